"""Scalar roundings of the precision modes for Numba kernels (refimpl/numerics.py is the spec).

    bf16_f32(x)   fp32 -> bf16 (RNE), returned as fp32: numerics.round_bf16 of one fp32 value
    exp_f32(x)    numerics.exp(x, "mirror") of one fp32 value: float64 exp, rounded once to fp32

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
    return np.float32(math.exp(np.float64(x)))
