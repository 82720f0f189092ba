"""Numba kernel of the lightning indexer's scoring and top-k (spec: refimpl/model/indexer.py index_topk).

    index_topk(q, keys, weights, start_pos, ratio, index_topk, prec)
        q [b,s,i,j], keys [b,n,j], weights [b,s,i] -> (topk [b,s,width] int64, scores [b,s,n])

For query t = start_pos + si, entries e < (t+1)//ratio are visible:
    I[e] = Σ_h w[h] · ReLU(q[h] · K[e])        mirror: q·K exact -> fp32 -> bf16; the product w·relu
                                               one fp32 op -> bf16; the sum over heads exact -> fp32 -> bf16
and topk = the min(index_topk, visible) best entries, descending, ties to the lower entry
(numerics.top_k; NaN rows, which the spec orders NaN-first, are left to numerics.top_k).

The dots q·K come from BLAS, as in the spec (its `product` is one float64 np.matmul): for a
span of queries and a tile of entries, one dgemm of the span's [queries x heads, j] by the tile's
keys. In mirror they are sums of bf16 x FP4-grid products, exact in float64 whatever the order.
In float64 / float32 mode, where a dot need not be exact, they are Numba float64 sums over j
ascending (`_fixed_dots`), so that no BLAS order (which may depend on the shape of the call)
reaches the scores. The rest is Numba: ReLU,
the weights and the sum over heads ascending (per entry), then the top-k of each query: the k-th
largest score by a partition, the entries above it and the first ones equal to it (ascending),
sorted stably (the full stable sort's first k, without sorting every visible entry).

Work split: scoring tasks (span of queries, tile of entries) and then top-k tasks (span of
queries) on the pool of `refimpl.kernels.blas.run_tasks` (one BLAS thread each); a small call
runs as one task on the calling thread. Each score and each top-k is computed the same way
whatever the split, so results do not depend on the thread count or the call's length.
float64 / float32: the same steps in float64 (float32 rounds the scores once to fp32 at the end).
"""
from __future__ import annotations

import numba
import numpy as np

from refimpl.kernels import threads
from refimpl.kernels.blas import run_tasks
from refimpl.kernels.rounding import bf16_f32, rounded_once_f32
from refimpl.numerics import check_precision, top_k, work_dtype

TILE = 4096     # entries per scoring task: a [span x heads, TILE] float64 block of dots
SPAN = 16       # queries per task


@numba.njit(cache=True, nogil=True)
def _fixed_dots(qq, kt, lo, hi):
    """qq [r, j] · kt[:, lo:hi] ([j, n] float64) -> [r, hi-lo], each dot over j ascending (the entries as lanes)."""
    dots = np.zeros((qq.shape[0], hi - lo), np.float64)
    for r in range(qq.shape[0]):
        out = dots[r]
        for c in range(qq.shape[1]):
            qc = qq[r, c]
            row = kt[c, lo:hi]
            for e in range(hi - lo):
                out[e] += qc * row[e]
    return dots


@numba.njit(cache=True, nogil=True)
def _tile_scores(dots, w, bi, s0, s1, lo, hi, start_pos, ratio, mirror, out):
    """out[bi, si, lo:min(hi, visible)] for the queries s0..s1-1 from their dots [(s1-s0) x heads, hi-lo]."""
    n_heads = w.shape[2]
    tot = np.empty(hi - lo, np.float64)
    for si in range(s0, s1):
        top = min(hi, (start_pos + si + 1) // ratio)            # entry e visible iff m(e+1) <= t+1
        nt = top - lo
        if nt <= 0:
            continue
        for e in range(nt):
            tot[e] = 0.0
        base = (si - s0) * n_heads
        for hh in range(n_heads):                               # sum over heads ascending
            row = dots[base + hh]
            if mirror:
                wh = np.float32(w[bi, si, hh])
                for e in range(nt):
                    qk = bf16_f32(rounded_once_f32(row[e]))    # bf16 einsum output (fp32 accumulator)
                    if qk <= 0:
                        qk = np.float32(0.0)                   # relu_
                    tot[e] += np.float64(bf16_f32(np.float32(qk * wh)))   # * weights (bf16 op)
            else:
                wh64 = np.float64(w[bi, si, hh])
                for e in range(nt):
                    v = row[e]
                    if v <= 0:
                        v = 0.0
                    tot[e] += v * wh64
        for e in range(nt):
            if mirror:
                out[bi, si, lo + e] = bf16_f32(rounded_once_f32(tot[e]))   # .sum over heads: exact, fp32, bf16
            else:
                out[bi, si, lo + e] = tot[e]


@numba.njit(cache=True, nogil=True)
def _topk_rows(scores, bi, s0, s1, start_pos, ratio, index_topk, topk, buf):
    """topk[bi, si] for the queries s0..s1-1: descending score, ties to the lower entry. buf: float64
    scratch of at least the visible entries (the task's own)."""
    for si in range(s0, s1):
        visible = (start_pos + si + 1) // ratio
        if visible == 0:
            continue
        k = min(index_topk, visible)
        neg = buf[:visible]
        has_nan = False
        for e in range(visible):
            neg[e] = -np.float64(scores[bi, si, e])
            if neg[e] != neg[e]:
                has_nan = True
        if k == visible or has_nan:                             # NaN rows: redone by numerics.top_k
            order = np.argsort(neg, kind="mergesort")          # stable: equal scores keep entry order
            for r in range(k):
                topk[bi, si, r] = order[r]
            continue
        thr = np.partition(neg, k - 1)[k - 1]                   # -(the k-th largest score)
        cand = np.empty(k, np.int64)
        c = 0
        for e in range(visible):                                # above the k-th: fewer than k, in entry order
            if neg[e] < thr:
                cand[c] = e
                c += 1
        for e in range(visible):                                # then equal to it, lowest entries first
            if c == k:
                break
            if neg[e] == thr:
                cand[c] = e
                c += 1
        vals = np.empty(k, np.float64)
        for r in range(k):
            vals[r] = neg[cand[r]]
        order = np.argsort(vals, kind="mergesort")             # stable: candidates are in entry order
        for r in range(k):
            topk[bi, si, r] = cand[order[r]]


def _score_and_select(q, keys, weights, start_pos, ratio, index_topk, mirror, scores, topk):
    """scores and topk of every query (see the module docstring): the scoring tasks, then the top-k tasks."""
    b, s, n_heads, hd = q.shape
    n_vis = (start_pos + s) // ratio                             # entries the last query sees
    k64 = np.ascontiguousarray(keys[:, :n_vis], dtype=np.float64)   # [b, n_vis, j] exact upcast
    kt = None if mirror else np.ascontiguousarray(np.swapaxes(k64, 1, 2))   # [b, j, n_vis] for _fixed_dots
    small = s * n_heads * hd * max(n_vis, 1) < threads.SMALL_WORK   # read at each call: tests set it to 0
    span = s if small else SPAN
    tile = max(n_vis, 1) if small else TILE
    score_tasks, topk_tasks = [], []
    for bi in range(b):
        for s0 in range(0, s, span):
            s1 = min(s0 + span, s)
            topk_tasks.append((bi, s0, s1))
            last = (start_pos + s1) // ratio                    # entries the span's last query sees
            score_tasks += [(bi, s0, s1, lo, min(lo + tile, last)) for lo in range(0, last, tile)]

    def score(task):
        bi, s0, s1, lo, hi = task
        qq = q[bi, s0:s1].reshape(-1, hd).astype(np.float64)   # [(s1-s0) x heads, j]
        dots = qq @ k64[bi, lo:hi].T if mirror else _fixed_dots(qq, kt[bi], lo, hi)   # [(s1-s0) x heads, hi-lo]
        _tile_scores(dots, weights, bi, s0, s1, lo, hi, start_pos, ratio, mirror, scores)

    def select(task):
        _topk_rows(scores, *task, start_pos, ratio, index_topk, topk, np.empty(max(n_vis, 1)))   # scratch per task
    run_tasks(score, score_tasks)
    run_tasks(select, topk_tasks)


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
    width = min(index_topk, (start_pos + s) // ratio)
    topk = np.full((b, s, width), -1, np.int64)
    scores = np.full((b, s, n), -np.inf, dt)
    if b * s:
        _score_and_select(q, keys, weights, int(start_pos), int(ratio), int(index_topk), prec == "mirror",
                          scores, topk)
    nan_rows = np.argwhere(np.isnan(scores).any(axis=-1))
    for bi, si in nan_rows:                       # NaN orders as the largest (torch.topk): the spec's rule
        visible = (start_pos + si + 1) // ratio
        topk[bi, si, :min(index_topk, visible)] = top_k(scores[bi, si, :visible], min(index_topk, visible))
    return topk, scores
