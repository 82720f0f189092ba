"""Lightning indexer: chooses which compressed entries a CSA query attends (docs/architecture.md §9).

    qI      = wq_b(qr) as [s, i, j];  RoPE on the last p dims;  FP4-QDQ(Hadamard(qI))
    K_e     = entries of the indexer's own compressor (m = 4, d = j, rotate = True)
    w       = weights_proj(x) · j^-0.5 · i^-0.5                                    [s, i]
    I[t, e] = Σ_h w[t, h] · ReLU(qI[t, h] · K_e)           for e < (t+1)//4 (causal), else -inf
    topk    = the k = min(index_topk, visible) best e, descending score

Top-k ties: a stable rule, the lower entry index wins (numerics.top_k); the official torch.topk
leaves ties unspecified (docs/architecture.md §19.24). The returned ids are entry numbers (0-based), -1 padded;
attention turns them into rows of its KV tensor. The scores only choose entries: attention reads
the MAIN compressor's entries with the same ids.
Official: model.py Indexer (M:L380-433).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.model.linear import Fp8Matrix, bf16_linear, product, quantized_linear
from refimpl.numerics import FP4_BLOCK, bf16, hadamard, qdq_fp4, reduce_sum, top_k, work_dtype
from refimpl.model.rope import RopeTable, apply_rope
from refimpl.sites import record, replayed
from refimpl.ops import swappable


@dataclass(frozen=True)
class IndexerWeights:
    """Indexer of one CSA layer (attn.indexer.*)."""
    wq_b: Fp8Matrix              # [i*j, q]  FP8       attn.indexer.wq_b.weight / .scale
    weights_proj: np.ndarray     # [i, c]    bf16      attn.indexer.weights_proj.weight
    compressor: CompressorWeights  # m = 4, d = j      attn.indexer.compressor.*


@dataclass(frozen=True)
class IndexerState:
    """Index keys made so far and the indexer compressor's pending rows."""
    keys: np.ndarray             # [b, n_entries, j]  bf16 values (indexer kv_cache)
    compressor: CompressorState


@swappable
def index_scores(q: np.ndarray, keys: np.ndarray, weights: np.ndarray, prec: str) -> np.ndarray:
    """I[e] = Σ_h w[h]·ReLU(q[h]·K[e]) for one query. q [i, j], keys [n, j], weights [i] -> [n]."""
    qk = bf16(product(q, keys.T, prec), prec)                         # [i, n] official: bf16 einsum output
    prod = bf16(np.maximum(qk, 0) * weights[:, None], prec)          # relu_(), * weights (bf16)
    return bf16(reduce_sum(prod, 0, prec), prec)                      # .sum(dim=2): exact, fp32, bf16 out


@swappable
def index_topk(q: np.ndarray, keys: np.ndarray, weights: np.ndarray, start_pos: int, ratio: int, index_topk: int,
               prec: str):
    """Scores and top-k entries of every query of a call (query t = start_pos + si sees entries e < (t+1)//ratio).

    q [b,s,i,j], keys [b,n,j], weights [b,s,i] -> (topk [b,s,min(index_topk, (start_pos+s)//ratio)] int64,
    descending score, ties to the lower entry, -1 padded; scores [b,s,n], -inf where not visible).
    """
    dt = work_dtype(prec)
    b, s = q.shape[:2]
    width = min(index_topk, (start_pos + s) // ratio)                   # official: topk(min(topk, end_pos//m))
    topk = np.full((b, s, width), -1, dtype=np.int64)
    scores = np.full((b, s, keys.shape[1]), -np.inf, dtype=dt)
    for bi in range(b):
        for si in range(s):
            visible = (start_pos + si + 1) // ratio                      # entry e visible iff m(e+1) <= t+1
            if visible == 0:
                continue
            sc = index_scores(q[bi, si], keys[bi, :visible], weights[bi, si], prec)   # [visible]
            scores[bi, si, :visible] = sc
            topk[bi, si, :min(index_topk, visible)] = top_k(sc, min(index_topk, visible))
    return topk, scores


def indexer(x: np.ndarray, qr: np.ndarray, start_pos: int, state: IndexerState, w: IndexerWeights,
            table: RopeTable, layer: Layer, ctx):
    """Select compressed entries per query. x [b,s,c], qr [b,s,q] -> (topk [b,s,k] int64 -1 padded, state)."""
    cfg, prec, dt = ctx.cfg, ctx.prec, ctx.dtype
    b, s, _ = x.shape
    n_heads, hd, m = cfg.index_n_heads, cfg.index_head_dim, layer.compress_ratio
    q = quantized_linear(qr, w.wq_b, prec).reshape(b, s, n_heads, hd)   # [b, s, i, j]
    q = apply_rope(q, table, prec)
    q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=FP4_BLOCK)   # official: rotate_activation; fp4 sim
    new_keys, cstate = compress(x, start_pos, state.compressor, w.compressor, layer, ctx, head_dim=hd, rotate=True)
    keys = np.concatenate([state.keys, new_keys.astype(state.keys.dtype)], axis=1)  # [b, (start_pos+s)//m, j]
    weights = bf16_linear(x, w.weights_proj, prec)                      # [b, s, i]
    weights = bf16(weights * dt(hd ** -0.5 * n_heads ** -0.5), prec)    # official: * (softmax_scale * i^-0.5)

    topk, scores = index_topk(q, keys.astype(dt), weights, start_pos, m, cfg.index_topk, prec)
    t = start_pos + np.arange(s)                                        # query positions
    hidden = np.arange(keys.shape[1])[None, :] >= ((t + 1) // m)[:, None]   # [s, n] not visible: -inf
    record(ctx, f"layers.{layer.id}.attn.indexer.scores", scores, hidden=hidden)
    topk = replayed(ctx, f"layers.{layer.id}.attn.indexer.topk", topk, start_pos)
    record(ctx, f"layers.{layer.id}.attn.indexer.topk", topk.astype(np.int32))
    return topk, IndexerState(keys=keys, compressor=cstate)
