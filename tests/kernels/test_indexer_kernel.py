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
