"""refimpl: a readable, exact NumPy reference implementation of DeepSeek V4 Flash.

The contract: given the official checkpoint format and token ids, refimpl computes what the
official inference code (deepseek-ai/DeepSeek-V4-Flash, `inference/model.py`) computes, in three
precision modes (`float64` exact math, `float32`, `mirror` = rounds where the official code rounds),
with every sub-operation traceable by name. It is an oracle, not a fast engine.
"""
from refimpl.config import Config, ConfigError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "__version__"]
