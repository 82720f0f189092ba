"""Tests of refimpl.model.hyperconn: split + Sinkhorn, hc_pre / hc_post / hc_head (docs/architecture.md §7, §19.19-19.22)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.context import RunContext
from refimpl.config import Config
from refimpl.model.hyperconn import HyperConnWeights, hc_head, hc_post, hc_pre, split_sinkhorn
from refimpl.oracle.trace import Trace

TINY = Config.tiny()
EPS = 1e-6
N = 4


def sink(logits, iters, prec="float64"):
    """Sinkhorn of comb logits [.., 4, 4] alone (mixes = [0]*8 ++ logits, scale 1, base 0)."""
    logits = np.asarray(logits, dtype=np.float64)
    mixes = np.concatenate([np.zeros(logits.shape[:-2] + (2 * N,)), logits.reshape(*logits.shape[:-2], N * N)], -1)
    return split_sinkhorn(mixes, np.ones(3), np.zeros(2 * N + N * N), n=N, iters=iters, eps=EPS, prec=prec)


# ------------------------------------------------------------------------------------------------
# hand-worked

def test_split_layout_pre_post_comb_hand_worked():
    """docs/architecture.md §7: mixes [0:4] pre, [4:8] post, [8:24] comb row-major j·4+k; scale[0..2] per group."""
    base = np.zeros(24)
    base[:4] = [0.0, math.log(3), -math.log(3), 0.0]            # sigmoid: 0.5, 0.75, 0.25, 0.5
    base[4:8] = [0.0, math.log(3), 0.0, -math.log(3)]           # 2·sigmoid: 1, 1.5, 1, 0.5
    mixes = np.zeros(24)
    pre, post, comb = split_sinkhorn(mixes, np.array([1.0, 1.0, 1.0]), base, n=N, iters=20, eps=EPS, prec="float64")
    assert np.allclose(pre, [0.5 + EPS, 0.75 + EPS, 0.25 + EPS, 0.5 + EPS], rtol=1e-14)
    assert np.allclose(post, [1.0, 1.5, 1.0, 0.5], rtol=1e-14)
    assert np.allclose(comb, 0.25, atol=2e-6)                   # uniform logits: uniform doubly stochastic
    # the scales act per group: scale[0] on pre, scale[1] on post, scale[2] on comb
    mixes = np.zeros(24)
    mixes[0], mixes[4], mixes[8 + 1] = 1.0, 1.0, 1.0            # pre_0, post_0, comb[0, 1]
    pre, post, comb = split_sinkhorn(mixes, np.array([2.0, 3.0, 0.0]), np.zeros(24), n=N, iters=20, eps=EPS,
                                     prec="float64")
    assert math.isclose(pre[0], 1 / (1 + math.exp(-2.0)) + EPS, rel_tol=1e-14)
    assert math.isclose(post[0], 2 / (1 + math.exp(-3.0)), rel_tol=1e-14)
    assert np.allclose(comb, 0.25, atol=2e-6)                   # scale[2] = 0 kills the comb logit
    # comb[j, k] = mixes[8 + 4j + k]: a large logit at (j=0, k=1) lands in row 0, column 1
    mixes = np.zeros(24)
    mixes[8 + 0 * 4 + 1] = 8.0
    _, _, comb = split_sinkhorn(mixes, np.ones(3), np.zeros(24), n=N, iters=20, eps=EPS, prec="float64")
    assert np.unravel_index(np.argmax(comb), comb.shape) == (0, 1)


def test_sinkhorn_first_steps_hand_worked():
    """docs/architecture.md §19.19: row softmax + eps, then a column step; iters=1 stops there (no row step)."""
    L = np.array([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, -1.0]])
    e = np.exp(L - L.max(-1, keepdims=True))
    c = e / e.sum(-1, keepdims=True) + EPS
    c = c / (c.sum(0, keepdims=True) + EPS)
    _, _, comb = sink(L, iters=1)
    assert np.allclose(comb, c, rtol=1e-14, atol=0)
    c2 = c / (c.sum(1, keepdims=True) + EPS)
    c2 = c2 / (c2.sum(0, keepdims=True) + EPS)
    _, _, comb2 = sink(L, iters=2)
    assert np.allclose(comb2, c2, rtol=1e-14, atol=0)


def test_hc_pre_hand_worked():
    """X = Σ_j pre_j · stream_j with pre = sigmoid(...) + eps, NOT normalized to sum 1.

    docs/architecture.md §7 hc_pre.
    """
    c = TINY.dim
    h = np.broadcast_to((np.arange(N) + 1.0)[:, None], (N, c))[None, None].copy()   # stream j = j+1
    base = np.zeros(TINY.n_mix)
    base[:4] = [0.0, math.log(3), -math.log(3), 0.0]                                 # pre ≈ .5 .75 .25 .5
    w = HyperConnWeights(fn=np.zeros((TINY.n_mix, N * c)), base=base, scale=np.ones(3))
    x, post, comb = hc_pre(h, w, "hc", RunContext(TINY, "float64"))
    want = 0.5 * 1 + 0.75 * 2 + 0.25 * 3 + 0.5 * 4 + EPS * (1 + 2 + 3 + 4)          # = 4.75 + 1e-5
    assert x.shape == (1, 1, c) and np.allclose(x, want, rtol=1e-14)
    assert np.allclose(post, 1.0) and post.shape == (1, 1, N) and comb.shape == (1, 1, N, N)


def test_hc_pre_mixes_use_rms_over_all_flattened_streams():
    """docs/architecture.md §19.21: mixes = (v @ fnᵀ) · rsqrt(mean(v²) + eps) over the n·c flattened values."""
    rng = np.random.default_rng(0)
    c = TINY.dim
    h = rng.standard_normal((1, 2, N, c)) * np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    fn = np.zeros((TINY.n_mix, N * c))
    fn[0] = rng.standard_normal(N * c) / 32                      # only pre_0 has a non-zero mix
    w = HyperConnWeights(fn=fn, base=np.zeros(TINY.n_mix), scale=np.ones(3))
    x, _, _ = hc_pre(h, w, "hc", RunContext(TINY, "float64"))
    v = h.reshape(1, 2, N * c)
    m0 = (v @ fn[0]) / np.sqrt(np.mean(v * v, axis=-1) + TINY.norm_eps)                # [1, 2]
    pre0 = 1 / (1 + np.exp(-m0)) + EPS
    want = pre0[..., None] * h[:, :, 0] + (0.5 + EPS) * h[:, :, 1:].sum(axis=2)
    assert np.allclose(x, want, rtol=1e-12)


def test_hc_post_column_k_forms_stream_k():
    """docs/architecture.md §19.19: new stream k = post_k · x + Σ_j comb[j, k] · R_j (the transpose matters)."""
    x = np.array([[[0.0, 0.0, 1.0]]])                            # [b, s, c=3]
    R = np.array([[[[1.0, 0, 0], [0, 1.0, 0]]]])                 # [b, s, n=2, c]
    post = np.array([[[2.0, 0.5]]])
    comb = np.array([[[[0.9, 0.1], [0.3, 0.7]]]])                # [j, k]
    y = hc_post(x, R, post, comb, RunContext(TINY, "float64"))
    want = np.array([[[[0.9, 0.3, 2.0], [0.1, 0.7, 0.5]]]])
    assert np.allclose(y, want, rtol=1e-15, atol=1e-16)
    assert not np.allclose(y, [[[[0.9, 0.1, 2.0], [0.3, 0.7, 0.5]]]])   # the row-k reading is wrong


def test_hc_head_sigmoid_pre_no_sinkhorn():
    """docs/architecture.md §19.20: head pre = sigmoid(m · scale[0] + base) + eps; x = Σ pre_j stream_j."""
    c = TINY.dim
    h = np.broadcast_to((np.arange(N) + 1.0)[:, None], (N, c))[None, None].copy()
    w = HyperConnWeights(fn=np.zeros((N, N * c)), base=np.array([0.0, math.log(3), -math.log(3), 0.0]),
                         scale=np.array([0.7]))
    x = hc_head(h, w, RunContext(TINY, "float64"))
    assert np.allclose(x, 4.75 + EPS * 10, rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# properties

logits_st = st.integers(0, 2**32 - 1)


@settings(max_examples=40)
@given(seed=logits_st, bound=st.floats(0.1, 10.0))
def test_sinkhorn_nonnegative_columns_sum_to_one_rows_converge(seed, bound):
    """Comb >= 0; columns sum to 1 within ~eps (ends on a column step); row error shrinks.

    docs/architecture.md §7 (Sinkhorn).
    """
    L = np.random.default_rng(seed).uniform(-bound, bound, (3, N, N))
    errs = []
    for iters in (1, 2, 3, 5, 10, 20, 40):
        _, _, comb = sink(L, iters)
        assert np.all(comb > 0)
        col = comb.sum(axis=-2)
        assert np.all(col < 1)                                   # c / (c + eps) < 1
        if iters >= 10:
            assert np.max(np.abs(col - 1)) <= 2 * EPS
        errs.append(np.max(np.abs(comb.sum(axis=-1) - 1)))
    for a, b in zip(errs, errs[1:]):
        assert b <= a * (1 + 1e-9) + 1e-15, errs
    assert errs[-1] <= errs[0]


@settings(max_examples=40)
@given(seed=logits_st, scale=st.floats(0.0, 5.0), spread=st.floats(0.0, 5.0))
def test_pre_in_eps_1eps_post_in_0_2(seed, scale, spread):
    """docs/architecture.md §19.20: pre ∈ (eps, 1+eps), post ∈ (0, 2) (bounded logits, float64)."""
    rng = np.random.default_rng(seed)
    mixes = rng.uniform(-spread, spread, (5, 24))
    base = rng.uniform(-5, 5, 24)
    pre, post, comb = split_sinkhorn(mixes, np.full(3, scale), base, n=N, iters=20, eps=EPS, prec="float64")
    assert np.all((pre > EPS) & (pre < 1 + EPS))
    assert np.all((post > 0) & (post < 2))
    assert comb.shape == (5, N, N)


@pytest.mark.parametrize("prec", ["float64", "float32", "mirror"])
def test_model_hc_mixes_in_range(tiny_model, prec):
    """docs/architecture.md §19.19-19.20 on the tiny model: every recorded comb has columns ≈ 1, post ∈ (0, 2)."""
    t = Trace(("layers.*.hc_*",))
    tiny_model(prec).forward(np.arange(1, 41), trace=t)
    names = [k for k in t.tensors if k.endswith(".comb")]
    assert len(names) == 2 * (TINY.n_layers + TINY.n_mtp_layers)          # the MTP block (layer n_layers) too
    for k in names:
        comb = t.tensors[k]
        assert np.all(comb >= 0)
        assert np.allclose(comb.sum(axis=-2), 1, atol=1e-5), k
        post = t.tensors[k.replace(".comb", ".post")]
        assert np.all((post > 0) & (post < 2)), k
