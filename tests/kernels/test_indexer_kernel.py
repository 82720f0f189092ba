"""refimpl/kernels/indexer.py (index_topk) against model.indexer.index_topk (kernel_checks.py: the agreement)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, bf16, check, dtype_of
from refimpl.kernels import indexer as ki
from refimpl.model.indexer import index_topk


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), s=st.integers(1, 12), heads=st.sampled_from([1, 3, 4]),
       hd=st.sampled_from([8, 32]), start=st.integers(0, 40), ratio=st.sampled_from([1, 4]),
       k=st.integers(1, 12), coarse=st.booleans())
def test_index_topk(prec, seed, b, s, heads, hd, start, ratio, k, coarse):
    """coarse: integer-valued inputs, so many scores tie and the stable tie rule decides."""
    rng = np.random.default_rng(seed)
    n = (start + s) // ratio + int(rng.integers(0, 3))          # the keys may run past the visible ones
    draw = (lambda *sh: rng.integers(-2, 3, sh).astype(np.float32)) if coarse else \
        (lambda *sh: bf16(rng.standard_normal(sh)))
    dt = dtype_of(prec)
    q, keys, w = draw(b, s, heads, hd).astype(dt), draw(b, n, hd).astype(dt), draw(b, s, heads).astype(dt)
    want_idx, want_sc = index_topk.spec(q, keys, w, start, ratio, k, prec)
    got_idx, got_sc = ki.index_topk(q, keys, w, start, ratio, k, prec)
    check(got_sc, want_sc, prec, f32_atol=1e-5 * max(1.0, np.abs(want_sc[np.isfinite(want_sc)]).max(initial=0)))
    if prec != "float32" or coarse:                             # float32 scores may order near-ties differently
        assert np.array_equal(got_idx, want_idx)
    assert got_idx.dtype == np.int64 and got_idx.shape == want_idx.shape


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31), levels=st.sampled_from([1, 2, 5, 50]), k=st.sampled_from([1, 7, 511, 512, 513]),
       n=st.integers(1, 1500))
def test_topk_selection_with_many_ties_is_the_stable_sort(seed, levels, k, n):
    """The top-k by partition (k-th largest, the entries above it, then the lowest entries equal to it)
    gives the first k of the full stable sort (numerics.top_k) when most scores tie: few distinct
    levels, k below, at and above the number visible, -0.0 and 0.0 mixed (equal, so entry order decides)."""
    from refimpl.numerics import top_k
    rng = np.random.default_rng(seed)
    scores = rng.integers(-levels // 2, levels - levels // 2, (1, 1, n)).astype(np.float32)
    scores[scores == 0] *= np.where(rng.random(int((scores == 0).sum())) < 0.5, -1, 1).astype(np.float32)
    width = min(k, n)
    topk = np.full((1, 1, width), -1, np.int64)
    ki._topk_rows(scores, 0, 0, 1, n - 1, 1, k, topk, np.empty(n))
    assert np.array_equal(topk[0, 0], top_k(scores[0, 0], width))
