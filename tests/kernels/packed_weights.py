"""Random packed weights and the mirror boundary check shared by the kernel tests."""
import math

import ml_dtypes
import numpy as np

from refimpl.model.linear import Fp4Matrix, Fp8Matrix


def fp8_matrix(rng, n: int, k: int, *, scale_lo: int = 118, scale_hi: int = 124) -> Fp8Matrix:
    """Random e4m3 codes (every finite code, subnormals included; no NaN code) and E8M0 block scales."""
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01                         # 0x7F/0xFF (NaN) -> 0x7E/0xFE
    scale = rng.integers(scale_lo, scale_hi, (-(-n // 128), -(-k // 128)), dtype=np.uint8)
    return Fp8Matrix(codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu))


def fp4_matrix(rng, n: int, k: int, *, scale_lo: int = 118, scale_hi: int = 130) -> Fp4Matrix:
    """Random packed e2m1 bytes [n, k/2] (int8, as stored) and E8M0 1x32 scales."""
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scale = rng.integers(scale_lo, scale_hi, (n, -(-k // 32)), dtype=np.uint8)
    return Fp4Matrix(codes.view(np.int8), scale.view(ml_dtypes.float8_e8m0fnu))


def on_fp32_boundary(products: np.ndarray) -> bool:
    """True if the exact sum of these float64 products lies within 2^-45 (relative) of an fp32 rounding midpoint.

    A mirror kernel and its spec add the same exact float64 products in different orders; their
    one rounding to fp32 can differ only for such sums.
    """
    exact = math.fsum(products.tolist())
    r = np.float32(exact)
    other = np.nextafter(r, np.float32(np.inf) if exact > r else np.float32(-np.inf))
    mid = (float(r) + float(other)) / 2                            # exact in float64
    return abs(exact - mid) <= 2.0 ** -45 * abs(exact)
