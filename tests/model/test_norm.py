"""Tests of refimpl.model.norm: weighted RMSNorm (docs/architecture.md §5) and the weightless per-head q norm (§19.5)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import numerics as nx
from refimpl.model.norm import head_rms_norm, rms_norm

EPS = 1e-6


def test_rms_norm_hand_worked():
    """rms_norm: y = w ⊙ x / sqrt(mean(x²) + eps); [3, 4] has mean square 12.5."""
    y = rms_norm(np.array([3.0, 4.0]), np.array([1.0, 2.0]), eps=EPS, prec="float64")
    assert np.allclose(y, np.array([3.0, 8.0]) / np.sqrt(12.5 + EPS), rtol=1e-15, atol=0)
    # eps matters for tiny inputs: x = 0 gives 0, x = 1e-3 gives 1e-3/sqrt(1e-6 + 1e-6)
    y = rms_norm(np.array([1e-3, 1e-3]), np.ones(2), eps=EPS, prec="float64")
    assert np.allclose(y, 1e-3 / np.sqrt(2e-6), rtol=1e-12)
    assert np.array_equal(rms_norm(np.zeros((2, 4)), np.ones(4), eps=EPS, prec="float64"), np.zeros((2, 4)))


def test_rms_norm_over_last_axis_only():
    """rms_norm: one RMS per row (last axis)."""
    x = np.array([[3.0, 4.0], [30.0, 40.0]])
    y = rms_norm(x, np.ones(2), eps=0.0, prec="float64")
    assert np.allclose(y, [[3 / np.sqrt(12.5), 4 / np.sqrt(12.5)]] * 2, rtol=1e-15)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), a=st.floats(0.5, 100.0), n=st.integers(1, 300))
def test_rms_norm_scale_invariant(seed, a, n):
    """rms_norm: rms_norm(a·x) == rms_norm(x) for a > 0 (up to eps, which is 1e-6 of a unit mean square)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, n)) + 1.0                # mean square >= ~0.25 per row (w.h.p. >= 0.1)
    w = 1 + 0.02 * rng.standard_normal(n)
    ms = np.mean(x * x, axis=-1)
    if ms.min() < 0.1:
        return
    y1 = rms_norm(x, w, eps=EPS, prec="float64")
    y2 = rms_norm(a * x, w, eps=EPS, prec="float64")
    assert np.allclose(y1, y2, rtol=4e-5, atol=0)
    yw = rms_norm(x, np.ones(n), eps=0.0, prec="float64")
    assert np.allclose(np.mean(yw * yw, axis=-1), 1.0, rtol=1e-12)


def test_rms_norm_mirror_returns_bf16_values_and_float32_agrees():
    """rms_norm: fp32 math, bf16 output (mirror); float32 mode equals float64 to fp32 precision."""
    rng = np.random.default_rng(2)
    x = nx.round_bf16(rng.standard_normal((4, 256)) * 3)
    w = nx.round_bf16(1 + 0.02 * rng.standard_normal(256))
    ym = rms_norm(x, w, eps=EPS, prec="mirror")
    assert ym.dtype == np.float32 and np.array_equal(ym, nx.round_bf16(ym))
    y64 = rms_norm(x.astype(np.float64), w, eps=EPS, prec="float64")
    assert np.allclose(ym, y64, rtol=2**-8, atol=0)
    y32 = rms_norm(x, w, eps=EPS, prec="float32")
    assert y32.dtype == np.float32 and np.allclose(y32, y64, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(ym, y32)                   # bf16 rounding really happens in mirror


def test_head_rms_norm_weightless_per_head():
    """docs/architecture.md §19.5: q / sqrt(mean over the head dim of q² + eps), one factor per head, no weight."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 4, 128)) * np.array([0.1, 1.0, 10.0, 100.0])[:, None]   # heads differ
    y = head_rms_norm(q, eps=EPS, prec="float64")
    want = q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + EPS)
    assert np.allclose(y, want, rtol=1e-14, atol=0)
    assert np.allclose(np.mean(y * y, axis=-1), 1.0, rtol=2e-4)   # every head normalized separately (eps: 1e-4 at 0.1)


def test_head_rms_norm_mirror_emulates_bf16_ops():
    """head_rms_norm: square, mean, +eps, rsqrt and the product are each bf16 tensors in the official code."""
    rng = np.random.default_rng(4)
    q = nx.round_bf16(rng.standard_normal((1, 5, 8, 128)) * 2)
    y = head_rms_norm(q, eps=EPS, prec="mirror")
    assert y.dtype == np.float32 and np.array_equal(y, nx.round_bf16(y))
    sq = nx.round_bf16(q * q)
    mean = nx.round_bf16(np.mean(sq, axis=-1, keepdims=True, dtype=np.float32))
    r = nx.round_bf16(np.float32(1) / np.sqrt(nx.round_bf16(mean + np.float32(EPS))))
    assert np.array_equal(y, nx.round_bf16(q * r))
    exact = head_rms_norm(q.astype(np.float64), eps=EPS, prec="float64")
    assert np.allclose(y, exact, rtol=2**-6, atol=0)
