"""Numba kernel of sparse attention with the per-head sink (spec: refimpl/model/attention.py).

    sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale, prec)
        q [b,s,h,d], kv [b,n,d], attn_sink [h], topk_idxs [b,s,k] (-1 padded) -> o [b,s,h,d]

A head's output is computed by one thread in a fixed order, whatever the grouping of queries
and heads into tasks, the thread count or the number of queries in the call, so results are
bit-identical across all of them.

mirror (the official kernel, K:L276-368, as `sparse_attn_query` states it): per block of 64
index entries, in order, -1 entries skipped,
    sc  = fp32(Σ_c q·kv) · fp32(scale)         the dot in float64 (exact for bf16 inputs), rounded once
    m'  = max(m, max sc);  r = exp(m - m');  p = exp(sc - m')      each exp one float64 op rounded once
    den = fp32(den · r) + fp32(Σ p)            the block sum in float64 in NumPy's pairwise order, rounded once
    acc = fp32(acc · r) + fp32(Σ bf16(p) · kv)                      P·V in float64, rounded once
then den += exp(sink - m), o = bf16(acc / den). Every other step is a separate fp32 op: Numba
without fastmath emits no fused multiply-add (no `contract` flag on the IR).

The mirror path (`_mirror`) takes its two float64 products from BLAS, as the spec does (its
`product` is one float64 np.matmul): per query, the scores of all its entries and heads are one
dgemm (q [heads, d] @ rows [k, d]ᵀ), and P·V one dgemm per block of 64 (the bf16 probabilities,
exact 0 at -1 entries, @ the block's rows). Both sums are of bf16 x bf16 products, exact in
float64 whatever the order while the magnitudes in one sum spread over less than about 28
binades (the premise the spec's own BLAS product rests on), so the BLAS's order and thread count
change nothing. The rest (the fp32 online softmax, the pairwise block sums, the
rescaled accumulator) is Numba, in the order above. The queries (and, for a decode step, the
heads) are split into tasks on the pool of `refimpl.kernels.blas.run_tasks`: one BLAS thread
each, one Python thread per Numba thread; a small call runs as one task on the calling thread.
Each head of each query is computed the same way in any task, so the split never shows.

float64 / float32: one softmax over the whole index set in float64 (float32 mode rounds the
result once to fp32; the spec's float32 BLAS path differs from it by float32 rounding only).

In float64 / float32 (`_sparse_attention`, one task = a query and a group of its heads, in a
prange), the float64 sums run over the head dim (scores) or the block's entries (P·V) in order,
with the independent outputs (a block's 64 scores, a row's d channels) as the vector lanes: the order
of each sum is fixed, and the loops vectorize without reassociation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from refimpl.kernels import threads
from refimpl.kernels.blas import run_tasks, workers
from refimpl.kernels.rounding import bf16_f32, exp_f32, pairwise_sum, rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.numerics import SPARSE_ATTN_BLOCK, check_precision, work_dtype

BLOCK = SPARSE_ATTN_BLOCK     # official: block = 64 (K:L290)


@numba.njit(cache=True)
def _gather_block(kv, bi, idx_row, lo, hi, kvb, kvT, jbuf):
    """Valid entries of idx_row[lo:hi] -> count; their rows in float64 as kvb[:count] and transposed
    as kvT[:, :count] (each product loop then runs along contiguous memory)."""
    nb = 0
    for e in range(lo, hi):
        j = idx_row[e]
        if j >= 0:
            jbuf[nb] = j
            nb += 1
    d = kvT.shape[0]
    for jj in range(nb):
        j = jbuf[jj]
        for c in range(d):
            kvb[jj, c] = kv[bi, j, c]
    for c in range(d):
        for jj in range(nb):
            kvT[c, jj] = kvb[jj, c]
    return nb


@numba.njit(cache=True)
def _scores(q, bi, si, hh, kvT, nb, s64):
    """s64[:nb] = Σ_c q[bi,si,hh,c]·kvT[c, jj] in float64, c ascending (exact for bf16 values)."""
    for jj in range(nb):
        s64[jj] = 0.0
    for c in range(kvT.shape[0]):
        qc = np.float64(q[bi, si, hh, c])
        row = kvT[c]
        for jj in range(nb):
            s64[jj] += qc * row[jj]


@numba.njit(cache=True)
def _exact_task(q, kv, sink, idx, scale, bi, si, h0, h1, out):
    """Heads h0..h1-1 of query (bi, si): one softmax over all valid entries, in float64 -> out."""
    d = q.shape[3]
    k = idx.shape[2]
    nh = h1 - h0
    idx_row = idx[bi, si]
    kvT = np.empty((d, BLOCK), np.float64)
    kvb = np.empty((BLOCK, d), np.float64)
    jbuf = np.empty(BLOCK, np.int64)
    s64 = np.empty(BLOCK, np.float64)
    sc = np.empty((nh, k), np.float64)                         # scores of the valid entries, in order
    mx = np.full(nh, -np.inf)
    n_valid = 0
    for lo in range(0, k, BLOCK):
        nb = _gather_block(kv, bi, idx_row, lo, min(lo + BLOCK, k), kvb, kvT, jbuf)
        for t in range(nh):
            _scores(q, bi, si, h0 + t, kvT, nb, s64)
            for jj in range(nb):
                v = s64[jj] * scale
                sc[t, n_valid + jj] = v
                if v > mx[t]:
                    mx[t] = v                                  # the sink is not in the max
        n_valid += nb
    acc = np.zeros((nh, d), np.float64)
    den = np.zeros(nh, np.float64)
    for t in range(nh):
        for e in range(n_valid):
            p = math.exp(sc[t, e] - mx[t])
            sc[t, e] = p
            den[t] += p
        den[t] += math.exp(np.float64(sink[h0 + t]) - mx[t])   # sink: denominator only
    e = 0
    for lo in range(0, k, BLOCK):
        nb = _gather_block(kv, bi, idx_row, lo, min(lo + BLOCK, k), kvb, kvT, jbuf)
        for t in range(nh):
            out_t = acc[t]
            for jj in range(nb):
                pj = sc[t, e + jj]
                row = kvb[jj]
                for c in range(d):
                    out_t[c] += pj * row[c]
        e += nb
    for t in range(nh):
        for c in range(d):
            out[bi, si, h0 + t, c] = acc[t, c] / den[t]


@numba.njit(cache=True, parallel=True)
def _sparse_attention(q, kv, sink, idx, scale, groups, out):
    """float64 / float32, all queries: task = (query, head group); groups divides h."""
    b, s, h = q.shape[0], q.shape[1], q.shape[2]
    hs = h // groups
    for task in numba.prange(b * s * groups):
        query, g = task // groups, task % groups
        bi, si = query // s, query % s
        _exact_task(q, kv, sink, idx, scale, bi, si, g * hs, g * hs + hs, out)


@numba.njit(cache=True, nogil=True)
def _gather_rows(kv, bi, idx_row, rows):
    """rows[e] = kv[bi, idx_row[e]] in float64; a -1 entry (and the padding past the index set) a zero row."""
    k, d = idx_row.shape[0], rows.shape[1]
    for e in range(rows.shape[0]):
        j = idx_row[e] if e < k else -1
        if j >= 0:
            for c in range(d):
                rows[e, c] = kv[bi, j, c]
        else:
            for c in range(d):
                rows[e, c] = 0.0


@numba.njit(cache=True, nogil=True)
def _block_softmax(S, idx_row, scale32, P, R, m, den, blk_n, s64, jbuf):
    """The official online softmax of one query over its blocks of 64 entries, for heads S's rows.

    S [hs, kp]: float64 dots q·kv (kp = k padded to whole blocks). Out: P [hs, kp] = bf16(p) as
    float64 (0 at -1 entries), R [hs, n_blocks] the fp32 rescale r of each block, m the final
    running max, den the fp32 sum of p (rescaled block by block, the sink not yet in it),
    blk_n[bl] = the block's valid entries (0: the block changes nothing)."""
    hs, kp = S.shape
    k = idx_row.shape[0]
    for t in range(hs):
        m[t] = -np.inf
        den[t] = 0.0
        for e in range(kp):
            P[t, e] = 0.0
    for bl in range(kp // BLOCK):
        lo = bl * BLOCK
        nb = 0
        for e in range(lo, min(lo + BLOCK, k)):
            if idx_row[e] >= 0:
                jbuf[nb] = e                                   # the block's valid entries, in order
                nb += 1
        blk_n[bl] = nb
        if nb == 0:
            continue                                           # r = exp(0) = 1, p = 0: nothing changes
        for t in range(hs):
            m_new = m[t]
            for jj in range(nb):
                sc = np.float32(rounded_once_f32(S[t, jbuf[jj]]) * scale32)   # fp32(q·kv) * scale (fp32 op)
                s64[jj] = sc
                if sc > m_new:
                    m_new = sc                                 # reduce_max into the running max
            r = exp_f32(np.float32(m[t] - m_new))              # scores_scale; exp(-inf) = 0 in block 0
            for jj in range(nb):
                p = exp_f32(np.float32(rounded_once_f32(s64[jj]) - m_new))
                s64[jj] = np.float64(p)
                P[t, jbuf[jj]] = np.float64(bf16_f32(p))       # P cast to bf16 for the P·V gemm
            bsum = pairwise_sum(s64, 0, nb)                    # scores_sum: float64 in NumPy's order, rounded once
            den[t] = np.float32(den[t] * r) + rounded_once_f32(bsum)   # sum_exp = sum_exp * scale + scores_sum
            R[t, bl] = r
            m[t] = m_new


@numba.njit(cache=True, nogil=True)
def _block_accumulate(PV, R, blk_n, m, den, sink, h0, out_q, store_bf16):
    """acc = fp32(acc · r) + fp32(P·V) block by block, then o = acc / (den + exp(sink - m)) -> out_q[h0 + t]
    (bf16 values; store_bf16 False: the fp32 acc / sum before the store). PV [n_blocks, hs, d] float64."""
    n_blocks, hs, d = PV.shape
    acc = np.empty(d, np.float32)                              # acc_o of one head
    for t in range(hs):
        for c in range(d):
            acc[c] = 0.0
        for bl in range(n_blocks):
            if blk_n[bl] == 0:
                continue
            r = R[t, bl]
            for c in range(d):
                acc[c] = np.float32(acc[c] * r) + rounded_once_f32(PV[bl, t, c])   # acc_o *= scale; += gemm
        dsum = den[t] + exp_f32(np.float32(sink[h0 + t] - m[t]))   # sum_exp += exp(attn_sink - max)
        for c in range(d):
            o = np.float32(acc[c] / dsum)                      # acc_o /= sum_exp
            out_q[h0 + t, c] = bf16_f32(o) if store_bf16 else o   # bf16 store


def _scratch(kp: int, hs: int, d: int):
    """One task's buffers: rows, S, P, R, PV, m, den, blk_n, s64, jbuf."""
    nblk = kp // BLOCK
    return (np.empty((kp, d)), np.empty((hs, kp)), np.empty((hs, kp)), np.empty((hs, nblk), np.float32),
            np.empty((nblk, hs, d)), np.empty(hs, np.float32), np.empty(hs, np.float32), np.empty(nblk, np.int64),
            np.empty(BLOCK), np.empty(BLOCK, np.int64))


POOL_WORK_FACTOR = 16    # mirror: calls under this many times threads.SMALL_WORK multiply-adds run on one thread


def _mirror(q, kv, sink, idx, scale32, out, store_bf16=True):
    """mirror: every query of q [b,s,h,d] -> out (see the module docstring). sink [h] fp32, idx int64."""
    b, s, h, d = q.shape
    k = idx.shape[2]
    kp = -(-k // BLOCK) * BLOCK
    nblk = kp // BLOCK
    n = b * s
    # read at each call: tests set SMALL_WORK to 0. A decode step over the window alone (Flash: 64 heads x
    # 128 index entries, 2^23 multiply-adds, about 0.6 ms) took twice as long split over the pool as the
    # spec on one thread: it runs on the calling thread below POOL_WORK_FACTOR x SMALL_WORK (a CSA layer's
    # window + compressed entries, 640 and more, stay on the pool)
    small = 2 * n * h * d * k < threads.SMALL_WORK * POOL_WORK_FACTOR
    groups = 1 if small else _head_groups(n, h)
    hs = h // groups
    per = n if small else max(1, -(-n // (4 * workers())))      # queries per task
    spans = [(lo, min(lo + per, n), g * hs) for lo in range(0, n, per) for g in range(groups)]

    def task(span):
        q0, q1, h0 = span
        rows, S, P, R, PV, m, den, blk_n, s64, jbuf = _scratch(kp, hs, d)   # per task: the tasks run at once
        rows3, Pb = rows.reshape(nblk, BLOCK, d), P.reshape(hs, nblk, BLOCK).transpose(1, 0, 2)
        for query in range(q0, q1):
            bi, si = divmod(query, s)
            _gather_rows(kv, bi, idx[bi, si], rows)
            np.matmul(q[bi, si, h0:h0 + hs].astype(np.float64), rows.T, out=S)   # exact dots, any order
            _block_softmax(S, idx[bi, si], scale32, P, R, m, den, blk_n, s64, jbuf)
            np.matmul(Pb, rows3, out=PV)                       # per block: bf16(p) @ kv, exact, any order
            _block_accumulate(PV, R, blk_n, m, den, sink, h0, out[bi, si], store_bf16)
    run_tasks(task, spans)


def _head_groups(n_queries: int, h: int) -> int:
    """Split each query's heads into groups when there are fewer queries than threads (decode).

    Only the work split depends on this: each head is computed the same way in any group.
    """
    threads = numba.get_num_threads()
    groups = 1
    while n_queries * groups < threads and h % (groups * 2) == 0:
        groups *= 2
    return groups


def sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale, prec):
    """Kernel of model.attention.sparse_attention (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    q, kv, sink = np.asarray(q), np.asarray(kv), np.asarray(attn_sink).astype(dt)
    idx = np.asarray(topk_idxs)
    if q.ndim != 4 or kv.ndim != 3 or idx.ndim != 3:
        raise ValueError(f"sparse_attention: expected q [b,s,h,d], kv [b,n,d], topk_idxs [b,s,k]; got "
                         f"{q.shape}, {kv.shape}, {idx.shape}")
    b, s, h, d = q.shape
    if kv.shape[0] != b or kv.shape[2] != d or idx.shape[:2] != (b, s) or sink.shape != (h,):
        raise ValueError(f"sparse_attention: shapes do not agree: q {q.shape}, kv {kv.shape}, "
                         f"attn_sink {sink.shape}, topk_idxs {idx.shape}")
    if q.dtype.kind != "f" or kv.dtype.kind != "f" or idx.dtype.kind not in "iu":
        raise TypeError(f"sparse_attention: q and kv must be float arrays and topk_idxs integers; got "
                        f"{q.dtype}, {kv.dtype}, {idx.dtype}")
    valid = idx >= 0
    if idx.shape[2] and (idx >= kv.shape[1]).any():
        raise IndexError(f"sparse_attention: an index is >= the {kv.shape[1]} KV rows")
    empty = ~valid.any(axis=-1)
    if empty.any():
        bi, si = np.argwhere(empty)[0]
        raise ValueError(f"sparse_attention: query {si} (batch {bi}) has no entry to attend to")
    if prec == "mirror" and (~valid[..., :BLOCK].any(axis=-1)).any():
        raise ValueError("sparse_attention (mirror): the first block of 64 index entries has no "
                         "valid entry; the official kernel returns NaN for such a query")
    # one compiled signature per working dtype: C-contiguous, writeable arrays (a broadcast index set is copied)
    q = np.require(q if q.dtype in (np.float32, np.float64) else q.astype(dt), None, ["C", "W"])
    kv = np.require(kv if kv.dtype in (np.float32, np.float64) else kv.astype(dt), None, ["C", "W"])
    idx = np.require(idx, np.int64, ["C", "W"])
    out = np.empty((b, s, h, d), dt)
    if b * s == 0:
        return out
    scale = float(softmax_scale) if prec == "float64" else float(np.float32(softmax_scale))   # spec: dt(scale)
    if prec == "mirror":
        _mirror(q, kv, sink, idx, np.float32(scale), out)
        return out
    with serial_below(2 * b * s * h * d * idx.shape[2]):
        _sparse_attention(q, kv, sink, idx, scale, _head_groups(b * s, h), out)
    return out
