"""refimpl/kernels/norm.py (rms_norm, head_rms_norm) against model.norm (kernel_checks.py: the agreement)."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, bf16, check, dtype_of
from refimpl.kernels import norm as kn
from refimpl.model.norm import head_rms_norm, rms_norm


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), lead=st.sampled_from([(1,), (3,), (2, 5), (1, 2, 4)]),
       c=st.sampled_from([1, 7, 64, 200, 1024]), spread=st.sampled_from([0.0, 8.0]))
def test_rms_norm(prec, seed, lead, c, spread):
    rng = np.random.default_rng(seed)
    dt = dtype_of(prec)
    x = bf16(rng.standard_normal((*lead, c)) * np.exp(rng.uniform(-spread, spread, (*lead, c)))).astype(dt)
    w = bf16(1 + 0.1 * rng.standard_normal(c)).astype(ml_dtypes.bfloat16)
    want = rms_norm.spec(x, w, eps=1e-6, prec=prec)
    check(kn.rms_norm(x, w, eps=1e-6, prec=prec), want, prec, f32_atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(1, 1, 4, 16), (2, 3, 2, 64), (1, 5, 1, 128)]))
def test_head_rms_norm(prec, seed, shape):
    rng = np.random.default_rng(seed)
    q = bf16(rng.standard_normal(shape) * 3).astype(dtype_of(prec))
    want = head_rms_norm.spec(q, eps=1e-6, prec=prec)
    check(kn.head_rms_norm(q, eps=1e-6, prec=prec), want, prec, f32_atol=2e-6 * np.abs(want).max())
