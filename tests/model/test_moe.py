"""Tests of refimpl.model.moe: routing (hash and score), SwiGLU clamp, combination, shared expert by revision.

docs/architecture.md §11; watch points §19.15-19.18, §19.24, §19.31.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.context import RunContext
from refimpl.config import Config
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.model import moe as moe_module
from refimpl.model.moe import ExpertWeights, GateWeights, MoEWeights, expert, expert_sum, moe, route
from refimpl.numerics import round_bf16
from refimpl.synthetic.quantize import quant_fp4_weight, quant_fp8_weight
from refimpl.oracle.trace import Trace

TINY = Config.tiny()                      # 8 experts, top-2, route_scale 1.5, swiglu_limit 10
E, A, L = TINY.n_routed_experts, TINY.n_activated_experts, TINY.swiglu_limit
C, F = 128, 128                           # hand-built expert sizes (multiples of 128: FP8 act-quant blocks)


def sqrt_softplus(z):
    z = np.asarray(z, dtype=np.float64)
    return np.sqrt(np.where(z > 20, z, np.log1p(np.exp(np.minimum(z, 20)))))


def silu(x):
    return x / (1 + np.exp(-x))


def fp8(w):
    return Fp8Matrix(*quant_fp8_weight(w))


def fp4(w):
    return Fp4Matrix(*quant_fp4_weight(w))


def make_expert(rng, gate_scale=1.0, up_scale=1.0, kind=fp4):
    return ExpertWeights(w1=kind(rng.standard_normal((F, C)) * gate_scale / math.sqrt(C)),
                         w2=kind(rng.standard_normal((C, F)) / math.sqrt(F)),
                         w3=kind(rng.standard_normal((F, C)) * up_scale / math.sqrt(C)))


def swiglu_ref(x, w, limit, weight=None, symmetric_gate=False):
    """Direct float64 SwiGLU: silu(min(g, L)) · clamp(u, -L, L) [· weight] @ w2ᵀ."""
    g, u = x @ w.w1.dequantize().T.astype(np.float64), x @ w.w3.dequantize().T.astype(np.float64)
    if limit > 0:
        u = np.clip(u, -limit, limit)
        g = np.clip(g, -limit, limit) if symmetric_gate else np.minimum(g, limit)
    h = silu(g) * u
    if weight is not None:
        h = weight * h
    return h @ w.w2.dequantize().T.astype(np.float64)


# ------------------------------------------------------------------------------------------------
# routing: hand-worked

def test_hash_routing_hand_worked():
    """Hash layers take ids = tid2eid[token]; weights from the gate's sqrt-softplus scores.

    docs/architecture.md §19.15.
    """
    tid2eid = np.array([[0, 1], [2, 3], [4, 5], [6, 7], [1, 0]])
    tokens = np.array([3, 0, 4, 3])
    x = np.random.default_rng(0).standard_normal((4, 8))
    gate = GateWeights(weight=np.zeros((E, 8)), bias=None, tid2eid=tid2eid)
    w, ids = route(x, tokens, 0, gate, TINY.layer(3), RunContext(TINY, "float64"))
    assert ids.tolist() == [[6, 7], [0, 1], [1, 0], [6, 7]]
    assert np.allclose(w, 0.75, rtol=1e-15)                     # equal scores sqrt(ln 2): 1.5 / 2 each
    # non-zero gate logits: z = x · e_k (identity weight), weights = sc[ids] / Σ · 1.5
    gate = GateWeights(weight=np.eye(E, 8), bias=None, tid2eid=tid2eid)
    x = np.zeros((1, 8))
    x[0, 6], x[0, 7] = 2.0, -1.0
    w, ids = route(x, np.array([3]), 0, gate, TINY.layer(3), RunContext(TINY, "float64"))
    s6, s7 = sqrt_softplus(2.0), sqrt_softplus(-1.0)
    assert ids.tolist() == [[6, 7]]
    assert np.allclose(w, [[1.5 * s6 / (s6 + s7), 1.5 * s7 / (s6 + s7)]], rtol=1e-14)


def test_score_routing_hand_worked_bias_selects_only():
    """Top-a of sc + bias chooses; weights are unbiased sc, renormalised, × 1.5.

    docs/architecture.md §19.16, §19.17.
    """
    gate = GateWeights(weight=np.eye(E), bias=np.zeros(E), tid2eid=None)
    x = np.array([[3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    w, ids = route(x, np.array([0]), 0, gate, TINY.layer(3), RunContext(TINY, "float64"))
    s = sqrt_softplus(x[0])
    assert ids.tolist() == [[0, 2]]
    assert np.allclose(w, [[1.5 * s[0] / (s[0] + s[2]), 1.5 * s[2] / (s[0] + s[2])]], rtol=1e-14)
    bias = np.zeros(E)
    bias[3] = 5.0                                               # pushes expert 3 (z = 0) to the top
    w, ids = route(x, np.array([0]), 0, GateWeights(np.eye(E), bias, None), TINY.layer(3), RunContext(TINY, "float64"))
    assert ids.tolist() == [[3, 0]]
    assert np.allclose(w, [[1.5 * s[3] / (s[3] + s[0]), 1.5 * s[0] / (s[3] + s[0])]], rtol=1e-14)
    assert math.isclose(s[3], math.sqrt(math.log(2)), rel_tol=1e-15)
    # softplus threshold 20: z > 20 returns z, so sc = sqrt(z)
    x = np.zeros((1, E))
    x[0, 1], x[0, 4] = 25.0, 36.0
    w, ids = route(x, np.array([0]), 0, GateWeights(np.eye(E), np.zeros(E), None), TINY.layer(3), RunContext(TINY, "float64"))
    assert ids.tolist() == [[4, 1]] and np.allclose(w, [[1.5 * 6 / 11, 1.5 * 5 / 11]], rtol=1e-15)


# ------------------------------------------------------------------------------------------------
# routing: properties

@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 12))
def test_hash_ids_depend_only_on_token(seed, T):
    """docs/architecture.md §19.15: hash ids = tid2eid[token] whatever x; weights sum to route_scale."""
    rng = np.random.default_rng(seed)
    tid2eid = np.stack([rng.permutation(E)[:A] for _ in range(20)])
    gate = GateWeights(weight=rng.standard_normal((E, 16)), bias=None, tid2eid=tid2eid)
    tokens = rng.integers(0, 20, T)
    w1, ids1 = route(rng.standard_normal((T, 16)) * 3, tokens, 0, gate, TINY.layer(3), RunContext(TINY, "float64"))
    w2, ids2 = route(rng.standard_normal((T, 16)) * 3, tokens, 0, gate, TINY.layer(3), RunContext(TINY, "float64"))
    assert np.array_equal(ids1, tid2eid[tokens]) and np.array_equal(ids2, tid2eid[tokens])
    assert np.allclose(w1.sum(-1), TINY.route_scale, rtol=1e-14) and np.all(w1 > 0)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 12), spread=st.floats(0.0, 3.0))
def test_bias_changes_choice_not_weights(seed, T, spread):
    """Weights = unbiased sc[ids] / Σ · 1.5; the same chosen set gets the same weights under any bias.

    docs/architecture.md §19.16.
    """
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((E, 16))
    x = rng.standard_normal((T, 16))
    b1, b2 = rng.standard_normal(E) * spread, rng.standard_normal(E) * spread
    w1, ids1 = route(x, np.zeros(T, int), 0, GateWeights(W, b1, None), TINY.layer(3), RunContext(TINY, "float64"))
    w2, ids2 = route(x, np.zeros(T, int), 0, GateWeights(W, b2, None), TINY.layer(3), RunContext(TINY, "float64"))
    sc = sqrt_softplus(x @ W.T)
    for w, ids, b in ((w1, ids1, b1), (w2, ids2, b2)):
        chosen = np.take_along_axis(sc, ids, -1)
        assert np.allclose(w, 1.5 * chosen / chosen.sum(-1, keepdims=True), rtol=1e-13)
        biased = sc + b
        worst_in = np.take_along_axis(biased, ids, -1).min(-1)
        masked = biased.copy()
        np.put_along_axis(masked, ids, -np.inf, -1)
        assert np.all(worst_in >= masked.max(-1))               # the biased top-a
        assert np.allclose(w.sum(-1), TINY.route_scale, rtol=1e-14)
    for r in range(T):
        if set(ids1[r].tolist()) == set(ids2[r].tolist()):
            d1, d2 = dict(zip(ids1[r].tolist(), w1[r])), dict(zip(ids2[r].tolist(), w2[r]))
            assert all(d1[k] == d2[k] for k in d1)


# ------------------------------------------------------------------------------------------------
# SwiGLU clamp

def test_swiglu_clamp_fires_beyond_limit():
    """docs/architecture.md §19.18: up ∈ [-10, 10], gate ≤ 10; inputs beyond ±10 must be clamped."""
    rng = np.random.default_rng(0)
    w = make_expert(rng, gate_scale=30.0, up_scale=30.0)        # |w1 x|, |w3 x| ~ 30
    x = rng.standard_normal((6, C))
    g = x @ w.w1.dequantize().T
    u = x @ w.w3.dequantize().T
    assert (g > L).any() and (g < -L).any() and (np.abs(u) > L).any()
    y = expert(x, w, "float64", swiglu_limit=L)
    assert np.allclose(y, swiglu_ref(x, w, L), rtol=1e-12, atol=1e-12)
    assert not np.allclose(y, swiglu_ref(x, w, 0.0), rtol=1e-3)     # the clamp really changed the result
    assert not np.allclose(y, swiglu_ref(x, w, L, symmetric_gate=True), rtol=1e-9, atol=1e-12)
    assert np.allclose(expert(x, w, "float64", swiglu_limit=0.0), swiglu_ref(x, w, 0.0), rtol=1e-12)


def test_swiglu_gate_has_no_lower_clamp():
    """Gate clamped only from above: a gate of about -40 gives silu(-40), not silu(-10).

    docs/architecture.md §19.18.
    """
    rng = np.random.default_rng(1)
    w = make_expert(rng)
    x = np.abs(rng.standard_normal((3, C)))                      # x >= 0 and w1 <= 0: every gate value < 0
    w1 = -np.abs(w.w1.dequantize())
    w1 = w1 * 40 / np.abs(x @ w1.T).mean()
    big = ExpertWeights(w1=fp4(w1), w2=w.w2, w3=w.w3)
    g, u = x @ big.w1.dequantize().T, x @ big.w3.dequantize().T
    assert (g < -L).all() and (np.abs(u) < L).all()
    y = expert(x, big, "float64", swiglu_limit=L)
    assert np.allclose(y, swiglu_ref(x, big, L), rtol=1e-12, atol=1e-15)
    assert np.allclose(y, swiglu_ref(x, big, 0.0), rtol=1e-12, atol=1e-15)            # nothing clamped
    assert not np.allclose(y, swiglu_ref(x, big, L, symmetric_gate=True), rtol=1e-3, atol=0)


def test_routing_weight_applied_before_w2_mirror():
    """W·h enters the FP8 activation quantization of w2 (differs from scaling the output).

    docs/architecture.md §19.17.
    """
    rng = np.random.default_rng(2)
    w = make_expert(rng)
    x = round_bf16(rng.standard_normal((4, C)))
    wt = np.array([[0.3], [0.77], [1.1], [0.123]], dtype=np.float32)
    inside = expert(x, w, "mirror", swiglu_limit=L, weights=wt)
    outside = wt * expert(x, w, "mirror", swiglu_limit=L)
    assert not np.array_equal(inside, outside)
    assert np.linalg.norm(inside - outside) < 0.05 * np.linalg.norm(outside)   # FP8-level difference
    x64 = x.astype(np.float64)
    assert np.allclose(expert(x64, w, "float64", swiglu_limit=L, weights=wt),
                       swiglu_ref(x64, w, L, weight=wt), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# the whole MoE sublayer

def make_moe(rng, shared_scale):
    gate = GateWeights(weight=rng.standard_normal((E, C)) / math.sqrt(C), bias=rng.standard_normal(E) * 0.05,
                       tid2eid=None)
    experts = tuple(make_expert(rng) for _ in range(E))
    shared = make_expert(rng, gate_scale=shared_scale, up_scale=shared_scale, kind=fp8)
    return MoEWeights(gate=gate, experts=experts, shared=shared)


def moe_ref(x, tokens, w, limit_shared):
    """y_t = Σ_a weight_ta · expert_{id_ta}(x_t) + shared(x_t), float64."""
    flat = x.reshape(-1, C)
    weights, ids = route(flat, tokens.reshape(-1), 0, w.gate, TINY.layer(3), RunContext(TINY, "float64"))
    y = np.zeros_like(flat)
    for t in range(len(flat)):
        for a in range(A):
            y[t] += swiglu_ref(flat[t:t + 1], w.experts[ids[t, a]], L, weight=weights[t, a])[0]
    return (y + swiglu_ref(flat, w.shared, limit_shared)).reshape(x.shape)


def test_moe_shared_expert_clamp_only_in_current_revision():
    """The shared expert is clamped (10) in "current", unclamped in "initial".

    docs/architecture.md §11, §18, §19.18.
    """
    rng = np.random.default_rng(3)
    w = make_moe(rng, shared_scale=30.0)
    x = rng.standard_normal((1, 5, C))
    tokens = np.arange(5)[None]
    cur = moe(x, tokens, 0, w, TINY.layer(3), RunContext(TINY, "float64"))
    ini = moe(x, tokens, 0, w, TINY.layer(3), RunContext(TINY, "float64", revision="initial"))
    assert np.allclose(cur, moe_ref(x, tokens, w, L), rtol=1e-11, atol=1e-11)
    assert np.allclose(ini, moe_ref(x, tokens, w, 0.0), rtol=1e-11, atol=1e-11)
    assert not np.allclose(cur, ini, rtol=1e-3)
    # small activations: no clamp fires, the two revisions agree
    w = make_moe(rng, shared_scale=1.0)
    assert np.allclose(moe(x, tokens, 0, w, TINY.layer(3), RunContext(TINY, "float64")),
                       moe(x, tokens, 0, w, TINY.layer(3), RunContext(TINY, "float64", revision="initial")), rtol=1e-13, atol=1e-14)


class ConstantExpert:
    """A stand-in routed or shared expert whose output is `value` in every element (a bf16 value)."""
    def __init__(self, value):
        self.value = value


def constant_experts(monkeypatch, module, name):
    """Replace module.<name> (model.moe.expert or kernels.moe._expert) with ConstantExpert's output,
    so that only expert_sum's accumulation is left: [T, c] of w.value (float32, or float64 for x float64)."""
    def stub(x, w, *args, **kwargs):
        return np.full(x.shape, w.value, np.float64 if x.dtype == np.float64 else np.float32)
    monkeypatch.setattr(module, name, stub)


def three_expert_case():
    """(flat, ids, weights, w): token 0 routed to experts [2, 3, 1] (outputs 2^-24, 2^-24, 1), token 1
    to [1, 3, 2] (the same set), shared expert output 0.

    Hand-worked, fp32: in ascending id, (((0 + 1) + 2^-24) + 2^-24) + 0 = 1 (each 1 + 2^-24 is a tie,
    rounded to even 1); in descending id or in slot order (token 0), 2^-24 + 2^-24 = 2^-23 first and
    1 + 2^-23 last, exact; the exact sum (float64) is 1 + 2^-23 too.
    """
    outputs = {0: 0.0, 1: 1.0, 2: 2.0 ** -24, 3: 2.0 ** -24}
    w = MoEWeights(gate=None, experts=tuple(ConstantExpert(outputs[e]) for e in range(4)),
                   shared=ConstantExpert(0.0))
    ids = np.array([[2, 3, 1], [1, 3, 2]], np.int64)
    return np.ones((2, C), np.float32), ids, np.ones(ids.shape, np.float32), w


@pytest.mark.parametrize("prec", ["mirror", "float32", "float64"])
def test_routed_experts_are_added_in_ascending_id_hand_worked(monkeypatch, prec):
    """docs/architecture.md §19.31: fp32 over the routed experts in ascending id, the shared one last.

    With two experts per token the order cannot matter (0 + a + b commutes); three can."""
    constant_experts(monkeypatch, moe_module, "expert")
    flat, ids, weights, w = three_expert_case()
    y = expert_sum.spec(flat.astype(np.float64) if prec == "float64" else flat, ids, weights, w, TINY, prec,
                        "current")
    expected = 1.0 + 2.0 ** -23 if prec == "float64" else 1.0
    assert y.dtype == (np.float64 if prec == "float64" else np.float32)
    assert np.all(y == expected)


def spread_routing(rng, T, a, n_experts=E):
    """ids [T, a] (distinct, random order) and routing weights spread over 2^-26..2^2 (float32): expert
    outputs (bf16, 8 bits) further apart than fp32's 24 bits, so that partial sums round."""
    ids = np.stack([rng.choice(n_experts, a, replace=False) for _ in range(T)]).astype(np.int64)
    weights = (2.0 ** rng.uniform(-26, 2, (T, a))).astype(np.float32)
    return ids, weights


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), a=st.integers(3, 6))
def test_expert_sum_adds_three_to_six_experts_in_ascending_id(seed, a):
    """docs/architecture.md §19.31 with up to Flash's 6 experts per token and routing weights spread
    over 2^28: each token's fp32 sum, expert by expert in ascending id, then the shared expert. (The
    order changes 0-10% of these outputs; the tiny model's 2 per token cannot show it.)"""
    rng = np.random.default_rng(seed)
    w = make_moe(rng, shared_scale=1.0)
    T = 12
    flat = round_bf16(rng.standard_normal((T, C)) * 2)
    ids, weights = spread_routing(rng, T, a)
    y = expert_sum.spec(flat, ids, weights, w, TINY, "mirror", "current")
    for t in range(T):
        acc = np.zeros(C, np.float32)
        for k in np.argsort(ids[t]):                             # this token's experts, ascending id
            acc += expert(flat[t:t + 1], w.experts[ids[t, k]], "mirror", swiglu_limit=L,
                          weights=weights[t:t + 1, k:k + 1])[0]
        acc += expert(flat[t:t + 1], w.shared, "mirror", swiglu_limit=L)[0]
        assert np.array_equal(y[t], acc), t


def test_moe_trace_ids_and_weights(tiny_model):
    """Layers 0..2 route by tid2eid[token]; every layer's weights sum to 1.5.

    docs/architecture.md §19.15 on the tiny model.
    """
    model = tiny_model("float64")
    toks = np.random.default_rng(9).integers(0, TINY.vocab_size, 30)
    t = Trace(("layers.*.ffn.expert_*", "layers.*.ffn.gate_scores"))
    model.forward(toks, trace=t)
    for layer in range(TINY.n_layers):
        ids = t.tensors[f"layers.{layer}.ffn.expert_ids"]
        w = t.tensors[f"layers.{layer}.ffn.expert_weights"]
        assert ids.shape == (30, A) and np.allclose(w.sum(-1), 1.5, rtol=1e-12)
        gate = model.weights.layers[layer].ffn.gate
        if layer < TINY.n_hash_layers:
            assert gate.bias is None and np.array_equal(ids, np.asarray(gate.tid2eid)[toks])
            assert f"layers.{layer}.ffn.gate_scores" not in t.tensors       # no selection, no scores
        else:
            assert gate.tid2eid is None and gate.bias is not None
            sc = t.tensors[f"layers.{layer}.ffn.gate_scores"]                # the biased scores top-a ran on
            assert sc.shape == (30, TINY.n_routed_experts)
            chosen = np.zeros(sc.shape, bool)
            np.put_along_axis(chosen, ids.astype(np.int64), True, axis=-1)
            assert np.all(np.where(chosen, sc, np.inf).min(-1) >= np.where(chosen, -np.inf, sc).max(-1))


def test_nonfinite_router_bias_is_named_not_silently_chosen():
    """The bias only chooses: an Inf in it would pick expert 3 for every token (checked, as site gate_scores)."""
    from refimpl.oracle.trace import NonFiniteError
    E = TINY.n_routed_experts
    bias = np.zeros(E, np.float32)
    bias[3] = np.inf
    x = np.random.default_rng(0).standard_normal((2, E))
    with pytest.raises(NonFiniteError, match=r"site 'layers\.4\.ffn\.gate_scores' \(layer 4\)"):
        route(x, np.array([0, 1]), 0, GateWeights(np.eye(E), bias, None), TINY.layer(4), RunContext(TINY, "float64"))
