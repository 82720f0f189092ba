"""Backward of the compressor (refimpl/model/compressor.py) for a sequence from position 0.

Forward, per channel of entry i (pool P = the block's m tokens, or with overlap the previous
block's m tokens in channels [0:d] and this block's in [d:2d]):
    a_t = softmax_t(score_t),   e = Σ_t a_t · kv_t,   then rms_norm, RoPE at position m·i,
    and (indexer keys) the Hadamard rotation
Backward, with de the gradient of e (after the norm's and RoPE's backward):
    dkv_t = a_t · de,   dscore_t = a_t · de · (kv_t − e)          (the softmax backward, per channel)
The pooled rows go back to the tokens they came from: with overlap, the first m rows of block
i's pool are block i-1's tokens in channels [0:d], so every token of a complete block but the
last receives gradient from two entries; block 0's previous half is padding (score −inf, a = 0).
Tokens after the last complete block (an incomplete group) make no entry: gradient 0. The
Hadamard matrix H/sqrt(n) is symmetric and orthogonal, so its backward is itself. ape is added to
the scores by in-block position: its gradient sums dscore over the tokens at that position.
"""
from __future__ import annotations

import numpy as np

from refimpl.config import Layer
from refimpl.model.compressor import CompressorWeights
from refimpl.model.rope import layer_rope_table
from refimpl.numerics import hadamard
from refimpl.grad.linear import linear_backward
from refimpl.grad.norm import rms_norm_backward
from refimpl.grad.rope import apply_rope_backward


def pools(x: np.ndarray, w: CompressorWeights, layer: Layer, *, head_dim: int):
    """The pooled rows of every complete block. x [b,s,c] -> (pool_kv, pool_score [b, n_full, o*m, d], kv, score)."""
    b, s, _ = x.shape
    m, d = layer.compress_ratio, head_dim
    x = x.astype(np.float64)
    kv = x @ w.wkv.T                                                   # [b, s, o*d]
    score = x @ w.wgate.T + w.ape[np.arange(s) % m]                   # [b, s, o*d]
    n_full = s // m
    blk_kv = kv[:, :n_full * m].reshape(b, n_full, m, kv.shape[-1])   # [b, n_full, m, o*d]
    blk_score = score[:, :n_full * m].reshape(b, n_full, m, kv.shape[-1])
    if not layer.overlap:
        return blk_kv, blk_score, kv, score
    prev_kv = np.concatenate([np.zeros_like(blk_kv[:, :1]), blk_kv[:, :-1]], axis=1)     # block 0: padding
    prev_score = np.concatenate([np.full_like(blk_score[:, :1], -np.inf), blk_score[:, :-1]], axis=1)
    pool_kv = np.concatenate([prev_kv[..., :d], blk_kv[..., d:]], axis=2)             # [b, n_full, 2m, d]
    pool_score = np.concatenate([prev_score[..., :d], blk_score[..., d:]], axis=2)
    return pool_kv, pool_score, kv, score


def unpool(dpool: np.ndarray, s: int, layer: Layer, *, head_dim: int) -> np.ndarray:
    """The gradient of the pooled rows back onto the tokens. dpool [b, n_full, o*m, d] -> [b, s, o*d]."""
    b, n_full = dpool.shape[:2]
    m, d = layer.compress_ratio, head_dim
    if layer.overlap:
        dblk = np.zeros((b, n_full, m, 2 * d))
        dblk[..., d:] = dpool[:, :, m:]                                # this block's half
        dblk[:, :-1, :, :d] = dpool[:, 1:, :m]                         # block i-1 as the previous half of block i
    else:
        dblk = dpool
    out = np.zeros((b, s, dblk.shape[-1]))
    out[:, :n_full * m] = dblk.reshape(b, n_full * m, dblk.shape[-1])              # tokens of an incomplete group: 0
    return out


def compress_backward(de: np.ndarray, x: np.ndarray, w: CompressorWeights, layer: Layer, cfg, *, head_dim: int,
                      rotate: bool):
    """Backward of compress(x, 0, fresh state, ...). de [b, n_full, d], x [b,s,c]
    -> (dx [b,s,c], {"wkv", "wgate", "ape", "norm"} gradients)."""
    b, s, _ = x.shape
    m = layer.compress_ratio
    if s < m:                                                           # no complete block: no entry, no gradient
        return np.zeros(x.shape), {"wkv": np.zeros(w.wkv.shape), "wgate": np.zeros(w.wgate.shape),
                                   "ape": np.zeros(w.ape.shape), "norm": np.zeros(w.norm.shape)}
    pool_kv, pool_score, _, _ = pools(x, w, layer, head_dim=head_dim)
    a = np.exp(pool_score - pool_score.max(axis=2, keepdims=True))
    a = a / a.sum(axis=2, keepdims=True)                              # [b, n_full, P, d] softmax over the pool
    e = np.sum(a * pool_kv, axis=2)                                    # [b, n_full, d]
    if rotate:
        de = hadamard(de.astype(np.float64), "float64")
    table = layer_rope_table(np.arange(pool_kv.shape[1]) * m, cfg, layer.id, "float64")
    de = apply_rope_backward(de, table)
    de, dnorm = rms_norm_backward(de, e, w.norm, eps=cfg.norm_eps)
    dkv = unpool(a * de[:, :, None, :], s, layer, head_dim=head_dim)
    dscore = unpool(a * de[:, :, None, :] * (pool_kv - e[:, :, None, :]), s, layer, head_dim=head_dim)
    dx_kv, dwkv = linear_backward(dkv, x, w.wkv)
    dx_score, dwgate = linear_backward(dscore, x, w.wgate)
    dape = np.zeros_like(w.ape, dtype=np.float64)
    np.add.at(dape, np.arange(s) % m, dscore.sum(axis=0))
    return dx_kv + dx_score, {"wkv": dwkv, "wgate": dwgate, "ape": dape, "norm": dnorm}
