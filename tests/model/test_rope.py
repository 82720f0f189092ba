"""Tests of refimpl.model.rope: the interleaved layout, YaRN tables, the per-layer regime, properties.

docs/architecture.md §6 (tables; interleaved pairs on the last p dims), watch points §19.1-19.4.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import numerics as nx
from refimpl.config import Config
from refimpl.model.rope import RopeTable, apply_rope, layer_rope_table, rope_table, yarn_frequencies

TINY = Config.tiny()
FLASH = Config.flash()
YARN = dict(factor=16.0, beta_fast=32, beta_slow=1)


def table_of(angles):
    """A RopeTable from explicit angles [s, p/2] (float64)."""
    a = np.asarray(angles, dtype=np.float64)
    return RopeTable(cos=np.cos(a), sin=np.sin(a))


# ------------------------------------------------------------------------------------------------
# hand-worked: layout

def test_apply_rope_4dim_interleaved_pairs_hand_worked():
    """Apply: (x0, x1) and (x2, x3) are complex numbers x0 + i·x1, x2 + i·x3 (adjacent pairs)."""
    # angles: pair 0 by π/2 (multiply by i), pair 1 by π (multiply by -1); cos/sin exact
    t = RopeTable(cos=np.array([[0.0, -1.0]]), sin=np.array([[1.0, 0.0]]))
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])                       # [b=1, s=1, 4]
    y = apply_rope(x, t, "float64")
    # (1 + 2i)·i = -2 + 1i ; (3 + 4i)·(-1) = -3 - 4i
    assert np.array_equal(y, [[[-2.0, 1.0, -3.0, -4.0]]])
    # the split-halves ("rotate_half") layout would pair (x0, x2), (x1, x3): a different answer
    assert not np.array_equal(y, [[[-3.0, -4.0, 1.0, 2.0]]])
    # inverse: multiply by the conjugate
    assert np.array_equal(apply_rope(y, t, "float64", inverse=True), x)


def test_apply_rope_acts_on_last_p_dims_only():
    """Apply: the rotation uses x[..., -p:]; the leading d-p dims pass unchanged."""
    t = RopeTable(cos=np.array([[0.0, -1.0]]), sin=np.array([[1.0, 0.0]]))
    x = np.array([[[7.0, 8.0, 1.0, 2.0, 3.0, 4.0]]])
    y = apply_rope(x, t, "float64")
    assert np.array_equal(y, [[[7.0, 8.0, -2.0, 1.0, -3.0, -4.0]]])
    assert np.array_equal(x, [[[7.0, 8.0, 1.0, 2.0, 3.0, 4.0]]])  # input not written in place


def test_apply_rope_per_position_and_broadcast_over_heads():
    """Apply: 3-D input indexes the table per token; 4-D [b,s,h,d] broadcasts it over heads."""
    rng = np.random.default_rng(0)
    t = table_of(rng.uniform(-4, 4, (3, 2)))                      # 3 positions, p = 4
    x = rng.standard_normal((2, 3, 5, 6))                         # [b, s, h, d]
    y = apply_rope(x, t, "float64")
    for h in range(5):
        assert np.array_equal(y[:, :, h], apply_rope(x[:, :, h], t, "float64"))
    # position 1 uses row 1 of the table: compare to a hand rotation of pair 0 of head 0
    a, b = x[0, 1, 0, 2], x[0, 1, 0, 3]
    c, s = t.cos[1, 0], t.sin[1, 0]
    assert np.allclose(y[0, 1, 0, 2:4], [a * c - b * s, a * s + b * c], rtol=0, atol=1e-15)


def test_rope_table_small_base_hand_worked():
    """Tables: f_i = base^(-2i/p), angle = t·f_i; dim 4, base 100: f = [1, 0.1]."""
    t = rope_table(np.array([0, 1, 3]), dim=4, base=100.0, original_seq_len=0, prec="float64", **YARN)
    assert np.allclose(t.cos, np.cos([[0, 0], [1, 0.1], [3, 0.3]]), rtol=0, atol=1e-15)
    assert np.allclose(t.sin, np.sin([[0, 0], [1, 0.1], [3, 0.3]]), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# YaRN tables

def plain_freqs(base, dim=64):
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def test_yarn_ramp_low15_high25_for_base_160000():
    """Tables: base 160000, dim 64, original 65536, beta 32/1: low = 15, high = 25.

    Pairs 0-15 keep f_i, pairs 25-31 use f_i/16, pairs in between blend linearly with ramp (i-15)/10.
    """
    f = yarn_frequencies(dim=64, base=160000.0, original_seq_len=65536, dtype=np.float64, prec="float64", **YARN)
    plain = plain_freqs(160000.0)
    ramp = np.clip((np.arange(32) - 15) / 10, 0, 1)
    want = plain / 16 * ramp + plain * (1 - ramp)
    assert np.allclose(f, want, rtol=1e-14, atol=0)
    ratio = f / plain
    assert np.allclose(ratio[:16], 1.0, rtol=1e-14)               # 0..15 unchanged
    assert np.allclose(ratio[25:], 1 / 16, rtol=1e-14)            # 25..31 divided by 16
    assert np.all((ratio[16:25] < 1) & (ratio[16:25] > 1 / 16))   # strict blend in between
    assert np.allclose(ratio[20], 0.5 / 16 + 0.5, rtol=1e-14)     # half way
    # the hand derivation of low / high
    corr = lambda r: 64 * math.log(65536 / (r * 2 * math.pi)) / (2 * math.log(160000))
    assert (math.floor(corr(32)), math.ceil(corr(1))) == (15, 25)
    # the float32 table (official dtype) agrees to fp32 precision
    f32 = yarn_frequencies(dim=64, base=160000.0, original_seq_len=65536, prec="float32", **YARN)
    assert f32.dtype == np.float32 and np.allclose(f32, want, rtol=3e-7, atol=0)


def test_no_yarn_when_original_seq_len_is_zero():
    """Tables: original_seq_len 0 = plain frequencies."""
    f = yarn_frequencies(dim=64, base=10000.0, original_seq_len=0, dtype=np.float64, prec="float64", **YARN)
    assert np.allclose(f, plain_freqs(10000.0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("cfg", [TINY, FLASH], ids=["tiny", "flash"])
def test_layer_regimes_ratio0_base10000_without_yarn(cfg):
    """docs/architecture.md §19.2: ratio-0 layers base 10000 no YaRN; compressed layers 160000 + YaRN."""
    for layer, ratio in enumerate(cfg.compress_ratios):
        if ratio == 0:
            assert cfg.rope_base(layer) == 10000.0 and cfg.rope_original_seq_len(layer) == 0
        else:
            assert cfg.rope_base(layer) == 160000.0 and cfg.rope_original_seq_len(layer) == 65536
    pos = np.array([0, 1, 127, 65535, 65536, 1048575])
    ratio0 = [i for i, r in enumerate(cfg.compress_ratios) if r == 0]
    comp = [i for i, r in enumerate(cfg.compress_ratios) if r != 0]
    plain = plain_freqs(10000.0)
    p160 = plain_freqs(160000.0)
    ramp = np.clip((np.arange(32) - 15) / 10, 0, 1)
    yarn = p160 / 16 * ramp + p160 * (1 - ramp)
    for layers, f in ((ratio0, plain), (comp, yarn)):
        for layer in (layers[0], layers[-1]):
            t = layer_rope_table(pos, cfg, layer, "float64")
            ang = pos[:, None].astype(np.float64) * f[None, :]
            # angles up to ~1e6 rad: the float64 rounding of f_i moves them by < 1e-9
            assert np.allclose(t.cos, np.cos(ang), rtol=0, atol=1e-8), layer
            assert np.allclose(t.sin, np.sin(ang), rtol=0, atol=1e-8), layer


def test_rope_table_float32_close_to_float64():
    """The fp32 table (official) is the float64 one up to fp32 rounding of angle and frequencies."""
    pos = np.arange(0, 200)
    a = layer_rope_table(pos, TINY, 2, "float64")
    b = layer_rope_table(pos, TINY, 2, "float32")
    assert b.cos.dtype == np.float32
    assert np.allclose(a.cos, b.cos, atol=1e-4) and np.allclose(a.sin, b.sin, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# properties

@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), s=st.integers(1, 6), layer=st.sampled_from([0, 2, 3]),
       start=st.integers(0, 70000))
def test_rope_inverse_restores_input_and_preserves_pair_norms(seed, s, layer, start):
    """Apply (float64): RoPE⁻¹(RoPE(x)) = x; each rotated pair keeps its norm."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, s, 3, TINY.head_dim))
    t = layer_rope_table(start + np.arange(s), TINY, layer, "float64")
    y = apply_rope(x, t, "float64")
    assert np.allclose(apply_rope(y, t, "float64", inverse=True), x, rtol=0, atol=1e-12)
    p = TINY.rope_head_dim
    nx_ = np.hypot(x[..., -p::2], x[..., -p + 1::2])
    ny_ = np.hypot(y[..., -p::2], y[..., -p + 1::2])
    assert np.allclose(nx_, ny_, rtol=1e-13, atol=0)
    assert np.array_equal(y[..., :-p], x[..., :-p])


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), t1=st.integers(0, 5000), t2=st.integers(0, 5000),
       shift=st.integers(0, 5000))
def test_rope_dot_product_depends_on_relative_position(seed, t1, t2, shift):
    """Apply: <RoPE(q, t1), RoPE(k, t2)> depends only on t1 - t2 (the reason for the output de-rotation)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 64))
    def dot(a, b):
        tq = layer_rope_table(np.array([a]), TINY, 2, "float64")
        tk = layer_rope_table(np.array([b]), TINY, 2, "float64")
        return float(np.sum(apply_rope(q, tq, "float64") * apply_rope(k, tk, "float64")))
    assert math.isclose(dot(t1, t2), dot(t1 + shift, t2 + shift), rel_tol=1e-9, abs_tol=1e-9)


def test_apply_rope_mirror_rounds_rotated_dims_to_bf16():
    """Apply: rotated pair written back into bf16 (mirror); the other dims unchanged."""
    rng = np.random.default_rng(1)
    x = nx.round_bf16(rng.standard_normal((1, 4, 2, TINY.head_dim)))
    t = layer_rope_table(np.arange(4) + 5, TINY, 2, "mirror")
    y = apply_rope(x, t, "mirror")
    assert y.dtype == np.float32
    assert np.array_equal(y, nx.round_bf16(y))
    assert np.array_equal(y[..., :-64], x[..., :-64])
    exact = apply_rope(x.astype(np.float64), layer_rope_table(np.arange(4) + 5, TINY, 2, "float64"), "float64")
    assert np.allclose(y, exact, rtol=2**-8, atol=1e-6)
