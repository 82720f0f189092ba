"""Weight blocks decoded from the checkpoint bytes inside a kernel (shared by linear.py and moe.py).

A product kernel walks a weight row in blocks of BLOCK = 128 input columns: `decode_block`
turns the block's codes into float64 weights (exact: e4m3 / e2m1 / bf16 values times powers of
two), then the kernel adds x[k] · w[k] into BLOCK lane accumulators, lane k mod 128 (see
linear.py for the order). Loops run over plain `range` variables on slices: an index such as
`row[k0 + k]` makes Numba check for negative indices, which stops LLVM from vectorizing.

Formats (refimpl/numerics.py; codes are raw bytes or bits, never ml_dtypes arrays):

    FP8    e4m3fn [N, K] uint8, E8M0 scale [ceil(N/128), ceil(K/128)] per 128x128 block.  The
           bits b & 0x7F placed at bit 20 of a float32 (sign at bit 31) are the e4m3 value times
           2^-120, for normals and subnormals alike; the block scale 2^(S-127) times 2^120 then
           gives the exact float64 weight. 0x7F / 0xFF (e4m3fn NaN) decode as NaN.
    FP4    packed e2m1 [N, K/2] uint8, low nibble first, E8M0 scale [N, ceil(K/32)] per 1x32
           block. The magnitude bits eem placed at bit 22 of a float32 are the e2m1 value times
           2^-126; the scale 2^(S-127) times 2^126 gives the weight.
    BF16   uint16 [N, K] (a bfloat16 matrix's bits): bits << 16 is the float32.
    F32    uint32 [N, K] (a float32 matrix's bits).

E8M0 scale 255 (NaN) is refused before a kernel runs, as the spec's dequantization does.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

BLOCK = 128     # input columns per block: the FP8 scale block (four FP4 blocks)

FMT_FP8, FMT_FP4, FMT_BF16, FMT_F32 = 0, 1, 2, 3


@njit(cache=True)
def decode_block(fmt, codes, scale, n, scale_row, k0, kb, bits, w):
    """Weights of row n, columns k0..k0+kb-1 -> w[:kb] float64 (exact). bits: [BLOCK] uint32 scratch.

    scale_row: the FP8 scale-grid row of this weight row (its absolute row // 128); unused otherwise.
    """
    fl = bits.view(np.float32)
    ub = bits[:kb]
    if fmt == FMT_FP8:
        src = codes[n, k0:k0 + kb]
        for k in range(kb):
            t = np.uint32(src[k])
            v = ((t & np.uint32(0x80)) << np.uint32(24)) | ((t & np.uint32(0x7F)) << np.uint32(20))
            ub[k] = np.uint32(0x7FC00000) if (t & np.uint32(0x7F)) == np.uint32(0x7F) else v
        s = math.ldexp(1.0, np.int64(scale[scale_row, k0 // BLOCK]) - 7)   # 2^(S-127) · 2^120
        f = fl[:kb]
        wb = w[:kb]
        for k in range(kb):
            wb[k] = np.float64(f[k]) * s
    elif fmt == FMT_FP4:
        src = codes[n, k0 // 2:(k0 + kb) // 2]
        lo = bits[:kb // 2]
        hi = bits[kb // 2:kb]
        for i in range(kb // 2):
            t = np.uint32(src[i])
            lo[i] = ((t & np.uint32(0x8)) << np.uint32(28)) | ((t & np.uint32(0x7)) << np.uint32(22))
            hi[i] = ((t & np.uint32(0x80)) << np.uint32(24)) | ((t & np.uint32(0x70)) << np.uint32(18))
        for q in range((kb + 31) // 32):                   # 1x32 blocks, each with its own scale
            s = math.ldexp(1.0, np.int64(scale[n, k0 // 32 + q]) - 1)         # 2^(S-127) · 2^126
            m = min(32, kb - 32 * q)
            f0 = fl[16 * q:16 * q + m // 2]                # elements 32q, 32q+2, ... (low nibbles)
            f1 = fl[kb // 2 + 16 * q:kb // 2 + 16 * q + m // 2]   # 32q+1, 32q+3, ... (high nibbles)
            we = w[32 * q:32 * q + m:2]
            wo = w[32 * q + 1:32 * q + m:2]
            for i in range(m // 2):
                we[i] = np.float64(f0[i]) * s
                wo[i] = np.float64(f1[i]) * s
    elif fmt == FMT_BF16:
        src = codes[n, k0:k0 + kb]
        for k in range(kb):
            ub[k] = np.uint32(src[k]) << np.uint32(16)
        f = fl[:kb]
        wb = w[:kb]
        for k in range(kb):
            wb[k] = f[k]
    else:  # FMT_F32
        src = codes[n, k0:k0 + kb]
        for k in range(kb):
            ub[k] = np.uint32(src[k])
        f = fl[:kb]
        wb = w[:kb]
        for k in range(kb):
            wb[k] = f[k]
