"""CUDA kernels of the lightning indexer's scoring and top-k (spec: refimpl/model/indexer.py).

`index_topk` has the spec's signature (the spec's `indexer` runs its other steps: the q projection,
RoPE, Hadamard + FP4 QDQ, the indexer's compressor, weights_proj, replay, the trace sites; each a
swappable operation, so the products run on the device too) and scores and selects for every query
of the call in two launches instead of the spec's loop over queries:

    index_scores_kernel   one thread per (batch, query, entry): I = Σ_h w[h]·ReLU(q[h]·K_e) with the
                          spec's roundings (mirror: bf16(fp32(q·K)), bf16(fp32(relu·w)), the sum
                          over heads float64 rounded once, bf16); -inf for entries not yet visible
    topk_kernel           one thread per (batch, query, entry): its rank = the number of visible
                          entries that beat it (a higher score, or an equal one at a lower index;
                          NaN the largest, as numerics.top_k); rank < k writes the entry's id there

The rank rule is exactly numerics.top_k's order (descending, ties to the lower index), so the
selected sets and their order equal the spec's whenever the scores do. The top-k costs O(n) per
entry (O(s·n²) per call): fine at the lengths a check runs, slow for 1M-token contexts.
`index_scores` (one query, the spec's per-query signature) runs the same scoring kernel.
Modes: mirror as the spec; float64 plain float64; float32 the mirror arithmetic without the bf16
roundings (within float32 error of the spec's fp32 BLAS product).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_FLOAT64, MODE_MIRROR, bf16_if, device_function, mul, rnd
from refimpl.cuda.host import check_mode, launch_1d, to_device, to_host

__all__ = ["index_topk", "index_scores"]


@cuda.jit
def index_scores_kernel(q, keys, weights, start_pos, ratio, mode, out):
    """q [b,s,i,j], keys [b,n,j], weights [b,s,i] -> out [b,s,n]; entry e visible iff e < (start_pos+si+1)//ratio."""
    item = cuda.grid(1)
    b, s, n_heads, hd = q.shape
    n = keys.shape[1]
    if item >= b * s * n:
        return
    bi, si, e = item // (s * n), (item // n) % s, item % n
    if e >= (start_pos + si + 1) // ratio:
        out[bi, si, e] = -np.inf
        return
    fp32, mirror = mode != MODE_FLOAT64, mode == MODE_MIRROR
    total = 0.0
    for h in range(n_heads):
        dot = 0.0
        for jj in range(hd):
            dot += np.float64(q[bi, si, h, jj]) * np.float64(keys[bi, e, jj])
        qk = bf16_if(rnd(dot, fp32), mirror)                              # bf16 einsum output
        if qk < 0.0:
            qk = 0.0                                                       # relu_()
        total += bf16_if(mul(qk, np.float64(weights[bi, si, h]), fp32), mirror)   # * weights (bf16)
    out[bi, si, e] = bf16_if(rnd(total, fp32), mirror)                     # .sum(dim=2): exact, fp32, bf16


@device_function
def _beats(a, ia, b, ib):
    """True if score a at index ia comes before score b at index ib: larger, NaN largest, ties to the lower index."""
    a_nan, b_nan = a != a, b != b
    if a_nan or b_nan:
        if a_nan and b_nan:
            return ia < ib
        return a_nan
    return a > b or (a == b and ia < ib)


@cuda.jit
def topk_kernel(scores, start_pos, ratio, topk, out):
    """scores [b,s,n] -> out [b,s,width] (pre-filled with -1): the k = min(topk, visible) best visible entries, best first."""
    item = cuda.grid(1)
    b, s, n = scores.shape
    if item >= b * s * n:
        return
    bi, si, e = item // (s * n), (item // n) % s, item % n
    visible = min((start_pos + si + 1) // ratio, n)
    if e >= visible:
        return
    mine = scores[bi, si, e]
    rank = 0
    for other in range(visible):
        if other != e and _beats(scores[bi, si, other], other, mine, e):
            rank += 1
    if rank < min(topk, visible):
        out[bi, si, rank] = e


def _scores(q, keys, weights, start_pos: int, ratio: int, mode: int, dt):
    """Device scores [b, s, n] (a device array) of every query of a call."""
    b, s = q.shape[:2]
    out = cuda.device_array((b, s, keys.shape[1]), dt)
    launch_1d(index_scores_kernel, out.size, to_device(q.astype(dt, copy=False)), to_device(keys.astype(dt, copy=False)),
              to_device(weights.astype(dt, copy=False)), start_pos, ratio, mode, out)
    return out


def index_scores(q: np.ndarray, keys: np.ndarray, weights: np.ndarray, prec: str) -> np.ndarray:
    """Same signature and results as indexer.index_scores: q [i, j], keys [n, j], weights [i] -> [n]."""
    mode, dt = check_mode(prec)
    q, keys, weights = np.asarray(q), np.asarray(keys), np.asarray(weights)
    if q.ndim != 2 or keys.ndim != 2 or keys.shape[1] != q.shape[1] or weights.shape != q.shape[:1]:
        raise ValueError(f"index_scores: need q [i, j], keys [n, j], weights [i]; got {q.shape}, {keys.shape}, "
                         f"{weights.shape}")
    n = keys.shape[0]                       # every entry visible: start_pos + 1 = n with ratio 1
    d = _scores(q[None, None], keys[None], weights[None, None], max(n - 1, 0), 1, mode, dt)
    return to_host(d)[0, 0]


def index_topk(q: np.ndarray, keys: np.ndarray, weights: np.ndarray, start_pos: int, ratio: int, index_topk: int,
               prec: str):
    """Same signature and results as indexer.index_topk: q [b,s,i,j], keys [b,n,j], weights [b,s,i] ->
    (topk [b,s,min(index_topk, (start_pos+s)//ratio)] int64 -1 padded, scores [b,s,n] -inf where not visible)."""
    mode, dt = check_mode(prec)
    q, keys, weights = np.asarray(q), np.asarray(keys), np.asarray(weights)
    b, s = q.shape[:2]
    if q.ndim != 4 or keys.ndim != 3 or keys.shape[0] != b or keys.shape[2] != q.shape[3] \
            or weights.shape != q.shape[:3]:
        raise ValueError(f"index_topk: need q [b,s,i,j], keys [b,n,j], weights [b,s,i]; got {q.shape}, "
                         f"{keys.shape}, {weights.shape}")
    width = min(index_topk, (start_pos + s) // ratio)                   # official: topk(min(topk, end_pos//m))
    d_scores = _scores(q, keys, weights, start_pos, ratio, mode, dt)    # [b, s, n] on the device
    d_topk = cuda.to_device(np.full((b, s, width), -1, dtype=np.int64))
    if width:
        launch_1d(topk_kernel, d_scores.size, d_scores, start_pos, ratio, index_topk, d_topk)
    return to_host(d_topk), to_host(d_scores)


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py)."""
    from numba import types as T
    fp = (T.float32, T.float64)
    return [
        (index_scores_kernel, [(dt[:, :, :, :], dt[:, :, :], dt[:, :, :], T.int64, T.int64, T.int64, dt[:, :, :])
                               for dt in fp]),
        (topk_kernel, [(dt[:, :, :], T.int64, T.int64, T.int64, T.int64[:, :, :]) for dt in fp]),
    ]
