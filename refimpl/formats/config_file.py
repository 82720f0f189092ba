"""Reading a checkpoint's configuration: its Hugging Face `config.json`, or the official `inference/config.json`.

Every key must be known and present; a missing key never silently takes a default (other
implementations shipped exactly that bug with `compress_rope_theta`, docs/architecture.md §19.2).
The key tables and the mapping to `Config` fields are in refimpl/config.py (`from_hf_dict`,
`from_inference_dict`); this module finds the file, reads it with a size limit and names the
file and key in every error.
"""
from __future__ import annotations

import os
from pathlib import Path

from refimpl.config import HF_KEYS, Config, ConfigError, from_hf_dict, from_inference_dict
from refimpl.formats.files import read_json

MAX_CONFIG_BYTES = 1 << 20                 # config.json is about 2 KB; a larger file is not one (a shard?)


def read_config(path: str | Path, config_class: type = Config, **overrides) -> Config:
    """The Config of a checkpoint dir (`config.json`, HF format, or `inference/config.json`), or of that file.

    config_class: a subclass of Config to make instead (a tool that admits more than the released configs).
    """
    path = Path(path)
    if path.is_dir():
        f = path / "config.json"
        if not f.exists() and (path / "inference" / "config.json").exists():
            f = path / "inference" / "config.json"
    else:
        f = path
    if not os.path.lexists(f):
        raise ConfigError(f"{f}: no config.json in the checkpoint directory")
    raw = read_json(f, limit=MAX_CONFIG_BYTES, what="a config.json", regular=True, error=ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    hf = "hidden_size" in raw or "model_type" in raw
    fields = from_hf_dict(raw, f) if hf else from_inference_dict(raw, f)
    fields.update(overrides)
    try:
        return config_class(**fields)
    except ConfigError as e:
        if e.field in overrides:                        # the caller's value, not the file's
            raise
        key = HF_KEYS.get(e.field) if hf else None     # name the key as the file spells it
        where = f" (key {key!r})" if key and key != e.field else ""
        raise ConfigError(f"{f}: {e}{where}", field=e.field) from None
