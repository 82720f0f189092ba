"""inspect.py: summaries of any checkpoint, and the streaming NaN/Inf scan of its values."""
import numpy as np
import pytest

from refimpl.config import Config
from refimpl.formats.checkpoint import count_nonfinite
from refimpl.formats.inspect import format_summary, summarize
from refimpl.formats.weights import expected_tensors

TINY = Config.tiny()
NAN_BF16 = b"\xc0\x7f"                      # 0x7FC0 little-endian
INF_F32 = np.float32(np.inf)


def test_summarize(tiny_ckpt):
    s = summarize(tiny_ckpt)
    assert s["ok"] and s["problems"] == [] and s["tensors"] == s["expected"] == len(expected_tensors(TINY))
    assert sum(v["bytes"] for v in s["by_kind"].values()) == s["bytes"] == s["index_total_size"]
    assert sum(v["count"] for v in s["by_dtype"].values()) == s["tensors"]
    assert set(s["by_kind"]) == {"attention", "experts", "shared_expert", "router", "mhc", "norms",
                                 "embedding", "head", "mtp"}
    text = format_summary(s)
    assert "validation: OK" in text and "F8_E4M3" in text and "experts" in text


def test_summarize_reports_problems(tiny_ckpt):
    s = summarize(tiny_ckpt, TINY.replace(n_routed_experts=4, n_activated_experts=2))
    assert not s["ok"] and s["by_kind"]["unexpected"]["count"] == 6 * 4 * (TINY.n_layers + 1)
    assert "problem(s)" in format_summary(s, max_problems=3) and "more" in format_summary(s, max_problems=3)


def test_scan_reads_every_float_and_fp8_byte_but_no_fp4(tiny_ckpt):
    """The scan covers BF16, F32, FP8 e4m3 and the E8M0 scales; FP4 codes and int tables are never NaN."""
    s = summarize(tiny_ckpt)
    by = s["by_dtype"]
    read = sum(by[k]["bytes"] for k in ("BF16", "F32", "F8_E4M3", "F8_E8M0"))
    assert s["scan"]["bytes"] == read and s["scan"]["skipped_bytes"] == by["I8"]["bytes"] + by["I64"]["bytes"]
    assert s["scan"]["seconds"] >= 0
    assert "read for NaN/Inf in" in format_summary(s)


@pytest.mark.parametrize("tensor, index, value, words", [
    ("embed.weight", 5 * TINY.dim + 3, NAN_BF16, "1 NaN/Inf value(s) (BF16)"),
    ("norm.weight", 0, NAN_BF16, "1 NaN/Inf value(s) (BF16)"),
    ("head.weight", 17, b"\x80\x7f", "1 NaN/Inf value(s) (BF16)"),              # +Inf
    ("layers.3.hc_ffn_fn", 11, INF_F32, "1 NaN/Inf value(s) (F32)"),
    ("hc_head_base", 1, np.float32(np.nan), "1 NaN/Inf value(s) (F32)"),
    ("layers.1.attn.wq_a.weight", 100, b"\x7f", "1 FP8 e4m3 byte(s) are NaN (0x7F/0xFF)"),
    ("mtp.0.e_proj.weight", 0, b"\xff", "1 FP8 e4m3 byte(s) are NaN (0x7F/0xFF)"),
])
def test_inspect_finds_nan_and_inf_weights(patched_ckpt, tensor, index, value, words):
    s = summarize(patched_ckpt({tensor: {index: value}}))
    assert not s["ok"]
    assert s["problems"] == [f"tensor {tensor!r}: {words}"]
    assert f"tensor {tensor!r}" in format_summary(s)


def test_count_nonfinite_over_chunk_boundaries():
    """Chunks that split an item (a short read) are carried over, not misread."""
    x = np.array([1.0, np.nan, -np.inf, 2.0, np.inf, 0.0], np.float32)
    raw = x.tobytes()
    for cut in range(1, len(raw)):
        assert count_nonfinite([raw[:cut], raw[cut:]], "F32") == 3
    codes = bytes([0x00, 0x7F, 0x7E, 0xFF, 0xFE, 0x80])            # e4m3fn: only 0x7F and 0xFF are NaN
    assert count_nonfinite([codes], "F8_E4M3") == 2
    assert count_nonfinite([np.array([0x7F80, 0xFF80, 0x7FC1, 0x7F7F], np.uint16).tobytes()], "BF16") == 3


def test_tid2eid_out_of_range_is_a_problem(patched_ckpt):
    """-1 would silently pick the last expert, n_routed_experts would fail mid-forward."""
    a = TINY.n_activated_experts
    bad = patched_ckpt({"layers.1.ffn.gate.tid2eid": {7 * a: -1, 9 * a + 1: TINY.n_routed_experts}})
    s = summarize(bad)
    assert s["problems"] == ["tensor 'layers.1.ffn.gate.tid2eid': 2 expert id(s) outside "
                             "[0, n_routed_experts = 8), the first -1 for token id 7"]


# ---------------------------------------------------------------- issue 25: what inspect let pass

def _copy(tiny_ckpt, tmp_path):
    import shutil
    out = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, out)
    return out


def test_a_shard_file_is_not_a_checkpoint(tiny_ckpt):
    """summarize(shard) read the config beside it and said OK, although a checkpoint is a folder."""
    from refimpl.formats.checkpoint import CheckpointError
    shard = next(tiny_ckpt.glob("model-*.safetensors"))
    with pytest.raises(CheckpointError, match="is a file: a checkpoint is a folder"):
        summarize(shard)


@pytest.mark.parametrize("size, words", [
    (1024, "tokenizer: tokenizer.json has no token for 256 of the model's 1280 ids (config vocab_size), "
           "the first 1024: a generated id could have no text"),
    (1536, "tokenizer: tokenizer.json has token id 1535, outside the model's vocabulary (config vocab_size = 1280)"),
])
def test_a_tokenizer_that_is_not_the_model_vocabulary_is_a_problem(tiny_ckpt, tmp_path, size, words):
    """A smaller tokenizer passed inspect and failed mid-generation (issue 25)."""
    from refimpl.synthetic.tokenizer import build_tiny_tokenizer, write_tokenizer_files
    ck = _copy(tiny_ckpt, tmp_path)
    write_tokenizer_files(ck, build_tiny_tokenizer(size))
    s = summarize(ck)
    assert s["problems"] == [words] and "validation: 1 problem(s)" in format_summary(s)


def test_an_unreadable_tokenizer_is_a_problem(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path)
    (ck / "tokenizer.json").write_text('{"model": ')
    assert summarize(ck)["problems"][0].startswith("tokenizer: ")


@pytest.mark.parametrize("layers", [8, 64, 1024])
def test_a_config_implying_millions_of_tensors_is_refused_before_listing_them(tiny_ckpt, tmp_path, layers):
    """8 layers x 65,536 experts took 18 s and 2.4 GB, 64 layers ran out of memory (issue 25)."""
    import json
    import time
    import tracemalloc
    ck = _copy(tiny_ckpt, tmp_path)
    raw = json.loads((ck / "config.json").read_text())
    raw.update(num_hidden_layers=layers, n_routed_experts=1 << 16, compress_ratios=[0] * (layers + 1))
    (ck / "config.json").write_text(json.dumps(raw))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        s = summarize(ck)
        assert time.perf_counter() - t0 < 5 and tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    n = 6 * (layers + 1) << 16
    assert len(s["problems"]) == 1 and s["expected"] > n
    assert s["problems"][0].startswith(f"the config implies {s['expected']:,} tensors of ")
    assert "but the checkpoint holds 585 of 10.7 MiB: config.json does not describe these files" in s["problems"][0]
