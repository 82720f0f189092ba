"""Each backward of refimpl/grad/ against central finite differences of the spec's forward, on drawn inputs.

For a forward f and a drawn cotangent w, the scalar L = Σ w ⊙ f(inputs) has the directional
derivative Σ backward(w)[x] ⊙ u along a drawn direction u of each input x; the central difference
of L must agree within refimpl.grad.check's RTOL / ATOL (float64). Where the forward has a
selection or a clamp, the drawn inputs keep a margin of many steps from it (near-ties avoided).
"""
import numpy as np
from hypothesis import assume, given, settings, strategies as st

from refimpl.config import Config, Layer
from refimpl.context import RunContext
from refimpl.grad.attention import sparse_attention_backward
from refimpl.grad.check import ATOL, RTOL, STEP
from refimpl.grad.compressor import compress_backward
from refimpl.grad.hyperconn import (hc_head_backward, hc_post_backward, hc_pre_backward, sinkhorn_steps,
                                    split_sinkhorn_backward)
from refimpl.grad.linear import linear_backward
from refimpl.grad.moe import expert_backward, route_backward
from refimpl.grad.norm import head_rms_norm_backward, rms_norm_backward
from refimpl.grad.params import Dense
from refimpl.grad.probe import Probe
from refimpl.grad.rope import apply_rope_backward
from refimpl.grad.hyperconn import hc_pre_forward
from refimpl.model.attention import sparse_attention
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.model.hyperconn import HyperConnWeights, hc_head, hc_post, split_sinkhorn
from refimpl.model.moe import ExpertWeights, expert
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.model.rope import apply_rope, layer_rope_table

TINY = Config.tiny()
seeds = st.integers(0, 2**32 - 1)


def assert_directional(f, grads: dict, inputs: dict, rng, *, step=STEP):
    """f(**inputs) -> scalar; grads[name]: its gradient at inputs. Checks every input along a drawn direction."""
    for name, x in inputs.items():
        u = rng.standard_normal(np.shape(x))
        plus, minus = dict(inputs), dict(inputs)
        plus[name], minus[name] = x + step * u, x - step * u
        f_plus, f_minus = f(**plus), f(**minus)
        fd = (f_plus - f_minus) / (2 * step)
        an = float(np.sum(grads[name] * u))
        # the float64 evaluation of f is itself off by a few units of roundoff, which the difference divides
        # by the step: a small step (1e-7 beside the clamp) makes that term larger than ATOL (seed 5472)
        roundoff = 16 * 2.0 ** -52 * max(abs(f_plus), abs(f_minus)) / step
        assert abs(fd - an) <= RTOL * max(abs(fd), abs(an)) + ATOL + roundoff, (name, fd, an)


def test_assert_directional_catches_a_wrong_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(5)
    assert_directional(lambda x: float(np.sum(x ** 3)), {"x": 3 * x ** 2}, {"x": x}, rng)
    try:
        assert_directional(lambda x: float(np.sum(x ** 3)), {"x": 2 * x ** 2}, {"x": x}, rng)
    except AssertionError:
        return
    raise AssertionError("a wrong gradient passed")


@given(seeds, st.integers(1, 4), st.integers(1, 9), st.integers(1, 9))
def test_linear_backward(seed, rows, n_in, n_out):
    rng = np.random.default_rng(seed)
    x, w, cot = rng.standard_normal((rows, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal((rows, n_out))
    dx, dw = linear_backward(cot, x, w)
    assert_directional(lambda x, w: float(np.sum(cot * (x @ w.T))), {"x": dx, "w": dw}, {"x": x, "w": w}, rng)


@given(seeds, st.integers(1, 3), st.integers(2, 16), st.floats(1e-2, 1e2))
def test_rms_norm_backward(seed, rows, c, scale):
    rng = np.random.default_rng(seed)
    x, w, cot = rng.standard_normal((rows, c)) * scale, rng.standard_normal(c), rng.standard_normal((rows, c))
    dx, dw = rms_norm_backward(cot, x, w, eps=1e-6)
    f = lambda x, w: float(np.sum(cot * rms_norm(x, w, eps=1e-6, prec="float64")))   # noqa: E731
    # the step follows the smallest row's RMS, the scale of rms_norm's curvature (a step of 1e-5 against a row
    # of RMS 0.003 drawn at scale 1 left a truncation error of 1.5e-6, over RTOL: seed 268435457, 2 x 2)
    rms = float(np.sqrt(np.mean(x * x, axis=1)).min())
    assert_directional(f, {"x": dx, "w": dw}, {"x": x, "w": w}, rng, step=STEP * min(scale, rms))


@given(seeds, st.integers(1, 3), st.integers(1, 4))
def test_head_rms_norm_backward(seed, s, h):
    rng = np.random.default_rng(seed)
    q, cot = rng.standard_normal((1, s, h, 8)), rng.standard_normal((1, s, h, 8))
    dq = head_rms_norm_backward(cot, q, eps=1e-6)
    assert_directional(lambda q: float(np.sum(cot * head_rms_norm(q, eps=1e-6, prec="float64"))), {"q": dq}, {"q": q},
                       rng)


@given(seeds, st.integers(1, 6), st.booleans(), st.sampled_from([0, 3]))
def test_rope_backward_is_the_adjoint(seed, s, inverse, layer):
    """<R x, y> = <x, Rᵀ y> for the rotation R of any position, heads or not, inverse or not."""
    rng = np.random.default_rng(seed)
    table = layer_rope_table(np.arange(s) * 7, TINY, layer, "float64")
    for shape in [(1, s, TINY.head_dim), (1, s, 2, TINY.head_dim)]:
        x, y = rng.standard_normal(shape), rng.standard_normal(shape)
        lhs = np.sum(apply_rope(x, table, "float64", inverse=inverse) * y)
        rhs = np.sum(x * apply_rope_backward(y, table, inverse=inverse))
        assert abs(lhs - rhs) <= 1e-12 * np.sum(np.abs(x) * np.abs(y))


@given(seeds, st.integers(1, 4), st.integers(1, 30), st.floats(0.0, 0.5))
def test_split_sinkhorn_backward_through_every_iteration(seed, n, iters, eps):
    rng = np.random.default_rng(seed)
    mixes = rng.standard_normal((2, (2 + n) * n)) * 2
    scale, base = rng.standard_normal(3), rng.standard_normal((2 + n) * n)
    wp, wq, wc = rng.standard_normal((2, n)), rng.standard_normal((2, n)), rng.standard_normal((2, n, n))

    def f(mixes, scale, base):
        pre, post, comb = split_sinkhorn(mixes, scale, base, n=n, iters=iters, eps=eps, prec="float64")
        return float(np.sum(wp * pre) + np.sum(wq * post) + np.sum(wc * comb))
    dm, ds, db = split_sinkhorn_backward(wp, wq, wc, mixes, scale, base, n=n, iters=iters, eps=eps)
    assert_directional(f, {"mixes": dm, "scale": ds, "base": db}, {"mixes": mixes, "scale": scale, "base": base}, rng)


def test_sinkhorn_steps_reproduce_the_spec():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 4, 4))
    _, steps = sinkhorn_steps(logits, iters=20, eps=1e-6)
    m = np.concatenate([np.zeros((3, 8)), logits.reshape(3, 16)], axis=-1)
    _, _, comb = split_sinkhorn(m, np.ones(3), np.zeros(24), n=4, iters=20, eps=1e-6, prec="float64")
    assert np.array_equal(steps[-1][2], comb)
    assert len(steps) == 1 + 2 * 19                     # a column step, then 19 (row, column) pairs


def _ctx(**changes):
    return RunContext(TINY.replace(**changes), "float64", kernels="numpy")


@given(seeds, st.integers(1, 4), st.integers(1, 3), st.integers(1, 20))
@settings(max_examples=15)
def test_hc_pre_and_hc_post_backward(seed, n, s, iters):
    rng = np.random.default_rng(seed)
    c = 8
    ctx = _ctx(hc_mult=n, hc_sinkhorn_iters=iters)
    h, res = rng.standard_normal((1, s, n, c)), rng.standard_normal((1, s, n, c))
    w = dict(fn=rng.standard_normal(((2 + n) * n, n * c)) * 0.3, base=rng.standard_normal((2 + n) * n),
             scale=rng.standard_normal(3))
    cx, cpost, ccomb, cy = (rng.standard_normal(a) for a in [(1, s, c), (1, s, n), (1, s, n, n), (1, s, n, c)])

    def f(h, fn, base, scale):
        x, post, comb, _ = hc_pre_forward(h, HyperConnWeights(fn, base, scale), "hc", ctx, Probe())
        return float(np.sum(cx * x) + np.sum(cpost * post) + np.sum(ccomb * comb))
    _, _, _, cache = hc_pre_forward(h, HyperConnWeights(**w), "hc", ctx, Probe())
    dh, _, g = hc_pre_backward(cx, cpost, ccomb, cache, HyperConnWeights(**w), ctx.cfg)
    assert_directional(f, {"h": dh, **g}, {"h": h, **w}, rng)

    x, post, comb = rng.standard_normal((1, s, c)), rng.standard_normal((1, s, n)), rng.random((1, s, n, n))
    dx, dres, dpost, dcomb = hc_post_backward(cy, x, res, post, comb)
    f = lambda x, res, post, comb: float(np.sum(cy * hc_post(x, res, post, comb, ctx)))   # noqa: E731
    assert_directional(f, {"x": dx, "res": dres, "post": dpost, "comb": dcomb},
                       {"x": x, "res": res, "post": post, "comb": comb}, rng)


@given(seeds, st.integers(1, 4), st.integers(1, 3))
@settings(max_examples=15)
def test_hc_head_backward(seed, n, s):
    rng = np.random.default_rng(seed)
    c, ctx = 8, _ctx(hc_mult=n)
    h, cot = rng.standard_normal((1, s, n, c)), rng.standard_normal((1, s, c))
    w = dict(fn=rng.standard_normal((n, n * c)) * 0.3, base=rng.standard_normal(n), scale=rng.standard_normal(1))
    dh, g = hc_head_backward(cot, h, HyperConnWeights(**w), ctx.cfg)
    f = lambda h, fn, base, scale: float(np.sum(cot * hc_head(h, HyperConnWeights(fn, base, scale), ctx)))  # noqa: E731
    assert_directional(f, {"h": dh, **g}, {"h": h, **w}, rng)


@given(seeds, st.integers(1, 4), st.integers(1, 3), st.integers(1, 9), st.booleans(), st.floats(-5, 5))
def test_sparse_attention_backward_with_the_sink(seed, s, h, n, pad, sink_level):
    """-1 padded index sets, repeated rows across queries; the sink's gradient and its share of the denominator."""
    rng = np.random.default_rng(seed)
    d, scale = 8, 8 ** -0.5
    q, kv, do = rng.standard_normal((1, s, h, d)), rng.standard_normal((1, n, d)), rng.standard_normal((1, s, h, d))
    sink = rng.standard_normal(h) + sink_level
    k = min(n, 4)
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(s)])[None]
    if pad and k > 1:
        idx[..., -1] = -1
    dq, dkv, dsink = sparse_attention_backward(do, q, kv, sink, idx, scale)
    f = lambda q, kv, sink: float(np.sum(do * sparse_attention(q, kv, sink, idx, scale, "float64")))   # noqa: E731
    assert_directional(f, {"q": dq, "kv": dkv, "sink": dsink}, {"q": q, "kv": kv, "sink": sink}, rng)


@given(seeds, st.sampled_from([(2, 4), (3, 16)]), st.integers(1, 40), st.sampled_from([64, 128]), st.booleans())
@settings(max_examples=15)
def test_compressor_backward_overlap_and_incomplete_groups(seed, layer_ratio, s, d, rotate):
    """Ratio 4 pools overlapping blocks (block 0's previous half is padding); tokens after the last complete
    block get no gradient; the indexer's Hadamard rotation (rotate) is its own transpose."""
    layer_id, m = layer_ratio
    cfg = TINY
    ctx = RunContext(cfg, "float64", kernels="numpy")
    layer = cfg.layer(layer_id)
    assert layer.compress_ratio == m
    o, c = (2 if layer.overlap else 1), 12
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, s, c))
    w = dict(wkv=rng.standard_normal((o * d, c)) * 0.5, wgate=rng.standard_normal((o * d, c)) * 0.5,
             ape=rng.standard_normal((m, o * d)), norm=rng.standard_normal(d))
    cot = rng.standard_normal((1, s // m, d))
    state = CompressorState.empty(1, cfg, layer_id, head_dim=d, prec="float64")

    def f(x, wkv, wgate, ape, norm):
        e, _ = compress(x, 0, state, CompressorWeights(wkv, wgate, ape, norm), layer, ctx, head_dim=d, rotate=rotate)
        return float(np.sum(cot * e))
    dx, g = compress_backward(cot, x, CompressorWeights(**w), layer, cfg, head_dim=d, rotate=rotate)
    assert not dx[:, (s // m) * m:].any()                                   # the incomplete group: no entry yet
    assert_directional(f, {"x": dx, **g}, {"x": x, **w}, rng)


@given(seeds, st.integers(1, 6), st.integers(2, 6), st.data())
def test_route_backward_with_the_selection_fixed(seed, rows, e, data):
    rng = np.random.default_rng(seed)
    a = data.draw(st.integers(1, e))
    cfg = TINY.replace(n_routed_experts=e, n_activated_experts=a)
    x, gw = rng.standard_normal((1, rows, 8)), rng.standard_normal((e, 8))
    ids = np.stack([rng.choice(e, a, replace=False) for _ in range(rows)])[None]
    cot = rng.standard_normal((1, rows, a))

    def f(x, gw):                                       # route's weights at fixed ids (refimpl/model/moe.py)
        sc = np.sqrt(np.logaddexp(0, x @ gw.T))
        picked = np.take_along_axis(sc, ids, axis=-1)
        return float(np.sum(cot * picked / picked.sum(-1, keepdims=True) * cfg.route_scale))
    dx, dgw = route_backward(cot, x, ids, gw, cfg)
    assert_directional(f, {"x": dx, "gw": dgw}, {"x": x, "gw": gw}, rng)


@given(seeds, st.integers(1, 5), st.sampled_from([0.0, 1.5, 10.0]), st.booleans())
def test_expert_backward_with_the_clamp(seed, rows, limit, weighted):
    """Inputs far beyond the clamp on both sides: the subgradient is 0 outside [-L, L] (up) and above L (gate)."""
    rng = np.random.default_rng(seed)
    c, f_ = 6, 5
    x = rng.standard_normal((rows, c))
    w = {k: rng.standard_normal(sh) for k, sh in (("w1", (f_, c)), ("w2", (c, f_)), ("w3", (f_, c)))}
    weights = rng.random((rows, 1)) + 0.1 if weighted else None
    cot = rng.standard_normal((rows, c))
    gate, up = x @ w["w1"].T, x @ w["w3"].T
    if limit:                                           # a near-tie: a step could cross the clamp's edge
        assume(np.all(np.abs(np.abs(up) - limit) > 1e-4) and np.all(np.abs(gate - limit) > 1e-4))

    def f(x, w1, w2, w3):
        ex = ExpertWeights(Dense(w1), Dense(w2), Dense(w3))
        return float(np.sum(cot * expert(x, ex, "float64", swiglu_limit=limit, weights=weights)))
    dx, dweights, g = expert_backward(cot, x, ExpertWeights(*(Dense(w[k]) for k in ("w1", "w2", "w3"))),
                                      swiglu_limit=limit, weights=weights)
    assert_directional(f, {"x": dx, **g}, {"x": x, **w}, rng, step=1e-7)
    if weighted:
        ex = ExpertWeights(*(Dense(w[k]) for k in ("w1", "w2", "w3")))
        fw = lambda weights: float(np.sum(cot * expert(x, ex, "float64", swiglu_limit=limit, weights=weights)))  # noqa: E731
        assert_directional(fw, {"weights": dweights[:, None]}, {"weights": weights}, rng)
