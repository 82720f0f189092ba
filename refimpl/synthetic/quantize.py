"""Weight quantizers of the synthetic checkpoint writer: float weights to the official FP8 / FP4 bytes.

    FP8 (128x128 blocks)  W[o, i] ≈ e4m3(Wq[o, i]) · 2^(S[o//128, i//128] - 127)
    FP4 (1x32 blocks)     W[o, k] ≈ e2m1(nib(o, k)) · 2^(S[o, k//32] - 127)

Per block, s = the smallest power of two with amax/s <= max (448 for e4m3, 6 for e2m1), computed
exactly, with the amax floors of the activation quantizers, so an all-zero FP8 block gets
s = 2^-22 (E8M0 105) and an all-zero FP4 block s = 2^-126 (E8M0 1); then q = RNE(w / s), exact
division. Loading needs only the inverse, numerics.dequant_fp8_weight / dequant_fp4_weight.
"""
from __future__ import annotations

import numpy as np

from refimpl.numerics import (FP4_AMAX_FLOOR, FP4_BLOCK, FP4_MAX, FP8_AMAX_FLOOR, FP8_BLOCK, FP8_MAX,
                              _as_float, encode_fp4_e2m1, encode_fp8_e4m3, encode_ue8m0, pack_fp4)


def _exact_pow2_exponent(amax: np.ndarray, max_val: float) -> np.ndarray:
    """Smallest integer e with amax <= max_val·2^e (amax > 0), computed exactly in float64."""
    a = amax.astype(np.float64)                                  # exact upcast
    _, e = np.frexp(a / max_val)                                 # estimate: ceil(log2) is e-1 or e
    e = e.astype(np.int64)
    e = np.where(a <= max_val * np.ldexp(1.0, e - 1), e - 1, e)  # products by 2^k are exact
    return np.where(a > max_val * np.ldexp(1.0, e), e + 1, e)    # guards the quotient's rounding


def quant_fp8_weight(w, *, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (e4m3 codes [N, K] uint8, E8M0 [ceil(N/128), ceil(K/128)] uint8); amax floor 1e-4."""
    w = _as_float(w, "quant_fp8_weight")
    if w.ndim != 2:
        raise ValueError(f"quant_fp8_weight: w must be 2-D, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quant_fp8_weight: w has non-finite values")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    wp = np.zeros((nb * block, kb * block), dtype=w.dtype)      # zero-padded partial edge blocks
    wp[:n, :k] = w
    blocks = wp.reshape(nb, block, kb, block)                    # [nb, 128, kb, 128]
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), FP8_AMAX_FLOOR)  # floor as in act_quant
    e = _exact_pow2_exponent(amax, FP8_MAX)                      # smallest s = 2^e with amax/s <= 448
    scale = encode_ue8m0(np.ldexp(1.0, e))                       # ValueError if out of E8M0 range
    s = np.ldexp(np.ones((), w.dtype), e)[:, None, :, None]      # [nb, 1, kb, 1] in w's dtype
    values = encode_fp8_e4m3(blocks / s).reshape(nb * block, kb * block)[:n, :k]  # exact division
    return np.ascontiguousarray(values), scale

def quant_fp4_weight(w) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] -> (packed int8 [N, K/2], E8M0 [N, K/32] uint8); per 1x32 block, amax floor 6·2^-126."""
    w = _as_float(w, "quant_fp4_weight")
    if w.ndim != 2 or w.shape[1] % FP4_BLOCK:
        raise ValueError(f"quant_fp4_weight: need a 2-D w with K % 32 == 0, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quant_fp4_weight: w has non-finite values")
    n, k = w.shape
    blocks = w.reshape(n, k // FP4_BLOCK, FP4_BLOCK)             # [N, K/32, 32]
    amax = np.maximum(np.abs(blocks).max(axis=-1), FP4_AMAX_FLOOR)
    e = _exact_pow2_exponent(amax, FP4_MAX)                      # smallest s = 2^e with amax/s <= 6
    scale = encode_ue8m0(np.ldexp(1.0, e))
    s = np.ldexp(np.ones((), w.dtype), e)[..., None]             # [N, K/32, 1]
    nibbles = encode_fp4_e2m1(blocks / s).reshape(n, k)          # exact division
    return pack_fp4(nibbles), scale
