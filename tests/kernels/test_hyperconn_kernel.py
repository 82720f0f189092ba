"""refimpl/kernels/hyperconn.py (split_sinkhorn) against model.hyperconn.split_sinkhorn (kernel_checks.py: the agreement)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, check, dtype_of
from refimpl.kernels import hyperconn as kh
from refimpl.model.hyperconn import split_sinkhorn


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 30), n=st.sampled_from([1, 2, 4]),
       iters=st.sampled_from([1, 2, 20]), gain=st.sampled_from([1.0, 10.0]))
def test_split_sinkhorn(prec, seed, rows, n, iters, gain):
    rng = np.random.default_rng(seed)
    x = (2 + n) * n
    dt = dtype_of(prec)
    mixes = (rng.standard_normal((rows, x)) * gain).astype(np.float32).astype(dt).reshape(1, rows, x)
    scale, base = rng.uniform(0.2, 0.6, 3).astype(np.float32), rng.standard_normal(x).astype(np.float32)
    want = split_sinkhorn.spec(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    got = kh.split_sinkhorn(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    for g, w in zip(got, want):            # values in [0, 2]; 20 float32 Sinkhorn steps: ~20 ulps of 1
        check(g, w, prec, f32_atol=5e-6)
