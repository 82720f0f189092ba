"""Tokenizer: text <-> token ids, over the `tokenizers` library and a checkpoint's tokenizer.json.

The official pipeline encodes messages to a string with `encoding.encode_messages` (which writes
the BOS text itself) and then calls `tokenizer.encode(string)` (official: G:L125, L133); so
`Tokenizer.encode` never adds BOS/EOS, whatever post-processor tokenizer.json carries, and
`decode` keeps special tokens, making decode(encode(text)) == text.

The small BPE tokenizer that synthetic checkpoints carry is trained in `refimpl.synthetic.tokenizer`.
"""

from __future__ import annotations

import functools
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from refimpl.formats.encoding import BOS, EOS
from refimpl.formats.files import read_json, read_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
MODEL_MAX_LENGTH = 1048576                      # official tokenizer_config.json
MAX_TOKENIZER_BYTES = 64 << 20                  # the official tokenizer.json is 7.8 MB
MAX_CONFIG_BYTES = 1 << 20                      # tokenizer_config.json: a few KB


_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """Tokenizer files that cannot be read, or text or ids the tokenizer cannot take."""


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A tokenizer.json plus the BOS/EOS strings of tokenizer_config.json."""
    tok: tokenizers.Tokenizer
    bos_token: str = BOS
    eos_token: str = EOS

    def __post_init__(self):
        for name in ("bos_token", "eos_token"):
            if self.tok.token_to_id(getattr(self, name)) is None:
                raise ValueError(f"{name} {getattr(self, name)!r} is not in the vocabulary")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """Load <path>/tokenizer.json and the bos/eos strings of <path>/tokenizer_config.json."""
        path = Path(path)
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if not os.path.lexists(path / name):
                raise TokenizerError(f"{path}: no {name} (a tokenizer needs {TOKENIZER_FILE} and {CONFIG_FILE}; "
                                     "synthetic flash/pro checkpoints have none: copy the official files in, "
                                     "or give token ids)")
        config = read_json(path / CONFIG_FILE, limit=MAX_CONFIG_BYTES, what="a tokenizer_config.json",
                           regular=True, error=TokenizerError)
        if not isinstance(config, dict):
            raise TokenizerError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
        text = read_text(path / TOKENIZER_FILE, limit=MAX_TOKENIZER_BYTES, what="a tokenizer.json",
                         regular=True, error=TokenizerError)
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as err:          # the tokenizers library raises a bare Exception on bad files
            raise TokenizerError(f"{path / TOKENIZER_FILE}: not a tokenizer file ({str(err)[:200]})") from None
        return cls(tok, bos_token=_token_string(config, "bos_token"),
                   eos_token=_token_string(config, "eos_token"))

    def encode(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added (the encoder writes BOS as text).

        max_tokens: refuse, before tokenizing, a text too long to give at most that many tokens
        (more than 2 x max_tokens x the longest token's bytes): tokenizing costs about 200 bytes
        of memory per input byte, so a 50 MB prompt would take gigabytes only to be refused.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if (bad := _SURROGATE.search(text)) is not None:
            raise TokenizerError(f"text has a lone surrogate {bad.group()!r} at character {bad.start()} "
                                 "(not valid Unicode)")
        if max_tokens is not None:
            n, most = len(text.encode("utf-8")), 2 * max_tokens * self.max_token_bytes
            if n > most:
                raise TokenizerError(f"text of {n} bytes is far more than {max_tokens} tokens can hold "
                                     f"(refused above {most} bytes, before tokenizing)")
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included."""
        ids, v = list(ids), self.vocab_size
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise TokenizerError(f"token ids must be integers, got {i!r}")
            if not 0 <= i < v:      # the library decodes an id past the vocabulary as "" and fails below 0
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {v})")
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(int(token_id))

    @property
    def bos_id(self) -> int:
        return self.tok.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token stands for: its longest vocabulary string, in UTF-8.

        (A byte-level token is written with one character per byte, of 1 or 2 UTF-8 bytes.)
        """
        return max(len(t.encode("utf-8")) for t in self.tok.get_vocab(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _token_string(config: dict, key: str) -> str:
    """bos_token / eos_token of tokenizer_config.json: a string or an AddedToken dict."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{CONFIG_FILE}: `{key}` must be a string or {{'content': str}}, got {value!r}")
    return value
