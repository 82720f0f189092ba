"""Tests of refimpl.synthetic.quantize: the writer's FP8 / FP4 weight quantizers (smallest power-of-two
scale per block, RNE codes, exact round trip within half a unit in the last place)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import numerics as nx
from refimpl.synthetic.quantize import quant_fp4_weight, quant_fp8_weight
from helpers import ulp_e2m1, ulp_e4m3


def _block_scales_fp8(scale, n, k):
    """E8M0 grid -> float64 [n, k] scale of each element (block 128)."""
    s = nx.decode_ue8m0(scale).astype(np.float64)
    return np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_quant_fp8_weight_round_trip_within_half_ulp(n, k, seed, dtype):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 2.0 ** rng.integers(-20, 20, (n, 1))).astype(dtype)
    values, scale = quant_fp8_weight(w)
    assert values.shape == (n, k) and values.dtype == np.uint8
    assert scale.shape == (-(-n // 128), -(-k // 128)) and scale.dtype == np.uint8
    s = _block_scales_fp8(scale, n, k)
    err = np.abs(nx.dequant_fp8_weight(values, scale).astype(np.float64) - w)
    assert np.all(err <= s * ulp_e4m3(w / s) / 2)
    # the smallest power of two with amax / s <= 448 (above the 1e-4 floor)
    nb, kb = scale.shape
    amax = np.zeros((nb, kb))
    for i in range(nb):
        for j in range(kb):
            amax[i, j] = max(np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max(), np.float32(1e-4))
    sb = nx.decode_ue8m0(scale).astype(np.float64)
    assert np.all(amax <= 448 * sb) and np.all(amax > 224 * sb)


def test_quant_fp8_weight_zero_block_and_partial_edges():
    w = np.zeros((192, 384), np.float32)
    w[:96, 128:256] = 3.0                                             # block (0, 1)
    w[150, 300] = -960.0                                              # block (1, 2), in the partial row block
    values, scale = quant_fp8_weight(w)
    # all-zero blocks take the 1e-4 floor: s = 2^ceil(log2(1e-4/448)) = 2^-22 (code 105), values 0
    # 3/448 -> 2^-7 (code 120); 960/448 -> 2^2 (code 129), 960/4 = 240 is an e4m3 value
    assert scale.tolist() == [[105, 120, 105], [105, 105, 129]]
    assert np.all(values[:, :128] == 0)
    assert np.array_equal(nx.dequant_fp8_weight(values, scale), w)    # exactly representable
    with pytest.raises(ValueError):
        quant_fp8_weight(np.array([[np.inf]]))


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 40), kb=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_quant_fp4_weight_round_trip_within_half_ulp(n, kb, seed):
    rng = np.random.default_rng(seed)
    k = 32 * kb
    w = rng.standard_normal((n, k)) * 2.0 ** rng.integers(-20, 20, (n, 1))
    w[0, :32] = 0.0                                                   # an all-zero block
    packed, scale = quant_fp4_weight(w)
    assert packed.shape == (n, k // 2) and packed.dtype == np.int8
    assert scale.shape == (n, kb) and scale.dtype == np.uint8
    assert scale[0, 0] == 1                                           # floor 6·2^-126 -> s = 2^-126
    s = np.repeat(nx.decode_ue8m0(scale).astype(np.float64), 32, axis=1)
    err = np.abs(nx.dequant_fp4_weight(packed, scale).astype(np.float64) - w)
    assert np.all(err <= s * ulp_e2m1(w / s) / 2)
    amax = np.maximum(np.abs(w).reshape(n, kb, 32).max(-1), 6 * 2.0**-126)
    sb = nx.decode_ue8m0(scale).astype(np.float64)
    assert np.all(amax <= 6 * sb) and np.all(amax > 3 * sb)


def test_quant_fp4_weight_rejects_bad_k():
    with pytest.raises(ValueError):
        quant_fp4_weight(np.ones((2, 48)))
