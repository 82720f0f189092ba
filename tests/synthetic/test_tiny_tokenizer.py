"""Tests of refimpl.synthetic.tokenizer: the tiny BPE tokenizer of synthetic checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.formats.encoding import SPECIAL_TOKENS
from refimpl.synthetic.tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("vocab_size", [len(SPECIAL_TOKENS) + 256, 1024, 2048, 4096])
def test_build_tiny_tokenizer_vocab_size_exact(vocab_size):
    tok = build_tiny_tokenizer(vocab_size)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert max(tok.get_vocab(with_added_tokens=True).values()) == vocab_size - 1   # ids are 0..v-1


@pytest.mark.parametrize("vocab_size", [10, len(SPECIAL_TOKENS) + 255, 1 << 20, 1024.0])
def test_build_tiny_tokenizer_bad_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size)


def test_build_tiny_tokenizer_deterministic():
    assert build_tiny_tokenizer(1024).to_str() == build_tiny_tokenizer(1024).to_str()
    # another process (other hash seeds) gives the same file
    code = "from refimpl.synthetic.tokenizer import build_tiny_tokenizer; print(build_tiny_tokenizer(1024).to_str())"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.rstrip("\n") == build_tiny_tokenizer(1024).to_str()
