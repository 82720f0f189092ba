"""refimpl: a readable, exact NumPy reference implementation of DeepSeek V4 Flash.

The contract: given the official checkpoint format and token ids, refimpl computes what the
official inference code (deepseek-ai/DeepSeek-V4-Flash, `inference/model.py`) computes, in three
precision modes (`float64` exact math, `float32`, `mirror` = rounds where the official code rounds),
with every sub-operation traceable by name. A position's result never depends on how many other
rows a call has; in float64 (and in mirror with layout="canonical") not on the chunking either,
while mirror's default official layout keeps the official code's own difference between prefill
and decode (docs/architecture.md §15). It is an oracle, not a fast engine.

    model = refimpl.load(ckpt, precision="mirror")      # memory-mapped; nothing dequantized yet
    logits = model.forward(tokens)                      # [s, v] for every position
    logits, state = model.prefill(tokens, state)        # from any position
    logits, state = model.decode(token, state)
"""
from refimpl.config import Config, ConfigError
from refimpl.generate import SamplingParams, generate
from refimpl.formats.weights import load
from refimpl.model.transformer import Model
from refimpl.oracle.trace import Trace
from refimpl._version import __version__

__all__ = ["Config", "ConfigError", "Model", "SamplingParams", "Trace", "generate", "load", "__version__"]
