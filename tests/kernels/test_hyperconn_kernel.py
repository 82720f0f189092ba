"""refimpl/kernels/hyperconn.py against model.hyperconn: split_sinkhorn (kernel_checks.py: the agreement) and
hc_post (bit for bit)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, bf16, check, dtype_of
from refimpl.config import Config
from refimpl.context import RunContext
from refimpl.kernels import hyperconn as kh
from refimpl.model.hyperconn import hc_post, split_sinkhorn
from refimpl.numerics import round_bf16
from refimpl.ops import parse_kernels, use_kernels

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


# ------------------------------------------------------------------------------------------------ hc_post

def _post_inputs(rng, rows, n, c, dt, spread):
    """x, residual bf16 values; post, comb with magnitudes 2^-spread .. 2^spread (the float64 sum over the
    streams then rounds, and its order shows); -0 in x and h (channels 0, 35, ..: every term of the sum
    and post·x are ±0, so the sign of 0 shows)."""
    def wide(shape):
        return (rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))).astype(np.float32)
    x = bf16(rng.standard_normal((1, rows, c)))
    x[..., ::5] = -0.0
    res = bf16(wide((1, rows, n, c)))
    res[..., ::7] = -0.0
    post, comb = wide((1, rows, n)), wide((1, rows, n, n))
    return [a.astype(dt) for a in (x, res, post, comb)]


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 9), n=st.sampled_from([1, 2, 4]),
       c=st.sampled_from([1, 8, 130]), spread=st.sampled_from([0, 12, 40]))
def test_hc_post_equals_spec_bit_for_bit(prec, seed, rows, n, c, spread):
    """Every precision: the same IEEE ops in the same order as the spec, so every bit agrees (signs of 0 too)."""
    ctx = RunContext(cfg=Config.tiny(), prec=prec)
    args = _post_inputs(np.random.default_rng(seed), rows, n, c, dtype_of(prec), spread)
    want = hc_post.spec(*args, ctx)
    got = kh.hc_post(*args, ctx)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint32 if got.dtype == np.float32 else np.uint64),
                          want.view(np.uint32 if want.dtype == np.float32 else np.uint64))


def test_hc_post_mirror_sums_the_streams_in_order_in_float64():
    """A hand-worked row: old streams h = (2^30, 3, -2^30) (second channel: 3 + 2^-6), all with weight 1
    in new stream 0, post = 0. The fp32 products are exact; the float64 sum in stream order is exactly
    3 (3 + 2^-6), which fp32 adds would lose (fl32(2^30 + 3) = 2^30, then 0); 3 + 2^-6 = 3.015625 is
    a bf16 value, so the bf16 store keeps it. New streams 1 and 2 have weight 0: exact 0."""
    ctx = RunContext(cfg=Config.tiny(), prec="mirror")
    res = np.array([[[[2.0 ** 30, 2.0 ** 30], [3.0, 3.0 + 2 ** -6], [-(2.0 ** 30), -(2.0 ** 30)]]]], np.float32)
    x = np.ones((1, 1, 2), np.float32)
    post = np.zeros((1, 1, 3), np.float32)
    comb = np.zeros((1, 1, 3, 3), np.float32)
    comb[..., :, 0] = 1.0
    got = kh.hc_post(x, res, post, comb, ctx)
    assert got[0, 0].tolist() == [[3.0, 3.015625], [0.0, 0.0], [0.0, 0.0]]
    assert np.array_equal(got, hc_post.spec(x, res, post, comb, ctx))


def test_hc_post_mirror_rounds_the_stream_sum_before_the_add():
    """Hand-worked: the stream sum is rounded to fp32 on its own, then added to post·x in fp32 (two
    roundings), not rounded once with it. Old streams h = (2^-24, 2^-25) with weights (1, 2^-25): the
    sum 2^-24 + 2^-50 rounds to 2^-24; post·x = 1 + 2^-8; (1 + 2^-8) + 2^-24 is an fp32 tie, to even:
    1 + 2^-8, itself a bf16 tie, to even: 1. Rounded once (exact in float64), 1 + 2^-8 + 2^-24 + 2^-50
    is above the fp32 tie (to 1 + 2^-8 + 2^-23) and then above the bf16 one: 1 + 2^-7."""
    ctx = RunContext(cfg=Config.tiny(), prec="mirror")
    res = np.array([[[[2.0 ** -24], [2.0 ** -25]]]], np.float32)
    x = np.ones((1, 1, 1), np.float32)
    post = np.array([[[1 + 2.0 ** -8, 0.0]]], np.float32)
    comb = np.array([[[[1.0, 0.0], [2.0 ** -25, 0.0]]]], np.float32)
    for f in (kh.hc_post, hc_post.spec):
        assert f(x, res, post, comb, ctx)[0, 0, :, 0].tolist() == [1.0, 0.0]     # new stream 1: weights 0


def test_hc_post_is_the_numba_selections_kernel():
    assert parse_kernels("numba").impl("hc_post") is kh.hc_post
    assert parse_kernels("numba,hc_post=numpy").impl("hc_post") is None
    ctx = RunContext(cfg=Config.tiny(), prec="mirror")
    args = _post_inputs(np.random.default_rng(1), 3, 4, 16, np.float32, 4)
    with use_kernels("numba"):
        assert np.array_equal(hc_post(*args, ctx), hc_post.spec(*args, ctx))


def test_hc_post_refuses_mismatched_shapes():
    ctx = RunContext(cfg=Config.tiny(), prec="mirror")
    x, res, post, comb = _post_inputs(np.random.default_rng(2), 2, 4, 8, np.float32, 0)
    with pytest.raises(ValueError, match="hc_post: need"):
        kh.hc_post(x, res, post[..., :3], comb, ctx)


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

