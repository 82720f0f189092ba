"""Kernels of the products (refimpl/kernels/linear.py) against their spec functions (refimpl/model/linear.py).

mirror: bit-identical, except where the exact float64 sum lies on an fp32 rounding boundary (the
kernel and BLAS add the same exact products in different orders); every such case is checked to
be one, and at most one output in 10,000 of a case may be one.
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

from packed_weights import fp4_matrix, fp8_matrix, on_fp32_boundary
from refimpl.kernels import linear as K
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
    if prec == "mirror":
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
