"""Scalar roundings and sums of refimpl/kernels/rounding.py against NumPy and ml_dtypes."""
import numpy as np
from hypothesis import given, settings, strategies as st

from refimpl.kernels.rounding import bf16_f32, pairwise_sum
from refimpl.numerics import round_bf16


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 3000), spread=st.sampled_from([0.0, 10.0, 60.0]))
def test_pairwise_sum_is_numpys_order(seed, n, spread):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n + 5) * np.exp(rng.uniform(-spread, spread, n + 5))).astype(np.float32).astype(np.float64)
    assert pairwise_sum(a, 5, n) == np.sum(a[5:])             # bit-identical, not just close


def test_bf16_rounding_matches_ml_dtypes_on_ties_edges_and_specials():
    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                           np.uint32([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x00008000,
                                      0x80000000, 0x7FC00000, 0x3F807FFF])])
    x = bits.view(np.float32)
    got = np.array([bf16_f32(v) for v in x], np.float32)
    want = round_bf16(x)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
