"""CUDA kernels of the matrix products (spec: refimpl/model/linear.py quantized_linear, matmul).

quantized_linear: y = bf16( act_fp8(x) @ dequant(W)ᵀ ) with W an Fp8Matrix (e4m3 bytes, E8M0 scale
per 128x128 block) or an Fp4Matrix (two e2m1 nibbles per byte, low first; E8M0 scale per 1x32
block) - the routed experts' FP4 products and the shared expert's / attention's FP8 products.
The weight stays packed on the device: each thread decodes the bytes of its row as it goes,
through decode tables made by the spec's own decoders (numerics.decode_fp8_e4m3 etc.).

    act_quant_kernel     mirror: per row and 128-block, amax -> power-of-two scale (the official
                         bit tricks) -> RNE to e4m3 -> q·s (numerics.act_fp8); one thread per block
    fp8/fp4_gemm         one thread per output (row r, column o), the spec's block sums
                         (model/linear.py block_sums): each 128-column block's sum in float64 (an
                         FP4 block: its four 1x32 sums, each scaled, added in ascending order), the
                         block sums added in ascending order, then rounded once to fp32 (and bf16)
    dense_gemm           one thread per output: Σ_i x[r,i]·W[o,i] in float64, i ascending, rounded once

Quantized products (mirror): the activations are e4m3 values times a power of two per 1x128 block,
the weights e4m3 / e2m1 values times powers of two, so every FP8 block's sum and every 1x32 sum of
an FP4 block is exact in float64 whatever the order of its additions (fused or not); the kernel
then adds these exact sums as the spec does, in the same order: bit-identical results. Only their
combination rounds, which is why its order is the spec's and not one pass over the row
(a pass over all K columns, or an FP4 row's 1x32 sums added one by one to the running total, can
round to another fp32 value next to a rounding boundary).
Dense products (bf16/fp32 weights): each x·W is exact in float64, so the float64 sum differs from
the spec's (NumPy/BLAS float64, another order) by far less than half an fp32 ulp: the fp32 result
is the same except where the exact sum lies that close to a rounding boundary.
A row's result does not depend on the other rows or on the launch shape.
float64 mode: float64 throughout (within ~1e-15 of the spec). float32 mode: the float64 sum
rounded to fp32, where the spec takes one fp32 BLAS product: they agree within float32 error.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_FLOAT64, MODE_MIRROR, SIMULATOR, bf16_if, div32, pow2_scale, rnd, round_e4m3
from refimpl.cuda.host import cached_device, check_mode, launch, launch_1d, to_device, to_host
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.numerics import (FP4_BLOCK, FP8_AMAX_FLOOR, FP8_BLOCK, FP8_MAX, FP8_MAX_INV, _act_blocks, _as_codes,
                              _check_scale_grid, decode_fp4_e2m1, decode_fp8_e4m3, decode_ue8m0)

__all__ = ["quantized_linear", "matmul"]

GEMM_THREADS = 32 if SIMULATOR else 128  # outputs (columns o) per thread block; grid.y = rows (host.THREADS)
MAX_GRID_Y = 65535                      # the grid's y limit: more rows are looped over


@cuda.jit
def act_quant_kernel(x, out):
    """x [R, K] fp32 -> out [R, K] = e4m3(x / s)·s per 1x128 block (numerics.act_quant_fp8, K:L40-125)."""
    item = cuda.grid(1)
    nblk = x.shape[1] // FP8_BLOCK
    if item >= x.shape[0] * nblk:
        return
    r, lo = item // nblk, (item % nblk) * FP8_BLOCK
    amax = np.float32(FP8_AMAX_FLOOR)                                      # T.max(amax, 1e-4)
    for i in range(lo, lo + FP8_BLOCK):
        a = abs(x[r, i])
        if a > amax:
            amax = a
    s = pow2_scale(amax, np.float32(FP8_MAX_INV))                          # fast_round_scale
    for i in range(lo, lo + FP8_BLOCK):
        v = div32(x[r, i], s)                                              # exact: s = 2^k
        v = min(max(v, np.float32(-FP8_MAX)), np.float32(FP8_MAX))         # clamp
        out[r, i] = np.float64(round_e4m3(v)) * np.float64(s)              # q·s exact


@cuda.jit
def fp8_gemm_kernel(x, codes, scale, e4m3, ue8m0, mode, out_bf16, out):
    """x [R, K] @ (e4m3[codes] · ue8m0[scale[o//128, i//128]])ᵀ -> out [R, N] (official: fp8_gemm K:L203-273)."""
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o >= codes.shape[0]:
        return
    K = codes.shape[1]
    fp32 = mode == MODE_MIRROR
    for r in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):          # rows beyond the grid's 65535
        total = 0.0
        for blk in range(0, K, FP8_BLOCK):                                 # 128-column blocks, ascending
            sc = ue8m0[scale[o // FP8_BLOCK, blk // FP8_BLOCK]]
            part = 0.0                                                     # the block's sum: exact (mirror)
            for i in range(blk, min(blk + FP8_BLOCK, K)):
                part += np.float64(x[r, i]) * e4m3[codes[o, i]]
            total += part * sc                                             # part·sc exact: sc = 2^k
        out[r, o] = bf16_if(rnd(total, fp32), out_bf16 and fp32)


@cuda.jit
def fp4_gemm_kernel(x, packed, scale, e2m1, ue8m0, mode, out_bf16, out):
    """x [R, K] @ (e2m1[nibble(o, i)] · ue8m0[scale[o, i//32]])ᵀ -> out [R, N]; byte i//2, low nibble first
    (official: fp4_gemm K:L441-536)."""
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o >= packed.shape[0]:
        return
    K = packed.shape[1] * 2
    fp32 = mode == MODE_MIRROR
    for r in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):
        total = 0.0
        for blk in range(0, K, FP8_BLOCK):                                 # 128-column blocks, ascending
            block = 0.0                                                    # the block's sum:
            for sub in range(blk, min(blk + FP8_BLOCK, K), FP4_BLOCK):     # its 1x32 sums, ascending
                sc = ue8m0[scale[o, sub // FP4_BLOCK]]
                part = 0.0                                                 # the 1x32 sum: exact (mirror)
                for i in range(sub, min(sub + FP4_BLOCK, K), 2):
                    byte = packed[o, i // 2]
                    part += np.float64(x[r, i]) * e2m1[byte & 15]          # element 2j: bits 0-3
                    part += np.float64(x[r, i + 1]) * e2m1[byte >> 4]      # element 2j+1: bits 4-7
                block += part * sc                                         # part·sc exact: sc = 2^k
            total += block
        out[r, o] = bf16_if(rnd(total, fp32), out_bf16 and fp32)


@cuda.jit
def dense_gemm_kernel(x, w, mode, out):
    """x [R, K] @ w[N, K]ᵀ -> out [R, N], float64 sum rounded once to fp32 in mirror."""
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o >= w.shape[0]:
        return
    for r in range(cuda.blockIdx.y, x.shape[0], cuda.gridDim.y):
        total = 0.0
        for i in range(w.shape[1]):
            total += np.float64(x[r, i]) * np.float64(w[o, i])
        out[r, o] = rnd(total, mode == MODE_MIRROR)


_TABLES = {}


def _table(name: str):
    """Device decode tables from the spec's decoders: e4m3 [256], e2m1 [16], ue8m0 [256] (float64)."""
    if name not in _TABLES:
        with np.errstate(invalid="ignore"):
            host = {"e4m3": lambda: decode_fp8_e4m3(np.arange(256, dtype=np.uint8)),
                    "e2m1": lambda: decode_fp4_e2m1(np.arange(16, dtype=np.uint8)),
                    "ue8m0": lambda: decode_ue8m0(np.arange(256, dtype=np.uint8))}[name]()
        _TABLES[name] = cuda.to_device(host.astype(np.float64))
    return _TABLES[name]


def _rows(x: np.ndarray, k: int, name: str) -> np.ndarray:
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"{name}: x has shape {x.shape}, the weight takes {k} inputs")
    return x.reshape(-1, k)


def _gemm_launch(kernel, n_out: int, n_rows: int, *args) -> None:
    if n_out and n_rows:
        launch(kernel, ((n_out + GEMM_THREADS - 1) // GEMM_THREADS, min(n_rows, MAX_GRID_Y)), GEMM_THREADS, *args)


def quantized_linear(x: np.ndarray, w, prec: str) -> np.ndarray:
    """Same signature and results as linear.quantized_linear: x [..., in], W [out, in] FP8/FP4 -> [..., out]."""
    mode, dt = check_mode(prec)
    if not isinstance(w, (Fp8Matrix, Fp4Matrix)):
        raise TypeError(f"quantized_linear: w must be an Fp8Matrix or Fp4Matrix, got {type(w).__name__}")
    x = np.asarray(x)
    n, k = w.shape
    lead = x.shape[:-1]
    if mode == MODE_MIRROR:
        _act_blocks(x, FP8_BLOCK, "act_quant_fp8")                         # the spec's dtype / shape / finite checks
    rows = _rows(x, k, "quantized_linear")
    kind = "dequant_fp8_weight" if isinstance(w, Fp8Matrix) else "dequant_fp4_weight"
    values = _as_codes(w.values, f"{kind} values")                     # the spec's checks of the weight
    if values.ndim != 2:
        raise ValueError(f"{kind}: values must be 2-D, got shape {values.shape}")
    scale = _as_codes(w.scale, f"{kind} scale")
    if isinstance(w, Fp8Matrix):
        _check_scale_grid(scale, (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), kind)
    else:
        _check_scale_grid(scale, (n, -(-k // FP4_BLOCK)), kind)
    d_x = to_device(rows.astype(dt, copy=False))
    if mode == MODE_MIRROR:
        d_q = cuda.device_array(rows.shape, np.float32)
        launch_1d(act_quant_kernel, rows.shape[0] * (k // FP8_BLOCK), d_x, d_q)
        d_x = d_q
    out = cuda.device_array((rows.shape[0], n), dt)
    d_values, d_scale = cached_device(w.values, np.uint8), cached_device(w.scale, np.uint8)
    if isinstance(w, Fp8Matrix):
        _gemm_launch(fp8_gemm_kernel, n, rows.shape[0], d_x, d_values, d_scale, _table("e4m3"), _table("ue8m0"),
                     mode, True, out)
    else:
        _gemm_launch(fp4_gemm_kernel, n, rows.shape[0], d_x, d_values, d_scale, _table("e2m1"), _table("ue8m0"),
                     mode, True, out)
    return to_host(out).reshape(*lead, n)


def matmul(x: np.ndarray, w: np.ndarray, prec: str) -> np.ndarray:
    """Same signature and results as linear.matmul: x [..., in] @ w[out, in]ᵀ -> [..., out] (fp32 accumulator)."""
    mode, dt = check_mode(prec)
    x, w = np.asarray(x), np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"matmul: w must be 2-D [out, in], got shape {w.shape}")
    rows = _rows(x, w.shape[1], "matmul")
    # the spec takes float64 copies; bf16 / fp32 weights are exact in fp32 (callers pass a fresh
    # `dense(w)` array each time, so nothing here is cached on the device)
    wdt = np.float64 if mode == MODE_FLOAT64 or w.dtype == np.float64 else np.float32
    out = cuda.device_array((rows.shape[0], w.shape[0]), dt)
    _gemm_launch(dense_gemm_kernel, w.shape[0], rows.shape[0], to_device(rows.astype(dt, copy=False)),
                 to_device(w.astype(wdt, copy=False)), mode, out)
    return to_host(out).reshape(*x.shape[:-1], w.shape[0])


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py)."""
    from numba import types as T
    u8, f8 = T.uint8, T.float64
    fp = (T.float32, T.float64)
    return [
        (act_quant_kernel, [(T.float32[:, :], T.float32[:, :])]),
        (fp8_gemm_kernel, [(dt[:, :], u8[:, :], u8[:, :], f8[:], f8[:], T.int64, T.boolean, dt[:, :]) for dt in fp]),
        (fp4_gemm_kernel, [(dt[:, :], u8[:, :], u8[:, :], f8[:], f8[:], T.int64, T.boolean, dt[:, :]) for dt in fp]),
        (dense_gemm_kernel, [(dt[:, :], wt[:, :], T.int64, dt[:, :]) for dt in fp for wt in fp]),
    ]
