"""The golden gradient traces (golden/gradients/): what the manifest says, reproduced, a backward bug named
against them, a changed stored gradient refused (docs/gradients.md, "The golden gradient traces")."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import refimpl.grad.attention as attention_grad
from refimpl.config import Config
from refimpl.oracle import golden
from refimpl.oracle.gradients import (compare_gradients, load_grad_trace, run_grad_trace, save_grad_trace)

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
TINY = Config.tiny()
MTP = "grad-mtp-prefill-17"                 # the quicker of the two (about 3 s to recompute)


def quiet(*_):
    pass


def entries():
    manifest = golden.read_manifest(GOLDEN)
    return manifest, {d["name"]: golden.GoldenGradient.from_dict(d, len(manifest["tokens"]))
                      for d in manifest["gradients"]}


def test_the_set_holds_what_the_manifest_says():
    manifest, grads = entries()
    assert {g.head for g in grads.values()} == {"main", "mtp"}
    W, M = TINY.window_size, max(TINY.compress_ratios)
    assert {g.length for g in grads.values()} == {W + 1, M + 1}        # across the window's edge, a ratio-16 block
    params = golden.parameter_gradients(TINY)
    size = 0
    for name, g in grads.items():
        path = GOLDEN / golden.gradient_file(name)
        size += path.stat().st_size
        t = load_grad_trace(path)
        assert t.meta["head"] == g.head and t.meta["golden_rows"] == list(g.rows)
        assert t.meta["tokens"] == manifest["tokens"][:g.length]
        assert {n for n in t.tensors if n in params} == set(g.params) and len(g.params) > 50
        for n in g.params:                                             # parameters: whole, small
            assert t.tensors[n].size <= golden.GRAD_PARAM_MAX
        sites = [n for n in t.tensors if n not in params]
        assert ("grad.logits" if g.head == "main" else "grad.mtp.logits") in sites
        assert "grad.layers.0.attn.q" in sites and "grad.embed" in sites
        for n in sites:                                                # activations: the stored rows only
            want = [r for r in g.rows if r < g.length - (1 if n.startswith(("grad.layers.6.", "grad.mtp.")) else 0)]
            if not n.endswith(".compressed_kv"):
                assert t.tensors[n].shape[0] == len(want), n
            assert t.tensors[n].dtype == np.float64
        assert any(np.abs(t.tensors[n]).max() > 0 for n in sites)      # rows that a loss reaches
    assert size < 1.5e6                                                # about 1.1 MB


def test_verify_recomputes_the_gradient_trace():
    assert golden.verify(GOLDEN, inputs=[MTP], progress=quiet) == []


def test_a_whole_gradient_trace_is_cut_to_the_golden_rows_and_a_missing_sink_is_named(tiny_model, monkeypatch):
    """A user's whole gradient trace against the golden one: compare cuts it to the stored rows; correct passes
    (every stored gradient compared), the sink left out of the attention backward is named at the sink's gradient."""
    _, grads = entries()
    g = grads[MTP]
    model = tiny_model("float64", kernels="numpy")
    ref = GOLDEN / golden.gradient_file(MTP)
    tokens = load_grad_trace(ref).meta["tokens"]
    mine = run_grad_trace(model, tokens, head=g.head)
    report = compare_gradients(golden.GradTrace("mine", *mine[::-1]), ref)
    assert report.ok and not report.only_b and len(report.rows) == len(load_file(str(ref)))
    orig = attention_grad.sparse_attention_backward

    def missing_sink(do, q, kv, attn_sink, topk_idxs, softmax_scale):
        return orig(do, q, kv, np.full_like(attn_sink, -np.inf), topk_idxs, softmax_scale)
    monkeypatch.setattr(attention_grad, "sparse_attention_backward", missing_sink)
    tensors, meta = run_grad_trace(model, tokens, head=g.head)
    report = compare_gradients(golden.GradTrace("planted", meta, tensors), ref)
    assert report.first_failure["name"] == "grad.mtp.0.attn.attn_sink"      # the MTP block: the first the loss meets


def test_a_changed_stored_gradient_fails_verify(tmp_path):
    """A stored gradient changed by 1e-6 of its scale (its file's hash updated, so verify reaches the numbers)."""
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    name = golden.gradient_file(MTP)
    t = load_grad_trace(copy / name)
    x = t.tensors["grad.layers.3.attn.q"].copy()
    x.flat[7] += 1e-6 * np.abs(x).max()
    save_grad_trace(copy / name, dict(t.tensors, **{"grad.layers.3.attn.q": x}), t.meta)
    manifest = json.loads((copy / "manifest.json").read_text())
    with pytest.raises(golden.GoldenError, match="SHA-256 differs"):
        golden.verify(copy, inputs=[MTP], progress=quiet)
    manifest["files"][name] = golden.sha256_file(copy / name)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    failures = golden.verify(copy, inputs=[MTP], progress=quiet)
    assert len(failures) == 1 and "grad.layers.3.attn.q" in failures[0] and MTP in failures[0], failures


def test_a_gradient_entry_is_checked_in_the_manifest(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["gradients"][0]["head"] = "both"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(golden.GoldenError, match="'head' must be"):
        golden.read_manifest(copy)
    with pytest.raises(golden.GoldenError, match="float64 only"):
        golden.verify(GOLDEN, inputs=[MTP], precisions=["mirror"], progress=quiet)


@pytest.mark.slow
def test_verify_recomputes_every_gradient_trace():
    _, grads = entries()
    assert golden.verify(GOLDEN, inputs=sorted(grads), progress=quiet) == []
