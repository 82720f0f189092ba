"""The BLAS paths' weight-panel cache and the helpers of mirror's checked dense products (refimpl/kernels/linear.py).

PanelCache keeps decoded panels of small read-only matrices; a kept panel must be the bits a fresh
decode gives, for every panel of a matrix, and never outlive (or be confused with) the memory it
was decoded from. _min_grain feeds blas_rounding_checked's proof that an output needs no
recomputation: it must be the exact grain (checked with Python's fractions).
"""
import gc
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packed_weights import fp4_matrix, fp8_matrix
from refimpl.kernels import linear as K
from refimpl.kernels.formats import FMT_F32
from refimpl.model import linear as spec
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.numerics import round_bf16


def _read_only(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _frozen(w):
    """The same matrix with read-only arrays (as a checkpoint's memory maps are)."""
    if isinstance(w, (Fp8Matrix, Fp4Matrix)):
        return type(w)(*_read_only(w.values.copy(), w.scale.copy()))
    return _read_only(np.array(w))[0]


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = K.PanelCache(K.PANEL_CACHE_BYTES)
    monkeypatch.setattr(K, "PANELS", cache)
    monkeypatch.setattr(K, "PANEL_ROWS", 48)                   # several panels per matrix
    return cache


@pytest.mark.parametrize("prec", ["mirror", "float32"])
@pytest.mark.parametrize("kind", ["fp8", "fp4", "bf16", "f32"])
def test_cached_panels_give_the_uncached_bits_on_every_call(fresh_cache, monkeypatch, kind, prec):
    """Read-only weights (kept) against writeable copies (never kept), three calls each, many-row products
    over several panels: identical bits, and the cache holds one entry per panel."""
    rng = np.random.default_rng(3)
    n, k = 130, 256
    if kind in ("fp8", "fp4"):
        w = fp8_matrix(rng, n, k) if kind == "fp8" else fp4_matrix(rng, n, k)
        run = K.quantized_linear
    else:
        w = (rng.standard_normal((n, k)) / 16).astype(np.float32)
        w = w.astype(ml_dtypes.bfloat16) if kind == "bf16" else w
        run = K.fp32_linear
    frozen = _frozen(w)
    x = round_bf16(rng.standard_normal((40, k)))
    want = run(x, w, prec)
    assert not fresh_cache.entries                             # writeable: nothing kept
    for _ in range(3):
        assert np.array_equal(run(x, frozen, prec), want)
    assert len(fresh_cache.entries) == 3                       # 130 rows in panels of 48
    if kind in ("fp8", "fp4") and prec == "mirror":
        assert np.array_equal(want, spec.quantized_linear(x, w, prec))


def test_a_kept_panel_is_the_decoded_panel_and_read_only(fresh_cache):
    rng = np.random.default_rng(4)
    w = _frozen(fp8_matrix(rng, 100, 256))
    fmt, codes, scale, _ = K.checked_codes(w)
    got, _ = fresh_cache.get("", fmt, codes, scale, 48, 96, 0, 256, np.float64)
    again, _ = fresh_cache.get("", fmt, codes, scale, 48, 96, 0, 256, np.float64)
    assert again is got and not got.flags.writeable
    fresh = np.empty((48, 256))
    K.decode_rows(fmt, codes, scale, 48, 96, 0, fresh)
    assert np.array_equal(got, fresh)
    assert np.array_equal(got, w.dequantize()[48:96])
    other, _ = fresh_cache.get("", fmt, codes, scale, 0, 48, 0, 256, np.float64)      # another panel: another entry
    assert np.array_equal(other, w.dequantize()[:48])


def test_entries_go_with_their_memory_and_stay_under_the_cap():
    rng = np.random.default_rng(5)
    panel_bytes = 32 * 128 * 8
    cache = K.PanelCache(3 * panel_bytes)
    scale = _read_only(np.zeros((1, 1), np.uint8))[0]
    mats = [_read_only(rng.standard_normal((32, 128)).astype(np.float32).view(np.uint32))[0] for _ in range(5)]
    for m in mats:
        w, _ = cache.get("", FMT_F32, m, scale, 0, 32, 0, 128, np.float64)
        assert np.array_equal(w, m.view(np.float32))
        assert cache.used <= cache.cap
    assert len(cache.entries) == 3 and cache.used == 3 * panel_bytes   # full: the last two were not kept
    assert {id(v[2][0]()) for v in cache.entries.values()} == {id(mats[i].base) for i in range(3)}
    del m, w
    del mats[0]                                                # the first matrix goes: its entry goes with it
    gc.collect()
    w3, _ = cache.get("", FMT_F32, mats[2], scale, 0, 32, 0, 128, np.float64)   # (was mats[3]): now kept
    assert len(cache.entries) == 3 and cache.used == 3 * panel_bytes
    assert cache.get("", FMT_F32, mats[2], scale, 0, 32, 0, 128, np.float64)[0] is w3
    assert all(all(r() is not None for r in v[2]) for v in cache.entries.values())
    big = _read_only(np.zeros((K.PANEL_CACHE_MATRIX // (8 * 128) + 1, 128), np.uint32))[0]
    cache.get("", FMT_F32, big, scale, 0, 32, 0, 128, np.float64)      # a matrix over the per-matrix limit
    assert all(v[0][0].shape[0] == 32 and v[2][0]() is not big for v in cache.entries.values())


def test_same_memory_other_view_is_another_entry(fresh_cache):
    """Two views of one owner (the rows of grouped wo_a's groups) are told apart by their place in it."""
    rng = np.random.default_rng(6)
    base = _read_only(rng.standard_normal((64, 128)).astype(np.float32).view(np.uint32))[0]
    scale = _read_only(np.zeros((1, 1), np.uint8))[0]
    a, _ = fresh_cache.get("", FMT_F32, base[:32], scale, 0, 32, 0, 128, np.float64)
    b, _ = fresh_cache.get("", FMT_F32, base[32:], scale, 0, 32, 0, 128, np.float64)
    assert np.array_equal(a, base[:32].view(np.float32)) and np.array_equal(b, base[32:].view(np.float32))


def _grain_reference(row) -> float:
    """The largest power of two dividing every non-zero value (exact rationals); inf without one, NaN with inf/NaN."""
    if not np.isfinite(row).all():
        return math.nan
    g = math.inf
    for v in row:
        if v:
            f = Fraction(float(v))
            p = abs(f.numerator)
            g = min(g, Fraction(p & -p, f.denominator))
    return float(g)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 40))
def test_min_grain_is_the_exact_grain(seed, k):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((6, k)) * np.exp2(rng.integers(-1080, 1000, (6, k)))   # subnormals to huge
    v[rng.random((6, k)) < 0.3] = 0.0
    v[1] = np.round(v[1] * 64) / 8 if np.isfinite(v[1]).all() else v[1]
    v[2] = 0.0
    v[3, 0] = rng.choice([np.inf, -np.inf, np.nan])
    v[4, -1] = -0.0 if k > 1 else v[4, -1]
    got = K._min_grain(np.ascontiguousarray(v))
    want = np.array([_grain_reference(r) for r in v])
    assert np.array_equal(got, want, equal_nan=True)


def test_min_grain_hand_worked():
    v = np.array([[3.0, 0.5, 6.0], [5e-324, 1.0, 0.0], [0.0, -0.0, 0.0], [2.0**1000, 3 * 2.0**-1074, 1.0],
                  [12.0, -40.0, 2.0**60]])
    assert np.array_equal(K._min_grain(v), [0.5, 5e-324, np.inf, 2.0**-1074, 4.0])
