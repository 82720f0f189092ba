"""CUDA kernel of the compressor's gated pooling (spec: refimpl/model/compressor.py gated_pool).

The compressor (compress) is the spec's bookkeeping around two kinds of heavy work, and both run
on the device under kernels="cuda": the fp32 projections x @ wkvᵀ and x @ wgateᵀ (fp32_linear ->
matmul, refimpl/cuda/linear.py) and the pooling here, one thread per (entry, channel):

    e[ch] = Σ_t fp32( kv_t[ch] · fp32(softmax_t(score[ch])) )     t over the pool (m or 2m rows)

mirror: the softmax is one op (float64 exp and sum, rounded once to fp32), the products kv·p are
fp32 ops, the sum over the pool is float64, rounded once (numerics.reduce_sum). float64: plain
float64. float32: the mirror arithmetic (the spec rounds every step to fp32; they agree within
float32 error). Official: model.py Compressor (M:L342, L352, L359).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_FLOAT64, mul, rnd
from refimpl.cuda.host import check_mode, launch_1d, to_device, to_host

__all__ = ["gated_pool"]


@cuda.jit
def gated_pool_kernel(kv, score, mode, out):
    """kv, score [B, P, d] -> out [B, d]: per channel, softmax over P weighting kv."""
    item = cuda.grid(1)
    B, P, d = kv.shape
    if item >= B * d:
        return
    bi, ch = item // d, item % d
    fp32 = mode != MODE_FLOAT64
    mx = -np.inf
    for t in range(P):
        if score[bi, t, ch] > mx:
            mx = np.float64(score[bi, t, ch])
    total = 0.0
    for t in range(P):
        total += math.exp(np.float64(score[bi, t, ch]) - mx)               # exact difference in float64
    acc = 0.0
    for t in range(P):
        p = rnd(math.exp(np.float64(score[bi, t, ch]) - mx) / total, fp32)  # softmax: one op, one rounding
        acc += mul(np.float64(kv[bi, t, ch]), p, fp32)                       # fp32 product
    out[bi, ch] = rnd(acc, fp32)                                             # exact sum, rounded once


def gated_pool(kv: np.ndarray, score: np.ndarray, prec: str) -> np.ndarray:
    """Same signature and results as compressor.gated_pool: kv, score [b,n,P,d] -> [b,n,d]."""
    mode, dt = check_mode(prec)
    kv, score = np.asarray(kv), np.asarray(score)
    if kv.ndim != 4 or kv.shape != score.shape:
        raise ValueError(f"gated_pool: kv and score must both be [b, n, P, d], got {kv.shape} and {score.shape}")
    if kv.shape[2] == 0 or np.isneginf(score.max(axis=2, initial=-np.inf)).any():
        raise ValueError("softmax: a slice is entirely -inf (no position to attend to)")
    b, n, P, d = kv.shape
    out = cuda.device_array((b * n, d), dt)
    launch_1d(gated_pool_kernel, b * n * d, to_device(kv.reshape(b * n, P, d).astype(dt, copy=False)),
              to_device(score.reshape(b * n, P, d).astype(dt, copy=False)), mode, out)
    return to_host(out).reshape(b, n, d)


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py)."""
    from numba import types as T
    return [(gated_pool_kernel, [(dt[:, :, :], dt[:, :, :], T.int64, dt[:, :]) for dt in (T.float32, T.float64)])]
