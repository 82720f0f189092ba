"""Tests of refimpl.formats.tokenizer: the checkpoint files, text <-> ids (on the synthetic tiny tokenizer)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.formats.encoding import BOS, EOS, SPECIAL_TOKENS, USER, encode_messages
from refimpl.formats.tokenizer import Tokenizer, TokenizerError
from refimpl.synthetic.tokenizer import build_tiny_tokenizer, write_tokenizer_files

# the official tokenizer_config.json (docs/architecture.md §17), written out
AT = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
OFFICIAL_CONFIG = {
    "add_bos_token": False, "add_eos_token": False, "bos_token": {**AT, "content": BOS},
    "clean_up_tokenization_spaces": False, "eos_token": {**AT, "content": EOS}, "legacy": True,
    "model_max_length": 1048576, "pad_token": {**AT, "content": EOS}, "sp_model_kwargs": {},
    "unk_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer(build_tiny_tokenizer(1024))


def test_bos_eos_ids(tiny):
    assert (tiny.bos_id, tiny.eos_id) == (0, 1)
    assert (tiny.id_to_token(0), tiny.id_to_token(1)) == (BOS, EOS)
    assert [tiny.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tiny.vocab_size == 1024


def test_special_tokens_are_single_ids(tiny):
    for k, token in enumerate(SPECIAL_TOKENS):
        assert tiny.encode(token) == [k]
        ids = tiny.encode("ab" + token + "cd")
        assert ids.count(k) == 1 and tiny.decode(ids) == "ab" + token + "cd"


def test_no_automatic_bos_or_eos(tiny):
    assert tiny.encode("") == []
    ids = tiny.encode("hello world")
    assert ids and tiny.bos_id not in ids and tiny.eos_id not in ids
    assert tiny.encode(BOS + "hi")[0] == tiny.bos_id   # BOS only where the text has it


def test_encoded_prompt_roundtrip(tiny):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "答案", "reasoning_content": "推理"}]
    prompt = encode_messages(messages, thinking_mode="thinking")
    ids = tiny.encode(prompt)
    assert ids[0] == tiny.bos_id and ids[-1] == tiny.eos_id
    assert ids.count(tiny.token_to_id(USER)) == prompt.count(USER)
    assert tiny.decode(ids) == prompt


@settings(deadline=None, max_examples=200)
@given(text=st.text())
def test_decode_encode_roundtrip(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


@settings(deadline=None, max_examples=200)
@given(parts=st.lists(st.text(max_size=8) | st.sampled_from(SPECIAL_TOKENS), max_size=8))
def test_decode_encode_roundtrip_with_special_tokens(tiny, parts):
    text = "".join(parts)
    assert tiny.decode(tiny.encode(text)) == text


def test_write_and_load_checkpoint_files(tmp_path, tiny):
    write_tokenizer_files(tmp_path, tiny.tok)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == OFFICIAL_CONFIG and list(config) == list(OFFICIAL_CONFIG)
    assert "chat_template" not in config
    loaded = Tokenizer.from_checkpoint(tmp_path)
    assert (loaded.bos_token, loaded.eos_token) == (BOS, EOS)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 1024)
    text = "<｜User｜>print('hi')  # 中文<｜Assistant｜></think>"
    assert loaded.encode(text) == tiny.encode(text)
    write_tokenizer_files(tmp_path / "again", loaded)             # a Tokenizer is accepted too
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


def test_from_checkpoint_string_tokens(tmp_path, tiny):
    write_tokenizer_files(tmp_path, tiny.tok)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    assert Tokenizer.from_checkpoint(tmp_path).eos_id == 1


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_from_checkpoint_missing_file(tmp_path, tiny, missing):
    write_tokenizer_files(tmp_path, tiny.tok)
    (tmp_path / missing).unlink()
    with pytest.raises(TokenizerError, match=f"no {missing}"):
        Tokenizer.from_checkpoint(tmp_path)


def test_from_checkpoint_bad_config(tmp_path, tiny):
    write_tokenizer_files(tmp_path, tiny.tok)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": EOS}))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    with pytest.raises(ValueError, match="bos_token"):
        Tokenizer.from_checkpoint(tmp_path)


def test_encode_rejects_non_text(tiny):
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"{not json", "tokenizer.json: not a tokenizer file"),
    ("tokenizer.json", b'{"model": {"type": "BPE"}}', "tokenizer.json: not a tokenizer file"),
    ("tokenizer_config.json", b"[1", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", b'{"bos_token": "\xff"}',
     r"tokenizer_config.json: not UTF-8 text \(byte 0xff at offset 15\)"),
    ("tokenizer_config.json", b"[" * 100_000, "tokenizer_config.json: JSON nested more than 100 levels"),
    ("tokenizer.json", b"[" * 100_000, "tokenizer.json: not a tokenizer file"),
    ("tokenizer_config.json", b"[1]", "tokenizer_config.json: expected a JSON object, got list"),
])
def test_from_checkpoint_corrupt_files(tmp_path, tiny, name, content, message):
    write_tokenizer_files(tmp_path, tiny.tok)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_checkpoint(tmp_path)
    assert issubclass(TokenizerError, ValueError)


def test_encode_refuses_lone_surrogates(tiny):
    with pytest.raises(TokenizerError, match=r"lone surrogate '\\ud800' at character 1"):
        tiny.encode("a\ud800b")


@pytest.mark.parametrize("ids, message", [([5, 1024], "token id 1024 is outside the vocabulary"),
                                          ([-1], "token id -1 is outside"), ([1.7], "must be integers"),
                                          ([True], "must be integers")])
def test_decode_refuses_bad_ids(tiny, ids, message):
    with pytest.raises(TokenizerError, match=message):
        tiny.decode(ids)
    assert tiny.decode(np.array([5, 1023])) == tiny.decode([5, 1023])


# ---------------------------------------------------------------- issue 25: tokenizing is bounded, panics are errors

def _with(tok: Tokenizer, **parts) -> Tokenizer:
    """A copy of tok with these parts (normalizer=..., pre_tokenizer=...) replaced."""
    import tokenizers
    t = tokenizers.Tokenizer.from_str(tok.tok.to_str())
    for name, value in parts.items():
        setattr(t, name, value)
    return Tokenizer(t)


def test_an_expanding_normalizer_is_refused_before_tokenizing(tiny):
    """Replace("a", 2000 characters): a 5 KB prompt took 1.6 GB before refusal, 100 KB aborted (exit 134)."""
    import time
    from tokenizers import normalizers
    tok = _with(tiny, normalizer=normalizers.Replace("a", "x" * 2000))
    assert tok.normalizer_growth == 2000
    for n in (5_000, 100_000):
        t0 = time.perf_counter()
        with pytest.raises(TokenizerError, match=r"normalizes to more than \d+ bytes .* writes up to 2000 characters "
                                                 r"for one\), far more than 4096 tokens can hold \(refused before"):
            tok.encode("a" * n, max_tokens=4096)
        assert time.perf_counter() - t0 < 1
    assert tok.encode("b a b", max_tokens=4096) == tok.tok.encode("b a b", add_special_tokens=False).ids   # fits


def test_a_normalizer_beyond_what_can_be_bounded_is_refused(tiny):
    from tokenizers import normalizers
    tok = _with(tiny, normalizer=normalizers.Replace("a", "x" * 70_000))
    with pytest.raises(TokenizerError, match="its normalizer can write 70000 characters for one, more than the 65536"):
        tok.encode("b", max_tokens=4096)
    assert tok.encode("b") == [tok.token_to_id("b")]           # unbounded calls are the caller's choice


def test_a_long_added_token_counts_once_where_it_occurs(tiny):
    """A 1 MB added token widened the byte bound so that a 7 MB chat was tokenized (1.4 GB) before refusal."""
    import tokenizers
    t = tokenizers.Tokenizer.from_str(tiny.tok.to_str())
    long = "y" * (64 << 10)
    t.add_tokens([tokenizers.AddedToken(long)])
    tok = Tokenizer(t)
    with pytest.raises(TokenizerError, match="refused above 928 bytes, before tokenizing"):
        tok.encode("hello world " * 40_000, max_tokens=16)       # 480 KB of ordinary text
    assert tok.encode(long * 7, max_tokens=16) == [tok.token_to_id(long)] * 7


@settings(deadline=None, max_examples=50)
@given(text=st.text(max_size=40))
def test_normalizer_growth_bounds_what_each_normalizer_writes(text):
    from tokenizers import Regex, normalizers
    from refimpl.formats.tokenizer import _growth
    for n in (normalizers.NFKC(), normalizers.NFKD(), normalizers.NFD(), normalizers.Lowercase(),
              normalizers.BertNormalizer(), normalizers.Prepend("▁▁"), normalizers.Replace("ab", "xyz" * 5),
              normalizers.Replace(Regex("b*"), "--"), normalizers.ByteLevel(), normalizers.Strip(),
              normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])):
        growth = _growth(json.loads(n.__getstate__()))
        assert len(n.normalize_str(text)) <= growth * max(len(text), 1), n.__getstate__()
    assert len(normalizers.NFKD().normalize_str("\ufdfa")) == 18                 # the longest decomposition


def test_a_regex_that_backtracks_without_end_is_an_error_not_a_panic(tiny, capfd):
    """Onig's retry limit made the library panic: a Rust report on stderr and a PanicException traceback."""
    from tokenizers import Regex, pre_tokenizers
    tok = _with(tiny, pre_tokenizer=pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(a+)+$"), "isolated"),
                                                             pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    capfd.readouterr()
    with pytest.raises(TokenizerError, match=r"tokenizer.json: the tokenizers library failed tokenizing this text "
                                             r"\(Onig: Regex search error: retry-limit-in-match over\)"):
        tok.encode("a" * 40 + "b", max_tokens=4096)
    assert capfd.readouterr().err == ""                              # the panic's own report is held back
    assert tok.decode(tok.encode("ab", max_tokens=16)) == "ab"     # text that does not backtrack still works


def test_duplicate_keys_in_tokenizer_json_are_refused(tmp_path, tiny):
    """The library's reader keeps the last of two equal vocabulary keys, leaving an id without a token."""
    write_tokenizer_files(tmp_path, tiny.tok)
    text = (tmp_path / "tokenizer.json").read_text(encoding="utf-8")
    vocab_at = text.index('"vocab": {') + len('"vocab": {')
    (tmp_path / "tokenizer.json").write_text(text[:vocab_at] + '"x": 5, ' + text[vocab_at:], encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json: duplicate key 'x' in a JSON object"):
        Tokenizer.from_checkpoint(tmp_path)


def test_check_vocab(tiny):
    tiny.check_vocab(1024)
    with pytest.raises(TokenizerError, match="no token for 256 of the model's 1280 ids"):
        tiny.check_vocab(1280)
    with pytest.raises(TokenizerError, match="token id 1023, outside the model's vocabulary"):
        tiny.check_vocab(1000)
