"""`refimpl trace --grad` and `refimpl compare` on gradient traces, end to end, and the backward benchmark's report."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl.cli.main import main
from refimpl.oracle.gradients import GradTraceError, compare_gradients, load_grad_trace, save_grad_trace

TOKENS = "5,6,7,8,9,10,11,12,13,14,15,16,17,18"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grad_trace(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("grad") / "ref.safetensors"
    assert main(["trace", str(tiny_ckpt), "--tokens", TOKENS, "--grad", "main",
                 "--sites", "grad.layers.*,grad.embed,grad.logits,grad.final.x", "--out", str(out)]) == 0
    return out


def test_the_names_a_trace_can_hold_are_the_names_backward_gives(tiny_model):
    from refimpl.grad import backward
    from refimpl.oracle.gradients import gradient_names
    model = tiny_model("float64", kernels="numpy")
    g = backward(model, [3, 4, 5], [4, 5, 6], mtp_targets=[5, 6])
    assert sorted(gradient_names(model.cfg)) == sorted([*g.sites, *(f"grad.{k}" for k in g.params)])


def test_trace_grad_writes_a_gradient_trace(grad_trace, capsys):
    t = load_grad_trace(grad_trace)
    assert t.meta["kind"] == "gradients" and t.meta["head"] == "main" and t.meta["precision"] == "float64"
    assert t.meta["targets"] == [int(x) for x in TOKENS.split(",")][1:] + [-1]
    assert "grad.layers.0.attn.q" in t.tensors and "grad.layers.3.attn.wq_a.weight" in t.tensors
    assert "grad.head.weight" not in t.tensors                       # not asked for
    assert t.tensors["grad.layers.0.attn.q"].shape == (14, 8, 128) and t.tensors["grad.embed"].dtype == np.float64
    assert main(["compare", str(grad_trace), str(grad_trace)]) == 0
    assert "OK: every gradient within tolerance" in capsys.readouterr().out


def test_compare_names_the_first_gradient_out_of_tolerance(grad_trace, tmp_path, capsys):
    t = load_grad_trace(grad_trace)
    bad = dict(t.tensors)
    bad["grad.layers.2.attn.kv"] = bad["grad.layers.2.attn.kv"] * (1 + 1e-6)      # made here ...
    bad["grad.layers.1.out"] = bad["grad.layers.1.out"] * 1.5                    # ... and inherited later
    path = tmp_path / "bad.safetensors"
    save_grad_trace(path, bad, t.meta)
    assert main(["compare", str(path), str(grad_trace)]) == 1
    out = capsys.readouterr().out
    assert "FIRST GRADIENT OUT OF TOLERANCE: grad.layers.2.attn.kv" in out
    assert main(["compare", str(path), str(grad_trace), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_failure"]["name"] == "grad.layers.2.attn.kv" and not report["ok"]
    r = compare_gradients(path, grad_trace)
    assert [x["name"] for x in r.rows if not x["ok"]] == ["grad.layers.2.attn.kv", "grad.layers.1.out"]


@pytest.mark.parametrize("args, code, message", [
    (["--grad", "main", "--precision", "mirror"], 2, "float64 only"),
    (["--targets", "1,2"], 2, "needs --grad"),
    (["--grad", "main", "--chunks", "1,13"], 2, "not with --grad"),
    (["--grad", "main", "--targets", "1,2"], 1, "must be 14 integers"),
    (["--grad", "mtp", "--targets", "1,2"], 1, "must be 13 integers"),
    (["--grad", "main", "--sites", "grad.nothing*"], 1, "match no gradient"),
    (["--grad", "sideways"], 2, "invalid choice"),
])
def test_trace_grad_bad_input(tiny_ckpt, tmp_path, capsys, args, code, message):
    out = tmp_path / "g.safetensors"
    assert main(["trace", str(tiny_ckpt), "--tokens", TOKENS, *args, "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_compare_refuses_a_gradient_trace_against_a_forward_trace(grad_trace, tiny_ckpt, tmp_path, capsys):
    fwd = tmp_path / "fwd.safetensors"
    assert main(["trace", str(tiny_ckpt), "--tokens", TOKENS, "--precision", "float64", "--out", str(fwd)]) == 0
    assert main(["compare", str(fwd), str(grad_trace)]) == 1
    assert "not a gradient trace" in capsys.readouterr().err
    assert main(["compare", str(grad_trace), str(grad_trace), "--partial"]) == 2
    with pytest.raises(GradTraceError, match="differ in 'tokens'"):
        t = load_grad_trace(grad_trace)
        other = tmp_path / "other.safetensors"
        save_grad_trace(other, t.tensors, {**t.meta, "tokens": [1, 2]})
        compare_gradients(other, grad_trace)


def test_the_benchmark_reports_positive_ratios(tiny_ckpt):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grad_backward.py"), "--ckpt", str(tiny_ckpt),
                        "--lengths", "4", "--repeat", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report["ratios"]) == {"backward_over_forward_4", "forward_and_backward_over_forward_4"}
    assert all(v > 0 for v in report["ratios"].values())
