"""The `refimpl` command, run in-process as a user would."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from refimpl.cli.main import main


def test_make_checkpoint_and_inspect(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["make-checkpoint", "tiny", str(out), "--seed", "3"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tensors" in text and "experts" in text
    # an existing directory is refused (nothing is overwritten by accident)
    assert main(["make-checkpoint", "tiny", str(out)]) != 0


def test_inspect_reports_an_invalid_checkpoint(tmp_path, tiny_ckpt, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    cfg["compress_ratios"] = cfg["compress_ratios"][:5] + [0]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 1
    assert "unexpected tensor" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["float64", "float32", "mirror"])
def test_trace_writes_the_stable_sites(tiny_ckpt, tmp_path, precision):
    out = tmp_path / "t.safetensors"
    assert main(["trace", str(tiny_ckpt), "--tokens", "0,15,27", "--precision", precision, "--out", str(out)]) == 0
    t = load_file(str(out))
    assert t["logits"].shape == (3, 1280)
    for i in range(6):
        assert t[f"layers.{i}.out"].shape == (3, 4, 256)
    from safetensors import safe_open
    with safe_open(str(out), "np") as f:
        meta = json.loads(f.metadata()["refimpl"])
    assert meta["tokens"] == [0, 15, 27] and meta["precision"] == precision and meta["layout"] == "official"


def test_trace_chunked_equals_one_shot(tiny_ckpt, tmp_path):
    a, b = tmp_path / "a.st", tmp_path / "b.st"
    toks = ",".join(str(i * 7 % 1280) for i in range(10))
    common = ["--tokens", toks, "--precision", "mirror", "--layout", "canonical"]
    assert main(["trace", str(tiny_ckpt), *common, "--out", str(a)]) == 0
    assert main(["trace", str(tiny_ckpt), *common, "--chunks", "3,2,1,4", "--out", str(b)]) == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    assert np.array_equal(ta["logits"], tb["logits"])
    assert np.array_equal(ta["layers.5.out"], tb["layers.5.out"])
    from safetensors import safe_open
    with safe_open(str(b), "np") as f:
        assert json.loads(f.metadata()["refimpl"])["layout"] == "canonical"
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2", "--layout", "dense", "--out", str(a)]) == 2   # usage


def test_trace_bad_input_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "x.st"
    assert main(["trace", str(tiny_ckpt), "--tokens", "0,99999", "--out", str(out)]) == 1   # a refused input
    assert "outside the vocabulary" in capsys.readouterr().err
    assert not out.exists()
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2,3", "--max-seq-len", "2", "--out", str(out)]) == 1
    assert "max_seq_len" in capsys.readouterr().err


def test_generate_streams_tokens(tiny_ckpt, capsys):
    assert main(["generate", str(tiny_ckpt), "--tokens", "0,5,9", "--max-new-tokens", "3"]) == 0
    cap = capsys.readouterr()
    assert "3 tokens" in cap.err and cap.out.strip()


def test_encode_prints_exactly_the_prompt(tmp_path, capsys):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    assert main(["encode", str(f)]) == 0
    assert capsys.readouterr().out == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert main(["encode", str(f), "--thinking"]) == 0
    assert capsys.readouterr().out.endswith("<｜Assistant｜><think>")


def test_parse_prints_json(tmp_path, capsys):
    f = tmp_path / "c.txt"
    f.write_text("I think so</think>Paris.<｜end▁of▁sentence｜>")
    assert main(["parse", str(f), "--thinking"]) == 0
    msg = json.loads(capsys.readouterr().out)
    assert msg["content"] == "Paris." and msg["reasoning_content"] == "I think so"


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "reproduces every decoded token: yes" in out
    assert (tmp_path / "tiny" / "demo_trace.safetensors").exists()
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "2"]) == 0   # reuses it
    assert "reused" in capsys.readouterr().out
