"""Numba kernels of the products in refimpl/model/linear.py (and attention's grouped wo_a).

    quantized_linear   FP8 128x128 / packed FP4 1x32 weights read as bytes, decoded tile by tile
    fp32_linear        bf16 (or fp32) weights read as their bits
    bf16_linear        the same, output rounded to bf16
    grouped_wo_a       attention step 6: o_g @ wo_a[g]ᵀ for each group, from the FP8 bytes

One kernel, `product_kernel`, does all of them: output rows in tiles of TILE (formats.py), input
columns in blocks of BLOCK = 128; every output element is the float64 sum over its blocks in
ascending order of (the block's sum over its columns in ascending order) · (the block's scale).
That order depends on nothing but the weight's shape, so a row of x gives the same output alone
or among any number of rows, on any number of threads.

Exactness (mirror). The activations of an FP8/FP4 product are e4m3 values times a power of two
per 1x128 block (act_fp8) and the weights are e4m3 / e2m1 values times a power of two per block:
every product is exact in float64 and an e4m3·e4m3 sum over one 128-block of one scale is an
integer multiple of one power of two below 2^43, so the FP8 block sums are exact in any order.
What is not exact is the combination of blocks (and, for FP4, of its four 32-blocks inside a
128-block, whose scales differ): the kernel and the spec (a float64 BLAS matrix-vector product)
add the same exact products in different orders, so their float64 sums differ by a few float64
ulps at most and the one rounding to fp32 agrees except when the exact sum lies within that
distance of an fp32 rounding boundary (the tests count these cases). bf16/fp32 weights times
fp32 activations: products exact in float64 (8 or 24 + 24 bits), same argument.

float64 mode: the same kernel; it and BLAS both sum within K·2^-53·Σ|x·w| of the exact value.
float32 mode: the spec takes one float32 BLAS product (error up to about K·2^-24·Σ|x·w|); the
kernel computes the float64 sum and rounds it once to float32, which is closer to exact.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from refimpl.kernels.formats import BLOCK, FMT_BF16, FMT_F32, FMT_FP4, FMT_FP8, decode_block
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.numerics import FP4_BLOCK, FP8_BLOCK, _as_codes, _check_scale_grid, act_fp8, bf16, f32, work_dtype


ROWS_PER_TASK = 16   # output rows per parallel task (buffers are allocated once per task)


@njit(parallel=True, cache=True)
def product_kernel(fmt, x, codes, scale, n_out, row0):
    """x [T, K] float64 @ W[row0 : row0+n_out]ᵀ -> [T, n_out] float64, W given by its codes (formats.py).

    codes holds the rows row0.. of W (codes[n] is row row0+n); an FP8 scale grid is indexed by the
    absolute row (row0 + n) // 128, so a row range of a larger FP8 matrix can be passed.
    Order of every output element (t, n): lane l = k mod 128 sums x[t, k]·w[n, k] over its columns
    in ascending k, then the lanes are added in ascending l.
    """
    T, K = x.shape
    out = np.empty((T, n_out))
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):               # each output element belongs to one task: one thread
        bits = np.empty(BLOCK, np.uint32)
        w = np.empty(BLOCK)
        acc = np.empty((T, BLOCK))
        for n in range(task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0.0
            for k0 in range(0, K, BLOCK):
                kb = min(BLOCK, K - k0)
                decode_block(fmt, codes, scale, n, (row0 + n) // BLOCK, k0, kb, bits, w)
                wb = w[:kb]
                for t in range(T):
                    xb = x[t, k0:k0 + kb]
                    a = acc[t, :kb]
                    for k in range(kb):
                        a[k] += xb[k] * wb[k]
            for t in range(T):
                a = acc[t]
                y = 0.0
                for k in range(min(BLOCK, K)):
                    y += a[k]
                out[t, n] = y
    return out


def _rows(x: np.ndarray, k: int, name: str) -> np.ndarray:
    """x [..., k] -> contiguous float64 [rows, k]; ValueError on a wrong last dim."""
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: input has shape {x.shape}, expected a last dim of {k}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float input, got {x.dtype}")
    return np.ascontiguousarray(x.reshape(-1, k), dtype=np.float64)


def _finish(y: np.ndarray, lead: tuple, prec: str) -> np.ndarray:
    """float64 [rows, n] -> the spec's matmul output: float64 (float64 mode), else rounded once to fp32."""
    y = y.reshape(*lead, y.shape[-1])
    return y if prec == "float64" else f32(y, "mirror")            # one rounding to the fp32 accumulator


def quantized_codes(w: Fp8Matrix | Fp4Matrix):
    """(fmt, codes uint8, scale uint8) of an FP8/FP4 matrix, checked as the spec's dequantization checks it."""
    if isinstance(w, Fp8Matrix):
        codes = _as_codes(w.values, "dequant_fp8_weight values")
        scale = _as_codes(w.scale, "dequant_fp8_weight scale")
        if codes.ndim != 2:
            raise ValueError(f"dequant_fp8_weight: values must be 2-D, got shape {codes.shape}")
        n, k = codes.shape
        _check_scale_grid(scale, (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), "dequant_fp8_weight")
        return FMT_FP8, codes, scale
    if isinstance(w, Fp4Matrix):
        codes = _as_codes(w.values, "dequant_fp4_weight values")
        scale = _as_codes(w.scale, "dequant_fp4_weight scale")
        if codes.ndim != 2:
            raise ValueError(f"dequant_fp4_weight: packed values must be 2-D, got shape {codes.shape}")
        n, k = codes.shape[0], 2 * codes.shape[1]
        _check_scale_grid(scale, (n, -(-k // FP4_BLOCK)), "dequant_fp4_weight")
        return FMT_FP4, codes, scale
    raise TypeError(f"quantized_linear: expected an Fp8Matrix or Fp4Matrix, got {type(w).__name__}")


def quantized_product(x: np.ndarray, w: Fp8Matrix | Fp4Matrix, prec: str) -> np.ndarray:
    """act_fp8(x) @ W ᵀ as the spec's `matmul` returns it (before the bf16 rounding). x [..., in] -> [..., out]."""
    fmt, codes, scale = quantized_codes(w)
    n, k = w.shape
    x = act_fp8(x, prec)                                          # official: act_quant(x, 128, ue8m0)
    y = product_kernel(fmt, _rows(x, k, "quantized_linear"), codes, scale, n, 0)
    return _finish(y, np.shape(x)[:-1], prec)


def quantized_linear(x: np.ndarray, w: Fp8Matrix | Fp4Matrix, prec: str) -> np.ndarray:
    """Kernel of model.linear.quantized_linear: x [..., in] -> [..., out] (bf16 values in mirror)."""
    work_dtype(prec)                                              # ValueError on an unknown mode
    return bf16(quantized_product(x, w, prec), prec)


def _dense_codes(w: np.ndarray, name: str):
    """(fmt, codes) of a bf16 or float32 matrix viewed as its bits; None for other dtypes."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: weight must be 2-D, got shape {w.shape}")
    if w.dtype == np.float32:
        return FMT_F32, w.view(np.uint32)
    if w.dtype.name == "bfloat16":
        return FMT_BF16, w.view(np.uint16)
    return None


_NO_SCALE = np.zeros((1, 1), np.uint8)


def fp32_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Kernel of model.linear.fp32_linear: x [..., in] @ w[out, in]ᵀ, w bf16 or float32 (others: the spec)."""
    from refimpl.model.linear import fp32_linear as spec
    work_dtype(prec)
    dense = _dense_codes(w, "fp32_linear")
    if dense is None:
        return spec.spec(x, w, prec)
    fmt, codes = dense
    y = product_kernel(fmt, _rows(x, codes.shape[1], "fp32_linear"), codes, _NO_SCALE, codes.shape[0], 0)
    return _finish(y, np.shape(x)[:-1], prec)


def bf16_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Kernel of model.linear.bf16_linear: fp32_linear, then bf16 (mirror)."""
    return bf16(fp32_linear(x, w, prec), prec)


def grouped_wo_a(o: np.ndarray, wo_a: Fp8Matrix, groups: int, prec: str) -> np.ndarray:
    """Kernel of model.attention.grouped_wo_a: o [b, s, g, h*d/g] -> u [b, s, g, r], from wo_a's FP8 bytes."""
    fmt, codes, scale = quantized_codes(wo_a)
    n, k = codes.shape
    o = np.asarray(o)
    if groups < 1 or n % groups or o.ndim != 4 or o.shape[2] != groups or o.shape[3] != k:
        raise ValueError(f"grouped_wo_a: o {o.shape} and wo_a {codes.shape} do not make {groups} groups")
    r = n // groups
    b, s = o.shape[:2]
    u = np.empty((b, s, groups, r), np.float64 if prec == "float64" else np.float32)
    for gi in range(groups):                                      # official: einsum over groups (M:L538)
        y = product_kernel(fmt, _rows(o[:, :, gi], k, "grouped_wo_a"), codes[gi * r:(gi + 1) * r], scale, r, gi * r)
        u[:, :, gi] = bf16(_finish(y, (b, s), prec), prec)
    return u
