"""The products of the precision map (docs/architecture.md §3-4), one function per kind.

    quantized_linear  y = bf16( act_fp8(x) @ dequant(W)ᵀ )   FP8 e4m3 weight, E8M0 128x128 scales (M:L116-118),
                                                             or packed FP4 e2m1, E8M0 1x32 scales (M:L113-115)
    bf16_linear       y = bf16( x @ Wᵀ )                     bf16 weight, no activation quantization (M:L120)
    fp32_linear       y = fp32( x @ Wᵀ )                     fp32 weight (exact upcast of bf16)     (M:L120)
    product           a @ b with the official fp32 accumulator (attention and indexer scores, P·V)

Weights are `[out, in]` and used as `x @ w.T`, as in the official `F.linear`.

Row-count independence. On a CPU, a BLAS product's result for one row can change in the last bit
with the number of rows in the call, and `mirror` mode amplifies such flips through the FP8
re-quantization of the next layer. An oracle must give a position the same output whatever the
number of rows in the call, so in `float64` and `mirror` mode every product is taken
row by row (one matrix-vector product per row, always the same BLAS call for the same shapes), in
float64, and the result is rounded once to the official accumulator precision (fp32), then to the
output dtype. In `float32` mode one matrix product is used (faster; rows may then differ in the
last bit with the row count, which the float32 tolerance profile allows).

Block sums (mirror's FP8/FP4 products, `block_sums`). There both operands are e4m3 / e2m1 values
times powers of two: an FP8 activation (e4m3, a multiple of 2^-9 below 2^9, times its 1x128 block
scale) times an FP8 weight (the same, times its 128x128 block scale) is a multiple of 2^-18 below
2^18 times the two scales, so the sum of the 128 products of one column block is below 2^25 times
them: at most 43 significant bits, exact in float64 whatever the order of the additions, with or
without fused multiply-adds. An FP4 weight (e2m1: a multiple of 0.5, at most 6) has one scale per
32 columns: a 32-column sum is exact (27 bits), and a 128-column sum too while the block's four
scales span at most 24 binades (29 bits + the span <= 53). So mirror defines the product as the
official kernel structures it (per-block partial sums, scaled, accumulated: fp8_gemm K:L203-273,
fp4_gemm K:L441-536): each 128-column block's sum (an FP4 block: its four 32-column sums added
in ascending order), the blocks added in ascending order in float64, the result rounded once to
fp32 (docs/architecture.md §4). Every block sum is
exact, so any BLAS call computes it with the same bits for any number of rows: a matrix product
per block is row-count independent, and the kernels (refimpl/kernels/linear.py) reproduce these
bits on any number of rows and threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.numerics import (FP4_BLOCK, FP8_BLOCK, MIRROR, act_fp8, bf16, dequant_fp4_weight, dequant_fp8_weight,
                              rounded_once, work_dtype)
from refimpl.ops import swappable


@dataclass(frozen=True)
class Fp8Matrix:
    """FP8 e4m3 weight with one E8M0 scale per 128x128 block (docs/architecture.md §16)."""
    values: np.ndarray   # [out, in]                      float8_e4m3fn   <name>.weight
    scale: np.ndarray    # [ceil(out/128), ceil(in/128)]  float8_e8m0fnu  <name>.scale

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def dequantize(self) -> np.ndarray:
        """Exact float32 weight: e4m3 value times its power-of-two block scale."""
        return dequant_fp8_weight(self.values, self.scale)


@dataclass(frozen=True)
class Fp4Matrix:
    """Packed FP4 e2m1 weight (two per byte, low nibble first) with one E8M0 scale per 1x32 block."""
    values: np.ndarray   # [out, in/2]   int8            <name>.weight
    scale: np.ndarray    # [out, in/32]  float8_e8m0fnu  <name>.scale

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1] * 2)

    def dequantize(self) -> np.ndarray:
        """Exact float32 weight: e2m1 value times its power-of-two block scale."""
        return dequant_fp4_weight(self.values, self.scale)


def dense(w: np.ndarray, prec: str) -> np.ndarray:
    """A bf16/fp32 checkpoint matrix as the working dtype (exact upcast)."""
    return np.asarray(w).astype(work_dtype(prec))    # bf16 -> f32/f64 is exact


def product(a: np.ndarray, b: np.ndarray, prec: str) -> np.ndarray:
    """a @ b with the official fp32 accumulator: exact and rounded once to fp32 in mirror (numerics.rounded_once),
    exact in float64 mode, one float32 product in float32 mode."""
    inside = np.float32 if prec == "float32" else np.float64
    return rounded_once(np.matmul, a.astype(inside), b.astype(inside), prec=prec)


@swappable
def matmul(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """x [..., in] @ w[out, in]ᵀ -> [..., out]: `product`, taken row by row outside float32 mode."""
    if prec == "float32":
        return product(x, w.T, prec)
    return rounded_once(lambda rows: _row_by_row(rows, w), x, prec=prec)   # w converted a slice at a time


def _row_by_row(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [..., in] @ w[out, in]ᵀ in float64, one matrix-vector product per row: independent of the row count."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)              # [b*s, in]
    out = np.empty((rows.shape[0], w.shape[0]), dtype=np.float64)    # [b*s, out]
    step = max(1, (1 << 23) // w.shape[1])       # float64 copies of at most 64 MB of the weight at a time
    for lo in range(0, w.shape[0], step):        # the split depends on the weight's shape only
        w64 = w[lo:lo + step].astype(np.float64)                      # [step, in]
        for r in range(rows.shape[0]):
            out[r, lo:lo + step] = w64 @ rows[r]
    return out.reshape(*x.shape[:-1], w.shape[0])


@swappable
def fp32_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Official fp32 `F.linear` (compressor wkv/wgate, gate, hc_fn, head): fp32 output."""
    return matmul(x, dense(w, prec), prec)


@swappable
def bf16_linear(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Official bf16 `F.linear` (indexer weights_proj, wo_a einsum): fp32 accumulation, bf16 output."""
    return bf16(matmul(x, dense(w, prec), prec), prec)


@swappable
def quantized_linear(x: np.ndarray, w: Fp8Matrix | Fp4Matrix, prec: str) -> np.ndarray:
    """Official `linear` for FP8/FP4 weights (M:L108-120): FP8 activation quant (mirror), fp32 accumulate, bf16 out."""
    x = act_fp8(x, prec)                                               # official: act_quant(x, 128, ue8m0)
    y = quantized_matmul(x, w, prec)                                   # [..., out]
    return bf16(y, prec)                                               # official: fp32 accumulator -> bf16


def quantized_matmul(x: np.ndarray, w: Fp8Matrix | Fp4Matrix, prec: str) -> np.ndarray:
    """x [..., in] (already act_fp8-quantized) @ dequant(W)ᵀ with the official fp32 accumulator: in mirror the
    block sums (module docstring), rounded once to fp32; otherwise `matmul`."""
    if prec != MIRROR:
        return matmul(x, w.dequantize(), prec)
    sub = FP4_BLOCK if isinstance(w, Fp4Matrix) else FP8_BLOCK         # columns per scale of a weight row
    wd = w.dequantize()                                                # [out, in] float32, exact
    return rounded_once(lambda rows, w64: block_sums(rows, w64, sub=sub), x, wd, prec=prec)


def block_sums(x: np.ndarray, w: np.ndarray, *, sub: int) -> np.ndarray:
    """x [..., in] @ w[out, in]ᵀ (float64) as the sum over 128-column blocks in ascending order of each block's
    sum; a block's sum is its `sub`-column sums (sub = 128: one; sub = 32: four) added in ascending order.

    With mirror's operands every block sum is exact (module docstring), so each matrix product below
    gives the same bits for a row whatever the other rows.
    """
    rows = x.reshape(-1, x.shape[-1])                                  # [b*s, in]
    k = rows.shape[1]
    if k % FP8_BLOCK or FP8_BLOCK % sub:
        raise ValueError(f"block_sums: {k} input columns are not whole blocks of {FP8_BLOCK}")
    y = np.zeros((rows.shape[0], w.shape[0]))                          # [b*s, out]
    for k0 in range(0, k, FP8_BLOCK):                                  # official: per-block partial sums, accumulated
        block = rows[:, k0:k0 + sub] @ w[:, k0:k0 + sub].T             # [b*s, out] exact
        for j in range(k0 + sub, k0 + FP8_BLOCK, sub):                 # an FP4 block's further 32-column sums
            block += rows[:, j:j + sub] @ w[:, j:j + sub].T
        y += block
    return y.reshape(*x.shape[:-1], w.shape[0])
