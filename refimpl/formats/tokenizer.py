"""Tokenizer: text <-> token ids, over the `tokenizers` library and a checkpoint's tokenizer.json.

The official pipeline encodes messages to a string with `encoding.encode_messages` (which writes
the BOS text itself) and then calls `tokenizer.encode(string)` (official: G:L125, L133); so
`Tokenizer.encode` never adds BOS/EOS, whatever post-processor tokenizer.json carries, and
`decode` keeps special tokens, making decode(encode(text)) == text.

Tokenizing is bounded (`encode(text, max_tokens=)`): it costs about 200 bytes of memory per byte of
normalized text, so a text that cannot give at most max_tokens tokens is refused before the
library tokenizes it, by lower bounds on its token count (each with a factor 2 to spare):
- each token stands for at most S bytes of text, S the longest vocabulary string of at most
  LONG_TOKEN_BYTES bytes; the text of a longer token (a 1 MB added token) counts once per
  occurrence. A text of more than 2 x max_tokens x S bytes outside those is refused;
- a normalizer can expand text (a Replace of "a" by 2,000 characters made a 5 KB prompt take
  1.6 GB): where tokenizer.json has one, the text is normalized in pieces small enough for the
  most it can write for one character (`normalizer_growth`, from its spec) and refused once the
  normalized text passes the same bound. One that can write more than MAX_GROWTH is refused.
A Rust panic in the library (a pre-tokenizer regex that backtracks without end) is a
TokenizerError, like any other failure; the library's own report of it on stderr is dropped.

The small BPE tokenizer that synthetic checkpoints carry is trained in `refimpl.synthetic.tokenizer`.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import numbers
import os
import re
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import tokenizers

from refimpl.formats.encoding import BOS, EOS
from refimpl.formats.files import StrictJSONError, parse_json, read_json, read_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
MODEL_MAX_LENGTH = 1048576                      # official tokenizer_config.json
MAX_TOKENIZER_BYTES = 64 << 20                  # the official tokenizer.json is 7.8 MB
MAX_CONFIG_BYTES = 1 << 20                      # tokenizer_config.json: a few KB
LONG_TOKEN_BYTES = 256                          # longer tokens are counted where they occur (module docstring)
MAX_GROWTH = 1 << 16                            # characters a normalizer may write for one
NORMALIZE_PIECE = 1 << 20                       # characters of normalized text made at once while measuring


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
            parse_json(text)              # the library's reader keeps the last of two equal vocabulary keys
            tok = _library(lambda: tokenizers.Tokenizer.from_str(text), "reading it")
        except StrictJSONError as err:
            raise TokenizerError(f"{path / TOKENIZER_FILE}: {err}") from None
        except (Exception, RecursionError) as err:   # the library raises a bare Exception on bad files
            raise TokenizerError(f"{path / TOKENIZER_FILE}: not a tokenizer file ({str(err)[:200]})") from None
        return cls(tok, bos_token=_token_string(config, "bos_token"),
                   eos_token=_token_string(config, "eos_token"))

    def encode(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added (the encoder writes BOS as text).

        max_tokens: refuse, before tokenizing, a text that cannot give at most that many tokens
        (the bounds of the module docstring): a 50 MB prompt would take gigabytes only to be refused.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if (bad := _SURROGATE.search(text)) is not None:
            raise TokenizerError(f"text has a lone surrogate {bad.group()!r} at character {bad.start()} "
                                 "(not valid Unicode)")
        if max_tokens is not None:
            self._check_fits(text, max_tokens)
        return _library(lambda: self.tok.encode(text, add_special_tokens=False).ids, "tokenizing this text")

    def _check_fits(self, text: str, max_tokens: int) -> None:
        """Refuse a text that cannot give at most max_tokens tokens, without tokenizing it."""
        short, long = self._token_lengths
        parts = long.split(text) if long else [text]          # the text outside the long tokens
        most = 2 * max_tokens * short
        n = sum(len(p.encode("utf-8")) for p in parts)
        if n > most or len(parts) - 1 > max_tokens:
            raise TokenizerError(f"text of {len(text.encode('utf-8'))} bytes is far more than {max_tokens} tokens "
                                 f"can hold (refused above {most} bytes, before tokenizing)")
        if self.tok.normalizer is None or (growth := self.normalizer_growth) <= 1:
            return
        if growth > MAX_GROWTH:
            raise TokenizerError(f"{TOKENIZER_FILE}: its normalizer can write {growth} characters for one, more than "
                                 f"the {MAX_GROWTH} refimpl can bound while tokenizing")
        step, n = max(1, NORMALIZE_PIECE // growth), 0
        for part in parts:
            for i in range(0, len(part), step):
                piece = part[i:i + step]
                n += len(_library(lambda: self.tok.normalizer.normalize_str(piece), "normalizing this text")
                         .encode("utf-8"))
                if n > most:
                    raise TokenizerError(f"text of {len(text.encode('utf-8'))} bytes normalizes to more than "
                                         f"{most} bytes ({TOKENIZER_FILE}'s normalizer writes up to {growth} "
                                         f"characters for one), far more than {max_tokens} tokens can hold "
                                         "(refused before tokenizing)")

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included."""
        ids, v = list(ids), self.vocab_size
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise TokenizerError(f"token ids must be integers, got {i!r}")
            if not 0 <= i < v:      # the library decodes an id past the vocabulary as "" and fails below 0
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {v})")
        ids = [int(i) for i in ids]
        return _library(lambda: self.tok.decode(ids, skip_special_tokens=False), "decoding these ids")

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a tokenizer whose ids are not exactly the model's [0, vocab_size), each with a token.

        With ids missing a generated id may have no text (generation failed midway); with more, a
        prompt may give an id the model has no embedding for.
        """
        ids = set(self.tok.get_vocab(with_added_tokens=True).values())
        if (top := max(ids, default=-1)) >= vocab_size:
            raise TokenizerError(f"{TOKENIZER_FILE} has token id {top}, outside the model's vocabulary "
                                 f"(config vocab_size = {vocab_size})")
        if len(ids) < vocab_size:
            missing = min(set(range(vocab_size)) - ids)
            raise TokenizerError(f"{TOKENIZER_FILE} has no token for {vocab_size - len(ids)} of the model's "
                                 f"{vocab_size} ids (config vocab_size), the first {missing}: a generated id "
                                 "could have no text")

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
    def _token_lengths(self) -> tuple[int, re.Pattern | None]:
        """(S, a pattern matching the text of every longer token): S is the longest vocabulary string of
        at most LONG_TOKEN_BYTES bytes, in UTF-8 (a byte-level token writes one character of 1 or 2 UTF-8
        bytes per byte it stands for, so it stands for at most that many bytes of text)."""
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        short, long = 1, set()
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            n = len(token.encode("utf-8"))
            if n <= LONG_TOKEN_BYTES:
                short = max(short, n)
            else:                          # an added token is its text; a model token's text is its decoding
                long.add(token if token in added else
                         _library(lambda: self.tok.decode([i], skip_special_tokens=False), "decoding its vocabulary"))
        long.discard("")
        if not long:
            return short, None
        return short, re.compile("|".join(re.escape(t) for t in sorted(long, key=len, reverse=True)))

    @functools.cached_property
    def normalizer_growth(self) -> int:
        """The most characters the normalizer of tokenizer.json writes for one character (an upper bound; 1: none)."""
        if self.tok.normalizer is None:
            return 1
        return _growth(json.loads(self.tok.normalizer.__getstate__()))

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


# ---------------------------------------------------------------- the library's failures and growth

T = TypeVar("T")


def _library(call: Callable[[], T], doing: str) -> T:
    """call() into the tokenizers library: a Rust panic there becomes a TokenizerError.

    A panic (Onig's "retry-limit-in-match over" on a regex that backtracks without end) raises
    pyo3's PanicException, a BaseException, after Rust has printed a report on stderr; the report
    is held back so that the error is one line, and anything else written meanwhile is let through.
    """
    with _stderr_held() as report:
        try:
            return call()
        except BaseException as e:
            if type(e).__name__ != "PanicException":
                raise
            report.drop = True
            raise TokenizerError(f"{TOKENIZER_FILE}: the tokenizers library failed {doing} "
                                 f"({str(e).strip()[:200]})") from None


class _Held:
    drop = False                   # set: what was written to stderr is not written out


@contextmanager
def _stderr_held():
    """Send file descriptor 2 to a temporary file for the block, then write out what it holds unless
    the block sets `drop`. Where stderr cannot be redirected, the block runs as is."""
    held = _Held()
    try:
        sys.stderr.flush()
        saved, spool = os.dup(2), tempfile.TemporaryFile()
    except (OSError, ValueError, AttributeError):
        yield held
        return
    try:
        os.dup2(spool.fileno(), 2)
        yield held
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        spool.seek(0)
        out = b"" if held.drop else spool.read()
        while out:
            out = out[os.write(2, out):]
        spool.close()


_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
UNICODE_GROWTH = 18         # the longest Unicode decomposition: U+FDFA (NFKD) is 18 characters


def _growth(spec: dict) -> int:
    """An upper bound on the characters a normalizer (its tokenizer.json spec) writes for one character."""
    kind = spec.get("type")
    if kind == "Sequence":
        return math.prod(_growth(s) for s in spec.get("normalizers", []))
    if kind in ("Strip", "StripAccents", "Nmt"):
        return 1                   # they remove characters or replace one by one
    if kind in _UNICODE_FORMS:
        return UNICODE_GROWTH
    if kind == "Lowercase":
        return 3                   # a lowercase mapping is at most 3 characters
    if kind == "ByteLevel":
        return 4                   # one character per UTF-8 byte
    if kind == "BertNormalizer":   # spaces around CJK, then accents stripped (NFD), then lowercase
        return (3 if spec.get("handle_chinese_chars") else 1) * UNICODE_GROWTH * 3
    if kind == "Prepend":
        return 1 + len(spec.get("prepend", ""))
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), len(spec.get("content", ""))
        if pattern.get("String"):  # each match of m characters becomes content
            return max(1, math.ceil(content / len(pattern["String"])))
        return 1 + 2 * content     # a regex may match nothing: content before and after each character
    if kind == "Precompiled":      # SentencePiece's map: a trie, then its replacement strings
        try:
            raw = base64.b64decode(spec["precompiled_charsmap"])
            (trie,) = struct.unpack_from("<I", raw)
            return max(1, *(len(r.decode("utf-8", "replace")) for r in raw[4 + trie:].split(b"\0")))
        except (KeyError, TypeError, ValueError, struct.error):
            pass
    # unknown: whatever it writes beyond its input comes from its spec
    return 1 + len(json.dumps(spec))
