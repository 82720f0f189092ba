"""The command line on inputs that used to give silent wrong results: NaN weights, out-of-range
config values, dropped trace sites, coerced numbers. Each is now refused or complete."""
import json
import shutil

import pytest
from safetensors.numpy import load_file

from refimpl.cli.main import main


def test_trace_in_chunks_holds_the_sites_of_one_forward(tiny_ckpt, tmp_path):
    a, b = tmp_path / "a.st", tmp_path / "b.st"
    toks = "0,7,14,21,28,35,42,49,56"
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--precision", "float64", "--out", str(a)]) == 0
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--precision", "float64", "--chunks", "4,5",
                 "--out", str(b)]) == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(tb) == sorted(ta)
    assert {"layers.2.attn.indexer.topk", "layers.4.attn.indexer.scores", "mtp.logits", "layers.6.out"} <= set(tb)


def test_inspect_reports_nan_weights_and_the_scan_time(patched_ckpt, capsys):
    bad = patched_ckpt({"embed.weight": {3: b"\xc0\x7f"}, "layers.2.attn.wkv.weight": {0: b"\xff"}})
    assert main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "validation: 2 problem(s)" in out
    assert "tensor 'embed.weight': 1 NaN/Inf value(s) (BF16)" in out
    assert "tensor 'layers.2.attn.wkv.weight': 1 FP8 e4m3 byte(s) are NaN (0x7F/0xFF)" in out
    assert "read for NaN/Inf in" in out


def test_generate_on_nan_weights_is_a_one_line_error(patched_ckpt, capsys):
    bad = patched_ckpt({"layers.3.attn_norm.weight": {5: b"\xc0\x7f"}})
    assert main(["generate", str(bad), "--tokens", "0,5,9", "--max-new-tokens", "4"]) != 0
    cap = capsys.readouterr()
    assert cap.out == ""                                          # no garbage token stream
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "site 'layers.3.attn.q' (layer 3)" in lines[0]


@pytest.mark.parametrize("key, value, words", [
    ("rms_norm_eps", -1, "norm_eps = -1.0: must be > 0 and <= 1 (key 'rms_norm_eps')"),
    ("rope_theta", -10000, "rope_theta = -10000.0: must be > 1"),
    ("sliding_window", 100_000_000, "window_size = 100000000: must be between 1 and 8192 (key 'sliding_window')"),
    ("hc_sinkhorn_iters", 100_000_000, "hc_sinkhorn_iters = 100000000: must be between 1 and 1000"),
])
def test_out_of_range_config_values_are_refused(tiny_ckpt, tmp_path, capsys, key, value, words):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    raw = json.loads((ck / "config.json").read_text())
    raw[key] = value
    (ck / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "t.st"
    assert main(["trace", str(ck), "--tokens", "0,5", "--out", str(out)]) != 0
    assert words in capsys.readouterr().err and not out.exists()


def test_rope_factor_zero_is_refused(tiny_ckpt, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    raw = json.loads((ck / "config.json").read_text())
    raw["rope_scaling"]["factor"] = 0
    (ck / "config.json").write_text(json.dumps(raw))
    assert main(["generate", str(ck), "--tokens", "0,5"]) != 0
    assert "rope_factor = 0.0: must be >= 1 and <= 1e+06 (key 'rope_scaling.factor')" in capsys.readouterr().err


def test_infinite_temperature_is_refused(tiny_ckpt, capsys):
    """It used to sample uniformly (logits / inf = 0)."""
    assert main(["generate", str(tiny_ckpt), "--tokens", "0,5", "--temperature", "inf"]) != 0
    cap = capsys.readouterr()
    assert cap.out == "" and "argument --temperature: must be a finite decimal number >= 0 (0 = greedy), got 'inf'" \
        in cap.err
