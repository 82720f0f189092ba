"""Planted backward bugs, each caught: `compare_gradients` names the first gradient it touches.

The reference is refimpl's own backward; each bug replaces one backward function for the run of
the planted model (monkeypatch), as a training stack's kernel would be wrong. The loss is the main
head's, so the backward meets the last main layer (5) first; the names expected are those the
bug's own step produces, every later one inheriting the error.
"""
import fnmatch

import numpy as np
import pytest

import refimpl.grad.attention as attention_grad
import refimpl.grad.compressor as compressor_grad
import refimpl.grad.hyperconn as hyperconn_grad
import refimpl.grad.moe as moe_grad
from refimpl.grad import backward_from, cross_entropy, forward, params_of, run_context
from refimpl.oracle.gradients import GradTrace, backward_order, compare_gradients

TOKENS = list(range(40, 64))                        # 24 tokens: 6 CSA entries (ratio 4), 1 HCA entry (ratio 16)


def transposed_mix(dcomb, p, steps, _orig=hyperconn_grad.sinkhorn_backward):
    return _orig(np.swapaxes(dcomb, -1, -2), p, steps)              # comb[k, j] where comb[j, k] belongs


def missing_sink(do, q, kv, attn_sink, topk_idxs, softmax_scale, _orig=attention_grad.sparse_attention_backward):
    return _orig(do, q, kv, np.full_like(attn_sink, -np.inf), topk_idxs, softmax_scale)   # softmax without the sink


def dropped_overlap_row(dpool, s, layer, *, head_dim):
    b, n_full = dpool.shape[:2]
    m, d = layer.compress_ratio, head_dim
    if not layer.overlap:
        return compressor_grad.__dict__["_orig_unpool"](dpool, s, layer, head_dim=head_dim)
    dblk = np.zeros((b, n_full, m, 2 * d))
    dblk[..., d:] = dpool[:, :, m:]                                  # the previous block's half is never returned
    out = np.zeros((b, s, 2 * d))
    out[:, :n_full * m] = dblk.reshape(b, n_full * m, 2 * d)
    return out


def inverted_clamp(dh, gate, up, *, swiglu_limit, _orig=moe_grad.swiglu_backward):
    dgate, dup, act = _orig(dh, gate, up, swiglu_limit=swiglu_limit)
    if swiglu_limit <= 0:
        return dgate, dup, act
    L = swiglu_limit
    sg = 1 / (1 + np.exp(-np.minimum(gate, L)))
    g, u = np.minimum(gate, L), np.clip(up, -L, L)
    full_gate, full_up = dh * u * sg * (1 + g * (1 - sg)), dh * g * sg
    return (np.where(gate <= L, 0.0, full_gate), np.where(np.abs(up) <= L, 0.0, full_up), act)   # 1 outside, 0 inside


BUGS = {
    "transposed mix in the Sinkhorn backward": (hyperconn_grad, "sinkhorn_backward", transposed_mix,
                                                "grad.layers.5.hc_ffn_*"),
    "missing sink term": (attention_grad, "sparse_attention_backward", missing_sink, "grad.layers.5.attn.attn_sink"),
    "dropped overlap row": (compressor_grad, "unpool", dropped_overlap_row, "grad.layers.4.attn.compressor.*"),
    "inverted clamp subgradient": (moe_grad, "swiglu_backward", inverted_clamp, "grad.layers.5.ffn.experts.*"),
}

_REF = {}


def gradient_trace(model, name: str) -> GradTrace:
    """The main loss's gradients as an in-memory gradient trace (the forward, which no bug touches, made once)."""
    if "forward" not in _REF:
        P, ctx = params_of(model.weights, model.cfg), run_context(model.cfg)
        ids = np.array([TOKENS])
        tape = forward(P, ids, ctx, mtp=False)
        _REF["forward"] = (P, ctx, tape, cross_entropy(tape.logits, np.array([TOKENS[1:] + [-1]]))[1])
    P, ctx, tape, dlogits = _REF["forward"]
    params, sites = backward_from(tape, P, ctx, dlogits, None)
    tensors = {**{k: v[0] for k, v in sites.items()}, **{f"grad.{k}": v for k, v in params.items()}}
    return GradTrace(name, {"n_layers": model.cfg.n_layers, "tokens": TOKENS}, tensors)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_backward_bug_is_named_where_it_is_made(tiny_model, monkeypatch, bug):
    model = tiny_model("float64", kernels="numpy")
    if "ref" not in _REF:
        _REF["ref"] = gradient_trace(model, "reference")
    module, function, buggy, expected = BUGS[bug]
    monkeypatch.setattr(compressor_grad, "_orig_unpool", compressor_grad.unpool, raising=False)
    monkeypatch.setattr(module, function, buggy)
    report = compare_gradients(gradient_trace(model, bug), _REF["ref"])
    first = report.first_failure
    assert first is not None, f"{bug}: not caught"
    assert fnmatch.fnmatchcase(first["name"], expected), (bug, first)


def test_the_reference_agrees_with_itself_and_the_order_runs_from_the_loss(tiny_model):
    model = tiny_model("float64", kernels="numpy")
    if "ref" not in _REF:
        _REF["ref"] = gradient_trace(model, "reference")
    assert compare_gradients(_REF["ref"], _REF["ref"]).ok
    order = backward_order(_REF["ref"].tensors, model.cfg.n_layers)
    assert order[0] == "grad.mtp.0.norm.weight" and order[-1] == "grad.embed.weight"   # the MTP head first (0 here)
    assert order.index("grad.mtp.0.e_proj.weight") < order.index("grad.logits") < order.index("grad.layers.5.out")
    assert order.index("grad.layers.5.out") < order.index("grad.layers.5.hc_attn.out") < order.index("grad.layers.4.out")
    assert order.index("grad.layers.0.attn.q") < order.index("grad.layers.0.attn.wq_a.weight") < \
        order.index("grad.layers.0.hc_attn.pre")
