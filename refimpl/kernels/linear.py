"""Numba kernels of the products in refimpl/model/linear.py (and attention's grouped wo_a).

    quantized_linear   FP8 128x128 / packed FP4 1x32 weights read as bytes and decoded on the fly
    fp32_linear        bf16 (or fp32) weights read as their bits (no converted copy of the matrix)
    bf16_linear        the same, output rounded to bf16
    grouped_wo_a       attention step 6: o_g @ wo_a[g]ᵀ for each group, from the FP8 bytes
    matvec_many        one row each against several matrices of one shape, in one parallel region
                       (decode: a token's experts in kernels/moe.py, wo_a's groups)

One kernel, `product_kernel` (and `product_kernel_serial`, the same operations on one thread for
small products), does all of them; mirror's FP8/FP4 products with many rows take BLAS instead
(`blas_block_sums`). Order of every output element, the spec's block sums (model/linear.py
`block_sums`): the input columns are taken in blocks of 128; a block's sum is taken in LANES = 16
float64 lanes (position p of the block goes to lane p % 16, positions ascending, x · w with w the
exact weight: raw weight · block scale, a power of two), the lanes added in ascending order; the
block sums are added in ascending order. An FP4 block's sum is its four 1x32 blocks' sums (each
taken the same way over its 16 packed bytes: lane i = even column's product, then the odd one's;
the FP4 lane order puts a block's even columns first, then its odd ones, as a packed byte holds
two) added in ascending order. The order depends on the weight's shape only, so a row of x gives
the same output alone or among any number of rows (one input row takes a path that decodes on
the fly, several rows share decoded weight rows: the same operations), on any number of threads.
The lanes are what LLVM vectorizes without reassociating anything (no fastmath).

Exactness (mirror). The activations of an FP8/FP4 product are e4m3 values times a power of two
per 1x128 block (act_fp8) and the weights e4m3 / e2m1 values times powers of two: every block sum
(and every 1x32 sum of an FP4 block) is exact in float64 in any order, so the kernel, the BLAS
path and the spec add the same float64 numbers in the same order: bit-identical results.
bf16/fp32 weights times fp32 activations: products exact in float64 (8 or 24 + 24 bits), sums
not; the kernel and the spec (a float64 BLAS product, row by row) differ by a few float64 ulps at
most, and the one rounding to fp32 agrees except when the exact sum lies that close to an fp32
rounding boundary (the tests check each differing output is such a case and count them).

One-row products (decode), four shortcuts that give the bits of the order above:
  - FP4 (mirror's activations): each 1x32 block's sum in int32 vectors (formats.fp4_dot128): x as
    integers times a power of two per block (_fp4_int_x), the weights as 4·e2m1; the sum is exact
    and so equals the lanes' sum, scaled by powers of two. Blocks without an int32 form, or whose
    scale leaves float64's normal range, take the lanes.
  - FP8: a 128-column block whose activations are integers below 2^28 times one power of two
    (_fp8_exact_blocks; mirror's always are) has an exact sum in any order: formats.fp8_dot128 takes
    it with fused multiply-adds in vectors, then the block scale.
  - bf16/fp32 weights: whole blocks through formats.dense_lanes128, the same multiplies and adds in
    the same lanes and order, kept in a register rather than in memory (any input, any mode); where
    K is a multiple of 128, eight rows at a time (formats.dense_lanes128x8: the lanes of eight rows
    transposed, so that their ordered sums are vector additions), with fused multiply-adds where x
    holds finite float32 values (_dense_exact: every product exact, so fma rounds as the add does).
  - FP4 rows whose 1x32 scalings all stay in float64's normal range: the four scalings of a block
    in one vector (formats.fp4_block128), the same operations.
The tests check each against the lanes bit for bit, on inputs that take it and inputs that do not.

float64 mode: the same kernel, for any number of rows (a row's bits never depend on the other rows: decode
== prefill); it and BLAS both sum within K·2^-53·Σ|x·w| of the exact value. Not dgemm: a plain dgemm's
row can change with the row count (measured, docs/architecture.md §4), and dgemm on fixed tiles of 16 rows
(which measured row-independent) would decode every weight to float64 on every decode step (measured
3-17x the kernel's time for one row).
float32 mode: the spec takes one float32 BLAS product (error up to about K·2^-24·Σ|x·w|); the
kernel computes the float64 sum and rounds it once to float32, which is closer to exact; the
tests bound the difference by (K + 2)·2^-24·Σ|x·w|.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np
from numba import config as numba_config, njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from refimpl.kernels.formats import (BLOCK, FMT_BF16, FMT_F32, FMT_FP4, FMT_FP8, FP4_XQ_LIMIT, FP8_XQ_LIMIT, ROWS8,
                                     bf16_value, dense_fma128x8, dense_lanes128, dense_lanes128x8, f32_from_bits,
                                     f64_from_bits, fp4_block128, fp4_block_scale, fp4_dot128, fp4_pair_raw,
                                     fp8_block_scale, fp8_dot128, fp8_raw)
from refimpl.kernels.blas import in_task, run_tasks
from refimpl.kernels.prefetch import prefetch
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.model.linear import matmul as _matmul
from refimpl.numerics import FP4_BLOCK, FP8_BLOCK, _as_codes, _check_scale_grid, act_fp8, bf16, round_f32, work_dtype
from refimpl.model import attention as spec_attention, linear as spec_linear


if numba_config.DISABLE_JIT:                     # the intrinsic has no plain-Python form (NUMBA_DISABLE_JIT=1)
    def trailing_zeros(v):                      # noqa: F811
        """The number of trailing zero bits of a non-zero integer."""
        v = int(v)
        return (v & -v).bit_length() - 1


LANES = 16           # lanes of a block's sum: position p of a block (FP4: of a 1x32 block's half) -> lane p % 16
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
def _lane_sum(a):
    """Σ a[:LANES] in ascending order."""
    y = 0.0
    for k in range(LANES):
        y += a[k]
    return y


@njit(cache=True, inline="always")
def _fp4_sub_sum(a, xe, xo, c, s, m):
    """One 1x32 FP4 block: lane i (< m) = xe[i]·(low nibble of c[i]·s) + xo[i]·(high nibble·s); Σ of the lanes."""
    a[:] = 0.0
    for i in range(m):
        lo, hi = fp4_pair_raw(c[i])
        a[i] += xe[i] * (lo * s)
        a[i] += xo[i] * (hi * s)
    return _lane_sum(a)


@njit(cache=True)
def _matvec_rows(fmt, x1, codes, scale, n_lo, n_hi, row0, out1, exact):
    """One input row x1 [K] (FP8, BF16 or F32 weights): rows n_lo..n_hi-1 of out1, two weight rows at a time.

    The order of product_kernel, decoding on the fly, one load of x serving two weight rows. The
    lanes a2 are allocated here, so LLVM knows they alias no argument. FP8 blocks marked in exact
    (_fp8_exact_blocks) have a sum that is exact in any order: it is taken by formats.fp8_dot128 and
    scaled, the lanes' bits. Whole bf16/fp32 blocks go through formats.dense_lanes128: the same
    operations in the same order, the lanes kept in a register; where K is a multiple of 128, eight
    rows at a time (_dense_rows8; exact[0]: the products are exact, _dense_exact), the rest two at a time.
    """
    K = x1.shape[0]
    a2 = np.empty((2, LANES))
    n = n_lo
    if fmt != FMT_FP8 and K % BLOCK == 0:                      # whole dense blocks: eight rows at a time
        n = _dense_rows8(x1, codes, n_lo, n_hi, out1, exact[0])
    while n < n_hi:
        sr = (row0 + n) // BLOCK
        two = n + 1 < n_hi and (row0 + n + 1) // BLOCK == sr   # both rows in one scale-grid row
        a0 = a2[0]
        a1 = a2[1]
        m = 1 if two else 0                                   # the second row: row n + m (itself if single)
        y0 = 0.0
        y1 = 0.0
        for k0 in range(0, K, BLOCK):
            kb = min(BLOCK, K - k0)
            _prefetch_ahead(codes, n, m, k0, k0 + kb)
            s = fp8_block_scale(scale[sr, k0 // BLOCK]) if fmt == FMT_FP8 else 1.0
            if fmt == FMT_FP8 and exact[k0 // BLOCK]:               # exact block sums: any order, then the scale
                y0 += fp8_dot128(codes, n, k0, x1, k0) * s
                y1 += fp8_dot128(codes, n + m, k0, x1, k0) * s
                continue
            if fmt != FMT_FP8 and kb == BLOCK:                      # the lanes below, held in registers
                y0 += dense_lanes128(codes, n, k0, x1, k0)
                y1 += dense_lanes128(codes, n + m, k0, x1, k0)
                continue
            a0[:] = 0.0
            a1[:] = 0.0
            for j in range(0, kb, LANES):                     # position k0 + j + l goes to lane l
                w = min(LANES, kb - j)
                xb = x1[k0 + j:k0 + j + w]
                c0 = codes[n, k0 + j:k0 + j + w]
                c1 = codes[n + m, k0 + j:k0 + j + w]
                if fmt == FMT_FP8:
                    for l in range(w):
                        a0[l] += xb[l] * (fp8_raw(c0[l]) * s)
                        a1[l] += xb[l] * (fp8_raw(c1[l]) * s)
                elif fmt == FMT_BF16:
                    for l in range(w):
                        a0[l] += xb[l] * bf16_value(c0[l])
                        a1[l] += xb[l] * bf16_value(c1[l])
                else:  # FMT_F32
                    for l in range(w):
                        a0[l] += xb[l] * f32_from_bits(np.uint32(c0[l]))
                        a1[l] += xb[l] * f32_from_bits(np.uint32(c1[l]))
            y0 += _lane_sum(a0)                               # the block's sum, blocks in ascending order
            y1 += _lane_sum(a1)
        out1[n] = y0
        if two:
            out1[n + 1] = y1
        n += 1 + m


F32_MAX = float(np.finfo(np.float32).max)
PREFETCH_BLOCKS = 4  # _dense_rows8: weight columns read ahead, in blocks of 128 (the next rows' at a row group's end)


@njit(cache=True)
def _dense_exact(x1):
    """x1 [K] -> [1] bool: every value finite and a float32 value, so that each product with a bf16 or float32
    weight is exact in float64 (formats.dense_fma128x8's condition): mirror's and float32 mode's inputs."""
    ok = np.ones(1, np.bool_)
    for v in x1:
        if not (abs(v) <= F32_MAX and np.float64(np.float32(v)) == v):      # not NaN, inf or beyond float32
            ok[0] = False
            break
    return ok


@njit(cache=True, inline="always")
def _prefetch_rows8(codes, n, k0):
    """Prefetch the 128-column block at column k0 of rows n..n+7 (those in bounds), one hint per cache line."""
    for r in range(n, min(n + ROWS8, codes.shape[0])):
        for k in range(k0, k0 + BLOCK, LINE // codes.itemsize):
            prefetch(codes, r, k)


@njit(cache=True)
def _dense_rows8(x1, codes, n_lo, n_hi, out1, fused):
    """bf16/fp32 weights (codes uint16/uint32), K % 128 == 0: rows n_lo.. of out1 in groups of eight, each block
    through formats.dense_lanes128x8 (or dense_fma128x8 where fused: x1 passed _dense_exact), the block sums
    added in ascending order from +0.0 as in _matvec_rows: its bits. -> the first row not done (fewer than
    eight remain). The block PREFETCH_BLOCKS ahead is prefetched (at a group's end, the next group's first)."""
    K = x1.shape[0]
    y = np.empty(ROWS8)
    n = n_lo
    while n + ROWS8 <= n_hi:
        y[:] = 0.0
        for k0 in range(0, K, BLOCK):
            kp = k0 + PREFETCH_BLOCKS * BLOCK
            if kp < K:
                _prefetch_rows8(codes, n, kp)
            elif kp - K < K:
                _prefetch_rows8(codes, n + ROWS8, kp - K)
            if fused:
                b = dense_fma128x8(codes, n, k0, x1, k0)
            else:
                b = dense_lanes128x8(codes, n, k0, x1, k0)
            for r in range(ROWS8):
                y[r] += b[r]
        out1[n:n + ROWS8] = y
        n += ROWS8
    return n


@njit(cache=True)
def _fp4_matvec_rows(xd, codes, scale, n_lo, n_hi, out1):
    """One input row xd [K] (FP4 lane order) times FP4 weight rows n_lo..n_hi-1 -> out1[n].

    The order of product_kernel, decoding on the fly; two weight rows n, n + 1 per pass over xd, so
    each x load serves both. The lanes a2 are allocated here: LLVM then knows they alias no argument
    (measured: passed in, the two-row loop was slower than one row).
    """
    K = xd.shape[0]
    a2 = np.empty((2, LANES))
    n = n_lo
    while n < n_hi:
        m = 1 if n + 1 < n_hi else 0                          # the second row: row n + m (itself if single)
        a0 = a2[0]
        a1 = a2[1]
        y0 = 0.0
        y1 = 0.0
        for k0 in range(0, K - K % BLOCK, BLOCK):             # full blocks: four 1x32 blocks of 16 lanes
            _prefetch_ahead(codes, n, m, k0 // 2, k0 // 2 + BLOCK // 2)   # the block's 64 bytes
            b0 = 0.0
            b1 = 0.0
            for q in range(4):
                s0 = fp4_block_scale(scale[n, k0 // 32 + q])
                s1 = fp4_block_scale(scale[n + m, k0 // 32 + q])
                c0 = codes[n, k0 // 2 + 16 * q:k0 // 2 + 16 * q + 16]
                c1 = codes[n + m, k0 // 2 + 16 * q:k0 // 2 + 16 * q + 16]
                xe, xo = xd[k0 + 16 * q:k0 + 16 * q + 16], xd[k0 + 64 + 16 * q:k0 + 64 + 16 * q + 16]
                a0[:] = 0.0
                a1[:] = 0.0
                for i in range(16):
                    lo0, hi0 = fp4_pair_raw(c0[i])
                    lo1, hi1 = fp4_pair_raw(c1[i])
                    a0[i] += xe[i] * (lo0 * s0)
                    a1[i] += xe[i] * (lo1 * s1)
                    a0[i] += xo[i] * (hi0 * s0)
                    a1[i] += xo[i] * (hi1 * s1)
                if q == 0:
                    b0 = _lane_sum(a0)
                    b1 = _lane_sum(a1)
                else:
                    b0 += _lane_sum(a0)
                    b1 += _lane_sum(a1)
            y0 += b0
            y1 += b1
        k0 = K - K % BLOCK
        kb = K - k0
        h = kb // 2
        if kb:                                                # a partial last block: each row on its own
            y0 += _fp4_block(xd, codes, scale, n, k0, h, a0)
            if m:
                y1 += _fp4_block(xd, codes, scale, n + 1, k0, h, a1)
        out1[n] = y0
        if m:
            out1[n + 1] = y1
        n += 1 + m


@njit(cache=True, inline="always")
def _fp4_block(xd, codes, scale, n, k0, h, a):
    """Row n's sum over the FP4 block at column k0 (2h columns, FP4 lane order): its 1x32 blocks' sums in
    ascending order."""
    b = 0.0
    for q in range((h + 15) // 16):                           # 1x32 blocks: 16 lanes of each half
        lo_i, hi_i = 16 * q, min(h, 16 * q + 16)
        c = codes[n, k0 // 2 + lo_i:k0 // 2 + hi_i]
        sq = _fp4_sub_sum(a, xd[k0 + lo_i:k0 + hi_i], xd[k0 + h + lo_i:k0 + h + hi_i], c,
                          fp4_block_scale(scale[n, k0 // 32 + q]), hi_i - lo_i)
        b = sq if q == 0 else b + sq
    return b


if numba_config.DISABLE_JIT:                    # plain Python (NUMBA_DISABLE_JIT=1): an intrinsic cannot run there
    def _trailing_zeros64(v):
        """The number of trailing zero bits of a non-zero integer."""
        v = int(v)
        return (v & -v).bit_length() - 1
else:
    @njit(cache=True, inline="always")
    def _trailing_zeros64(v):
        """The number of trailing zero bits of a non-zero integer (one tzcnt)."""
        return trailing_zeros(np.uint64(v))


@njit(cache=True, inline="always")
def _grain_exponent(bits, p):
    """The exponent of the lowest set bit of the float64 whose bits are bits[p] (|v| = odd · 2^result); None-like
    sentinels: 100000 for a zero, -100000 for inf or NaN."""
    b = bits[p] & np.uint64(0x7FFFFFFFFFFFFFFF)
    if b == 0:
        return np.int64(100000)
    ef = np.int64(b >> np.uint64(52))
    if ef == 0x7FF:
        return np.int64(-100000)
    sig = np.int64(b & np.uint64(0xFFFFFFFFFFFFF))
    e = np.int64(-1074)
    if ef:
        sig |= np.int64(1) << 52
        e = ef - 1075
    return e + np.int64(_trailing_zeros64(sig))                    # sig != 0: trailing zeros of the significand
                                                                   # (a loop here took ~49 steps for an e4m3 value)


@njit(cache=True)
def _fp8_exact_blocks(x1):
    """x1 [K] -> [ceil(K / 128)] bool: the 128-column blocks whose FP8 block sums are exact in any order, in
    float64 lanes and scaled (formats.fp8_dot128): whole blocks of finite values x = xq · 2^g, |xq| <
    FP8_XQ_LIMIT, with -938 <= g <= 850 (every product x · e4m3 · 2^(S-127), S = 0..254, and the sum are
    multiples of one power of two at least 2^-1074, below 2^1024)."""
    K = x1.shape[0]
    bits = x1.view(np.uint64)
    ok = np.zeros((K + BLOCK - 1) // BLOCK, np.bool_)
    for k0 in range(0, K - BLOCK + 1, BLOCK):
        lo = np.int64(100000)
        top = 0.0
        bad = False
        for p in range(k0, k0 + BLOCK):
            e = _grain_exponent(bits, p)
            if e == -100000:
                bad = True
                break
            lo = min(lo, e)
            top = max(top, abs(x1[p]))
        if bad:                                                    # inf or NaN: the lanes
            continue
        ok[k0 // BLOCK] = lo == 100000 or (-938 <= lo <= 850 and top < math.ldexp(float(FP8_XQ_LIMIT), int(lo)))
    return ok


NO_GRAIN = 1 << 20    # _fp4_int_x: a 1x32 block of x that is no integer vector below FP4_XQ_LIMIT times a power of two


@njit(cache=True)
def _fp4_int_x(xd):
    """xd [K] (FP4 lane order, K % 128 == 0) -> (xq [K] int32, g [K / 32] int64): for each 1x32 block, its
    16 even columns then its 16 odd ones as integers, x = xq · 2^g exactly with |xq| < FP4_XQ_LIMIT;
    g = NO_GRAIN where no such integers exist (a value inf or NaN, or too wide a range: the block is
    then taken in float64 lanes). g is the least exponent of the lowest set bit among the block's values."""
    K = xd.shape[0]
    xq = np.zeros(K, np.int32)
    g = np.zeros(K // 32, np.int64)
    bits = xd.view(np.uint64)
    for k0 in range(0, K, BLOCK):
        for q in range(4):
            j = k0 // 32 + q
            lo = np.int64(100000)                                  # least grain exponent of the block's non-zeros
            top = 0.0                                              # largest magnitude
            bad = False
            for half in range(2):
                for i in range(16):
                    p = k0 + 64 * half + 16 * q + i
                    e = _grain_exponent(bits, p)
                    bad = bad or e == -100000                      # inf or NaN
                    lo = min(lo, e)
                    top = max(top, abs(xd[p]))
            if bad or (lo != 100000 and top >= math.ldexp(float(FP4_XQ_LIMIT), int(lo))):
                g[j] = NO_GRAIN
                continue
            g[j] = 0 if lo == 100000 else lo
            for half in range(2):
                for i in range(16):
                    xq[k0 + 32 * q + 16 * half + i] = np.int32(math.ldexp(xd[k0 + 64 * half + 16 * q + i], int(-g[j])))
    return xq, g


@njit(cache=True)
def _fp4_matvec_rows_int(xd, xq, xg, codes, scale, n_lo, n_hi, out1):
    """_fp4_matvec_rows (K % 128 == 0) with each 1x32 block's sum taken in integers (formats.fp4_dot128).

    The block's sum Σ x·w = isum · 2^(g + S - 127) / 4 is exact either way (formats.py), so the float64
    value isum · 2^E is the lanes' sum bit for bit; a block whose E = g + S - 129 leaves float64's normal
    range (or whose x has no integer form: g = NO_GRAIN) is taken in float64 lanes as before. The 1x32
    sums are added in ascending order, the 128-column blocks too: product_kernel's order. A row whose
    scales keep every block in range (checked once per row) takes formats.fp4_block128 for each block:
    the same sums, scalings and additions, the four scalings in one vector.
    """
    K = xd.shape[0]
    a = np.empty(LANES)
    contiguous = scale.strides[1] == 1 and xg.strides[0] == 8       # fp4_block128 loads 4 scales, 4 grains at once
    g_lo, g_hi = np.int64(NO_GRAIN), np.int64(-NO_GRAIN)
    for j in range(K // 32):
        g_lo = min(g_lo, xg[j])
        g_hi = max(g_hi, xg[j])
    for n in range(n_lo, n_hi):
        s_lo, s_hi = np.int64(255), np.int64(0)
        for j in range(K // 32):
            s_lo = min(s_lo, np.int64(scale[n, j]))
            s_hi = max(s_hi, np.int64(scale[n, j]))
        checked = g_hi == NO_GRAIN or s_lo - 129 + g_lo < -1022 or s_hi - 129 + g_hi > 992
        y = 0.0
        for k0 in range(0, K, BLOCK):
            if n + PREFETCH_ROWS < codes.shape[0]:                  # the block's 64 bytes, PREFETCH_ROWS rows ahead
                prefetch(codes, n + PREFETCH_ROWS, k0 // 2)
            if not checked and contiguous:                          # every E in range: the scaling in vectors
                y += fp4_block128(codes, n, k0 // 2, xq, k0, scale, xg)
                continue
            b = 0.0
            isum = fp4_dot128(codes, n, k0 // 2, xq, k0)          # the four 1x32 blocks' integer sums
            for q in range(4):
                j = k0 // 32 + q
                E = np.int64(scale[n, j]) - 129 + xg[j]
                if not checked or -1022 <= E <= 992:
                    sq = float(isum[q]) * f64_from_bits(np.uint64(E + 1023) << np.uint64(52))
                else:
                    sq = _fp4_sub_sum(a, xd[k0 + 16 * q:k0 + 16 * q + 16], xd[k0 + 64 + 16 * q:k0 + 64 + 16 * q + 16],
                                      codes[n, k0 // 2 + 16 * q:k0 // 2 + 16 * q + 16],
                                      fp4_block_scale(scale[n, j]), 16)
                b = sq if q == 0 else b + sq
            y += b
        out1[n] = y


@njit(cache=True)
def _general_rows(fmt, xin, codes, scale, n_lo, n_hi, row0, out):
    """Rows n_lo..n_hi-1 of out [T, n] for any format and T (a separate function: the parallel
    kernel's loop body, kept out of Numba's parfor transformations).

    Two weight rows are decoded into w [2, K] (exact weights, lane order), then every pair of input
    rows takes both: four lane sets, each x and w load serving two of them. The input rows are
    taken in tiles of about TILE_BYTES, each tile against every weight row of the task, so a long
    input is not streamed from memory once per weight-row pair. Each output element sees the
    additions of product_kernel's order, the same as alone. FP4 weights: the blocks go through
    _fp4_block (on the decoded rows' raw values it is the same arithmetic). The scratch buffers are
    allocated here, so LLVM knows they alias no argument.
    """
    T, K = xin.shape
    w = np.empty((2, K))
    acc = np.empty((4, LANES))
    tile = max(2, TILE_BYTES // (8 * K))                      # input rows per tile: they stay in cache
    for t_lo in range(0, T, tile):
        t_hi = min(T, t_lo + tile)
        for n in range(n_lo, n_hi, 2):
            n1 = n + 1 if n + 1 < n_hi else n                 # the second weight row (row n again if none)
            _decode_row(fmt, codes, scale, n, (row0 + n) // BLOCK, w[0])
            _decode_row(fmt, codes, scale, n1, (row0 + n1) // BLOCK, w[1])
            if fmt == FMT_FP4:
                for t in range(t_lo, t_hi):
                    out[t, n] = _fp4_decoded_sum(xin[t], w[0], acc[0])
                    out[t, n1] = _fp4_decoded_sum(xin[t], w[1], acc[1])
                continue
            for t in range(t_lo, t_hi, 2):
                t1 = t + 1 if t + 1 < t_hi else t             # the second input row (row t again if none)
                a00, a01, a10, a11 = acc[0], acc[1], acc[2], acc[3]   # a<input row><weight row>
                y00 = 0.0
                y01 = 0.0
                y10 = 0.0
                y11 = 0.0
                for k0 in range(0, K, BLOCK):
                    kb = min(BLOCK, K - k0)
                    acc[:] = 0.0
                    for j in range(0, kb, LANES):             # position k0 + j + l goes to lane l
                        wd = min(LANES, kb - j)
                        x0, x1 = xin[t, k0 + j:k0 + j + wd], xin[t1, k0 + j:k0 + j + wd]
                        w0, w1 = w[0, k0 + j:k0 + j + wd], w[1, k0 + j:k0 + j + wd]
                        for l in range(wd):
                            a00[l] += x0[l] * w0[l]
                            a01[l] += x0[l] * w1[l]
                            a10[l] += x1[l] * w0[l]
                            a11[l] += x1[l] * w1[l]
                    y00 += _lane_sum(a00)                     # the block's sum, blocks in ascending order
                    y01 += _lane_sum(a01)
                    y10 += _lane_sum(a10)
                    y11 += _lane_sum(a11)
                out[t, n] = y00
                out[t, n1] = y01
                out[t1, n] = y10
                out[t1, n1] = y11


@njit(cache=True, inline="always")
def _fp4_decoded_sum(xd, w, a):
    """One input row xd [K] times one decoded FP4 weight row w [K] (both in FP4 lane order): _fp4_block's
    arithmetic (lane i: even column's product, then odd column's; 1x32 blocks' sums ascending), blocks ascending."""
    K = xd.shape[0]
    y = 0.0
    for k0 in range(0, K, BLOCK):
        h = min(BLOCK, K - k0) // 2
        b = 0.0
        for q in range((h + 15) // 16):
            lo_i, hi_i = 16 * q, min(h, 16 * q + 16)
            xe, xo = xd[k0 + lo_i:k0 + hi_i], xd[k0 + h + lo_i:k0 + h + hi_i]
            we, wo = w[k0 + lo_i:k0 + hi_i], w[k0 + h + lo_i:k0 + h + hi_i]
            a[:] = 0.0
            for i in range(hi_i - lo_i):
                a[i] += xe[i] * we[i]
                a[i] += xo[i] * wo[i]
            sq = _lane_sum(a)
            b = sq if q == 0 else b + sq
        y += b
    return y


@njit(parallel=True, cache=True)
def product_kernel(fmt, x, codes, scale, n_out, row0):
    """x [T, K] float64 @ W[row0 : row0+n_out]ᵀ -> [T, n_out] float64, W given by its codes (formats.py).

    codes holds the rows row0.. of W (codes[n] is row row0+n); an FP8 scale grid is indexed by the
    absolute row (row0 + n) // 128, so a row range of a larger FP8 matrix can be passed.
    Order of every output element: the module docstring's (block sums in LANES lanes, blocks
    ascending). One input row is decoded on the fly, several rows share decoded weight rows, two
    at a time: the same operations either way.
    """
    T, K = x.shape
    out = np.empty((T, n_out))
    xin = _deinterleave_fp4(x) if fmt == FMT_FP4 else x
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if T == 1 and fmt != FMT_FP4:
        exact = _fp8_exact_blocks(x[0]) if fmt == FMT_FP8 else _dense_exact(x[0])
        for task in prange(n_tasks):
            _matvec_rows(fmt, x[0], codes, scale, task * ROWS_PER_TASK, min(n_out, (task + 1) * ROWS_PER_TASK),
                         row0, out[0], exact)
        return out
    if T == 1 and fmt == FMT_FP4 and K % BLOCK == 0:
        xq, xg = _fp4_int_x(xin[0])
        for task in prange(n_tasks):
            _fp4_matvec_rows_int(xin[0], xq, xg, codes, scale, task * ROWS_PER_TASK,
                                 min(n_out, (task + 1) * ROWS_PER_TASK), out[0])
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
        exact = _fp8_exact_blocks(x[0]) if fmt == FMT_FP8 else _dense_exact(x[0])
        _matvec_rows(fmt, x[0], codes, scale, 0, n_out, row0, out[0], exact)
        return out
    xin = _deinterleave_fp4(x) if fmt == FMT_FP4 else x
    if T == 1 and fmt == FMT_FP4 and K % BLOCK == 0:
        xq, xg = _fp4_int_x(xin[0])
        _fp4_matvec_rows_int(xin[0], xq, xg, codes, scale, 0, n_out, out[0])
        return out
    if T == 1 and fmt == FMT_FP4:
        _fp4_matvec_rows(xin[0], codes, scale, 0, n_out, out[0])
        return out
    _general_rows(fmt, xin, codes, scale, 0, n_out, row0, out)
    return out


@njit(cache=True, nogil=True)
def decode_rows(fmt, codes, scale, n_lo, n_hi, row0, out):
    """out [n_hi - n_lo, K] = rows n_lo..n_hi-1 of the weight, natural column order, in out's dtype: float64
    (exact) or float32 (exact, or rounded as the spec's float32 dequantization rounds: RNE). On the calling
    thread, without the GIL: blas.run_tasks runs several at once."""
    K = out.shape[1]
    for i in range(n_hi - n_lo):
        n = n_lo + i
        o = out[i]
        if fmt == FMT_FP8:
            c = codes[n]
            srow = scale[(row0 + n) // BLOCK]
            for b in range(K // BLOCK):                       # whole 128-column blocks: a fixed trip that LLVM
                s = fp8_block_scale(srow[b])                  # vectorizes (3.4x the speed, as FP4's below)
                for k in range(BLOCK * b, BLOCK * b + BLOCK):
                    o[k] = fp8_raw(c[k]) * s
            for k in range(BLOCK * (K // BLOCK), K):          # a last, partial block
                o[k] = fp8_raw(c[k]) * fp8_block_scale(srow[K // BLOCK])
        elif fmt == FMT_FP4:
            c = codes[n]
            srow = scale[n]
            for b in range(K // 32):                          # one scale per 1x32 block (16 packed bytes): a
                s = fp4_block_scale(srow[b])                  # fixed trip that LLVM vectorizes (5x the speed)
                for j in range(16 * b, 16 * b + 16):
                    lo, hi = fp4_pair_raw(c[j])
                    o[2 * j] = lo * s
                    o[2 * j + 1] = hi * s
            for j in range(16 * (K // 32), K // 2):           # a last, partial block
                s = fp4_block_scale(srow[K // 32])
                lo, hi = fp4_pair_raw(c[j])
                o[2 * j] = lo * s
                o[2 * j + 1] = hi * s
        elif fmt == FMT_BF16:
            for k in range(K):
                o[k] = bf16_value(codes[n, k])
        else:  # FMT_F32
            for k in range(K):
                o[k] = f32_from_bits(np.uint32(codes[n, k]))


def fp4_spans_fit(scale: np.ndarray) -> bool:
    """True if every 128-column block of an FP4 weight has scales spanning at most 24 binades: then its
    128-column sums against FP8 activations are exact in float64 (model/linear.py), as its 32-column sums are."""
    n, nb = scale.shape
    return nb % 4 == 0 and _spans_fit(np.ascontiguousarray(scale, np.uint8))


@njit(cache=True, nogil=True)
def _spans_fit(scale):
    """fp4_spans_fit's scan in one pass (NumPy's max, min and int16 temporaries took ~5 ms per expert matrix,
    on the main thread, ~7 s of a 1024-token Flash prefill)."""
    n, nb = scale.shape
    for r in range(n):
        for b0 in range(0, nb, 4):
            lo = min(scale[r, b0], scale[r, b0 + 1], scale[r, b0 + 2], scale[r, b0 + 3])
            hi = max(scale[r, b0], scale[r, b0 + 1], scale[r, b0 + 2], scale[r, b0 + 3])
            if np.int32(hi) - np.int32(lo) > 24:
                return False
    return True


BLAS_MIN_ROWS = 16       # products with at least this many input rows take BLAS: mirror's FP8/FP4 block sums
                         # (blas_block_sums, the same bits), float32 mode's products (blas_float32, the spec's sgemm)
PANEL_ROWS = 512         # BLAS paths: weight rows decoded at a time, and input rows per block-sum product
PANEL_CACHE_BYTES = 96 << 20   # decoded weight panels kept for the BLAS paths, all matrices together (once
                               # full, further panels are decoded on each call as before)
PANEL_CACHE_MATRIX = 4 << 20   # only a matrix whose decoded form takes at most this many bytes is kept


class PanelCache:
    """Decoded weight panels of small read-only matrices, so that a product does not decode the same bytes again
    on every call (a tiny model's forward makes a few hundred such calls, each decoding its whole matrix).

    An entry is what `decode_rows` (and a function of its result, `derive`) gives for one panel, so a
    cached panel holds the bits the call would decode: the cache changes the speed only. Kept only for
    read-only codes and scales (checkpoint memory maps, the resident head; the rule of `checked_codes`:
    a writeable array may change between calls) of matrices whose decoded form takes at most
    PANEL_CACHE_MATRIX bytes, in at most PANEL_CACHE_BYTES in all, first come first kept (an evicting
    policy would miss on every call once a forward's panels pass the cap: they recur in the same
    cycle). The tiny model's panels take 72.5 MiB in mirror (float64), 36.2 MiB in float32 mode; at
    Flash dimensions only the small matrices qualify (hc_fn's 24 rows, the indexer's weights_proj:
    about 8 MiB a layer), and the cost is 96 MiB at most. An entry is keyed by the memory it was
    decoded from (the last array of its base chain, held by a weak reference: when that array goes,
    so do its entries).
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.used = 0
        self.entries: dict = {}                  # key -> (payload, nbytes, owner refs)
        self.gone: list = []                     # weak references whose owner died (appended by their callback)
        self.lock = threading.Lock()

    @staticmethod
    def _where(a: np.ndarray):
        """(owner, key part) of a read-only array, or None: the array owning the memory and the view's place in it."""
        if a.flags.writeable:
            return None
        owner = a
        while isinstance(owner.base, np.ndarray):  # the last array of the chain: a checkpoint's memory map, whose
            owner = owner.base                   # tensors may be fresh views on every access
        return owner, (id(owner), a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)

    def _pop(self, key) -> None:
        self.used -= self.entries.pop(key)[1]

    def get(self, kind: str, fmt, codes, scale, p0: int, p1: int, row0: int, K: int, dtype, derive=None):
        """Rows p0..p1-1 of the weight decoded as dtype (decode_rows), with derive(w) if given: (w, derive(w)).
        kind names what derive computes (part of the key)."""
        def build():
            w = np.empty((p1 - p0, K), dtype)
            decode_rows(fmt, codes, scale, p0, p1, row0, w)
            return (w, derive(w) if derive else None)
        wc = self._where(codes)
        ws = (_NO_SCALE, ("no scale",)) if scale is _NO_SCALE else self._where(scale)   # the dense products' constant
        if wc is None or ws is None or codes.shape[0] * K * 8 > PANEL_CACHE_MATRIX:
            return build()
        key = (kind, int(fmt), wc[1], ws[1], p0, p1, row0, K, np.dtype(dtype).str)
        with self.lock:
            while self.gone:                     # entries of owners that died since the last call
                ref = self.gone.pop()
                for k in [k for k, v in self.entries.items() if ref in v[2]]:
                    self._pop(k)
            hit = self.entries.get(key)
            if hit is not None:
                return hit[0]
        payload = build()
        nbytes = payload[0].nbytes + sum(a.nbytes for a in (payload[1] or ()) if isinstance(a, np.ndarray))
        if nbytes > self.cap:
            return payload
        try:
            refs = tuple(weakref.ref(o, self.gone.append) for o in {id(wc[0]): wc[0], id(ws[0]): ws[0]}.values())
        except TypeError:                        # an owner without weak references: not kept
            return payload
        for a in (payload[0], *(payload[1] or ())):
            if isinstance(a, np.ndarray):
                a.flags.writeable = False        # a kept panel is shared between calls: nobody may write it
        with self.lock:
            if key not in self.entries and self.used + nbytes <= self.cap:   # full: the panel is not kept
                self.entries[key] = (payload, nbytes, refs)
                self.used += nbytes
        return payload

    def clear(self) -> None:
        """Drop every entry (tests; a caller that wants the memory back)."""
        with self.lock:
            self.entries.clear()
            self.used = 0


PANELS = PanelCache(PANEL_CACHE_BYTES)


def blas_block_sums(fmt, x, codes, scale, n_out, row0):
    """Mirror's x [T, K] float64 (FP8-quantized activations) @ W[row0 : row0+n_out]ᵀ -> [T, n_out] float64 whose
    rounding to fp32 is the spec's block sums' (model/linear.py `block_sums`), through BLAS: one dgemm over
    all K columns per panel of PANEL_ROWS decoded weight rows, the panels spread over blas.run_tasks' threads.

    Every product x·w is exact in float64 (e4m3 times e4m3 or e2m1, times powers of two). An output is
    kept as BLAS gives it where it is the spec's: where its sum is exact (every partial sum, in any order,
    is a multiple of the grains of x's row and w's row below 2^53 of them: then BLAS's float64 is the
    spec's bit for bit), or where BLAS's sum and the spec's, both within h·Σ|x·w| of the exact one
    (`_half_width_blocks`), leave no fp32 rounding midpoint between them (the same fp32 value; _rounding_safe
    checks both, with a · f >= Σ|x·w| from the 128-column blocks' Σ|x| and bounds of |w|). The others are
    computed again in the kernel's order, whose float64 is the spec's (_redo_outputs); a panel with more
    than one output in RECOMPUTE_MAX of them takes the spec's block sums whole (`_panel_block_sums`), and so does
    every panel of a product with fewer than FULL_K_MIN columns.
    One dgemm over K ran 1.08 (24 rows) to 1.15-1.18 (512-1024 rows) times as fast as the 32 block
    products per panel it replaces (one thread, x 4096 columns x 512 weight rows). Decoded panels of small read-only
    matrices are kept with their weight-side bounds (PANELS).
    """
    T, K = x.shape
    out = np.empty((T, n_out))
    if K < FULL_K_MIN:                                               # a few blocks: their products, no checks
        def blocks(p0):
            p1 = min(n_out, p0 + PANEL_ROWS)
            w, _ = PANELS.get("", fmt, codes, scale, p0, p1, row0, K, np.float64)
            _panel_block_sums(fmt, x, w, scale, p0, p1, out)
        run_tasks(blocks, range(0, n_out, PANEL_ROWS))
        return out
    xs = _block_abs_sums(x, BLOCK)                                   # [T, K/128] Σ|x| per 128-column block
    gx = _min_grain(x)                                               # [T] every x[t, k] is a multiple of gx[t]
    h = _half_width_blocks(K)

    def panel(p0):
        p1 = min(n_out, p0 + PANEL_ROWS)
        if fmt == FMT_FP4:                                           # bounds from the 1x32 scales (cheap)
            w, _ = PANELS.get("", fmt, codes, scale, p0, p1, row0, K, np.float64)
            gw, wm = _fp4_scale_bounds(scale, p0, p1)
        else:                                                        # FP8: from the decoded values (tighter)
            w, (gw, wm) = PANELS.get("blocks", fmt, codes, scale, p0, p1, row0, K, np.float64,
                                     lambda w: (_min_grain(w), _block_abs_max(w, BLOCK)))
        y = x @ w.T                                                  # [T, p] float64, BLAS's order
        a, f = _abs_bound(xs, wm, BLOCK)                             # a · f >= Σ|x·w|
        ts, ns = _rounding_safe(y, a, f, gx, gw, h, out, p0)        # y into out; the outputs to recompute
        if len(ts) * RECOMPUTE_MAX > y.size:
            _panel_block_sums(fmt, x, w, scale, p0, p1, out)
        elif len(ts):
            _redo_outputs(fmt, x, codes, scale, row0, ts, ns, out)
    run_tasks(panel, range(0, n_out, PANEL_ROWS))
    return out


RECOMPUTE_MAX = 8        # blas_block_sums: a panel with more than 1/8 of its outputs to recompute takes block sums
FULL_K_MIN = 1024        # blas_block_sums: one dgemm over K from this many columns; below, the block products
                         # (the tiny model's K of 128-256: its 300-token mirror forward took 0.30 s of CPU with
                         # the block products against 0.33 s with one dgemm and the checks)


def _panel_block_sums(fmt, x, w, scale, p0, p1, out):
    """out[:, p0:p1] = the spec's block_sums of x with the decoded panel w (an FP4 panel whose scales span more
    than 24 binades in some 128-column block: its 32-column sums, the spec's definition; where they fit,
    every partial sum of a block is exact, so the 128-column sums are the same bits)."""
    fits = fmt == FMT_FP8 or fp4_spans_fit(scale[p0:p1])
    for t0 in range(0, x.shape[0], PANEL_ROWS):
        out[t0:t0 + PANEL_ROWS, p0:p1] = spec_linear.block_sums(x[t0:t0 + PANEL_ROWS], w, sub=BLOCK if fits else FP4_BLOCK)


@njit(cache=True, nogil=True)
def _fp4_scale_bounds(scale, p0, p1):
    """FP4 rows p0..p1-1 from their 1x32 scales alone: (gw [p], wm [p, K/128]): every weight of row n is a multiple
    of gw[n] = 0.5 · its least block scale (e2m1 values are multiples of 0.5), and |w| <= wm[n, b] = 6 · the
    largest scale of 128-column block b (6: e2m1's largest value). Scale bytes as fp4_block_scale reads them."""
    nb = scale.shape[1] // 4
    gw = np.empty(p1 - p0)
    wm = np.empty((p1 - p0, nb))
    for i in range(p1 - p0):
        lo = np.inf
        for b in range(nb):
            hi = 0.0
            for q in range(4 * b, 4 * b + 4):
                v = fp4_block_scale(scale[p0 + i, q]) * 2.0 ** -126  # 2^(S-127)
                lo = min(lo, v)
                hi = max(hi, v)
            wm[i, b] = 6.0 * hi
        gw[i] = 0.5 * lo
    return gw, wm


def _half_width_blocks(K: int) -> float:
    """h for blas_block_sums: |BLAS's float64 sum - the spec's block sums| <= h · Σ|x·w| (as `_half_width`): BLAS
    d <= K + 2; the spec's block sums are exact and a term then passes through at most its block's four
    32-column sums' additions and the blocks' sum: d = 4 + ceil(K / 128) + 1."""
    def gamma(d):
        return d * 2.0 ** -53 / (1 - d * 2.0 ** -53)
    return (gamma(K + 2) + gamma(4 + -(-K // BLOCK) + 1)) * (1 + 2.0 ** -40)


def blas_float32(fmt, x, codes, scale, n_out, row0):
    """float32 mode's x [T, K] @ W[row0 : row0+n_out]ᵀ -> [T, n_out] float32: the spec's one float32 BLAS product
    (sgemm), on panels of PANEL_ROWS weight rows decoded to float32 (no float32 copy of a whole matrix).

    Not row-count independent bit for bit: the float32 guarantees are bounds (docs/architecture.md §15),
    and the spec's own float32 product is this one (tests/kernels/test_linear_kernel.py measures it).
    """
    T, K = x.shape
    x32 = x.astype(np.float32)
    out = np.empty((T, n_out), np.float32)

    def panel(p0):
        p1 = min(n_out, p0 + PANEL_ROWS)
        w, _ = PANELS.get("", fmt, codes, scale, p0, p1, row0, K, np.float32)
        np.matmul(x32, w.T, out=out[:, p0:p1])
    run_tasks(panel, range(0, n_out, PANEL_ROWS))
    return out


@njit(cache=True, nogil=True)
def _min_grain(v):
    """v [R, K] float64 (C-contiguous) -> [R]: the smallest grain (the largest power of two dividing a value:
    v = odd integer · grain) among each row's non-zero values; inf for a row of zeros, NaN for a row with
    inf or NaN. From the bits: significand s (with its hidden bit), exponent e: grain = 2^(e + trailing zeros of s).

    Without branches in the loop (LLVM vectorizes it): a zero counts as no grain, and a bit set at 2^62
    bounds the count for it; inf and NaN are found from the largest exponent field afterwards."""
    R, K = v.shape
    bits = v.view(np.uint64)
    out = np.empty(R)
    for r in range(R):
        lo = np.int64(100000)                                        # the least grain exponent so far
        top = np.int64(0)                                            # the largest exponent field (0x7FF: inf or NaN)
        for k in range(K):
            b = bits[r, k] & np.uint64(0x7FFFFFFFFFFFFFFF)
            ef = np.int64(b >> np.uint64(52))
            sig = ((b & np.uint64(0xFFFFFFFFFFFFF)) | (np.uint64(ef != 0) << np.uint64(52))
                   | (np.uint64(1) << np.uint64(62)))                # hidden bit of a normal number; the bound
            g = max(ef, np.int64(1)) - 1075 + np.int64(trailing_zeros(sig))
            lo = min(lo, g if b != 0 else np.int64(100000))
            top = max(top, ef)
        out[r] = np.nan if top == 0x7FF else (np.inf if lo == 100000 else math.ldexp(1.0, int(lo)))
    return out


@njit(cache=True, nogil=True)
def _rounding_safe(y, a, f, gx, gw, h, out, p0):
    """Writes y [T, N] into out[:, p0:p0+N] (-0 as +0: the kernel's sums start at +0) and returns (ts, ns): the
    outputs whose fp32(y) may not be the fp32 rounding of the kernel's float64 sum of the same exact products
    (see blas_rounding_checked), a · f bounding Σ|x·w| and h · Σ|x·w| bounding |y - the kernel's sum|. Safe are
    those whose sum is exact (a·f < 2^52 · gx · gw: every partial sum, in any order, is a multiple of gx·gw
    below 2^53 of them) and those where y ± h·a·f holds no fp32 rounding midpoint; the others (and any
    non-finite one) are listed, in row-major order.

    Two passes. The first, without branches (LLVM vectorizes it), marks safe every output whose interval,
    widened by 2^-51·|y| for the float64 roundings of its ends (lo <= y - b and hi >= y + b while b < |y|),
    has ends with the same fp32 rounding r (finite, non-zero): rounding is monotonic, so every value
    between them rounds to r. The second checks the few others against the midpoints next to fp32(y)."""
    T, N = y.shape
    unsafe = np.zeros((T, N), np.bool_)
    m = 0
    for t in range(T):
        for n in range(N):
            yv = y[t, n]
            out[t, p0 + n] = yv if yv != 0 else 0.0
            av = a[t, n] * f
            b = av * h
            ay = abs(yv)
            e = b + ay * 2.0 ** -51
            r = np.float32(yv)
            fast = (abs(r) < np.inf) & (r != 0) & (b < ay) & (np.float32(yv - e) == np.float32(yv + e))
            bad = not (fast | (av < gx[t] * gw[n] * 2.0 ** 52))
            unsafe[t, n] = bad
            m += bad
    for t in range(T):
        for n in range(N):
            if not unsafe[t, n]:
                continue
            yv = y[t, n]
            r = np.float32(yv)
            if not np.isfinite(r) or not np.isfinite(yv):
                continue
            up = np.float64(np.nextafter(r, np.float32(np.inf)))
            down = np.float64(np.nextafter(r, np.float32(-np.inf)))
            if np.isfinite(up) and np.isfinite(down):
                b = a[t, n] * f * h
                fv = np.float64(r)
                if yv - b > (fv + down) / 2 and yv + b < (fv + up) / 2:
                    unsafe[t, n] = False
                    m -= 1
    ts = np.empty(m, np.int64)
    ns = np.empty(m, np.int64)
    i = 0
    for t in range(T):
        for n in range(N):
            if unsafe[t, n]:
                ts[i] = t
                ns[i] = p0 + n
                i += 1
    return ts, ns


def _half_width(K: int) -> float:
    """h: |BLAS's float64 sum - the kernel's| <= h · Σ|x·w| for K exact products (blas_rounding_checked).

    A float64 sum whose terms each pass through at most d additions lies within γ_d·Σ|x·w| of the exact
    sum, γ_d = d·2^-53 / (1 - d·2^-53), whatever the order and with fused multiply-adds (each rounds an
    exact product plus a partial sum once). BLAS's order is unknown: d <= K + 2 (its partial sums and
    the write into the output). The kernel's is the module docstring's: a term passes through its
    lane (128 / LANES additions from +0), the lane sum (LANES), the blocks' sum (one per 128-column
    block): d = 128 / LANES + LANES + ceil(K / 128), 56 at K = 4096. So h = γ_{K+2} + γ_d (the whole
    γ_K for both sides was twice as wide: twice the outputs sent to the recomputation), times
    (1 + 2^-40) for the roundings of h itself and of its product with the bound."""
    def gamma(d):
        return d * 2.0 ** -53 / (1 - d * 2.0 ** -53)
    return (gamma(K + 2) + gamma(BLOCK // LANES + LANES + -(-K // BLOCK))) * (1 + 2.0 ** -40)


ABS_BLOCK = 64           # blas_rounding_checked: columns per block of its bound on Σ|x·w| (16 before: the bound's
                         # product took 7% of a Flash head panel's dgemm, 1.6% now, for about 20% more outputs
                         # recomputed; the fast first pass of _rounding_safe and the narrower interval of
                         # _half_width more than pay for them)


@njit(cache=True, nogil=True)
def _block_abs_sums(x, B):
    """x [T, K] -> [T, ceil(K/B)] float64: Σ |x[t, k]| over each block of B columns (in column order)."""
    T, K = x.shape
    nb = (K + B - 1) // B
    out = np.zeros((T, nb))
    for t in range(T):
        for k in range(K):
            out[t, k // B] += abs(x[t, k])
    return out


@njit(cache=True, nogil=True)
def _block_abs_max(w, B):
    """w [p, K] -> [p, ceil(K/B)] float64: max |w[n, k]| over each block of B columns (a NaN is passed over: a
    NaN weight makes its outputs NaN, which blas_rounding_checked recomputes whatever their bound)."""
    p, K = w.shape
    nb = (K + B - 1) // B
    out = np.zeros((p, nb))
    for n in range(p):
        for b in range(nb):
            m = 0.0
            for k in range(b * B, min(K, b * B + B)):
                m = max(m, abs(w[n, k]))
            out[n, b] = m
    return out


def _abs_bound(xs: np.ndarray, wm: np.ndarray, B: int | None = None) -> tuple[np.ndarray, float]:
    """(a, f): a · f [T, p] is an upper bound of A = Σ_k |x[t, k]·w[n, k]|, from xs = _block_abs_sums(x, ABS_BLOCK)
    [T, nb] and wm = _block_abs_max(w, ABS_BLOCK) [p, nb] of the panel w [p, K] float64: A <= Σ_b (Σ_{k in b} |x[t, k]|) · max_{k in b} |w[n, k]|, a
    product with K / ABS_BLOCK inner terms (1/64 of the panel's dgemm).

    Every term is non-negative and float64 (x holds float32 values, w float32 or bf16 ones: no product or
    sum leaves float64's normal range unless it overflows to inf, which only sends an output to the
    recomputation), so each computed sum is within a factor 1 - γ of the exact one, in any order and with
    fused multiply-adds, γ = n·2^-53 / (1 - n·2^-53) for n terms: the block sums (n = ABS_BLOCK) and the
    product (n = nb + 1 with its multiplications). f divides by both factors' lower ends (times a further
    2^-50 for f's own roundings and _rounding_safe's product a · f).
    """
    g = ((ABS_BLOCK if B is None else B) + xs.shape[1] + 2) * 2.0 ** -53
    if g >= 0.25:                                                     # no useful bound: every output recomputed
        return np.full((xs.shape[0], wm.shape[0]), np.inf), 1.0
    return xs @ wm.T, 1 / ((1 - g) * (1 - g)) * (1 + 2.0 ** -50)


def _weight_checks(w: np.ndarray):
    """A decoded panel's side of blas_rounding_checked: (grains [p], block maxima of |w| [p, nb]), kept with
    the panel by PANELS for small read-only matrices."""
    return _min_grain(w), _block_abs_max(w, ABS_BLOCK)


def blas_rounding_checked(fmt, x, codes, scale, n_out, row0):
    """mirror's dense products (bf16/fp32 weights, or FP8 weights times bf16 activations: grouped wo_a) on many
    rows: a float64 [T, n_out] whose rounding to fp32 is product_kernel's, taken through BLAS.

    Each product x·w is exact in float64 (24 + 24 bits at most), so BLAS's sum (dgemm, s) and the kernel's
    (k) both lie near the exact sum: |s - k| <= h·A, A = Σ|x·w| (`_half_width`: γ_{K+2} for BLAS's unknown
    order, γ_56 at K = 4096 for the kernel's). `_abs_bound` bounds A from the blocks' sums of |x| and
    maxima of |w| (a product 1/ABS_BLOCK of the dgemm's size; a float32 product of |x| and |w| was
    tighter but took about 0.6 of the dgemm's time, measured on the Flash head). Where the interval
    s ± h·A holds no fp32 rounding midpoint, fp32(s) = fp32(k); every other output (and any non-finite one) is
    computed again by the kernel's order (_redo_outputs, all of a panel's in one call). So the rounded
    results are the kernel's bit for bit, for any number of rows: BLAS decides only how fast they come.
    The weight side (the decoded panel, its grains and block maxima) is kept by PANELS for small
    read-only matrices.
    """
    T, K = x.shape
    h = _half_width(K)
    xs = _block_abs_sums(x, ABS_BLOCK)                                # [T, nb] Σ|x| per block of columns
    gx = _min_grain(x)                                               # [T] every x[t, k] is a multiple of gx[t]
    out = np.empty((T, n_out))

    def panel(p0):
        p1 = min(n_out, p0 + PANEL_ROWS)
        w, (gw, wm) = PANELS.get("checks", fmt, codes, scale, p0, p1, row0, K, np.float64, _weight_checks)
        y = x @ w.T                                                  # [T, p] float64, BLAS's order
        a, f = _abs_bound(xs, wm)                                    # a · f >= Σ|x·w|
        ts, ns = _rounding_safe(y, a, f, gx, gw, h, out, p0)        # y into out; the unsafe outputs
        if len(ts):
            _redo_outputs(fmt, x, codes, scale, row0, ts, ns, out)
    run_tasks(panel, range(0, n_out, PANEL_ROWS))
    return out


@njit(cache=True, nogil=True)
def _redo_outputs(fmt, x, codes, scale, row0, ts, ns, out):
    """out[t, n] = product_kernel's x[t] · W[row0 + n] for each pair (ts[i], ns[i]), listed row by row (as
    _rounding_safe lists them): each output alone by the one-row path product_kernel_serial takes for x[t]
    (its own sum in the kernel's order, the same bits as among others), the row's preparation (FP4 lane
    order and integer form, FP8's exact blocks) once per row; all in one call without the GIL. (One
    product_kernel_serial call per output prepared its row every time: 1.6 us an output of the Flash head.)"""
    K = x.shape[1]
    i = 0
    while i < len(ts):
        t = ts[i]
        j = i
        while j < len(ts) and ts[j] == t:
            j += 1
        row = out[t]
        if fmt == FMT_FP4:
            xin = _deinterleave_fp4(x[t:t + 1])[0]
            if K % BLOCK == 0:
                xq, xg = _fp4_int_x(xin)
                for q in range(i, j):
                    _fp4_matvec_rows_int(xin, xq, xg, codes, scale, ns[q], ns[q] + 1, row)
            else:
                for q in range(i, j):
                    _fp4_matvec_rows(xin, codes, scale, ns[q], ns[q] + 1, row)
        else:
            exact = _fp8_exact_blocks(x[t]) if fmt == FMT_FP8 else np.zeros(1, np.bool_)
            for q in range(i, j):
                _matvec_rows(fmt, x[t], codes, scale, ns[q], ns[q] + 1, row0, row, exact)
        i = j


PARALLEL_MIN = 1 << 23   # multiply-adds below which a product runs on one thread (on a loaded 2-core
                         # machine a parallel start measured up to ~5 ms; 2^23 is about that much work)


def product(fmt, x, codes, scale, n_out, row0, *, prec: str = "float64", exact_blocks: bool = False):
    """x [T, K] float64 @ W[row0 : row0+n_out]ᵀ (product_kernel), on one thread when the product is small.

    From BLAS_MIN_ROWS rows on: with exact_blocks (mirror's FP8/FP4 products, whose block sums are
    exact) blas_block_sums, which gives the same bits; in float32 mode blas_float32 (float32 result).
    """
    if x.shape[0] >= BLAS_MIN_ROWS:
        if exact_blocks and x.shape[1] % BLOCK == 0:
            return blas_block_sums(fmt, x, codes, scale, n_out, row0)
        if prec == "float32":
            return blas_float32(fmt, x, codes, scale, n_out, row0)
        if prec == "mirror":
            return blas_rounding_checked(fmt, x, codes, scale, n_out, row0)
    # the one-row paths load a row's codes (and an FP4 block's scales) as vectors: C-contiguous rows (a checkpoint's
    # always are; a strided view, such as a transposed matrix, is copied)
    codes, scale = np.ascontiguousarray(codes), np.ascontiguousarray(scale)
    if x.shape[0] * x.shape[1] * n_out < PARALLEL_MIN or in_task():   # a pool task's products stay on its thread
        return product_kernel_serial(fmt, x, codes, scale, n_out, row0)
    return product_kernel(fmt, x, codes, scale, n_out, row0)


# ---------------------------------------------------------------- one row against several matrices (decode)
#
# A decode step multiplies one row by many small matrices: a token's six routed experts (w1 and w3
# take the same row, w2 each expert's own), the shared expert, wo_a's eight groups. Each such
# product alone is a short parallel region (about 1 ms of work), and a step made about twenty of
# them per layer, plus wo_a's groups on one thread (below PARALLEL_MIN each). `matvec_many` takes
# them in one region: the rows of every matrix split into the same tasks of ROWS_PER_TASK rows,
# each task the one-row code of product_kernel (_matvec_rows, _fp4_matvec_rows_int,
# _fp4_matvec_rows) on one matrix, so every output has the bits of product_kernel's on that matrix.

@njit(cache=True)
def _matvec_prep(fmt, x):
    """The per-row inputs of the one-row paths, x [M, K] float64 -> (xin [M, K], xq [M, K'] int32, xg [M, K''],
    exact [M, B] bool): FP4 lane order and the integer form (_fp4_int_x, K % 128 == 0), or FP8's exact blocks."""
    M, K = x.shape
    xin = _deinterleave_fp4(x) if fmt == FMT_FP4 else x
    int_fp4 = fmt == FMT_FP4 and K % BLOCK == 0
    xq = np.zeros((M, K if int_fp4 else 1), np.int32)
    xg = np.zeros((M, K // 32 if int_fp4 else 1), np.int64)
    exact = np.zeros((M, (K + BLOCK - 1) // BLOCK), np.bool_)
    for i in range(M):
        if int_fp4:
            xq[i], xg[i] = _fp4_int_x(xin[i])
        elif fmt == FMT_FP8:
            exact[i] = _fp8_exact_blocks(x[i])
        else:
            exact[i, 0] = _dense_exact(x[i])[0]
    return xin, xq, xg, exact, int_fp4


@njit(cache=True, inline="always")
def _matvec_task(fmt, x1, xq, xg, codes, scale, n_lo, n_hi, row0, out1, exact, int_fp4):
    """Rows n_lo..n_hi-1 of one matrix times one row: product_kernel's one-row path for the format."""
    if fmt == FMT_FP4:
        if int_fp4:
            _fp4_matvec_rows_int(x1, xq, xg, codes, scale, n_lo, n_hi, out1)
        else:
            _fp4_matvec_rows(x1, codes, scale, n_lo, n_hi, out1)
    else:
        _matvec_rows(fmt, x1, codes, scale, n_lo, n_hi, row0, out1, exact)


@njit(parallel=True, cache=True)
def matvec_many_kernel(fmt, x, xi, codes_t, scale_t, row0s, n_out):
    """x [M', K] float64, xi [M] (matrix i takes row xi[i] of x), codes_t / scale_t: tuples of M matrices of n_out
    rows (one format), row0s [M] (the first row of each in its FP8 scale grid) -> [M, n_out]:
    out[i] = x[xi[i]] @ matrix iᵀ, as product_kernel computes it. Each row of x is prepared once."""
    M = xi.shape[0]
    xin, xq, xg, exact, int_fp4 = _matvec_prep(fmt, x)
    out = np.empty((M, n_out))
    per = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(M * per):               # every output row belongs to one task: one thread
        i = task // per
        r = xi[i]
        lo = (task - i * per) * ROWS_PER_TASK
        _matvec_task(fmt, xin[r], xq[r], xg[r], codes_t[i], scale_t[i], lo, min(n_out, lo + ROWS_PER_TASK), row0s[i],
                     out[i], exact[r], int_fp4)
    return out


@njit(cache=True)
def matvec_many_serial(fmt, x, xi, codes_t, scale_t, row0s, n_out):
    """matvec_many_kernel on the calling thread only (small products); the same results."""
    M = xi.shape[0]
    xin, xq, xg, exact, int_fp4 = _matvec_prep(fmt, x)
    out = np.empty((M, n_out))
    for i in range(M):
        r = xi[i]
        _matvec_task(fmt, xin[r], xq[r], xg[r], codes_t[i], scale_t[i], 0, n_out, row0s[i], out[i], exact[r], int_fp4)
    return out


def _read_only(arrays) -> tuple:
    """C-contiguous read-only views of the arrays: one Numba type for all (a tuple the kernel can index), whether
    each came writeable (a matrix built in memory) or not (a checkpoint's memory map)."""
    out = []
    for a in arrays:
        v = np.ascontiguousarray(a).view()
        v.flags.writeable = False
        out.append(v)
    return tuple(out)


def matvec_many(fmt, x, codes, scales, row0s, n_out, rows=None):
    """x [M', K] float64, codes / scales: sequences of M FP8 or FP4 matrices' codes of one shape [n_out, K or K/2],
    rows: the row of x each matrix takes ([M] ints; None: row i for matrix i, M' = M) -> [M, n_out] float64, in one
    parallel region (on one thread when small). Matrix i's output is product(fmt, x[rows[i]][None], codes[i],
    scales[i], n_out, row0s[i])'s, bit for bit. A row shared by several matrices (a token's w1 and w3 of every
    expert) is prepared once (FP4 lane order and integer form, FP8 exactness check)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    codes, scales = _read_only(codes), _read_only(scales)
    xi = np.arange(len(codes), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    if (x.ndim != 2 or xi.shape != (len(codes),) or len(scales) != len(codes) or len({c.shape for c in codes}) > 1
            or (rows is None and x.shape[0] != len(codes)) or (len(xi) and not 0 <= xi.min() <= xi.max() < x.shape[0])):
        raise ValueError(f"matvec_many: {x.shape} input rows (taken as {xi.tolist()[:8]}) for {len(codes)} matrices "
                         f"of shapes {sorted({c.shape for c in codes})}")
    row0s = np.asarray(row0s, np.int64)
    if len(codes) * x.shape[1] * n_out < PARALLEL_MIN:
        return matvec_many_serial(fmt, x, xi, codes, scales, row0s, n_out)
    return matvec_many_kernel(fmt, x, xi, codes, scales, row0s, n_out)


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


_CHECKED: dict = {}          # (type, id(values), id(scale)) -> (weak references to both, fmt, NaN flag): read-only arrays


def _has_fp8_nan(codes: np.ndarray) -> bool:
    """True if an e4m3fn code is NaN (0x7F / 0xFF); scanned in row chunks (no full-size temporary)."""
    step = max(1, (1 << 24) // max(1, codes.shape[1]))
    return any(bool(np.any((codes[r:r + step] & 0x7F) == 0x7F)) for r in range(0, codes.shape[0], step))


def checked_codes(w: Fp8Matrix | Fp4Matrix):
    """quantized_codes(w) plus a NaN-code flag; the checks (the NaN scan is a full read) run once per read-only matrix.

    Checkpoint weights are read-only memory maps that live as long as the model: their checks are
    done on the first call and remembered (with weak references only, so the cache keeps no matrix
    alive); later calls take views of the same bytes, without a check (a decode step makes about a
    hundred such calls). A writeable matrix can change between calls, so it is checked on every call.
    """
    if not isinstance(w, (Fp8Matrix, Fp4Matrix)):
        quantized_codes(w)                                         # raises the spec's TypeError
    values, wscale = w.values, w.scale
    cacheable = (isinstance(values, np.ndarray) and isinstance(wscale, np.ndarray)
                 and not values.flags.writeable and not wscale.flags.writeable)
    key = (type(w), id(values), id(wscale))
    hit = _CHECKED.get(key) if cacheable else None
    if hit is not None and hit[0]() is values and hit[1]() is wscale:
        return hit[2], values.view(np.uint8), wscale.view(np.uint8), hit[3]   # checked before: 1-byte codes
    fmt, codes, scale = quantized_codes(w)                         # the spec's checks; views, no copies
    nan = fmt == FMT_FP8 and _has_fp8_nan(codes)                  # every e2m1 nibble is a number
    if cacheable:
        try:
            _CHECKED[key] = (weakref.ref(values), weakref.ref(wscale), fmt, nan)
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
    y = product(fmt, _rows(x, k, "quantized_linear"), codes, scale, n, 0, prec=prec, exact_blocks=prec == "mirror")
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


_NO_SCALE = np.zeros((1, 1), np.uint8)         # bf16/fp32 weights have no scale grid (never written)


def fp32_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Kernel of model.linear.fp32_linear: x [..., in] @ w[out, in]ᵀ, w bf16 or float32 (others: the spec)."""
    work_dtype(prec)
    dense = _dense_codes(w, "fp32_linear")
    if dense is None:
        return spec_linear.fp32_linear.spec(x, w, prec)
    fmt, codes = dense
    y = product(fmt, _rows(x, codes.shape[1], "fp32_linear"), codes, _NO_SCALE, codes.shape[0], 0, prec=prec)
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
    if b * s == 1:                                                # decode: every group in one region
        y = matvec_many(fmt, _rows(o[0, 0], k, "grouped_wo_a"), [codes[gi * r:(gi + 1) * r] for gi in range(groups)],
                        [scale] * groups, [gi * r for gi in range(groups)], r)
        u[0, 0] = bf16(_finish(y, (groups,), prec), prec)
        return u
    for gi in range(groups):                                      # official: einsum over groups (M:L538)
        y = product(fmt, _rows(o[:, :, gi], k, "grouped_wo_a"), codes[gi * r:(gi + 1) * r], scale, r, gi * r, prec=prec)
        u[:, :, gi] = bf16(_finish(y, (b, s), prec), prec)
    return u
