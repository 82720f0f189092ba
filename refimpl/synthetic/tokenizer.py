"""A small tokenizer for synthetic checkpoints: byte-level BPE trained on a built-in corpus.

`build_tiny_tokenizer(vocab_size)` gives exactly vocab_size ids: every `encoding.SPECIAL_TOKENS`
string is a special token, BOS = 0 and EOS = 1 as in the official tokenizer, and the same
vocab_size always gives the same tokenizer.json. `write_tokenizer_files` writes it with a
tokenizer_config.json shaped like the official one. Reading a checkpoint's tokenizer is
`refimpl.formats.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from refimpl.formats.files import write_text
from refimpl.formats.encoding import BOS, EOS, REASONING_EFFORT_MAX, SPECIAL_TOKENS, TOOLS_HEAD, TOOLS_TAIL
from refimpl.formats.tokenizer import CONFIG_FILE, MODEL_MAX_LENGTH, TOKENIZER_FILE, Tokenizer

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A reference implementation is read beside the \
official code, so clarity comes before speed. What's the weather in Beijing today? It is sunny \
with a temperature of 22 degrees and 45% humidity. Please summarise the following article in \
three sentences, then list the key dates. The model predicts the next token from the previous \
ones; attention mixes information across positions, and the experts transform each token.
You are a helpful assistant. Answer the user's question carefully and cite your sources.
Hello! How can I help you? The capital of France is Paris. Let me think about this step by step.
"""
_CHINESE = """\
你好，我是一个人工智能助手，很高兴为你服务。今天天气晴朗，气温二十二度，适合出门散步。
请把下面的文章概括成三句话，并列出其中的重要日期。模型根据前面的词预测下一个词。
北京是中国的首都，上海是重要的经济中心，广州和深圳位于南方。学习编程需要耐心和练习。
我们先分析问题，再给出答案。如果你有其他问题，欢迎继续提问。这个函数返回两个数的和。
"""
_CODE = '''\
def add(a: int, b: int) -> int:
    """Return the sum of two numbers."""
    return a + b

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i)

{"name": "get_weather", "arguments": {"location": "Beijing", "unit": "celsius"}, "ok": true}
x = np.zeros((4, 8), dtype=np.float32)  # [b, s]
'''


def tiny_corpus() -> list[str]:
    """Training text: fixed English/Chinese/code, prompt templates, and generated words/numbers."""
    lines = (_ENGLISH + _CHINESE + _CODE + TOOLS_HEAD + TOOLS_TAIL + REASONING_EFFORT_MAX).splitlines()
    # made-up words from syllables, in a fixed order: enough distinct pairs for a few thousand merges
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("", "n", "r", "s")
    syllables = [o + v + c for o, v, c in itertools.product(onsets, vowels, codas)]      # 280
    words = [a + b for a, b in itertools.product(syllables[::3], syllables[1::7])]
    lines += [" ".join(words[k:k + 12]) for k in range(0, len(words), 12)]
    lines += [" ".join(str(n * 7 % 1000) for n in range(k, k + 20)) for k in range(0, 1000, 20)]
    cjk = [chr(0x4E00 + (k * 37) % 0x51A6) for k in range(600)]       # 600 distinct CJK characters
    lines += ["".join(cjk[k:k + 30]) for k in range(0, len(cjk), 30)]
    return lines


def build_tiny_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE with exactly `vocab_size` ids: SPECIAL_TOKENS first (BOS 0, EOS 1), then 256 bytes."""
    n_min = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or vocab_size < n_min:
        raise ValueError(f"vocab_size must be an int >= {n_min} (special tokens + 256 bytes), got {vocab_size!r}")
    assert SPECIAL_TOKENS[:2] == (BOS, EOS)
    tok = tokenizers.Tokenizer(models.BPE())           # no unk token: every byte is in the alphabet
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r"\p{N}{1,3}"), "isolated"),        # digits in threes
        pre_tokenizers.Split(tokenizers.Regex(r"[\u4e00-\u9fa5\u3040-\u30ff]+"), "isolated"),  # CJK runs
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=[tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus(), trainer)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ValueError(f"the built-in corpus yields only {tok.get_vocab_size(with_added_tokens=True)} "
                         f"tokens, fewer than vocab_size={vocab_size}")
    return tok


def write_tokenizer_files(out_dir: str | Path, tok: tokenizers.Tokenizer | Tokenizer) -> None:
    """Write tokenizer.json and a tokenizer_config.json shaped like the official one."""
    if isinstance(tok, Tokenizer):
        tok = tok.tok
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / TOKENIZER_FILE, tok.to_str(pretty=True))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    config = {   # official tokenizer_config.json: same keys and order, no chat_template
        "add_bos_token": False, "add_eos_token": False, "bos_token": added(BOS),
        "clean_up_tokenization_spaces": False, "eos_token": added(EOS), "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH, "pad_token": added(EOS), "sp_model_kwargs": {},
        "unk_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}
    write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
