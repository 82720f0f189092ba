"""Kernels of the products (refimpl/kernels/linear.py) against their spec functions (refimpl/model/linear.py).

mirror, FP8/FP4 weights: bit-identical (the block sums are exact, the blocks added in the spec's order,
model/linear.py), on the one-row, several-row and BLAS paths, for any row and thread count.
mirror, bf16/fp32 weights: bit-identical, except where the exact float64 sum lies on an fp32
rounding boundary (the kernel and BLAS add the same exact products in different orders); every
such case is checked to be one, and at most one output in 10,000 of a case may be one.
float64: within 1e-12 of Σ|x·w| (both sums lie within K·2^-53·Σ|x·w| of the exact value).
float32: the spec's one float32 BLAS product lies within about K·2^-24·Σ|x·w| of the exact value
and the kernel within one fp32 rounding of it: bound (K + 2)·2^-24·Σ|x·w|.
"""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from packed_weights import fp4_matrix, fp8_matrix, on_fp32_boundary
from refimpl.kernels import linear as K
from refimpl.kernels.formats import (dense_fma128x8, dense_lanes128, dense_lanes128x8, fp4_block128, fp4_dot32,
                                     fp4_dot128, fp4_times4)
from refimpl.model import linear as spec
from refimpl.model.attention import grouped_wo_a
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.numerics import act_fp8, round_bf16



def _inputs(rng, rows: int, k: int, prec: str) -> np.ndarray:
    x = rng.standard_normal((rows, k)) * np.exp2(rng.integers(-4, 5, (rows, 1)))
    return round_bf16(x) if prec != "float64" else x


def _abs_product(x, w) -> np.ndarray:
    """Σ|x·w| per output: the scale of every rounding error bound."""
    wd = np.abs(w.dequantize() if isinstance(w, (Fp8Matrix, Fp4Matrix)) else np.asarray(w, np.float64))
    return np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64)) @ wd.astype(np.float64).T


def check_against_spec(kernel_y, spec_y, x_eff, w, prec):
    """Assert the documented agreement of a kernel output with its spec output (2-D views)."""
    assert kernel_y.dtype == spec_y.dtype and kernel_y.shape == spec_y.shape
    ky, sy = kernel_y.reshape(-1, kernel_y.shape[-1]), spec_y.reshape(-1, spec_y.shape[-1])
    bound = _abs_product(x_eff, w)
    if prec == "mirror" and isinstance(w, (Fp8Matrix, Fp4Matrix)):
        assert np.array_equal(ky, sy), f"mirror: {np.sum(ky != sy)} of {ky.size} outputs differ from the spec"
    elif prec == "mirror":
        diff = np.argwhere(ky != sy)
        assert len(diff) <= max(1, ky.size // 10000), f"mirror: {len(diff)} of {ky.size} outputs differ from the spec"
        wd = w.dequantize() if isinstance(w, (Fp8Matrix, Fp4Matrix)) else np.asarray(w, np.float32)
        xr = x_eff.reshape(-1, x_eff.shape[-1]).astype(np.float64)
        for r, n in diff:
            products = xr[r] * wd[n].astype(np.float64)            # exact in float64
            assert on_fp32_boundary(products), (r, n, ky[r, n], sy[r, n])
    elif prec == "float64":
        assert np.all(np.abs(ky - sy) <= 1e-12 * bound + 1e-300)
    else:
        k = x_eff.shape[-1]
        assert np.all(np.abs(ky.astype(np.float64) - sy) <= (k + 2) * 2.0 ** -24 * bound + 1e-38)


PRECS = st.sampled_from(["mirror", "float64", "float32"])


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), prec=PRECS, fmt=st.sampled_from(["fp8", "fp4"]),
       n=st.integers(1, 300), kblocks=st.integers(1, 3), odd_k=st.integers(0, 127), rows=st.integers(1, 5))
def test_quantized_linear_matches_spec(seed, prec, fmt, n, kblocks, odd_k, rows):
    rng = np.random.default_rng(seed)
    k = 128 * kblocks
    if prec != "mirror":                                           # act_quant needs K % 128 == 0; the others do not
        k = max(2, k - odd_k) & ~1                                 # even: FP4 packs two per byte
    w = fp8_matrix(rng, n, k) if fmt == "fp8" else fp4_matrix(rng, n, k)
    x = _inputs(rng, rows, k, prec).reshape(rows, 1, k) if rows > 1 else _inputs(rng, 1, k, prec)[0]
    ky = K.quantized_linear(x, w, prec)
    sy = spec.quantized_linear(x, w, prec)
    check_against_spec(ky, sy, act_fp8(x, prec), w, prec)


@pytest.fixture
def small_panels(monkeypatch):
    """The BLAS path in panels of 64 weight and input rows, so that small products cross panel edges, and mirror's
    FP8/FP4 products through one dgemm over K at any K (FULL_K_MIN; the other tests take the block products)."""
    monkeypatch.setattr(K, "PANEL_ROWS", 64)
    monkeypatch.setattr(K, "FULL_K_MIN", 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(["fp8", "fp4"]), n=st.integers(1, 150),
       kblocks=st.integers(1, 3), rows=st.sampled_from([1, 2, 5, 16, 17, 70]), span=st.sampled_from([4, 24, 25, 120]),
       act_span=st.integers(0, 40))
def test_mirror_quantized_products_are_the_spec_on_every_path(small_panels, seed, fmt, n, kblocks, rows, span,
                                                              act_span):
    """mirror, FP8/FP4: every path (one row, several rows in Numba, BLAS from BLAS_MIN_ROWS rows, in panels)
    gives the spec's bits, with weight scales spanning up to 120 binades (FP4 blocks past 24: the
    32-column sums) and activation blocks 2^±act_span apart; each row alone gives the same bits."""
    rng = np.random.default_rng(seed)
    k = 128 * kblocks
    top = 245 if fmt == "fp8" else 252                                 # no weight beyond fp32's range
    lo = int(rng.integers(1, min(254 - min(span, 120), top - 1)))      # lo < hi: a non-empty scale range
    hi = min(lo + span, top)
    w = fp8_matrix(rng, n, k, scale_lo=lo, scale_hi=hi) if fmt == "fp8" else fp4_matrix(rng, n, k, scale_lo=lo,
                                                                                          scale_hi=hi)
    x = rng.standard_normal((rows, k)) * np.exp2(rng.integers(-act_span, act_span + 1, (rows, kblocks)).repeat(128, 1))
    x = round_bf16(x)
    with np.errstate(over="ignore"):                                   # extreme scales: some sums pass fp32's range
        ky = K.quantized_linear(x, w, "mirror")
        assert np.array_equal(ky, spec.quantized_linear(x, w, "mirror"))
        for r in {0, rows - 1}:
            assert np.array_equal(K.quantized_linear(x[r:r + 1], w, "mirror")[0], ky[r])


@pytest.mark.parametrize("full_k_min", [0, None])
@pytest.mark.parametrize("rows", [1, 3, 18])
def test_mirror_block_order_hand_worked_on_every_path(rows, full_k_min, monkeypatch):
    """Blocks (1, 2^60, -2^60) in every order add to ((a + b) + c): 0 or 1, on each kernel path (FP8 128-column
    blocks; FP4 32-column sums inside one block, whose spans of 60 binades send BLAS to the 32-column sums;
    from 16 rows BLAS's one dgemm over K (FULL_K_MIN 0) and its block products)."""
    if full_k_min is not None:
        monkeypatch.setattr(K, "FULL_K_MIN", full_k_min)
    import itertools
    big = 2.0 ** 60
    perms = [list(p) for p in itertools.permutations([1.0, big, -big])]
    want = np.array([(a + b) + c for a, b, c in perms] * 3, np.float32)[:max(rows, 6)]
    codes = np.zeros((1, 384), np.uint8)
    codes[0, [0, 129, 258]] = 0x38                                     # e4m3 1.0
    w8 = Fp8Matrix(codes.view(ml_dtypes.float8_e4m3fn), np.full((1, 3), 127, np.uint8).view(ml_dtypes.float8_e8m0fnu))
    x8 = np.zeros((len(want), 384), np.float32)
    x8[:, [0, 129, 258]] = (perms * 3)[:len(want)]
    assert np.array_equal(K.quantized_linear(x8[:rows], w8, "mirror")[:, 0], want[:rows])
    from refimpl.numerics import pack_fp4
    nib = np.zeros((6, 128), np.uint8)
    scale = np.full((6, 4), 127, np.uint8)
    for r, p in enumerate(perms):
        for q, v in enumerate(p):
            nib[r, [0, 33, 66][q]] = 2 if v > 0 else 10                # e2m1 ±1.0
            scale[r, q] = 187 if abs(v) == big else 127                # 2^60 / 2^0
    w4 = Fp4Matrix(pack_fp4(nib), scale.view(ml_dtypes.float8_e8m0fnu))
    x4 = np.zeros((rows, 128), np.float32)
    x4[:, [0, 33, 66]] = 1.0
    y = K.quantized_linear(x4, w4, "mirror")
    assert np.array_equal(y, np.tile(want[:6], (rows, 1)))


@pytest.mark.parametrize("abs_block", [1, 16, 1000])     # the bound on Σ|x·w|: tightest, the default, the loosest
@pytest.mark.parametrize("wdtype", ["bf16", "f32"])
def test_mirror_dense_products_on_many_rows_are_the_kernel_row_by_row(wdtype, abs_block, monkeypatch):
    """mirror, bf16/fp32 weights, >= BLAS_MIN_ROWS rows (blas_rounding_checked): each row's fp32 result is the
    one-row kernel's bit for bit. The rows cancel massively (x = [a, b, ..., -b, -a] plus a small term), so
    BLAS's own float64 order rounds to another fp32 value on many of them: the midpoint check and the
    kernel's recomputation are what make them equal."""
    rng = np.random.default_rng(0)
    k, rows = 64, 200
    x = (rng.standard_normal((rows, k)) * np.exp2(rng.integers(-30, 30, (rows, k)))).astype(np.float32)
    x[:, k // 2:] = -x[:, :k // 2][:, ::-1]
    x[:, 5] = rng.standard_normal(rows)
    w = np.ones((3, k), np.float32)
    w[1] = rng.standard_normal(k)
    w = w.astype(ml_dtypes.bfloat16) if wdtype == "bf16" else w
    one = np.stack([K.fp32_linear(x[r:r + 1], w, "mirror")[0] for r in range(rows)])
    monkeypatch.setattr(K, "ABS_BLOCK", abs_block)
    blas = (x.astype(np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)
    assert np.sum(blas[:, 0] != one[:, 0]) > 10                        # BLAS alone rounds otherwise
    assert np.array_equal(K.fp32_linear(x, w, "mirror"), one)
    assert np.array_equal(K.fp32_linear(x[17:150], w, "mirror"), one[17:150])


def test_fp4_spans_fit_hand_worked():
    """A 128-column FP4 block fits when its four 1x32 scales span at most 24 binades."""
    assert K.fp4_spans_fit(np.array([[100, 124, 110, 100], [0, 24, 24, 0]], np.uint8))
    assert not K.fp4_spans_fit(np.array([[100, 125, 110, 100], [0, 24, 24, 0]], np.uint8))
    assert K.fp4_spans_fit(np.array([[0, 0, 0, 0, 200, 200, 200, 200]], np.uint8))   # spans within each block
    assert not K.fp4_spans_fit(np.array([[0, 0]], np.uint8))                         # not whole blocks


def test_blas_tasks_restore_the_thread_count_and_raise():
    """blas.run_tasks runs every task once, restores OpenBLAS's thread count, and raises a task's error."""
    from refimpl.kernels import blas
    lib = blas._openblas()
    before = int(lib[0]()) if lib else None
    done = []
    blas.run_tasks(done.append, range(7))
    assert sorted(done) == list(range(7))
    assert (int(lib[0]()) if lib else None) == before

    def boom(t):
        if t == 3:
            raise ValueError("task 3")
    with pytest.raises(ValueError, match="task 3"):
        blas.run_tasks(boom, range(5))
    assert (int(lib[0]()) if lib else None) == before


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), prec=PRECS, wdtype=st.sampled_from(["bf16", "f32"]),
       n=st.integers(1, 200), k=st.integers(1, 300), rows=st.integers(1, 4), out=st.sampled_from(["fp32", "bf16"]))
def test_dense_linear_matches_spec(seed, prec, wdtype, n, k, rows, out):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * k ** -0.5).astype(np.float32)
    if wdtype == "bf16":
        w = w.astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((rows, k)).astype(np.float64 if prec == "float64" else np.float32)
    kf, sf = (K.fp32_linear, spec.fp32_linear) if out == "fp32" else (K.bf16_linear, spec.bf16_linear)
    check_against_spec(kf(x, w, prec), sf(x, w, prec), x, w, prec)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), prec=PRECS, groups=st.sampled_from([1, 2, 4]),
       r=st.sampled_from([32, 96, 128, 160]), kg=st.sampled_from([64, 128, 200]))
def test_grouped_wo_a_matches_spec(seed, prec, groups, r, kg):
    rng = np.random.default_rng(seed)
    wo_a = fp8_matrix(rng, groups * r, kg)                         # group row ranges cross the 128-row scale blocks
    o = _inputs(rng, 3 * groups, kg, prec).reshape(1, 3, groups, kg)
    ky, sy = K.grouped_wo_a(o, wo_a, groups, prec), grouped_wo_a.spec(o, wo_a, groups, prec)
    assert ky.shape == sy.shape == (1, 3, groups, r)
    wd = wo_a.dequantize().reshape(groups, r, kg)
    for gi in range(groups):
        g = Fp8Matrix(wo_a.values[gi * r:(gi + 1) * r], wo_a.scale)   # only for the bound's dequantize
        check_against_spec(ky[:, :, gi], sy[:, :, gi], o[:, :, gi], wd[gi], prec)
        del g


@pytest.mark.parametrize("prec", ["mirror", "float64", "float32"])
@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16", "f32"])
def test_rows_are_independent_of_the_row_count(prec, fmt):
    """Row r of a 7-row call is bit-identical to the 1-row call on that row."""
    rng = np.random.default_rng(7)
    n, k = 200, 384
    w = {"fp8": lambda: fp8_matrix(rng, n, k), "fp4": lambda: fp4_matrix(rng, n, k),
         "bf16": lambda: rng.standard_normal((n, k)).astype(ml_dtypes.bfloat16),
         "f32": lambda: rng.standard_normal((n, k)).astype(np.float32)}[fmt]()
    f = K.fp32_linear if fmt in ("bf16", "f32") else K.quantized_linear
    x = _inputs(rng, 7, k, prec)
    many = f(x, w, prec)
    for r in range(7):
        assert np.array_equal(f(x[r:r + 1], w, prec)[0], many[r])


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_rows_across_input_tiles_are_independent_of_the_row_count(fmt):
    """With K = 4096 the several-row path takes the input rows in tiles of 32 (TILE_BYTES): a row
    gives the same bits alone, in a 67-row call (three tiles, an odd last one) and in a chunk that
    starts mid-tile."""
    from refimpl.kernels.linear import TILE_BYTES
    rng = np.random.default_rng(11)
    n, k = 40, 4096
    assert TILE_BYTES // (8 * k) == 32
    w = fp8_matrix(rng, n, k) if fmt == "fp8" else fp4_matrix(rng, n, k)
    x = _inputs(rng, 67, k, "mirror")
    many = K.quantized_linear(x, w, "mirror")
    chunk = K.quantized_linear(x[10:50], w, "mirror")
    assert np.array_equal(chunk, many[10:50])
    for r in (0, 1, 31, 32, 33, 63, 64, 66):
        assert np.array_equal(K.quantized_linear(x[r:r + 1], w, "mirror")[0], many[r])


def test_bad_input_is_refused_as_the_spec_refuses_it():
    rng = np.random.default_rng(0)
    w = fp8_matrix(rng, 64, 128)
    with pytest.raises(ValueError, match="last dim"):
        K.quantized_linear(np.zeros((2, 100), np.float32), w, "float32")
    with pytest.raises(TypeError, match="float32"):                # act_quant's own check, as in the spec
        K.quantized_linear(np.zeros((2, 128)), w, "mirror")
    bad = Fp8Matrix(w.values, np.full(w.scale.shape, 255, np.uint8).view(ml_dtypes.float8_e8m0fnu))
    for f in (K.quantized_linear, spec.quantized_linear):
        with pytest.raises(ValueError, match="scale is NaN"):
            f(np.zeros((1, 128), np.float32), bad, "float32")
    with pytest.raises(TypeError, match="Fp8Matrix or Fp4Matrix"):
        K.quantized_linear(np.zeros((1, 128), np.float32), np.zeros((64, 128), np.float32), "float32")
    with pytest.raises(ValueError, match="unknown precision"):
        K.quantized_linear(np.zeros((1, 128), np.float32), w, "float16")


def test_nan_codes_give_nan_as_in_the_spec():
    rng = np.random.default_rng(1)
    w = fp8_matrix(rng, 8, 128)
    codes = w.values.view(np.uint8).copy()
    codes[3, 5] = 0x7F
    w = Fp8Matrix(codes.view(ml_dtypes.float8_e4m3fn), w.scale)
    x = np.ones((1, 128), np.float32)
    ky, sy = K.quantized_linear(x, w, "float64"), spec.quantized_linear(x, w, "float64")
    assert np.array_equal(np.isnan(ky), np.isnan(sy)) and np.isnan(ky[0, 3]) and np.isnan(ky).sum() == 1


_SCRIPT = """
import json, sys, numpy as np
sys.path.insert(0, {here!r})
from packed_weights import fp4_matrix, fp8_matrix
from refimpl.kernels import linear as K
from refimpl.model import linear as spec
from refimpl.numerics import round_bf16
rng = np.random.default_rng(3)
x = round_bf16(rng.standard_normal((2, 128)))
out = {{}}
for name, w in (("fp8", fp8_matrix(rng, 40, 128)), ("fp4", fp4_matrix(rng, 40, 128))):
    for prec in ("mirror", "float64"):
        y = K.quantized_linear(x, w, prec)
        out[name + prec] = [y.tobytes().hex(), bool(np.array_equal(y, spec.quantized_linear(x, w, prec)))]
fmt, codes, scale, _ = K.checked_codes(w)                          # the parallel kernel itself (big enough)
xp = np.repeat(x.astype(np.float64), 3, axis=0)
out["parallel"] = K.product_kernel(fmt, xp, codes, scale, codes.shape[0], 0).tobytes().hex()
out["serial"] = K.product_kernel_serial(fmt, xp, codes, scale, codes.shape[0], 0).tobytes().hex()
# the one-row paths of decode: FP4 (integer sums, vector scaling), dense eight rows at a time (fused for float32 x)
x1 = round_bf16(rng.standard_normal((1, 256)))
out["fp4row"] = K.quantized_linear(x1, fp4_matrix(rng, 40, 256), "mirror").tobytes().hex()
wd = rng.standard_normal((45, 256)).astype(np.float32)
out["dense"] = [K.fp32_linear(x1.astype(np.float32), wd, "mirror").tobytes().hex(),
                K.fp32_linear(rng.standard_normal((1, 256)), wd, "float64").tobytes().hex()]
# thread-count test: products long enough that two threads overlap in each prange (64 tasks of 32
# rows; the several-row path and both one-row paths), three times each: a scratch buffer the threads
# share corrupts some of them
if {large}:
    import hashlib
    h = hashlib.sha256()
    xl = round_bf16(rng.standard_normal((16, 1024))).astype(np.float64)
    for w in (fp8_matrix(rng, 2048, 1024), fp4_matrix(rng, 2048, 1024)):
        fmt, codes, scale, _ = K.checked_codes(w)
        for rows in (xl, xl[:1]):
            for _ in range(3):
                h.update(K.product_kernel(fmt, rows, codes, scale, codes.shape[0], 0).tobytes())
    out["large"] = h.hexdigest()
xb = round_bf16(rng.standard_normal((40, 512)))                    # the BLAS path (mirror, >= BLAS_MIN_ROWS rows)
K.PANEL_ROWS = 32
out["blas"] = "".join(K.quantized_linear(xb, w, "mirror").tobytes().hex()
                      for w in (fp8_matrix(rng, 100, 512), fp4_matrix(rng, 100, 512)))
print(json.dumps(out))
"""


def _run(env: dict, large: bool = False) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(here=here, large=large)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_thread_count_does_not_change_a_bit():
    """One thread and two give the same bits, on small products and on products where two threads
    overlap in each prange ("large"), each called three times: a scratch buffer shared by the
    threads fails this on every run."""
    one, two = _run({"NUMBA_NUM_THREADS": "1"}, large=True), _run({"NUMBA_NUM_THREADS": "2"}, large=True)
    assert one == two and "large" in one
    assert one["parallel"] == one["serial"]                       # the one-thread path for small products
    assert one["fp8mirror"][1] and one["fp4mirror"][1]             # and equal to the spec on these inputs


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_parallel_and_serial_kernels_agree_bitwise(fmt, rows):
    rng = np.random.default_rng(11)
    n, k = 300, 384
    if fmt == "bf16":
        codes, scale, f = rng.integers(0, 1 << 16, (n, k), dtype=np.uint16), K._NO_SCALE, K.FMT_BF16
        codes[(codes & 0x7F80) == 0x7F80] = 0                     # no Inf/NaN
    else:
        w = fp8_matrix(rng, n, k) if fmt == "fp8" else fp4_matrix(rng, n, k)
        f, codes, scale, _ = K.checked_codes(w)
    x = round_bf16(rng.standard_normal((rows, k))).astype(np.float64)
    assert np.array_equal(K.product_kernel(f, x, codes, scale, n, 0), K.product_kernel_serial(f, x, codes, scale, n, 0))


def test_pure_python_run_gives_the_same_bits():
    """NUMBA_DISABLE_JIT=1: the kernels as plain Python give the compiled kernels' results."""
    assert _run({"NUMBA_DISABLE_JIT": "1"}) == _run({})


@pytest.mark.parametrize("n, k", [(7, 384), (33, 300), (5, 62)])
def test_fp4_one_row_path_matches_the_general_path_bitwise(n, k):
    """The one-row FP4 path (two weight rows per pass; an odd last row alone; a partial last block)
    gives the bits of the general path (a row of a two-row call), row by row."""
    rng = np.random.default_rng(n * k)
    f, codes, scale, _ = K.checked_codes(fp4_matrix(rng, n, k, scale_lo=0, scale_hi=255))
    x = round_bf16(rng.standard_normal((2, k)) * 2.0 ** rng.integers(-60, 60, (2, k))).astype(np.float64)
    both = K.product_kernel_serial(f, x, codes, scale, n, 0)
    for r in range(2):
        assert np.array_equal(K.product_kernel_serial(f, x[r:r + 1], codes, scale, n, 0)[0], both[r])


def test_checked_codes_checks_a_read_only_matrix_once_and_a_writeable_one_every_call():
    rng = np.random.default_rng(7)
    w = fp8_matrix(rng, 130, 256)
    w.values.flags.writeable = False
    w.scale.flags.writeable = False
    first = K.checked_codes(w)
    again = K.checked_codes(w)                                     # from the cache: the same format, bytes and flag
    assert first[0] == again[0] == K.FMT_FP8 and first[3] is again[3] is False
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[2], again[2])
    assert again[1].dtype == again[2].dtype == np.uint8
    bad_scale = w.scale.view(np.uint8).copy()
    bad_scale[0, 0] = 255                                          # a NaN scale in another read-only matrix: checked
    bad_scale.flags.writeable = False
    with pytest.raises(ValueError, match="NaN"):
        K.checked_codes(Fp8Matrix(w.values, bad_scale.view(ml_dtypes.float8_e8m0fnu)))
    fp4 = Fp4Matrix(w.values.view(np.int8), np.zeros((130, 16), np.uint8))   # the same bytes as FP4: its own entry
    assert K.checked_codes(fp4)[0] == K.FMT_FP4
    m = fp8_matrix(rng, 130, 256)                                  # writeable: a NaN code written later is seen
    assert K.checked_codes(m)[3] is False
    m.values.view(np.uint8)[3, 5] = 0x7F
    assert K.checked_codes(m)[3] is True


# float64's row-count independence rests on the spec's row-by-row products (model/linear.py `_row_by_row`: one
# BLAS matrix-vector call per row, the same call for the same weight) and on the fixed-order kernel. Measured on
# the machine that runs the tests, for the model's shape families (K inputs, N outputs: dim, q_lora_rank,
# o_lora_rank, moe_inter_dim, hc_mult·dim, the mix count, the head, at tiny and Flash sizes): a row's bits are the
# same alone, among other rows, and from a misaligned copy. (A plain dgemm fails this, which is why float64 does
# not use one: docs/architecture.md §4.)
ROW_FAMILIES = [(256, 1024), (256, 128), (128, 1024), (1024, 24), (512, 128), (128, 256), (256, 1280),
                (4096, 1024), (1024, 4096), (4096, 512), (16384, 24)]


@pytest.mark.parametrize("k,n", ROW_FAMILIES)
def test_float64_spec_rows_do_not_depend_on_the_other_rows(k, n):
    rng = np.random.default_rng(k * 7 + n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((17, k))
    y = spec.matmul.spec(x, w, "float64")
    buf = np.empty(k + 1)                                              # a row 8 bytes off the allocation's alignment
    buf[1:] = x[16]
    for r, alone in ((0, x[:1]), (16, x[16:]), (16, buf[1:][None])):
        assert np.array_equal(spec.matmul.spec(alone, w, "float64")[0], y[r])


@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), kind=st.sampled_from(["fp8", "fp4", "bf16"]))
def test_float64_kernel_row_is_the_same_alone_and_among_any_rows(seed, rows, kind):
    """float64 mode through the kernels: each row of a call of any length has the bits of that row alone
    (decode == prefill) and lies within the float64 bound of the spec's row-by-row product."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 256))
    if kind == "bf16":
        w = round_bf16(rng.standard_normal((150, 256))).astype(ml_dtypes.bfloat16)
        f, ref = K.fp32_linear, spec.fp32_linear
    else:
        w = (fp8_matrix if kind == "fp8" else fp4_matrix)(rng, 150, 256)
        f, ref = K.quantized_linear, spec.quantized_linear
    y = f(x, w, "float64")
    for r in {0, rows // 2, rows - 1}:
        assert np.array_equal(f(x[r:r + 1][None], w, "float64")[0, 0], y[r])   # [1, 1, k]: a decode step's shape
    assert np.all(np.abs(y - ref(x, w, "float64")) <= _abs_product(x, w) * 1e-12)
@njit
def _dot32(codes, n, j, xq, i):
    """formats.fp4_dot32 (an intrinsic: callable from compiled code only)."""
    return fp4_dot32(codes, n, j, xq, i)


def test_fp4_times4_on_every_code():
    """formats.fp4_times4 and the compiled fp4_dot32 decode all 16 e2m1 codes to 4 · their value."""
    want = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64) * 4
    assert [fp4_times4(c) for c in range(16)] == want.tolist()
    one = np.zeros(32, np.int32)
    for c in range(16):                                            # the byte's low nibble alone, then the high one
        one[:] = 0
        one[3] = 1
        assert _dot32(np.array([[0] * 3 + [c] + [0] * 12], np.uint8), 0, 0, one, 0) == want[c]
        one[3], one[16 + 3] = 0, 1
        assert _dot32(np.array([[0] * 3 + [c << 4] + [0] * 12], np.uint8), 0, 0, one, 0) == want[c]


def test_fp4_dot32_hand_worked():
    """Σ of 16 bytes' two nibbles against their own columns, with an offset into both arrays."""
    codes = np.zeros((2, 20), np.uint8)
    codes[1, 4:20] = 0x7A                                          # low nibble 0xA = -1.0 (x4: -4), high 0x7 = 6.0 (x4: 24)
    xq = np.zeros(40, np.int32)
    xq[8:24] = np.arange(16)                                       # even columns
    xq[24:40] = 1000                                               # odd columns
    assert _dot32(codes, 1, 4, xq, 8) == -4 * sum(range(16)) + 24 * 1000 * 16


def _fp4_x(rng, k, kind):
    """One input row [k] of the kinds the integer path must take or refuse (float64, FP4 lane order later)."""
    x = act_fp8(rng.standard_normal((1, k)).astype(np.float32) * np.float32(2.0 ** rng.integers(-20, 20)), "mirror")
    x = x.astype(np.float64)[0]
    if kind == "wide":                                             # 2^-60 beside 1: no int32 form, float64 lanes
        x[rng.integers(0, k)] = 2.0 ** -60
    elif kind == "nonfinite":
        x[rng.integers(0, k)] = rng.choice([np.inf, -np.inf, np.nan])
    elif kind == "zeros":
        x[:64] = 0.0
        x[64:96] = -0.0
    elif kind == "tiny":                                           # subnormal float64 values: E below the normal range
        x *= 2.0 ** -1060
        x[rng.integers(0, k)] = 2.0 ** -1074                       # at least one (the rest may all underflow to 0)
    elif kind == "any":                                            # float64 mode: arbitrary values
        x = rng.standard_normal(k) * 2.0 ** rng.integers(-30, 30, k)
    return x


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 70), kblocks=st.integers(1, 3),
       kind=st.sampled_from(["mirror", "wide", "nonfinite", "zeros", "tiny", "any"]),
       lo=st.integers(0, 250), span=st.sampled_from([0, 4, 30, 255]))
def test_fp4_integer_one_row_path_is_the_float_lanes_bit_for_bit(seed, n, kblocks, kind, lo, span):
    """The one-row FP4 path in integers (_fp4_matvec_rows_int) gives the float64 lanes' bits
    (_fp4_matvec_rows) for every input: mirror's activations, blocks with no int32 form, inf/NaN,
    signed zeros, products below float64's normal range, arbitrary float64 inputs, scales 0-254."""
    rng = np.random.default_rng(seed)
    k = 128 * kblocks
    f, codes, scale, _ = K.checked_codes(fp4_matrix(rng, n, k, scale_lo=lo, scale_hi=min(255, lo + span + 1)))
    xd = K._deinterleave_fp4(_fp4_x(rng, k, kind)[None])[0]
    want, got = np.empty(n), np.empty(n)
    K._fp4_matvec_rows(xd, codes, scale, 0, n, want)
    xq, xg = K._fp4_int_x(xd)
    with np.errstate(over="ignore", invalid="ignore"):
        K._fp4_matvec_rows_int(xd, xq, xg, codes, scale, 0, n, got)
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64)) or (
        np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)]))
    if kind == "mirror":
        assert (xg != K.NO_GRAIN).all()                            # mirror's activations all take the integer path
    if kind in ("wide", "nonfinite"):
        assert (xg == K.NO_GRAIN).sum() >= 1


def test_fp4_int_x_hand_worked():
    """The integer form of a 1x32 block: x = xq · 2^g with g the least grain; even columns first."""
    x = np.zeros(128)
    x[0], x[1], x[2] = 1.5, -0.25, 3.0                             # grain 2^-2: xq = 6, -1, 12
    x[40] = 2.0 ** 30                                              # block 1: 2^30 alone: xq = 1, g = 30
    x[64] = 1.0                                                    # block 2: 1 and 2^-21: range 2^21, refused
    x[66] = 2.0 ** -21
    xq, g = K._fp4_int_x(K._deinterleave_fp4(x[None])[0])
    assert g.tolist() == [-2, 30, K.NO_GRAIN, 0]                   # block 3: zeros (g = 0)
    assert xq[0] == 6 and xq[1] == 12 and xq[16] == -1             # columns 0, 2 (even), then 1 (odd)
    assert xq[32 + 4] == 1 and not xq[96:].any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 70), kblocks=st.integers(1, 3), odd_k=st.sampled_from([0, 0, 5]),
       kind=st.sampled_from(["mirror", "wide", "nonfinite", "zeros", "tiny", "any"]),
       lo=st.integers(0, 250), span=st.sampled_from([0, 4, 30, 255]))
def test_fp8_exact_block_sums_are_the_float_lanes_bit_for_bit(seed, n, kblocks, odd_k, kind, lo, span):
    """The one-row FP8 path with exact blocks taken in any order (formats.fp8_dot128, then the scale) gives the
    float64 lanes' bits for every input kind and scales 0-254; a partial last block stays in lanes."""
    rng = np.random.default_rng(seed)
    k = 128 * kblocks + odd_k
    f, codes, scale, _ = K.checked_codes(fp8_matrix(rng, n, k, scale_lo=lo, scale_hi=min(255, lo + span + 1)))
    x = np.concatenate([_fp4_x(rng, 128 * kblocks, kind), rng.standard_normal(odd_k)])
    exact = K._fp8_exact_blocks(x)
    want, got = np.empty(n), np.empty(n)
    with np.errstate(over="ignore", invalid="ignore"):
        K._matvec_rows(f, x, codes, scale, 0, n, 0, want, np.zeros_like(exact))
        K._matvec_rows(f, x, codes, scale, 0, n, 0, got, exact)
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64)) or (
        np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)]))
    if kind in ("mirror", "zeros"):
        assert exact[:kblocks].all()                               # mirror's activations take the exact path
    assert not (odd_k and exact[-1])
    if kind in ("wide", "nonfinite", "tiny"):
        assert not exact.all()


def test_fp8_exact_blocks_hand_worked():
    """Blocks whose sums are exact in any order: integers below 2^28 times one power of two, in range."""
    x = np.zeros(128 * 5)
    x[0:2] = 448.0, 2.0 ** -9                                       # block 0: an e4m3 range (2^18): exact
    x[128:130] = 1.0, 2.0 ** -28                                    # block 1: 2^28 apart: refused
    x[256] = np.nan                                                 # block 2: NaN: refused
    x[384] = 2.0 ** -1000                                           # block 3: grain 2^-1000 < 2^-938: refused
    x[512:514] = 2.0 ** 27, -(2.0 ** 27) + 1                        # block 4: |xq| < 2^28: exact
    assert K._fp8_exact_blocks(x).tolist() == [True, False, False, False, True]
    assert K._fp8_exact_blocks(x[:600]).tolist() == [True, False, False, False, False]   # a partial block: lanes


@njit
def _lanes128(codes, n, j, x, i):
    """formats.dense_lanes128 (an intrinsic: callable from compiled code only)."""
    return dense_lanes128(codes, n, j, x, i)


def _lanes_order(x, w):
    """linear.py's block order, written out: lane l = Σ_p x[p + l]·w[p + l] over p = 0, 16, .. in order, then the
    lanes added in ascending order from +0.0."""
    a = [0.0] * 16
    for p in range(0, 128, 16):
        for lane in range(16):
            a[lane] = a[lane] + float(x[p + lane]) * float(w[p + lane])
    y = 0.0
    for v in a:
        y += v
    return y


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["bf16", "f32"]), spread=st.integers(0, 60))
def test_dense_lanes128_is_the_lane_order_bit_for_bit(seed, dtype, spread):
    """The dense block sum held in a register gives the written-out lane order's bits on float64 inputs whose
    products and sums round (float64 mode): no fused multiply-add, no reassociation."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(130) * 2.0 ** rng.integers(-spread, spread + 1, 130)
    w = (rng.standard_normal((3, 140)) * 2.0 ** rng.integers(-spread, spread + 1, (3, 140))).astype(np.float32)
    codes = (w.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bf16" else w.view(np.uint32))
    wv = codes.astype(np.uint32) << 16 if dtype == "bf16" else codes
    for n, j, i in ((0, 0, 0), (2, 12, 2)):
        want = _lanes_order(x[i:i + 128], wv[n, j:j + 128].view(np.float32))
        got = _lanes128(codes, n, j, x, i)
        assert np.float64(got).view(np.uint64) == np.float64(want).view(np.uint64)


@njit
def _lanes128x8(codes, n, j, x, i, fused):
    """formats.dense_lanes128x8 / dense_fma128x8 (intrinsics: callable from compiled code only)."""
    return dense_fma128x8(codes, n, j, x, i) if fused else dense_lanes128x8(codes, n, j, x, i)


def _same_bits(got, want) -> bool:
    """Equal bit for bit, or (NaN payloads aside) equal with NaN in the same places."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return bool(np.array_equal(got.view(np.uint64), want.view(np.uint64)) or (
        np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])))


def _dense_case(rng, dtype, spread, rows, k, kind):
    """(codes [rows, k] bf16/fp32 bits, their float32 values, x [k] float64) for the dense one-row tests. kind:
    "f32" x of finite float32 values (mirror, float32 mode: the fused path), "f64" arbitrary float64 values,
    "nonfinite" float32 values with an inf or NaN; the weights have signed zeros, subnormals and (sometimes) inf/NaN."""
    w = (rng.standard_normal((rows, k)) * 2.0 ** rng.integers(-spread, spread + 1, (rows, k))).astype(np.float32)
    w.reshape(-1)[rng.integers(0, w.size, 3)] = np.float32(-0.0), np.float32(0.0), np.float32(2.0 ** -140)
    if rng.random() < 0.3:
        w.reshape(-1)[rng.integers(0, w.size)] = rng.choice([np.inf, -np.inf, np.nan])
    codes = (w.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bf16" else w.view(np.uint32))
    wv = (codes.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else w
    x = rng.standard_normal(k) * 2.0 ** rng.integers(-spread, spread + 1, k)
    if kind != "f64":
        x = x.astype(np.float32).astype(np.float64)
        x[rng.integers(0, k)] = -0.0
    if kind == "nonfinite":
        x[rng.integers(0, k)] = rng.choice([np.inf, -np.inf, np.nan])
    return codes, wv, x


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["bf16", "f32"]), spread=st.integers(0, 60),
       kind=st.sampled_from(["f32", "f64", "nonfinite"]))
def test_dense_lanes128x8_is_eight_dense_lanes128(seed, dtype, spread, kind):
    """Eight rows at once (the lanes transposed and summed as vectors) give dense_lanes128's bits for each row, at
    offsets into both arrays; with fused multiply-adds the same where x holds float32 values (exact products)."""
    rng = np.random.default_rng(seed)
    codes, _, x = _dense_case(rng, dtype, spread, 11, 140, kind)
    for n, j, i in ((0, 0, 0), (3, 12, 2)):
        want = [_lanes128(codes, n + r, j, x, i) for r in range(8)]
        assert _same_bits(_lanes128x8(codes, n, j, x, i, False), want)
        if kind == "f32":
            assert _same_bits(_lanes128x8(codes, n, j, x, i, True), want)


def test_dense_lanes128x8_hand_worked():
    """Row r of eight: lane sums added in ascending order from +0.0. Row 0: lane 0 holds 2^53 and lane 1 holds
    1 + 1 (two positions 16 apart): (2^53 + 2) ... exact; row 1: lane 0 holds 2^53, lanes 1 and 2 hold 1 each:
    2^53 + 1 rounds to 2^53 (ties to even) twice: 2^53, where lanes added pairwise would give 2^53 + 2."""
    x = np.ones(128)
    codes = np.zeros((8, 128), np.float32)
    codes[0, 0], codes[0, 1], codes[0, 17] = 2.0 ** 53, 1.0, 1.0
    codes[1, 0], codes[1, 1], codes[1, 2] = 2.0 ** 53, 1.0, 1.0
    codes[7, 127] = -3.0
    got = _lanes128x8(codes.view(np.uint32), 0, 0, x, 0, False)
    assert got == (2.0 ** 53 + 2, 2.0 ** 53, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["bf16", "f32"]), spread=st.integers(0, 40),
       kind=st.sampled_from(["f32", "f32", "f64", "nonfinite"]), rows=st.integers(1, 30), kblocks=st.integers(1, 3),
       n_lo=st.integers(0, 5))
def test_dense_one_row_path_is_the_lane_order(seed, dtype, spread, kind, rows, kblocks, n_lo):
    """The dense one-row path (_matvec_rows: eight rows at a time, fused multiply-adds for float32 inputs, the
    remaining rows two at a time) gives linear.py's written-out order bit for bit, for any row range."""
    rng = np.random.default_rng(seed)
    k = 128 * kblocks
    codes, wv, x = _dense_case(rng, dtype, spread, rows + n_lo, k, kind)
    f = K.FMT_BF16 if dtype == "bf16" else K.FMT_F32
    exact = K._dense_exact(x)
    assert bool(exact[0]) == (kind == "f32")
    got = np.full(rows + n_lo, 7.0)
    with np.errstate(over="ignore", invalid="ignore"):
        K._matvec_rows(f, x, codes, K._NO_SCALE, n_lo, n_lo + rows, 0, got, exact)
        want = [sum((_lanes_order(x[b:b + 128], wv[n, b:b + 128]) for b in range(0, k, 128)), 0.0)
                for n in range(n_lo, n_lo + rows)]
    assert (got[:n_lo] == 7.0).all()                               # rows outside the range untouched
    assert _same_bits(got[n_lo:], want)


def test_dense_exact_hand_worked():
    """The fused path's condition: finite float32 values only."""
    x = np.array([1.5, -0.0, 2.0 ** -149, 3.4e38], np.float32).astype(np.float64)
    assert K._dense_exact(x)[0]
    for bad in (0.1, np.inf, np.nan, 2.0 ** -150, 1e39):
        assert not K._dense_exact(np.append(x, bad))[0]


@njit
def _block128(codes, n, j, xq, i, scale, xg):
    """formats.fp4_block128 (an intrinsic: callable from compiled code only)."""
    return fp4_block128(codes, n, j, xq, i, scale, xg)


def test_fp4_block128_is_the_scaled_sums_in_order():
    """fp4_block128: the four 1x32 sums of fp4_dot128, each times 2^(scale - 129 + g), added in ascending order.
    Hand-worked: one nibble per 1x32 block (1.0 or -1.0: 4·e2m1 = ±4) against xq = 1, scaled to 1, 2^53 or -2^53:
    (1 + 2^53) - 2^53 + 0 = 0 (2^53 + 1 rounds to 2^53), and 2^53 + 1 + 1 + 1 = 2^53, where other orders give
    1 or 2^53 + 2. Then random blocks at offsets into every array, against the formula in plain Python."""
    codes = np.zeros((1, 64), np.uint8)
    xq = np.zeros(128, np.int32)
    xq[0::32] = 1                                                  # the low nibble of byte 16q meets xq[32q]
    for nibbles, scales, want in (([2, 2, 10, 0], [127, 180, 180, 127], 0.0),
                                  ([2, 2, 2, 2], [180, 127, 127, 127], 2.0 ** 53)):
        codes[0, 0::16] = nibbles                                  # 2: 1.0, 10: -1.0, 0: 0
        got = _block128(codes, 0, 0, xq, 0, np.array([scales], np.uint8), np.zeros(4, np.int64))
        assert got == want
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 256, (3, 96), dtype=np.uint8)
    xq = rng.integers(-(1 << 20), 1 << 20, 160).astype(np.int32)
    scale = np.array([[127] * 6, [20, 227, 200, 127, 127, 60], [100, 130, 160, 190, 127, 127]], np.uint8)
    xg = np.array([0, -40, 3, -7, 100, -1], np.int64)
    for n, j, i in ((1, 0, 0), (1, 32, 64), (2, 0, 0), (0, 16, 32)):
        isum = _dot128(codes, n, j, xq, i)
        want = None
        for q in range(4):
            sq = float(isum[q]) * 2.0 ** (int(scale[n, i // 32 + q]) - 129 + int(xg[i // 32 + q]))
            want = sq if want is None else want + sq
        assert np.float64(_block128(codes, n, j, xq, i, scale, xg)).view(np.uint64) == np.float64(want).view(np.uint64)


@njit
def _dot128(codes, n, j, xq, i):
    """formats.fp4_dot128 (an intrinsic: callable from compiled code only)."""
    return fp4_dot128(codes, n, j, xq, i)


def test_fp4_dot128_is_four_dot32():
    """A 128-column block's four 1x32 sums reduced together equal four separate fp4_dot32 sums."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (3, 80), dtype=np.uint8)
    xq = rng.integers(-(1 << 20), 1 << 20, 140).astype(np.int32)
    assert _dot128(codes, 2, 16, xq, 12) == tuple(_dot32(codes, 2, 16 + 16 * q, xq, 12 + 32 * q) for q in range(4))


def test_fp4_dot128_decodes_every_byte_as_the_reference():
    """fp4_dot128 (on AVX-512 a table lookup, elsewhere bit arithmetic) against fp4_times4 in plain Python: the
    256 byte values, each in a lane of its own 1x32 block, times large integers of both signs."""
    rng = np.random.default_rng(11)
    codes = np.arange(256, dtype=np.uint8)[rng.permutation(256)].reshape(4, 64)   # 4 blocks of 64 bytes
    for row in range(4):
        xq = rng.integers(-(1 << 20), 1 << 20, 128).astype(np.int32)
        want = [sum(int(xq[32 * q + i]) * fp4_times4(int(codes[row, 16 * q + i]) & 15)
                    + int(xq[32 * q + 16 + i]) * fp4_times4(int(codes[row, 16 * q + i]) >> 4) for i in range(16))
                for q in range(4)]
        assert _dot128(codes, row, 0, xq, 0) == tuple(want)


def _product_row(fmt, x1, codes, scale, n, row0):
    """product_kernel's one-row output for one matrix (serial and parallel agree: test above)."""
    return K.product_kernel_serial(fmt, x1[None], codes, scale, n, row0)[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(["fp8", "fp4"]), m=st.integers(1, 5),
       n=st.integers(1, 70), kblocks=st.integers(1, 3), odd_k=st.booleans(),
       kind=st.sampled_from(["mirror", "mirror", "wide", "nonfinite", "any"]), parallel=st.booleans())
def test_matvec_many_is_each_matrix_product_bit_for_bit(seed, fmt, m, n, kblocks, odd_k, kind, parallel, monkeypatch):
    """matvec_many (one region for several matrices, decode) gives for each matrix the one-row product's bits:
    FP8 matrices as row ranges of one larger matrix (wo_a's groups: the scale grid by absolute row), FP4 with
    K a multiple of 128 (the integer path) or not (the float lanes), any input kind, serial and parallel."""
    if parallel:
        monkeypatch.setattr(K, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(seed)
    k = 128 * kblocks - (64 if odd_k else 0)
    x = np.stack([_fp4_x(rng, 128 * kblocks, kind)[:k] for _ in range(m)])
    if fmt == "fp8":
        f, codes, scale, _ = K.checked_codes(fp8_matrix(rng, m * n, k, scale_lo=100, scale_hi=150))
        mats, scales, row0s = [codes[i * n:(i + 1) * n] for i in range(m)], [scale] * m, [i * n for i in range(m)]
    else:
        parts = [K.checked_codes(fp4_matrix(rng, n, k, scale_lo=100, scale_hi=150)) for _ in range(m)]
        f = parts[0][0]
        mats, scales, row0s = [p[1] for p in parts], [p[2] for p in parts], [0] * m
    mats[0] = mats[0].view()
    mats[0].flags.writeable = False                                # read-only (a memory map's) beside writeable ones
    with np.errstate(over="ignore", invalid="ignore"):
        got = K.matvec_many(f, x, mats, scales, row0s, n)
        want = np.stack([_product_row(f, x[i], mats[i], scales[i], n, row0s[i]) for i in range(m)])
    assert got.shape == (m, n)
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64)) or (
        np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)]))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("parallel", [False, True])
def test_matvec_many_shared_rows_are_the_repeated_rows(fmt, parallel, monkeypatch):
    """rows=: matrices taking the same input row (a token's w1 and w3 of every expert; the row prepared once) give
    the bits of the call with that row repeated, in any order of the rows."""
    if parallel:
        monkeypatch.setattr(K, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(21)
    k, n = 256, 40
    make = fp8_matrix if fmt == "fp8" else fp4_matrix
    parts = [K.checked_codes(make(rng, n, k, scale_lo=100, scale_hi=150)) for _ in range(5)]
    f, mats, scales = parts[0][0], [q[1] for q in parts], [q[2] for q in parts]
    x = np.stack([_fp4_x(rng, k, kind) for kind in ("mirror", "any", "mirror")])
    rows = [2, 0, 2, 1, 0]
    got = K.matvec_many(f, x, mats, scales, [0] * 5, n, rows)
    want = K.matvec_many(f, x[rows], mats, scales, [0] * 5, n)
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64))
    with pytest.raises(ValueError, match="matvec_many"):
        K.matvec_many(f, x, mats, scales, [0] * 5, n, [0, 1, 2, 3, 0])          # no row 3
    with pytest.raises(ValueError, match="matvec_many"):
        K.matvec_many(f, x, mats, scales, [0] * 5, n, [0, 1])                   # a row for each matrix


@pytest.mark.parametrize("kind", ["fp8", "fp4", "bf16", "f32"])
def test_one_row_products_of_strided_weights(kind):
    """A weight given as a strided view (column-major bytes, a transposed matrix) gives the contiguous weight's
    bits on the one-row paths, whose intrinsics load a row's codes as vectors (they once read the wrong bytes)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    if kind in ("fp8", "fp4"):
        w = fp8_matrix(rng, 200, 256) if kind == "fp8" else fp4_matrix(rng, 60, 256)
        strided = type(w)(values=np.asfortranarray(w.values), scale=np.asfortranarray(w.scale))
        got, want = K.quantized_linear(x, strided, "mirror"), K.quantized_linear(x, w, "mirror")
        assert np.array_equal(want, spec.quantized_linear.spec(x, w, "mirror"))
    else:
        w = rng.standard_normal((256, 45)).astype(np.float32)
        w = (w.astype(ml_dtypes.bfloat16) if kind == "bf16" else w).T             # [45, 256], column-major
        got, want = K.fp32_linear(x, w, "mirror"), K.fp32_linear(x, np.ascontiguousarray(w), "mirror")
    assert np.array_equal(got, want)


def test_matvec_many_refuses_mismatched_matrices():
    rng = np.random.default_rng(0)
    f, a, sa, _ = K.checked_codes(fp4_matrix(rng, 4, 128))
    _, b, sb, _ = K.checked_codes(fp4_matrix(rng, 5, 128))
    with pytest.raises(ValueError, match="matvec_many"):
        K.matvec_many(f, np.zeros((2, 128)), [a, b], [sa, sb], [0, 0], 4)
    with pytest.raises(ValueError, match="matvec_many"):
        K.matvec_many(f, np.zeros((3, 128)), [a, a], [sa, sa], [0, 0], 4)


@pytest.mark.parametrize("prec", ["mirror", "float64", "float32"])
def test_grouped_wo_a_decode_is_the_per_group_product(prec, monkeypatch):
    """A decode step's grouped wo_a (every group in one matvec_many call) equals the per-group products."""
    rng = np.random.default_rng(3)
    groups, r, kg = 4, 40, 256
    w = fp8_matrix(rng, groups * r, kg, scale_lo=110, scale_hi=140)
    o = _inputs(rng, groups, kg, prec).reshape(1, 1, groups, kg)
    got = K.grouped_wo_a(o, w, groups, prec)
    calls = []
    monkeypatch.setattr(K, "matvec_many", lambda *a: calls.append(a) or None)
    want = K.grouped_wo_a(np.concatenate([o, o], axis=1), w, groups, prec)[:, :1]   # two positions: per group
    assert not calls and got.dtype == want.dtype and np.array_equal(got, want)
@pytest.mark.parametrize("k", [32, 80, 4096])                          # whole 1x32 blocks, a last half block
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fp4_decode_rows_is_the_spec_dequantization(k, dtype):
    """decode_rows (the BLAS paths' weight panels) gives the spec's exact FP4 weights, a 1x32 scale per block,
    for rows taken from the middle of the matrix and a last, partial block."""
    rng = np.random.default_rng(k)
    w = fp4_matrix(rng, 37, k, scale_lo=100, scale_hi=140)
    fmt, codes, scale, _ = K.checked_codes(w)
    out = np.full((20, k), np.nan, dtype)
    K.decode_rows(fmt, codes, scale, 9, 29, 0, out)
    assert np.array_equal(out, w.dequantize()[9:29].astype(dtype))


@pytest.mark.parametrize("k", [128, 200, 4096])                        # whole 128-column blocks, a last partial one
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fp8_decode_rows_is_the_spec_dequantization(k, dtype):
    """decode_rows gives the spec's FP8 weights, the 128x128 scale of each block, for a row range of a larger
    matrix (row0: the scale grid by absolute row, across a 128-row boundary) and a last, partial block."""
    rng = np.random.default_rng(k)
    w = fp8_matrix(rng, 300, k, scale_lo=100, scale_hi=140)
    fmt, codes, scale, _ = K.checked_codes(w)
    out = np.full((40, k), np.nan, dtype)
    K.decode_rows(fmt, codes[110:], scale, 5, 45, 110, out)           # absolute rows 115..154
    assert np.array_equal(out, w.dequantize()[115:155].astype(dtype))


def test_abs_bound_blocks_hand_worked():
    """Blocks of 2 columns: Σ|x| per block 3, 7, 7 and max |w| 2, 5, 0.5; blocks of 16: one, 17 · 5."""
    x = np.array([[1.0, -2.0, 3.0, 4.0, -7.0]])
    w = np.array([[2.0, -1.0, 0.0, -5.0, 0.5]])
    assert np.array_equal(K._block_abs_sums(x, 2), [[3.0, 7.0, 7.0]])
    assert np.array_equal(K._block_abs_max(w, 2), [[2.0, 5.0, 0.5]])
    a, f = K._abs_bound(K._block_abs_sums(x, K.ABS_BLOCK), K._block_abs_max(w, K.ABS_BLOCK))
    assert a[0, 0] == 17.0 * 5 and 1 < f < 1 + 2.0 ** -40              # one block (the default: 64 columns)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 700), spread=st.integers(0, 60))
def test_abs_bound_is_an_upper_bound(seed, k, spread):
    """a · f bounds Σ_k |x·w| (math.fsum of the exact float64 products, correctly rounded) for any column count
    and values spread over many binades, so blas_rounding_checked's midpoint test never trusts a wrong sum."""
    import math
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, k)) * np.exp2(rng.integers(-spread, spread + 1, (5, k)))).astype(np.float32)
    w = (rng.standard_normal((7, k)) * np.exp2(rng.integers(-spread, spread + 1, (7, k)))).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    a, f = K._abs_bound(K._block_abs_sums(x64, K.ABS_BLOCK), K._block_abs_max(w64, K.ABS_BLOCK))
    for t in range(5):
        for n in range(7):
            assert a[t, n] * f >= math.fsum(np.abs(x64[t] * w64[n]))


def _f32_round_exact(q):
    """The fp32 rounding (to nearest, ties to even) of a Fraction q, exactly."""
    from fractions import Fraction
    c = np.float32(float(q))
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    dist = [abs(Fraction(float(v)) - q) for v in cands]
    best = min(dist)
    near = [v for v, d in zip(cands, dist) if d == best]
    return near[0] if len(near) == 1 else next(v for v in near if not int(v.view(np.uint32)) & 1)


def test_rounding_safe_trusts_only_intervals_that_round_as_one():
    """_rounding_safe (exactness test off: no grains) marks safe only outputs y whose whole interval y ± b rounds to
    fp32(y), checked exactly with fractions, on y a few float64 ulps from fp32 midpoints (odd and even
    neighbours, a power of two whose lower spacing is half), b from 0 to 6 ulps: the fast pass's widening
    of its ends is what keeps a rounded end from crossing a midpoint. Many of them are safe (not vacuous)."""
    from fractions import Fraction
    ys, bs = [], []
    for r in [np.float32(1.0), np.float32(1.0) + np.float32(2.0 ** -23), np.float32(-3.0), np.float32(2.0 ** -100)]:
        for nb in (np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))):
            mid = (float(r) + float(nb)) / 2                           # exact in float64
            for k in range(-6, 7):
                y = mid
                for _ in range(abs(k)):
                    y = np.nextafter(y, np.inf if k > 0 else -np.inf)
                u = abs(float(np.spacing(y)))
                for j in range(25):
                    ys.append(y)
                    bs.append(j / 4 * u)
    y = np.array(ys).reshape(1, -1)
    a = np.array(bs).reshape(1, -1)
    out = np.empty_like(y)
    ts, ns = K._rounding_safe(y, a, 1.0, np.zeros(1), np.zeros(y.shape[1]), 1.0, out, 0)
    unsafe = set(ns.tolist())
    assert np.array_equal(out, y) and set(ts.tolist()) <= {0}
    for n in range(y.shape[1]):
        if n in unsafe:
            continue
        r = np.float32(y[0, n])
        for end in (Fraction(float(y[0, n])) - Fraction(float(a[0, n])), Fraction(float(y[0, n])) + Fraction(float(a[0, n]))):
            assert _f32_round_exact(end) == r, (n, y[0, n], a[0, n])
    assert 0.3 * y.shape[1] < y.shape[1] - len(unsafe) < y.shape[1]


def test_half_width_hand_worked():
    """h = γ_{K+2} (BLAS, any order) + γ_d (the kernel: 8 additions in a lane, 16 lanes, one per 128-column block)."""
    g = lambda d: d * 2.0 ** -53 / (1 - d * 2.0 ** -53)
    assert K._half_width(4096) == pytest.approx(g(4098) + g(8 + 16 + 32), rel=1e-11)
    assert K._half_width(64) == pytest.approx(g(66) + g(8 + 16 + 1), rel=1e-11)
    assert K._half_width(4096) >= g(4098) + g(56)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp4_scale_bounds_hold_for_the_decoded_weights(seed):
    """_fp4_scale_bounds (blas_block_sums' weight side for FP4): every decoded weight of row n is a multiple of
    gw[n], |w| <= wm[n, b] over each 128-column block b, and both are attained on a hand-set row (1x32
    scales 2^-3, 2^5, 2^0, 2^-1: grain 0.5 · 2^-3, block maximum 6 · 2^5)."""
    rng = np.random.default_rng(seed)
    w = fp4_matrix(rng, 40, 512, scale_lo=100, scale_hi=150)
    fmt, codes, scale, _ = K.checked_codes(w)
    gw, wm = K._fp4_scale_bounds(scale, 3, 40)
    wd = w.dequantize()[3:40].astype(np.float64)
    assert np.all(np.mod(wd / gw[:, None], 1.0) == 0)
    assert np.all(np.abs(wd).reshape(37, 4, 128).max(axis=2) <= wm)
    from refimpl.numerics import pack_fp4
    nib = np.zeros((1, 128), np.uint8)
    nib[0, 0], nib[0, 40] = 1, 7                                       # e2m1 0.5 (block 0), 6 (block 1)
    sc = np.array([[124, 132, 127, 126]], np.uint8)
    w1 = Fp4Matrix(pack_fp4(nib), sc.view(ml_dtypes.float8_e8m0fnu))
    gw1, wm1 = K._fp4_scale_bounds(K.checked_codes(w1)[2], 0, 1)
    assert gw1[0] == 0.5 * 2.0 ** -3 and wm1[0, 0] == 6 * 2.0 ** 5
    assert w1.dequantize()[0, 0] == gw1[0] and w1.dequantize()[0, 40] == wm1[0, 0]
