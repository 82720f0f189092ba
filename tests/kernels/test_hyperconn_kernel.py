"""refimpl/kernels/hyperconn.py against model.hyperconn: split_sinkhorn (kernel_checks.py: the agreement) and
hc_post (bit for bit)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, check, dtype_of
from refimpl.kernels import hyperconn as kh
from refimpl.config import Config
from refimpl.context import RunContext
from refimpl.model.hyperconn import hc_post, split_sinkhorn
from refimpl.numerics import round_bf16

TINY = Config.tiny()


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


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31), b=st.sampled_from([1, 2]), s=st.integers(1, 9), n=st.sampled_from([1, 2, 4]),
       c=st.sampled_from([1, 8, 33]), span=st.sampled_from([0, 30]))
def test_hc_post_is_the_spec_bit_for_bit(prec, seed, b, s, n, c, span):
    """hc_post: the spec's bits in every mode (the same products, the stream sum in the same order, the
    same roundings), with magnitudes 2^±span apart (the float32 sums then round), a residual that is a
    slice of a longer one (not contiguous for b > 1), -0 inputs, and zero post / comb entries."""
    rng = np.random.default_rng(seed)
    dt = dtype_of(prec)

    def draw(*shape):
        v = rng.standard_normal(shape) * np.exp2(rng.integers(-span, span + 1, shape))
        v[rng.random(shape) < 0.1] = -0.0
        return round_bf16(v).astype(dt) if prec == "mirror" else v.astype(np.float32).astype(dt)
    x, post, comb = draw(b, s, c), draw(b, s, n), draw(b, s, n, n)
    residual = draw(b, s + 3, n, c)[:, 2:2 + s]
    ctx = RunContext(TINY, prec)
    want = hc_post.spec(x, residual, post, comb, ctx)
    got = kh.hc_post(x, residual, post, comb, ctx)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint64 if dt == np.float64 else np.uint32),
                          want.view(np.uint64 if dt == np.float64 else np.uint32))


def test_hc_post_rejects_mismatched_shapes():
    ctx = RunContext(TINY, "mirror")
    with pytest.raises(ValueError, match="hc_post"):
        kh.hc_post(np.zeros((1, 2, 8), np.float32), np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 2, 4), np.float32),
                   np.zeros((1, 2, 4, 3), np.float32), ctx)
