"""refimpl/kernels/compressor.py (gated_pool) against model.compressor.gated_pool (kernel_checks.py: the agreement)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, check, dtype_of
from refimpl.kernels import compressor as kc
from refimpl.model.compressor import gated_pool


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), n=st.integers(1, 4), P=st.sampled_from([4, 8, 16, 32]),
       d=st.integers(1, 40), pad=st.booleans())
def test_gated_pool(prec, seed, b, n, P, d, pad):
    """pad: the first half of the first entry's positions is padding (score -inf, kv 0), as with overlap."""
    rng = np.random.default_rng(seed)
    dt = dtype_of(prec)
    kv = rng.standard_normal((b, n, P, d)).astype(np.float32).astype(dt)
    score = (rng.standard_normal((b, n, P, d)) * 3).astype(np.float32).astype(dt)
    if pad:
        kv[:, 0, :P // 2], score[:, 0, :P // 2] = 0, -np.inf
    check(kc.gated_pool(kv, score, prec), gated_pool.spec(kv, score, prec), prec, f32_atol=1e-5 * np.abs(kv).max())


def test_gated_pool_refuses_an_all_padding_slice():
    kv, score = np.zeros((1, 1, 4, 2), np.float32), np.full((1, 1, 4, 2), -np.inf, np.float32)
    for fn in (gated_pool.spec, kc.gated_pool):
        with pytest.raises(ValueError, match="entirely -inf"):
            fn(kv, score, "mirror")
