"""Scalar roundings of the precision modes for Numba kernels (refimpl/numerics.py is the spec).

    rounded_once_f32(x)  a float64 value computed exactly (a product, a sum, an elementary function) rounded
                         once to fp32: numerics.rounded_once in mirror, for one value
    bf16_f32(x)          fp32 -> bf16 (RNE), returned as fp32: numerics.round_bf16 of one fp32 value
    exp_f32(x)           numerics.exp(x, "mirror") of one fp32 value: float64 exp, rounded once to fp32
    pairwise_sum         a float64 sum in NumPy's pairwise order (np.sum along a contiguous last axis)

Every njit here is cache=True and without fastmath. Numba types uint32 + uint32 as uint64 and
mixed signed/unsigned arithmetic as float64, so every integer step below is written with
explicit np.uint32 operands and results.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_SIGN_OFF = np.uint32(0x7FFFFFFF)
_EXP_ALL = np.uint32(0x7F800000)
_HALF_LSB = np.uint32(0x7FFF)
_HIGH16 = np.uint32(0xFFFF0000)


@numba.njit(cache=True, inline="always")
def rounded_once_f32(x):
    """A float64 value, computed exactly inside one official operation, rounded once to fp32 (RNE)."""
    return np.float32(x)


@numba.njit(cache=True, inline="always")
def bf16_f32(x):
    """One fp32 value rounded to bf16 (round to nearest, ties to even), as fp32; NaN stays NaN.

    Adding 0x7FFF plus the kept lowest bit and truncating is RNE on the bit pattern; a carry
    into the exponent is the correct rounding up to the next binade (or to ±inf past bf16 max).
    """
    u = np.float32(x).view(np.uint32)
    if (u & _SIGN_OFF) > _EXP_ALL:                      # NaN: unchanged
        return np.float32(x)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    return np.uint32((u + lsb + _HALF_LSB) & _HIGH16).view(np.float32)


@numba.njit(cache=True, inline="always")
def exp_f32(x):
    """exp of an fp32 value as one official op in mirror: float64 exp, rounded once to fp32."""
    return rounded_once_f32(math.exp(np.float64(x)))


_PW_BLOCK = 128    # NumPy's PW_BLOCKSIZE


@numba.njit(cache=True)
def _pairwise_leaf(a, lo, n):
    """NumPy's pairwise_sum for n <= 128: a running sum under 8 values, else 8 accumulators."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - n % 8
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(cache=True)
def pairwise_sum(a, lo, n):
    """Σ a[lo:lo+n] (float64) in exactly NumPy's order for a contiguous last-axis reduction.

    NumPy's pairwise summation (loops_utils.h: pairwise_sum): under 8 values a running sum; up
    to 128 values eight interleaved accumulators combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))
    then the remainder; above 128 the two halves (the first a multiple of 8) summed recursively
    and added. Using its order makes the float64 sum bit-identical to `np.sum(..., axis=-1)`
    (so mirror's one rounding to fp32 agrees even where the sum is not exact), and its eight
    accumulators vectorize without reassociation. The recursion is written as an explicit
    post-order walk: a recursive njit function crashes when Numba loads it from its cache.
    """
    if n <= _PW_BLOCK:
        return _pairwise_leaf(a, lo, n)
    los = np.empty(64, np.int64)          # frames: (start, length, stage); depth <= log2(n / 128) + 1
    lens = np.empty(64, np.int64)
    stage = np.zeros(64, np.int64)
    vals = np.empty(64, np.float64)       # finished halves, in post order
    top, nv = 0, 0
    los[0], lens[0] = lo, n
    while top >= 0:
        start, length = los[top], lens[top]
        if length <= _PW_BLOCK:
            vals[nv] = _pairwise_leaf(a, start, length)
            nv += 1
            top -= 1
            continue
        n2 = length // 2
        n2 -= n2 % 8
        if stage[top] == 0:                                   # first half
            stage[top] = 1
            top += 1
            los[top], lens[top], stage[top] = start, n2, 0
        elif stage[top] == 1:                                 # second half
            stage[top] = 2
            top += 1
            los[top], lens[top], stage[top] = start + n2, length - n2, 0
        else:                                                 # both done: first + second
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            top -= 1
    return vals[0]
