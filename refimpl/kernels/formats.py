"""Weight codes decoded inside a kernel, from their bits (shared by linear.py and moe.py).

Formats (refimpl/numerics.py; codes are raw bytes or bits, never ml_dtypes arrays):

    FP8    e4m3fn [N, K] uint8, E8M0 scale [ceil(N/128), ceil(K/128)] per 128x128 block.  The
           bits b & 0x7F placed at bit 20 of a float32 (sign at bit 31) are the e4m3 value times
           2^-120, for normals and subnormals alike (`fp8_raw`); the block scale 2^(S-127) times
           2^120 makes it exact. 0x7F / 0xFF (e4m3fn NaN) are not decoded: linear.py sends a
           matrix holding one to the spec function.
    FP4    packed e2m1 [N, K/2] uint8, low nibble first (element 2i in bits 0-3 of byte i), E8M0
           scale [N, ceil(K/32)] per 1x32 block. The magnitude bits eem placed at bit 22 of a
           float32 (sign at bit 31) are the e2m1 value times 2^-126 (`fp4_pair_raw`; 0.5 is a float32
           subnormal, exact); the scale 2^(S-127) times 2^126 makes it exact.
    BF16   uint16 [N, K] (a bfloat16 matrix's bits): bits << 16 is the float32.
    F32    uint32 [N, K] (a float32 matrix's bits).

All decoding is integer bit work and one reinterpretation (`f32_from_bits`), which LLVM
vectorizes; no table lookups. Every decoded value is exact in float64.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

BLOCK = 128     # input columns per block: the FP8 scale block, four FP4 blocks; also the lane count

FMT_FP8, FMT_FP4, FMT_BF16, FMT_F32 = 0, 1, 2, 3

if numba.config.DISABLE_JIT:                     # plain Python (NUMBA_DISABLE_JIT=1): a NumPy reinterpretation
    def f32_from_bits(bits):
        """The float32 whose bits are `bits` (uint32)."""
        return np.uint32(bits).view(np.float32)

    def f64_from_bits(bits):
        """The float64 whose bits are `bits` (uint64)."""
        return np.uint64(bits).view(np.float64)
else:
    @intrinsic
    def f32_from_bits(typingctx, bits):
        """The float32 whose bits are `bits` (uint32): one LLVM bitcast."""
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def f64_from_bits(typingctx, bits):
        """The float64 whose bits are `bits` (uint64): one LLVM bitcast."""
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.uint64), codegen


@njit(cache=True, inline="always")
def fp8_raw(code):
    """e4m3fn byte -> float32 e4m3 value · 2^-120: sign at bit 31, eeeemmm at bits 20-26.

    The byte sign-extended and shifted left by 20 has the sign at bit 31 and the code's low 7
    bits at 20-26; the mask clears the copies of the sign at bits 27-30 (two integer operations).
    """
    v = (np.int64(np.int8(code)) << 20) & 0x87F00000
    return f32_from_bits(np.uint32(v))


@njit(cache=True, inline="always")
def fp4_pair_raw(byte):
    """Packed e2m1 byte -> (low nibble, high nibble) as float32 e2m1 values · 2^-126.

    Each nibble's sign bit goes to bit 31 and its magnitude eem to bits 22-24 (two shifts, two
    masks, one or per nibble, all on non-negative integers: no sign extension to emulate in
    vector code).
    """
    b = np.uint64(np.uint8(byte))
    lo = ((b & np.uint64(0x08)) << np.uint64(28)) | ((b & np.uint64(0x07)) << np.uint64(22))
    hi = ((b & np.uint64(0x80)) << np.uint64(24)) | ((b & np.uint64(0x70)) << np.uint64(18))
    return f32_from_bits(np.uint32(lo)), f32_from_bits(np.uint32(hi))


@njit(cache=True, inline="always")
def bf16_value(bits):
    """bfloat16 bits (uint16) -> float32."""
    return f32_from_bits(np.uint32(bits) << np.uint32(16))


@njit(cache=True, inline="always")
def fp8_block_scale(byte):
    """E8M0 byte S (0..254) -> 2^(S-127) · 2^120 (float64, from its exponent bits): scales fp8_raw to the exact weight."""
    return f64_from_bits(np.uint64((np.int64(np.uint8(byte)) - 7 + 1023) << 52))


@njit(cache=True, inline="always")
def fp4_block_scale(byte):
    """E8M0 byte S (0..254) -> 2^(S-127) · 2^126 (float64, from its exponent bits): scales fp4_pair_raw to the exact weight."""
    return f64_from_bits(np.uint64((np.int64(np.uint8(byte)) - 1 + 1023) << 52))
