"""Numba kernel of the lightning indexer's scoring and top-k (spec: refimpl/model/indexer.py index_topk).

    index_topk(q, keys, weights, start_pos, ratio, index_topk, prec)
        q [b,s,i,j], keys [b,n,j], weights [b,s,i] -> (topk [b,s,width] int64, scores [b,s,n])

For query t = start_pos + si, entries e < (t+1)//ratio are visible:
    I[e] = Σ_h w[h] · ReLU(q[h] · K[e])        mirror: q·K exact -> fp32 -> bf16; the product w·relu
                                               one fp32 op -> bf16; the sum over heads exact -> fp32 -> bf16
and topk = the min(index_topk, visible) best entries, descending, ties to the lower entry
(numerics.top_k; NaN rows, which the spec orders NaN-first, are left to numerics.top_k).

Work split: tasks (query, tile of 256 entries) in a prange for the scores, then one task per query
for the top-k; each score is computed in a fixed order (dot over j ascending, sum over heads
ascending) whatever the split, so results do not depend on the thread count or the call's length.
float64 / float32: the same loops in float64 (float32 rounds the scores once to fp32 at the end).
"""
from __future__ import annotations

import numba
import numpy as np

from refimpl.kernels.rounding import bf16_f32, rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.numerics import check_precision, top_k, work_dtype

TILE = 256      # entries per scoring task (a [j, TILE] float64 slice of the keys stays in cache)


@numba.njit(cache=True)
def _score_tile(q, kt, w, bi, si, lo, hi, mirror, out):
    """out[bi, si, lo:hi] = scores of entries lo..hi-1 for query (bi, si); kt [b, j, n] float64."""
    n_heads, hd = q.shape[2], q.shape[3]
    nt = hi - lo
    dot = np.empty(nt, np.float64)
    tot = np.zeros(nt, np.float64)
    for hh in range(n_heads):
        for e in range(nt):
            dot[e] = 0.0
        for c in range(hd):
            qc = np.float64(q[bi, si, hh, c])
            row = kt[bi, c, lo:hi]                            # contiguous: the loop vectorizes
            for e in range(nt):
                dot[e] += qc * row[e]                         # q·K over j ascending
        if mirror:
            wh = np.float32(w[bi, si, hh])
            for e in range(nt):
                qk = bf16_f32(rounded_once_f32(dot[e]))             # bf16 einsum output (fp32 accumulator)
                if qk <= 0:
                    qk = np.float32(0.0)                      # relu_
                tot[e] += np.float64(bf16_f32(np.float32(qk * wh)))   # * weights (bf16 op)
        else:
            wh64 = np.float64(w[bi, si, hh])
            for e in range(nt):
                v = dot[e]
                if v <= 0:
                    v = 0.0
                tot[e] += v * wh64
    for e in range(nt):
        if mirror:
            out[bi, si, lo + e] = bf16_f32(rounded_once_f32(tot[e]))   # .sum over heads: exact, fp32, bf16
        else:
            out[bi, si, lo + e] = tot[e]


@numba.njit(cache=True, parallel=True)
def _index_topk(q, kt, w, start_pos, ratio, index_topk, mirror, scores, topk):
    b, s = q.shape[0], q.shape[1]
    n = kt.shape[2]
    n_tiles = (n + TILE - 1) // TILE
    for task in numba.prange(b * s * n_tiles):
        query, tile = task // n_tiles, task % n_tiles
        bi, si = query // s, query % s
        visible = (start_pos + si + 1) // ratio
        lo = tile * TILE
        hi = min(lo + TILE, visible)
        if lo < hi:
            _score_tile(q, kt, w, bi, si, lo, hi, mirror, scores)
    for query in numba.prange(b * s):
        bi, si = query // s, query % s
        visible = (start_pos + si + 1) // ratio
        if visible == 0:
            continue
        neg = np.empty(visible, np.float64)
        for e in range(visible):
            neg[e] = -np.float64(scores[bi, si, e])
        order = np.argsort(neg, kind="mergesort")             # stable: equal scores keep entry order
        for r in range(min(index_topk, visible)):
            topk[bi, si, r] = order[r]


def index_topk(q, keys, weights, start_pos, ratio, index_topk, prec):
    """Kernel of model.indexer.index_topk (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    q, keys, weights = np.asarray(q), np.asarray(keys), np.asarray(weights)
    if q.ndim != 4 or keys.ndim != 3 or weights.ndim != 3:
        raise ValueError(f"index_topk: expected q [b,s,i,j], keys [b,n,j], weights [b,s,i]; got "
                         f"{q.shape}, {keys.shape}, {weights.shape}")
    b, s, n_heads, hd = q.shape
    if keys.shape[0] != b or keys.shape[2] != hd or weights.shape != (b, s, n_heads):
        raise ValueError(f"index_topk: shapes do not agree: q {q.shape}, keys {keys.shape}, weights {weights.shape}")
    n = keys.shape[1]
    if (start_pos + s) // ratio > n:
        raise ValueError(f"index_topk: queries up to position {start_pos + s - 1} see "
                         f"{(start_pos + s) // ratio} entries, only {n} keys given")
    q = np.require(q if q.dtype in (np.float32, np.float64) else q.astype(dt), None, ["C", "W"])
    weights = np.require(weights if weights.dtype in (np.float32, np.float64) else weights.astype(dt), None, ["C", "W"])
    kt = np.ascontiguousarray(np.swapaxes(keys, 1, 2), dtype=np.float64)   # [b, j, n] exact upcast
    width = min(index_topk, (start_pos + s) // ratio)
    topk = np.full((b, s, width), -1, np.int64)
    scores = np.full((b, s, n), -np.inf, dt)
    if b * s:
        with serial_below(b * s * n_heads * hd * n):
            _index_topk(q, kt, weights, int(start_pos), int(ratio), int(index_topk), prec == "mirror", scores, topk)
    nan_rows = np.argwhere(np.isnan(scores).any(axis=-1))
    for bi, si in nan_rows:                       # NaN orders as the largest (torch.topk): the spec's rule
        visible = (start_pos + si + 1) // ratio
        topk[bi, si, :min(index_topk, visible)] = top_k(scores[bi, si, :visible], min(index_topk, visible))
    return topk, scores
