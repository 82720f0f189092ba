"""CUDA kernel of sparse attention with a sink (spec: refimpl/model/attention.py sparse_attention).

One thread block of SPARSE_ATTN_BLOCK = 64 threads per (batch, query, head). The block walks the
query's index set in steps of 64 entries, as the official kernel does (K:L276-368) and as the
spec's mirror path `sparse_attn_query` mirrors it: thread t scores entry lo+t, then every thread
takes the step's max, rescale factor and probability sum from shared memory (all threads compute
the same values in the same order), and thread t updates output dims t, t+64, ... of the fp32
accumulator held in shared memory.

    sc    = fp32(q · kv_j) · fp32(scale)        float64 dot (exact: bf16 x bf16 products), rounded once
    m'    = max(m, max_j sc);  r = exp(m - m');  p_j = exp(sc_j - m')       exp: float64, rounded once
    sum   = fp32(sum · r) + fp32(Σ_j p_j)       the step's sum in float64, rounded once
    acc   = fp32(acc · r) + fp32(Σ_j bf16(p_j) · kv_j)
    o     = bf16(acc / (sum + exp(sink - m)))

Modes: mirror as above (fp32 ops through device.mul32 etc., never fused). float64: the same
online softmax in float64 without any rounding, which equals the spec's one-pass softmax up to
float64 rounding (~1e-15 relative). float32: the float64 computation, the result rounded to
fp32 (the spec's float32 path rounds every op to fp32: they agree within float32 error).
Every query's result depends only on its own index set: no dependence on the batch, the number of
queries or the launch shape.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_MIRROR, add, bf16_if, div, ex, mul, rnd, sub
from refimpl.cuda.host import check_mode, launch, to_device, to_host
from refimpl.numerics import SPARSE_ATTN_BLOCK

__all__ = ["sparse_attention"]

BLOCK = SPARSE_ATTN_BLOCK               # 64 entries per step = 64 threads per thread block
MAX_HEAD_DIM = 1024                     # the fp32 accumulator of one head lives in shared memory
MAX_GRID_Y = 65535                      # the grid's y limit: a block takes more queries in turn


@cuda.jit
def sparse_attention_kernel(q, kv, sink, idx, scale, mode, out):
    """q [b,s,h,d], kv [b,n,d], sink [h], idx [b,s,k] (-1 padded), scale -> out [b,s,h,d]. Grid (h, s, b), 64 threads."""
    hi, bi = cuda.blockIdx.x, cuda.blockIdx.z
    for si in range(cuda.blockIdx.y, q.shape[1], cuda.gridDim.y):       # queries beyond the grid's 65535
        _attend(q, kv, sink, idx, scale, mode, out, bi, si, hi)


@cuda.jit(device=True)
def _attend(q, kv, sink, idx, scale, mode, out, bi, si, hi):
    """One (batch, query, head) by the 64 threads of the block."""
    t = cuda.threadIdx.x
    d, k = q.shape[3], idx.shape[2]
    mirror = mode == MODE_MIRROR
    fp32 = mirror                       # float32 mode: float64 inside, one rounding at the store
    sc = cuda.shared.array(BLOCK, np.float64)       # this step's scores (-inf: no entry)
    p = cuda.shared.array(BLOCK, np.float64)        # this step's probabilities
    rows = cuda.shared.array(BLOCK, np.int64)       # this step's kv rows (-1: none)
    acc = cuda.shared.array(MAX_HEAD_DIM, np.float64)
    for dd in range(t, d, BLOCK):
        acc[dd] = 0.0
    scale_f = rnd(scale, fp32)                      # fp32(softmax_scale)
    m = -np.inf                                     # scores_max
    den = 0.0                                       # sum_exp
    for lo in range(0, k, BLOCK):
        j = lo + t
        row = idx[bi, si, j] if j < k else -1
        rows[t] = row
        s = -np.inf
        if row >= 0:
            dot = 0.0
            for dd in range(d):
                dot += np.float64(q[bi, si, hi, dd]) * np.float64(kv[bi, row, dd])
            s = mul(rnd(dot, fp32), scale_f, fp32)  # T.gemm into fp32, *= scale
        sc[t] = s
        cuda.syncthreads()
        m_new = m                                   # every thread: the same max, in the same order
        valid = 0
        for jj in range(BLOCK):
            if rows[jj] >= 0:
                valid += 1
                if sc[jj] > m_new:
                    m_new = sc[jj]
        if valid > 0:                               # an empty step changes nothing (r = 1, p = 0)
            p[t] = ex(sub(s, m_new, fp32), fp32) if row >= 0 else 0.0
            cuda.syncthreads()
            r = ex(sub(m, m_new, fp32), fp32)       # scores_scale (0 in the first step)
            total = 0.0
            for jj in range(BLOCK):
                total += p[jj]
            den = add(mul(den, r, fp32), rnd(total, fp32), fp32)
            for dd in range(t, d, BLOCK):
                pv = 0.0
                for jj in range(BLOCK):
                    if rows[jj] >= 0:
                        pv += bf16_if(p[jj], mirror) * np.float64(kv[bi, rows[jj], dd])
                acc[dd] = add(mul(acc[dd], r, fp32), rnd(pv, fp32), fp32)
            m = m_new
        cuda.syncthreads()                          # before the next step overwrites sc, p, rows
    den = add(den, ex(sub(np.float64(sink[hi]), m, fp32), fp32), fp32)   # sum_exp += exp(sink - max)
    for dd in range(t, d, BLOCK):
        out[bi, si, hi, dd] = bf16_if(div(acc[dd], den, fp32), mirror)


def sparse_attention(q: np.ndarray, kv: np.ndarray, attn_sink: np.ndarray, topk_idxs: np.ndarray,
                     softmax_scale: float, prec: str) -> np.ndarray:
    """Same signature and results as attention.sparse_attention. q [b,s,h,d], kv [b,n,d], topk_idxs [b,s,k] -> [b,s,h,d]."""
    mode, dt = check_mode(prec)
    q, kv, idx = np.asarray(q), np.asarray(kv), np.asarray(topk_idxs)
    if q.ndim != 4 or kv.ndim != 3 or idx.ndim != 3 or kv.shape[0] != q.shape[0] or idx.shape[:2] != q.shape[:2] \
            or kv.shape[2] != q.shape[3] or np.shape(attn_sink) != (q.shape[2],):
        raise ValueError(f"sparse_attention: need q [b,s,h,d], kv [b,n,d], attn_sink [h], topk_idxs [b,s,k]; got "
                         f"{q.shape}, {kv.shape}, {np.shape(attn_sink)}, {idx.shape}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"sparse_attention: topk_idxs must be integers, got {idx.dtype}")
    b, s, h, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"sparse_attention (cuda): head dim {d} > {MAX_HEAD_DIM}")
    if ((idx >= kv.shape[1]) | (idx < -1)).any():
        raise IndexError(f"sparse_attention: an index is outside -1 .. {kv.shape[1] - 1}")
    has = (idx >= 0).any(axis=-1)                                           # [b, s]
    if not has.all():
        bi, si = np.argwhere(~has)[0]
        raise ValueError(f"sparse_attention: query {si} (batch {bi}) has no entry to attend to")
    if mode == MODE_MIRROR:
        first = (idx[..., :BLOCK] >= 0).any(axis=-1)
        if not first.all():
            raise ValueError("sparse_attention (mirror): the first block of 64 index entries has no "
                             "valid entry; the official kernel returns NaN for such a query")
    out = cuda.device_array((b, s, h, d), dt)
    if out.size:
        launch(sparse_attention_kernel, (h, min(s, MAX_GRID_Y), b), BLOCK, to_device(q.astype(dt, copy=False)),
               to_device(kv.astype(dt, copy=False)), to_device(np.asarray(attn_sink).astype(dt)),
               to_device(idx.astype(np.int64, copy=False)), float(softmax_scale), mode, out)
    return to_host(out)


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py)."""
    from numba import types as T
    sigs = [(dt[:, :, :, :], dt[:, :, :], dt[:], T.int64[:, :, :], T.float64, T.int64, dt[:, :, :, :])
            for dt in (T.float32, T.float64)]
    return [(sparse_attention_kernel, sigs)]
