"""Attention forward with its intermediates, and backward (refimpl/model/attention.py, docs/gradients.md).

The forward calls the spec's functions in the spec's order for a sequence from position 0 (the
state empty), so its values are refimpl's float64 ones; the index sets (window, and compressed
entries: all visible ones in HCA layers, the indexer's top-k in CSA layers) are held fixed.

sparse_attention with the sink, per query and head (sink only in the denominator):
    a_j = exp(σ_j) / (Σ_k exp(σ_k) + exp(sink)),  σ_j = scale · q·kv_j,   o = Σ_j a_j kv_j
    da_j = do·kv_j;   dσ_j = a_j (da_j − do·o);   dsink = −a_sink · (do·o)
    dq = scale · Σ_j dσ_j kv_j;   dkv_j = a_j do + scale · dσ_j q   (summed over heads)
The window rows are this call's kv rows, the compressed rows the main compressor's entries: their
gradients go to the kv path and to the compressor. The indexer only chooses: under the LM loss
its weights and its inputs receive nothing from it.
"""
from __future__ import annotations

import numpy as np

from refimpl.config import Layer
from refimpl.model.attention import (AttentionState, AttentionWeights, compressed_indices, grouped_wo_a,
                                     sparse_attention, window_indices)
from refimpl.model.compressor import compress
from refimpl.model.indexer import indexer
from refimpl.model.linear import quantized_linear
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.model.rope import apply_rope, layer_rope_table
from refimpl.numerics import KV_FP8_BLOCK, qdq_fp8
from refimpl.grad.compressor import compress_backward
from refimpl.grad.linear import linear_backward
from refimpl.grad.norm import head_rms_norm_backward, rms_norm_backward
from refimpl.grad.rope import apply_rope_backward


def sparse_attention_backward(do: np.ndarray, q: np.ndarray, kv: np.ndarray, attn_sink: np.ndarray,
                              topk_idxs: np.ndarray, softmax_scale: float):
    """Backward of sparse_attention (float64). do, q [b,s,h,d], kv [b,n,d], topk_idxs [b,s,k] -1 padded
    -> (dq [b,s,h,d], dkv [b,n,d], dsink [h])."""
    b, s, h, d = q.shape
    dq, dkv, dsink = np.zeros_like(q, dtype=np.float64), np.zeros(kv.shape), np.zeros(h)
    sink = np.asarray(attn_sink, np.float64)
    for bi in range(b):
        for si in range(s):
            idx = topk_idxs[bi, si]
            idx = idx[idx >= 0]
            rows = kv[bi, idx].astype(np.float64)                     # [k, d]
            qi, doi = q[bi, si].astype(np.float64), do[bi, si]        # [h, d]
            scores = qi @ rows.T * softmax_scale                      # [h, k]
            mx = scores.max(axis=-1, keepdims=True)
            p, p_sink = np.exp(scores - mx), np.exp(sink[:, None] - mx)
            den = p.sum(axis=-1, keepdims=True) + p_sink              # the sink: denominator only
            a, a_sink = p / den, p_sink / den                         # [h, k], [h, 1]
            da = doi @ rows.T                                         # [h, k]
            t = np.sum(a * da, axis=-1, keepdims=True)                # [h, 1] = do·o
            dscores = a * (da - t)
            dsink -= (a_sink * t)[:, 0]
            dq[bi, si] = softmax_scale * dscores @ rows
            np.add.at(dkv[bi], idx, a.T @ doi + softmax_scale * dscores.T @ qi)
    return dq, dkv, dsink


def attention_forward(x: np.ndarray, w: AttentionWeights, layer: Layer, ctx, probe):
    """The spec's attention for x [b,s,c] from position 0 (fresh state), its sites through probe -> (out [b,s,c], cache)."""
    cfg, prec, i = ctx.cfg, ctx.prec, layer.id
    b, s, _ = x.shape
    h, d, p, W, m = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.window_size, layer.compress_ratio
    state = AttentionState.empty(cfg, i, b, prec)
    table = layer_rope_table(np.arange(s), cfg, i, prec)
    qa = quantized_linear(x, w.wq_a, prec)                                    # [b, s, q]
    qr = rms_norm(qa, w.q_norm, eps=cfg.norm_eps, prec=prec)
    qb = quantized_linear(qr, w.wq_b, prec).reshape(b, s, h, d)
    q = probe(f"layers.{i}.attn.q", apply_rope(head_rms_norm(qb, eps=cfg.norm_eps, prec=prec), table, prec))
    kva = quantized_linear(x, w.wkv, prec)                                    # [b, s, d]
    kv = apply_rope(rms_norm(kva, w.kv_norm, eps=cfg.norm_eps, prec=prec), table, prec)
    if ctx.revision == "current":                                             # identity in float64
        kv = np.concatenate([qdq_fp8(kv[..., :d - p], prec, block=KV_FP8_BLOCK), kv[..., d - p:]], axis=-1)
    kv = probe(f"layers.{i}.attn.kv", kv)
    win_idx, n_prev = window_indices(0, s, W, ctx.layout)                     # n_prev = 0 from position 0
    topk_idxs, rows, n_entries = np.broadcast_to(win_idx, (b, s, win_idx.shape[1])), kv, 0
    if m:
        entries, _ = compress(x, 0, state.compressor, w.compressor, layer, ctx, head_dim=d, rotate=False)
        entries = probe(f"layers.{i}.attn.compressed_kv", entries)
        if layer.uses_indexer:
            sel, _ = indexer(x, qr, 0, state.indexer, w.indexer, table, layer, ctx)   # [b, s, k] held fixed
        else:
            sel = np.broadcast_to(compressed_indices(0, s, m), (b, s, entries.shape[1]))
        topk_idxs = np.concatenate([topk_idxs, np.where(sel >= 0, sel + s, -1)], axis=-1)
        rows, n_entries = np.concatenate([kv, entries], axis=1), entries.shape[1]
    o = sparse_attention(q, rows, w.attn_sink, topk_idxs, cfg.softmax_scale, prec)     # [b, s, h, d]
    og = apply_rope(o, table, prec, inverse=True).reshape(b, s, cfg.o_groups, -1)   # [b, s, g, h*d/g]
    u = grouped_wo_a(og, w.wo_a, cfg.o_groups, prec).reshape(b, s, -1)       # [b, s, g*r]
    out = probe(f"layers.{i}.attn.out", quantized_linear(u, w.wo_b, prec))
    cache = {"x": x, "qa": qa, "qr": qr, "qb": qb, "q": q, "kva": kva, "rows": rows, "topk_idxs": topk_idxs,
             "og": og, "u": u, "table": table, "n_entries": n_entries}
    return out, cache


def attention_backward(dout: np.ndarray, cache: dict, w: AttentionWeights, layer: Layer, cfg, sites: dict):
    """Backward of attention_forward. dout [b,s,c] -> (dx [b,s,c], parameter gradients by short name).

    sites receives the gradients of the sites attn.q, attn.kv and attn.compressed_kv (names with "grad.").
    """
    i, g = layer.id, cfg.o_groups
    x, table = cache["x"], cache["table"]
    b, s, _ = x.shape
    h, d = cfg.n_heads, cfg.head_dim
    grads = {}
    du, grads["wo_b"] = linear_backward(dout, cache["u"], w.wo_b.dequantize())
    du = du.reshape(b, s, g, -1)                                              # [b, s, g, r]
    wo_a = w.wo_a.dequantize().reshape(g, -1, cache["og"].shape[-1])          # [g, r, h*d/g]
    dog, dwo_a = np.empty(cache["og"].shape), np.empty(wo_a.shape)
    for gi in range(g):
        dog[:, :, gi], dwo_a[gi] = linear_backward(du[:, :, gi], cache["og"][:, :, gi], wo_a[gi])
    grads["wo_a"] = dwo_a.reshape(-1, wo_a.shape[-1])
    do = apply_rope_backward(dog.reshape(b, s, h, d), table, inverse=True)
    dq, drows, grads["attn_sink"] = sparse_attention_backward(do, cache["q"], cache["rows"], w.attn_sink,
                                                              cache["topk_idxs"], cfg.softmax_scale)
    sites[f"grad.layers.{i}.attn.q"] = dq
    dkv = drows[:, :s]
    sites[f"grad.layers.{i}.attn.kv"] = dkv
    # the kv path: RoPE, kv_norm, wkv
    dkva, grads["kv_norm"] = rms_norm_backward(apply_rope_backward(dkv, table), cache["kva"], w.kv_norm,
                                               eps=cfg.norm_eps)
    dx, grads["wkv"] = linear_backward(dkva, x, w.wkv.dequantize())
    # the q path: RoPE, the weightless head norm, wq_b, q_norm, wq_a
    dqb = head_rms_norm_backward(apply_rope_backward(dq, table), cache["qb"], eps=cfg.norm_eps)
    dqr, grads["wq_b"] = linear_backward(dqb.reshape(b, s, -1), cache["qr"], w.wq_b.dequantize())
    dqa, grads["q_norm"] = rms_norm_backward(dqr, cache["qa"], w.q_norm, eps=cfg.norm_eps)
    dx_q, grads["wq_a"] = linear_backward(dqa, x, w.wq_a.dequantize())
    dx = dx + dx_q
    if layer.compress_ratio:
        dentries = drows[:, s:]
        sites[f"grad.layers.{i}.attn.compressed_kv"] = dentries
        dx_c, cgrads = compress_backward(dentries, x, w.compressor, layer, cfg, head_dim=d, rotate=False)
        dx = dx + dx_c
        grads.update({f"compressor.{k}": v for k, v in cgrads.items()})
    return dx, grads
