"""Attention: one shared K=V head over a sliding window plus compressed entries.

The numbers (1)-(6) are the steps of docs/architecture.md §10:

    qr = q_norm(wq_a(x));  q = head_rms_norm(wq_b(qr)) as [s, h, d];  RoPE(q)          (1)
    kv = kv_norm(wkv(x));  RoPE(kv);  FP8-QDQ of the non-rope dims (block 64)          (2)
    index set of query t = window positions max(0, t-W+1) .. t                          (3)
                         + compressed entries: all visible (HCA) or indexer top-k (CSA)  (4)
    o = Σ_j softmax-with-sink(scale · q·kv_j) · kv_j        (5) sink in the denominator only
    o = RoPE⁻¹(o) at the query position;  out = wo_b(wo_a_g(o_g))                        (6)

KV rows given to `sparse_attention` (the official in-call KV of a prefill, generalised to a
prefill from any position): the previous window rows (positions start_pos-W' .. start_pos-1,
taken from the ring), then this call's rows, then every compressed entry made so far. The index
set of a query lists its window part (positions in order, -1 padded to the call's window width),
then its compressed part (ascending for HCA, descending index score for CSA, -1 padded). Which
rows hold a value does not matter; the ORDER of the index set does, in mirror: the official
kernel's online softmax runs over blocks of 64 entries of it (step 5), so the window width
decides which entries share a block. `layout` chooses it: "official" follows each official call
type (prefill from 0: min(s, W); decode: W), "canonical" is always W (docs/architecture.md §15).

State: the window ring (row = position mod W, docs/architecture.md §15) and the compressed entries, plus the
compressor / indexer states. It is passed in and returned; nothing is written in place.
Official: model.py Attention (M:L436-543), get_window_topk_idxs / get_compress_topk_idxs
(M:L254-276), kernel.py sparse_attn (K:L276-368).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.context import check_layout
from refimpl.model import chunks
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.model.indexer import IndexerState, IndexerWeights, indexer
from refimpl.model.linear import Fp8Matrix, bf16_linear, product, quantized_linear
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.numerics import (KV_FP8_BLOCK, MIRROR, SPARSE_ATTN_BLOCK, bf16, exp, qdq_fp8, reduce_sum, storage_dtype,
                              work_dtype)
from refimpl.model.rope import RopeTable, apply_rope, layer_rope_table
from refimpl.sites import record
from refimpl.ops import swappable


@dataclass(frozen=True)
class AttentionWeights:
    """Attention of one layer (layers.{i}.attn.*)."""
    wq_a: Fp8Matrix                  # [q, c]        FP8    attn.wq_a
    q_norm: np.ndarray               # [q]           bf16   attn.q_norm.weight
    wq_b: Fp8Matrix                  # [h*d, q]      FP8    attn.wq_b
    wkv: Fp8Matrix                   # [d, c]        FP8    attn.wkv
    kv_norm: np.ndarray              # [d]           bf16   attn.kv_norm.weight
    wo_a: Fp8Matrix                  # [g*r, h*d/g]  FP8 in the checkpoint, bf16 at run time (convert.py)
    wo_b: Fp8Matrix                  # [c, g*r]      FP8    attn.wo_b
    attn_sink: np.ndarray            # [h]           f32    attn.attn_sink
    compressor: CompressorWeights | None   # ratio != 0    attn.compressor.*
    indexer: IndexerWeights | None         # ratio == 4    attn.indexer.*


@dataclass(frozen=True)
class AttentionState:
    """Decode state of one layer's attention (docs/architecture.md §15)."""
    window: np.ndarray                      # [b, W, d] ring: row = position mod W
    compressed: np.ndarray | None           # [b, n_entries, d] main compressed entries
    # window, compressed entries and index keys are stored in storage_dtype(prec): bfloat16 in
    # mirror (they hold bf16 values, as the official bf16 caches), else the working dtype
    compressor: CompressorState | None
    indexer: IndexerState | None

    def nbytes(self) -> int:
        """Bytes held by this layer's state arrays."""
        arrays = [self.window, self.compressed]
        if self.compressor is not None:
            arrays += [self.compressor.kv, self.compressor.score]
        if self.indexer is not None:
            arrays += [self.indexer.keys, self.indexer.compressor.kv, self.indexer.compressor.score]
        return sum(a.nbytes for a in arrays if a is not None)

    @staticmethod
    def empty(cfg, layer: int, batch: int, prec: str) -> "AttentionState":
        dt = storage_dtype(prec)
        m, d = cfg.compress_ratio(layer), cfg.head_dim
        idx = None
        if cfg.uses_indexer(layer):
            idx = IndexerState(keys=np.zeros((batch, 0, cfg.index_head_dim), dt),
                               compressor=CompressorState.empty(batch, cfg, layer, head_dim=cfg.index_head_dim, prec=prec))
        return AttentionState(
            window=np.zeros((batch, cfg.window_size, d), dt),
            compressed=np.zeros((batch, 0, d), dt) if m else None,
            compressor=CompressorState.empty(batch, cfg, layer, head_dim=d, prec=prec) if m else None,
            indexer=idx)


def window_width(start_pos: int, s: int, window: int, layout: str = "official") -> int:
    """Width of every query's window part (valid positions, then -1) in a call of s tokens from start_pos.

    official: a prefill from position 0 lays out min(s, W) entries (M:L261-265); a decode step
    (start_pos > 0) always W: the ring slots oldest first, -1 padded while t < W-1 (M:L256-260).
    The official code has no multi-token call from start_pos > 0 (its decode takes one token,
    M:L530); refimpl gives such a chunk the decode layout, so it equals decoding its tokens one by one.
    canonical: always W, the official decode layout (and the official prefill's when s >= W), so
    that decode, prefill and every chunking agree bit for bit in mirror (docs/architecture.md §15).
    """
    check_layout(layout)
    return min(s, window) if layout == "official" and start_pos == 0 else window


def window_indices(start_pos: int, s: int, window: int, layout: str = "official") -> tuple[np.ndarray, int]:
    """Window index set of each query as rows of [previous window rows ++ this call's rows].

    -> (idx [s, window_width(...)] int64 -1 padded, n_prev = number of previous rows used).
    Query t = start_pos + i sees positions max(0, t-W+1) .. t, in position order (oldest first).
    """
    n_prev = min(start_pos, window - 1)                 # earlier positions any query here can see
    first = start_pos - n_prev                          # position of row 0
    width = window_width(start_pos, s, window, layout)
    t = start_pos + np.arange(s)[:, None]               # [s, 1] query positions
    pos = np.maximum(t - window + 1, 0) + np.arange(width)[None, :]   # [s, width]
    return np.where(pos > t, -1, pos - first), n_prev


def compressed_indices(start_pos: int, s: int, ratio: int) -> np.ndarray:
    """HCA index set (M:L268-276): query t sees entries 0 .. (t+1)//m - 1. -> [s, (start_pos+s)//m] -1 padded."""
    width = (start_pos + s) // ratio
    t = start_pos + np.arange(s)[:, None]
    j = np.arange(width)[None, :]
    return np.where(j < (t + 1) // ratio, j, -1)


@swappable
def sparse_attention(q: np.ndarray, kv: np.ndarray, attn_sink: np.ndarray, topk_idxs: np.ndarray,
                     softmax_scale: float, prec: str) -> np.ndarray:
    """Attention over gathered rows with a per-head sink. q [b,s,h,d], kv [b,n,d], topk_idxs [b,s,k] -> [b,s,h,d].

    float64 / float32: one softmax over the whole index set (the order of the set does not matter).
    mirror: the official kernel's online softmax over blocks of 64 entries, in the given order
    (`sparse_attn_query`), so the result depends on the index layout, as the official one does.
    """
    dt = work_dtype(prec)
    b, s, h, d = q.shape
    sink = attn_sink.astype(dt)
    o = np.empty((b, s, h, d), dt)
    for bi in range(b):
        for si in range(s):
            idx = topk_idxs[bi, si]
            if not (idx >= 0).any():
                raise ValueError(f"sparse_attention: query {si} (batch {bi}) has no entry to attend to")
            if prec == MIRROR:
                o[bi, si] = bf16(sparse_attn_query(q[bi, si], kv[bi], sink, idx, softmax_scale), prec)   # o: bf16
                continue
            rows = kv[bi, idx[idx >= 0]]                                  # [k, d]  -1 entries skipped
            scores = product(q[bi, si], rows.T, prec) * dt(softmax_scale)   # [h, k]
            mx = scores.max(axis=-1, keepdims=True)                       # [h, 1]  sink not in the max
            p = np.exp(scores - mx)                                       # [h, k]
            denom = p.sum(axis=-1, keepdims=True) + np.exp(sink[:, None] - mx)   # sink: denominator only
            o[bi, si] = product(p, rows, prec) / denom
    return o


def sparse_attn_query(qi: np.ndarray, kv: np.ndarray, sink: np.ndarray, idx: np.ndarray,
                      softmax_scale: float) -> np.ndarray:
    """One query of the official sparse_attn kernel (K:L276-368) in mirror rounding, before the bf16 store.

    qi [h, d] bf16 values, kv [n, d], sink [h], idx [k] (-1 padded) -> fp32 [h, d] = acc / sum.

    Per block of 64 index entries, in order (-1 entries score -inf and add exactly 0):
        sc    = fp32(q · kv_j) · fp32(scale)                     T.gemm into a cleared fp32 tile, *= scale
        m'    = max(m, max_j sc)                                 reduce_max, clear=False (the running max)
        r     = exp(m - m')                                      scores_scale (0 in the first block)
        p     = exp(sc - m')                                     fp32, relative to the RUNNING max
        sum   = fp32(sum · r) + Σ p                              block sum exact, rounded once
        acc   = fp32(acc · r) + fp32(bf16(p) · kv)               bf16 probabilities; P·V exact, rounded once
    then sum += exp(sink - m), o = acc / sum (the caller stores o as bf16). Each exp is one correctly
    rounded fp32 op of an fp32 difference; every other op is an IEEE fp32 op (fp32 arrays), no fused
    multiply-add (docs/architecture.md §10).
    """
    h, d = qi.shape
    m = np.full(h, -np.inf, np.float32)                                  # scores_max
    den = np.zeros(h, np.float32)                                        # sum_exp
    acc = np.zeros((h, d), np.float32)                                   # acc_o
    for lo in range(0, len(idx), SPARSE_ATTN_BLOCK):
        blk = idx[lo:lo + SPARSE_ATTN_BLOCK]
        rows = kv[blk[blk >= 0]]                                         # [nb, d] the block's valid entries
        if len(rows) == 0:
            if lo == 0:   # the kernel computes exp(-inf - (-inf)) = NaN here; refimpl's layouts never do this
                raise ValueError("sparse_attention (mirror): the first block of 64 index entries has no "
                                 "valid entry; the official kernel returns NaN for such a query")
            continue      # the kernel's step changes nothing: r = exp(0) = 1, p = 0
        sc = product(qi, rows.T, MIRROR) * np.float32(softmax_scale)   # [h, nb] fp32
        m_new = np.maximum(m, sc.max(axis=-1))                           # [h]
        r = exp(m - m_new, MIRROR)                                     # [h] scores_scale
        p = exp(sc - m_new[:, None], MIRROR)                           # [h, nb]
        den = den * r + reduce_sum(p, -1, MIRROR)                      # sum_exp = sum_exp * scale + scores_sum
        acc = acc * r[:, None] + product(bf16(p, MIRROR), rows, MIRROR)   # acc_o *= scale; gemm(bf16(p), kv)
        m = m_new
    den = den + exp(sink - m, MIRROR)                                  # sum_exp += exp(attn_sink - max)
    return acc / den[:, None]                                            # acc_o /= sum_exp (fp32)


@swappable
def grouped_wo_a(o: np.ndarray, wo_a: Fp8Matrix, groups: int, prec: str) -> np.ndarray:
    """Step 6's grouped output projection (official einsum over groups, M:L538): o [b, s, g, h*d/g] -> [b, s, g, r]."""
    w = wo_a.dequantize().reshape(groups, -1, o.shape[-1])            # [g, r, h*d/g] exact in bf16 (C:L137-141)
    return np.stack([bf16_linear(o[:, :, gi], w[gi], prec) for gi in range(groups)], axis=2)


def _queries(qr, table, w: AttentionWeights, layer: Layer, ctx) -> np.ndarray:
    """Step 1 for a chunk of queries: qr [b, n, q] -> q [b, n, h, d] (recorded: attn.q)."""
    cfg, prec = ctx.cfg, ctx.prec
    b, n = qr.shape[:2]
    q = quantized_linear(qr, w.wq_b, prec).reshape(b, n, cfg.n_heads, cfg.head_dim)   # [b, n, h, d]
    q = head_rms_norm(q, eps=cfg.norm_eps, prec=prec)                 # weightless, bf16 ops (docs/architecture.md §19.5)
    q = apply_rope(q, table, prec)
    record(ctx, f"layers.{layer.id}.attn.q", q)
    return q


def _attend_out(q, rows, topk_idxs, table, w: AttentionWeights, ctx, out, at: int, s: int):
    """Steps 5 and 6 for a chunk of queries q [b, n, h, d] -> out[:, at:at+n] ([b, s, c], made if None)."""
    cfg, prec = ctx.cfg, ctx.prec
    b, n = q.shape[:2]
    o = sparse_attention(q, rows, w.attn_sink, topk_idxs, cfg.softmax_scale, prec)   # [b, n, h, d]
    o = apply_rope(o, table, prec, inverse=True)                       # by the query position (docs/architecture.md §19.4)
    g = cfg.o_groups
    o = o.reshape(b, n, g, -1)                                         # [b, n, g, h*d/g] head-major groups
    u = grouped_wo_a(o, w.wo_a, g, prec)                               # [b, n, g, r]
    y = quantized_linear(u.reshape(b, n, -1), w.wo_b, prec)            # [b, n, c]
    if out is None:
        out = np.empty((b, s, y.shape[-1]), y.dtype)
    out[:, at:at + n] = y
    return out


def attention(x: np.ndarray, start_pos: int, state: AttentionState, w: AttentionWeights, layer: Layer, ctx):
    """One layer's attention for tokens start_pos .. start_pos+s-1. x [b,s,c] -> ([b,s,c], state).

    ctx.layout ("official" or "canonical") sets the width of the window part of the index sets
    (window_width); only mirror's block-wise softmax sees it.
    """
    cfg, prec, dt, i = ctx.cfg, ctx.prec, ctx.dtype, layer.id
    b, s, _ = x.shape
    h, d, p, W = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.window_size
    m = layer.compress_ratio
    positions = start_pos + np.arange(s)
    table = layer_rope_table(positions, cfg, i, prec)                 # one table for every site (M:L475-482)

    # step 1: the queries, in chunks of positions (chunks.py): the first chunk here, the others below
    qr = rms_norm(quantized_linear(x, w.wq_a, prec), w.q_norm, eps=cfg.norm_eps, prec=prec)   # [b, s, q]
    part, finish = chunks.chunked(ctx)
    spans = chunks.spans(s, 2 * h * d * 8)                             # [rows, h, d] in float64 inside wq_b
    tables = [RopeTable(table.cos[lo:hi], table.sin[lo:hi]) for lo, hi in spans]
    q = _queries(qr[:, :spans[0][1]], tables[0], w, layer, part)

    # step 2: the single K=V head of this call's tokens
    kv = rms_norm(quantized_linear(x, w.wkv, prec), w.kv_norm, eps=cfg.norm_eps, prec=prec)  # [b, s, d]
    kv = apply_rope(kv, table, prec)
    if ctx.revision == "current":   # FP8-simulate non-rope dims (QAT); identity in the initial revision
        kv = np.concatenate([qdq_fp8(kv[..., :d - p], prec, block=KV_FP8_BLOCK), kv[..., d - p:]], axis=-1)
    record(part, f"layers.{i}.attn.kv", kv)       # part: after the first chunk's queries (data-flow order)

    # step 3: window rows = the last W' positions from the ring, then this call's rows
    win_idx, n_prev = window_indices(start_pos, s, W, ctx.layout)          # [s, width]
    prev_rows = state.window[:, (start_pos - n_prev + np.arange(n_prev)) % W].astype(dt)   # [b, n_prev, d]
    rows = np.concatenate([prev_rows, kv], axis=1)                     # [b, n_prev+s, d]
    new_window = state.window.copy()
    keep = positions[-W:]                                              # last W positions of this call
    new_window[:, keep % W] = kv[:, -len(keep):]                       # stored losslessly (bf16 in mirror)

    # step 4: compressed entries and their index sets
    topk_idxs = np.broadcast_to(win_idx, (b, s, win_idx.shape[1]))
    compressed, cstate, istate = state.compressed, state.compressor, state.indexer
    if m:
        entries, cstate = compress(x, start_pos, state.compressor, w.compressor, layer, part, head_dim=d, rotate=False)
        record(part, f"layers.{i}.attn.compressed_kv", entries)
        compressed = np.concatenate([state.compressed, entries.astype(state.compressed.dtype)], axis=1)  # [b, n_entries, d]
        if layer.uses_indexer:
            sel, istate = indexer(x, qr, start_pos, state.indexer, w.indexer, table, layer, part)  # [b, s, k] entry ids
        else:
            sel = np.broadcast_to(compressed_indices(start_pos, s, m), (b, s, compressed.shape[1]))
        offset = rows.shape[1]                                         # entries follow the raw rows
        topk_idxs = np.concatenate([topk_idxs, np.where(sel >= 0, sel + offset, -1)], axis=-1)
        rows = np.concatenate([rows, compressed.astype(dt)], axis=1)   # [b, n_prev+s+n_entries, d]

    # step 5: sparse attention with sink, step 6: de-rotation and grouped output projection; per chunk of
    # queries, each over all the rows and index sets of the call
    out = None
    for k, (lo, hi) in enumerate(spans):
        q = q if k == 0 else _queries(qr[:, lo:hi], tables[k], w, layer, part)
        out = _attend_out(q, rows, topk_idxs[:, lo:hi], tables[k], w, part, out, lo, s)
        del q
    finish()
    record(ctx, f"layers.{i}.attn.out", out)
    return out, AttentionState(window=new_window, compressed=compressed, compressor=cstate, indexer=istate)
