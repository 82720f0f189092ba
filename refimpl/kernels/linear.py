"""Numba kernels of the products in refimpl/model/linear.py (and attention's grouped wo_a).

    quantized_linear   FP8 128x128 / packed FP4 1x32 weights read as bytes and decoded on the fly
    fp32_linear        bf16 (or fp32) weights read as their bits (no converted copy of the matrix)
    bf16_linear        the same, output rounded to bf16
    grouped_wo_a       attention step 6: o_g @ wo_a[g]ᵀ for each group, from the FP8 bytes

One kernel, `product_kernel` (and `product_kernel_serial`, the same operations on one thread for
small products), does all of them. Order of every output element: the input columns are taken
in blocks of 128; lane l (column k0 + l of each block; for FP4 the block's even columns, then its
odd ones, as a packed byte holds two) accumulates in float64 x · w over the blocks in ascending
order, w the exact weight (raw weight · block scale, a power of two: exact); then the 128 lanes
are added in ascending order. The order depends on the weight's shape only, so a row of x gives
the same output alone or among any number of rows (one input row takes a path that decodes on
the fly, several rows share decoded weight rows: the same operations), on any number of threads.
The lanes are what LLVM vectorizes without reassociating anything (no fastmath).

Exactness (mirror). The activations of an FP8/FP4 product are e4m3 values times a power of two
per 1x128 block (act_fp8) and the weights e4m3 / e2m1 values times powers of two: every product
x · w is exact in float64. Only the additions round: the kernel and the spec (a float64 BLAS
product, row by row) add the same exact products in different orders, their float64 sums differ
by a few float64 ulps at most, and the one rounding to fp32 agrees except when the exact sum lies
that close to an fp32 rounding boundary (the tests check each differing output is such a case
and count them: none so far). bf16/fp32 weights times fp32 activations: products exact in
float64 (8 or 24 + 24 bits), same argument.

float64 mode: the same kernel; it and BLAS both sum within K·2^-53·Σ|x·w| of the exact value.
float32 mode: the spec takes one float32 BLAS product (error up to about K·2^-24·Σ|x·w|); the
kernel computes the float64 sum and rounds it once to float32, which is closer to exact; the
tests bound the difference by (K + 2)·2^-24·Σ|x·w|.
"""
from __future__ import annotations

import weakref

import numpy as np
from numba import njit, prange

from refimpl.kernels.formats import (BLOCK, FMT_BF16, FMT_F32, FMT_FP4, FMT_FP8, bf16_value, f32_from_bits,
                                     fp4_block_scale, fp4_pair_raw, fp8_block_scale, fp8_raw)
from refimpl.kernels.prefetch import prefetch
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.model.linear import matmul as _matmul
from refimpl.numerics import FP4_BLOCK, FP8_BLOCK, _as_codes, _check_scale_grid, act_fp8, bf16, round_f32, work_dtype
from refimpl.model import attention as spec_attention, linear as spec_linear


ROWS_PER_TASK = 32   # output rows per parallel task (scratch buffers are allocated once per task)
PREFETCH_ROWS = 8    # one-row products: weight rows read ahead (kernels/prefetch.py)
LINE = 64            # bytes per cache line
TILE_BYTES = 1 << 20 # several-row products: input rows taken in tiles of about 1 MiB (float64)


@njit(cache=True)
def _deinterleave_fp4(x):
    """x [T, K] -> FP4 lane order: in each 128-column block of width kb, the even columns at lanes
    0..kb/2-1, then the odd ones (a packed byte holds columns 2i and 2i+1)."""
    T, K = x.shape
    xd = np.empty_like(x)
    for t in range(T):
        for k0 in range(0, K, BLOCK):
            h = min(BLOCK, K - k0) // 2
            src = x[t, k0:k0 + 2 * h]
            ev = xd[t, k0:k0 + h]
            od = xd[t, k0 + h:k0 + 2 * h]
            for i in range(h):
                ev[i] = src[2 * i]
                od[i] = src[2 * i + 1]
    return xd


@njit(cache=True, inline="always")
def _decode_row(fmt, codes, scale, n, scale_row, w):
    """w[:K] = row n's exact weights (raw weight · block scale, exact in float64), in lane order:
    for FP4 each 128-column block holds its even columns, then its odd ones."""
    K = w.shape[0]
    for k0 in range(0, K, BLOCK):
        kb = min(BLOCK, K - k0)
        if fmt == FMT_FP8:
            s = fp8_block_scale(scale[scale_row, k0 // BLOCK])
            src = codes[n, k0:k0 + kb]
            wb = w[k0:k0 + kb]
            for k in range(kb):
                wb[k] = fp8_raw(src[k]) * s
        elif fmt == FMT_FP4:
            h = kb // 2
            for q in range((h + 15) // 16):                   # 1x32 blocks: 16 lanes of each half
                m = min(16, h - 16 * q)
                s = fp4_block_scale(scale[n, k0 // 32 + q])
                src = codes[n, k0 // 2 + 16 * q:k0 // 2 + 16 * q + m]
                we = w[k0 + 16 * q:k0 + 16 * q + m]
                wo = w[k0 + h + 16 * q:k0 + h + 16 * q + m]
                for i in range(m):
                    lo, hi = fp4_pair_raw(src[i])          # columns k0 + 2i, k0 + 2i + 1
                    we[i] = lo * s
                    wo[i] = hi * s
        elif fmt == FMT_BF16:
            src = codes[n, k0:k0 + kb]
            wb = w[k0:k0 + kb]
            for k in range(kb):
                wb[k] = bf16_value(src[k])
        else:  # FMT_F32
            src = codes[n, k0:k0 + kb]
            wb = w[k0:k0 + kb]
            for k in range(kb):
                wb[k] = f32_from_bits(np.uint32(src[k]))


@njit(cache=True, inline="always")
def _prefetch_ahead(codes, n, m, k_lo, k_hi):
    """Prefetch columns k_lo..k_hi-1 of the weight-row pair PREFETCH_ROWS ahead of rows n, n + m."""
    ahead = min(n + PREFETCH_ROWS, codes.shape[0] - 2)
    if ahead > n + m:
        for k in range(k_lo, k_hi, LINE // codes.itemsize):   # one hint per cache line
            prefetch(codes, ahead, k)
            prefetch(codes, ahead + 1, k)


@njit(cache=True, inline="always")
def _lane_sum(a, lanes):
    """Σ a[:lanes] in ascending order."""
    y = 0.0
    for k in range(lanes):
        y += a[k]
    return y


@njit(cache=True)
def _matvec_rows(fmt, x1, codes, scale, n_lo, n_hi, row0, out1):
    """One input row x1 [K] (FP8, BF16 or F32 weights): rows n_lo..n_hi-1 of out1, two weight rows at a time.

    Each lane adds x · (raw weight · block scale), decoding on the fly: the same operations as
    _general_rows, with one load of x serving two weight rows. The lanes a2 are allocated here, so
    LLVM knows they alias no argument.
    """
    K = x1.shape[0]
    a2 = np.empty((2, BLOCK))
    lanes = min(BLOCK, K)
    n = n_lo
    while n < n_hi:
        sr = (row0 + n) // BLOCK
        two = n + 1 < n_hi and (row0 + n + 1) // BLOCK == sr   # both rows in one scale-grid row
        a0 = a2[0]
        a1 = a2[1]
        a0[:] = 0.0
        a1[:] = 0.0
        m = 1 if two else 0                                   # the second row: row n + m (itself if single)
        for k0 in range(0, K, BLOCK):
            kb = min(BLOCK, K - k0)
            _prefetch_ahead(codes, n, m, k0, k0 + kb)
            xb = x1[k0:k0 + kb]
            c0 = codes[n, k0:k0 + kb]
            c1 = codes[n + m, k0:k0 + kb]
            b0 = a0[:kb]
            b1 = a1[:kb]
            if fmt == FMT_FP8:
                s = fp8_block_scale(scale[sr, k0 // BLOCK])
                for k in range(kb):
                    b0[k] += xb[k] * (fp8_raw(c0[k]) * s)
                    b1[k] += xb[k] * (fp8_raw(c1[k]) * s)
            elif fmt == FMT_BF16:
                for k in range(kb):
                    b0[k] += xb[k] * bf16_value(c0[k])
                    b1[k] += xb[k] * bf16_value(c1[k])
            else:  # FMT_F32
                for k in range(kb):
                    b0[k] += xb[k] * f32_from_bits(np.uint32(c0[k]))
                    b1[k] += xb[k] * f32_from_bits(np.uint32(c1[k]))
        out1[n] = _lane_sum(a0, lanes)
        if two:
            out1[n + 1] = _lane_sum(a1, lanes)
        n += 1 + m


@njit(cache=True)
def _fp4_matvec_rows(xd, codes, scale, n_lo, n_hi, out1):
    """One input row xd [K] (FP4 lane order) times FP4 weight rows n_lo..n_hi-1 -> out1[n].

    The same operations as _general_rows: lane += x · (raw weight · block scale), decoding on the
    fly. Two weight rows n, n + 1 are taken per pass over xd, so each x load serves both; each
    row's own lanes see the same additions in the same order as alone. The lanes a2 [2, 128] are
    allocated here: LLVM then knows they alias no argument (measured: passed in, the two-row loop
    was slower than one row).
    """
    K = xd.shape[0]
    a2 = np.empty((2, BLOCK))
    n = n_lo
    while n < n_hi:
        m = 1 if n + 1 < n_hi else 0                          # the second row: row n + m (itself if single)
        a0 = a2[0]
        a1 = a2[1]
        a0[:] = 0.0
        a1[:] = 0.0
        for k0 in range(0, K - K % BLOCK, BLOCK):             # full blocks: four 1x32 blocks of constant size
            _prefetch_ahead(codes, n, m, k0 // 2, k0 // 2 + BLOCK // 2)   # the block's 64 bytes
            for q in range(4):
                s0 = fp4_block_scale(scale[n, k0 // 32 + q])
                s1 = fp4_block_scale(scale[n + m, k0 // 32 + q])
                c0 = codes[n, k0 // 2 + 16 * q:k0 // 2 + 16 * q + 16]
                c1 = codes[n + m, k0 // 2 + 16 * q:k0 // 2 + 16 * q + 16]
                ae0, ao0 = a0[16 * q:16 * q + 16], a0[64 + 16 * q:64 + 16 * q + 16]
                ae1, ao1 = a1[16 * q:16 * q + 16], a1[64 + 16 * q:64 + 16 * q + 16]
                xe, xo = xd[k0 + 16 * q:k0 + 16 * q + 16], xd[k0 + 64 + 16 * q:k0 + 64 + 16 * q + 16]
                for i in range(16):
                    lo0, hi0 = fp4_pair_raw(c0[i])
                    lo1, hi1 = fp4_pair_raw(c1[i])
                    ae0[i] += xe[i] * (lo0 * s0)
                    ao0[i] += xo[i] * (hi0 * s0)
                    ae1[i] += xe[i] * (lo1 * s1)
                    ao1[i] += xo[i] * (hi1 * s1)
        k0 = K - K % BLOCK
        kb = K - k0
        h = kb // 2
        for r in range(1 + m if kb else 0):                   # a partial last block: each row on its own
            a = a2[r]
            for q in range((h + 15) // 16):                   # 1x32 blocks: 16 lanes of each half
                s = fp4_block_scale(scale[n + r, k0 // 32 + q])
                lo_i, hi_i = 16 * q, min(h, 16 * q + 16)
                src = codes[n + r, k0 // 2 + lo_i:k0 // 2 + hi_i]
                ae, ao = a[lo_i:hi_i], a[h + lo_i:h + hi_i]
                xe, xo = xd[k0 + lo_i:k0 + hi_i], xd[k0 + h + lo_i:k0 + h + hi_i]
                for i in range(hi_i - lo_i):
                    lo, hi = fp4_pair_raw(src[i])
                    ae[i] += xe[i] * (lo * s)
                    ao[i] += xo[i] * (hi * s)
        out1[n] = _lane_sum(a0, min(BLOCK, K))
        if m:
            out1[n + 1] = _lane_sum(a1, min(BLOCK, K))
        n += 1 + m


@njit(cache=True)
def _general_rows(fmt, xin, codes, scale, n_lo, n_hi, row0, out):
    """Rows n_lo..n_hi-1 of out [T, n] for any format and T (a separate function: the parallel
    kernel's loop body, kept out of Numba's parfor transformations).

    Two weight rows are decoded into w [2, K] (exact weights, lane order), then every pair of input
    rows takes both: four lane accumulators, each x and w load serving two of them (measured at
    2048x4096: 1.4-2.4x the one-row-at-a-time loop, 20-26 GFLOP/s on 2 threads). The input rows
    are taken in tiles of about TILE_BYTES, each tile against every weight row of the task, so a
    long input is not streamed from memory once per weight-row pair. Each output
    element's lanes see the same additions in the same order as alone. The scratch buffers are
    allocated here, so LLVM knows they alias no argument.
    """
    T, K = xin.shape
    w = np.empty((2, K))
    acc = np.empty((4, BLOCK))
    lanes = min(BLOCK, K)
    tile = max(2, TILE_BYTES // (8 * K))                      # input rows per tile: they stay in cache
    for t_lo in range(0, T, tile):
        t_hi = min(T, t_lo + tile)
        for n in range(n_lo, n_hi, 2):
            n1 = n + 1 if n + 1 < n_hi else n                 # the second weight row (row n again if none)
            _decode_row(fmt, codes, scale, n, (row0 + n) // BLOCK, w[0])
            _decode_row(fmt, codes, scale, n1, (row0 + n1) // BLOCK, w[1])
            for t in range(t_lo, t_hi, 2):
                t1 = t + 1 if t + 1 < t_hi else t             # the second input row (row t again if none)
                acc[:] = 0.0
                a00, a01, a10, a11 = acc[0], acc[1], acc[2], acc[3]   # a<input row><weight row>
                for k0 in range(0, K, BLOCK):
                    kb = min(BLOCK, K - k0)
                    x0, x1 = xin[t, k0:k0 + kb], xin[t1, k0:k0 + kb]
                    w0, w1 = w[0, k0:k0 + kb], w[1, k0:k0 + kb]
                    b00, b01, b10, b11 = a00[:kb], a01[:kb], a10[:kb], a11[:kb]
                    for k in range(kb):
                        b00[k] += x0[k] * w0[k]
                        b01[k] += x0[k] * w1[k]
                        b10[k] += x1[k] * w0[k]
                        b11[k] += x1[k] * w1[k]
                out[t, n] = _lane_sum(a00, lanes)
                out[t, n1] = _lane_sum(a01, lanes)
                out[t1, n] = _lane_sum(a10, lanes)
                out[t1, n1] = _lane_sum(a11, lanes)


@njit(parallel=True, cache=True)
def product_kernel(fmt, x, codes, scale, n_out, row0):
    """x [T, K] float64 @ W[row0 : row0+n_out]ᵀ -> [T, n_out] float64, W given by its codes (formats.py).

    codes holds the rows row0.. of W (codes[n] is row row0+n); an FP8 scale grid is indexed by the
    absolute row (row0 + n) // 128, so a row range of a larger FP8 matrix can be passed.
    Order of every output element (t, n): lane l of each 128-column block (column k0 + l; for FP4
    the even columns, then the odd ones) accumulates x · w, w = raw weight · block scale (exact),
    over the blocks in ascending order; then the lanes are added in ascending order. One input
    row is decoded on the fly, several rows share decoded weight rows, two at a
    time: the same operations either way.
    """
    T, K = x.shape
    out = np.empty((T, n_out))
    xin = _deinterleave_fp4(x) if fmt == FMT_FP4 else x
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if T == 1 and fmt != FMT_FP4:
        for task in prange(n_tasks):
            _matvec_rows(fmt, x[0], codes, scale, task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK),
                         row0, out[0])
        return out
    if T == 1 and fmt == FMT_FP4:
        for task in prange(n_tasks):
            _fp4_matvec_rows(xin[0], codes, scale, task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK),
                             out[0])
        return out
    for task in prange(n_tasks):               # each output element belongs to one task: one thread
        _general_rows(fmt, xin, codes, scale, task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK),
                      row0, out)
    return out


@njit(cache=True)
def product_kernel_serial(fmt, x, codes, scale, n_out, row0):
    """product_kernel on the calling thread only (small products: no thread start-up); the same results."""
    T, K = x.shape
    out = np.empty((T, n_out))
    if T == 1 and fmt != FMT_FP4:
        _matvec_rows(fmt, x[0], codes, scale, 0, n_out, row0, out[0])
        return out
    xin = _deinterleave_fp4(x) if fmt == FMT_FP4 else x
    if T == 1 and fmt == FMT_FP4:
        _fp4_matvec_rows(xin[0], codes, scale, 0, n_out, out[0])
        return out
    _general_rows(fmt, xin, codes, scale, 0, n_out, row0, out)
    return out


PARALLEL_MIN = 1 << 23   # multiply-adds below which a product runs on one thread (on a loaded 2-core
                         # machine a parallel start measured up to ~5 ms; 2^23 is about that much work)


def product(fmt, x, codes, scale, n_out, row0):
    """x [T, K] float64 @ W[row0 : row0+n_out]ᵀ (product_kernel), on one thread when the product is small."""
    if x.shape[0] * x.shape[1] * n_out < PARALLEL_MIN:
        return product_kernel_serial(fmt, x, codes, scale, n_out, row0)
    return product_kernel(fmt, x, codes, scale, n_out, row0)


def spec_matmul(x, w, prec):
    """The spec's matmul (for inputs the kernel leaves to the spec)."""
    return _matmul.spec(x, w, prec)


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
    return y if prec == "float64" else round_f32(y)                # the exact sum rounded once to the fp32 accumulator


_CHECKED: dict = {}          # (id(values), id(scale)) -> (weak references to both, NaN flag): read-only arrays only


def _has_fp8_nan(codes: np.ndarray) -> bool:
    """True if an e4m3fn code is NaN (0x7F / 0xFF); scanned in row chunks (no full-size temporary)."""
    step = max(1, (1 << 24) // max(1, codes.shape[1]))
    return any(bool(np.any((codes[r:r + step] & 0x7F) == 0x7F)) for r in range(0, codes.shape[0], step))


def checked_codes(w: Fp8Matrix | Fp4Matrix):
    """quantized_codes(w) plus a NaN-code flag; the NaN scan (a full read) runs once per read-only matrix.

    Checkpoint weights are read-only memory maps that live as long as the model: their flag is kept
    (with weak references only, so the cache keeps no matrix alive). A writeable matrix can change
    between calls, so it is scanned on every call.
    """
    fmt, codes, scale = quantized_codes(w)                         # the spec's checks; views, no copies
    if fmt != FMT_FP8:
        return fmt, codes, scale, False                           # every e2m1 nibble is a number
    values = w.values
    cacheable = not values.flags.writeable and not np.asarray(w.scale).flags.writeable
    key = (id(values), id(w.scale))
    hit = _CHECKED.get(key) if cacheable else None
    if hit is not None and hit[0]() is values and hit[1]() is w.scale:
        return fmt, codes, scale, hit[2]
    nan = _has_fp8_nan(codes)
    if cacheable:
        try:
            _CHECKED[key] = (weakref.ref(values), weakref.ref(w.scale), nan)
        except TypeError:                        # an array type without weak references: not cached
            pass
    return fmt, codes, scale, nan


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
    fmt, codes, scale, nan = checked_codes(w)
    if nan:                                                       # NaN weights: the spec's NaN outputs
        return spec_matmul(act_fp8(x, prec), w.dequantize(), prec)
    n, k = w.shape
    x = act_fp8(x, prec)                                          # official: act_quant(x, 128, ue8m0)
    y = product(fmt, _rows(x, k, "quantized_linear"), codes, scale, n, 0)
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
    work_dtype(prec)
    dense = _dense_codes(w, "fp32_linear")
    if dense is None:
        return spec_linear.fp32_linear.spec(x, w, prec)
    fmt, codes = dense
    y = product(fmt, _rows(x, codes.shape[1], "fp32_linear"), codes, _NO_SCALE, codes.shape[0], 0)
    return _finish(y, np.shape(x)[:-1], prec)


def bf16_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Kernel of model.linear.bf16_linear: fp32_linear, then bf16 (mirror)."""
    return bf16(fp32_linear(x, w, prec), prec)


def grouped_wo_a(o: np.ndarray, wo_a: Fp8Matrix, groups: int, prec: str) -> np.ndarray:
    """Kernel of model.attention.grouped_wo_a: o [b, s, g, h*d/g] -> u [b, s, g, r], from wo_a's FP8 bytes."""
    fmt, codes, scale, nan = checked_codes(wo_a)
    if nan:                                                       # NaN weights: the spec's NaN outputs
        return spec_attention.grouped_wo_a.spec(o, wo_a, groups, prec)
    n, k = codes.shape
    o = np.asarray(o)
    if groups < 1 or n % groups or o.ndim != 4 or o.shape[2] != groups or o.shape[3] != k:
        raise ValueError(f"grouped_wo_a: o {o.shape} and wo_a {codes.shape} do not make {groups} groups")
    r = n // groups
    b, s = o.shape[:2]
    u = np.empty((b, s, groups, r), np.float64 if prec == "float64" else np.float32)
    for gi in range(groups):                                      # official: einsum over groups (M:L538)
        y = product(fmt, _rows(o[:, :, gi], k, "grouped_wo_a"), codes[gi * r:(gi + 1) * r], scale, r, gi * r)
        u[:, :, gi] = bf16(_finish(y, (b, s), prec), prec)
    return u
