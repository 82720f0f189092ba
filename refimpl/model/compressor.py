"""Compressor: one compressed KV entry per m tokens, by gated pooling (docs/architecture.md §8).

For a token at position t with input x_t (cast to fp32):
    kv_t    = x_t @ wkvᵀ                       [o·d]   (o = 2 with overlap, else 1)
    score_t = x_t @ wgateᵀ + ape[t mod m]      [o·d]   (ape is added to the scores, by in-block position)
Entry i (block i = tokens m·i .. m·i+m-1) is made when its last token arrives:
    no overlap (m > 4):  e_i[ch] = Σ_{t ∈ block i} softmax_t(score_t[ch]) · kv_t[ch]
    overlap (m = 4):     channels [0:d] come from block i-1, channels [d:2d] from block i,
                         one softmax per channel over the 2m positions;
                         before block 0 the previous half is padding: kv 0, score -inf.
Then   e = rms_norm(bf16(e)) ; RoPE on the last p dims at position m·i (the block's FIRST token)
       indexer (rotate):  e = FP4-QDQ(Hadamard(e))        main:  FP8-QDQ of the non-rope dims (block 64)
The softmax is per channel over positions; everything before the bf16 cast is fp32. In mirror the
softmax and the sum over the pool are each one official op (numerics.rounded_once); the products
kv·p are fp32 ops.

State (decode and chunked prefill): the official fp32 buffers (M:L301-304), [b, o·m, o·d]:
rows 0..m-1 hold the previous complete block (overlap only), the next m rows the tokens of the
block in progress (row = t mod m); score rows already include ape. A fresh state is kv 0 /
score -inf (docs/architecture.md §19.29). Here unused rows are always reset to 0 / -inf, so a state is canonical:
any chunking of a sequence ends in the same state.
Official: model.py Compressor (M:L279-377).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.model.linear import fp32_linear
from refimpl.model.norm import rms_norm
from refimpl.numerics import (FP4_BLOCK, KV_FP8_BLOCK, bf16, hadamard, qdq_fp4, qdq_fp8, reduce_sum, softmax,
                              work_dtype)
from refimpl.model.rope import apply_rope, layer_rope_table
from refimpl.ops import swappable


@dataclass(frozen=True)
class CompressorWeights:
    """Gated pooling of one compressor (main: attn.compressor.*, indexer: attn.indexer.compressor.*)."""
    wkv: np.ndarray     # [o*d, c]    bf16 (used as fp32)   <prefix>.wkv.weight
    wgate: np.ndarray   # [o*d, c]    bf16 (used as fp32)   <prefix>.wgate.weight
    ape: np.ndarray     # [m, o*d]    float32               <prefix>.ape
    norm: np.ndarray    # [d]         bf16                  <prefix>.norm.weight


@dataclass(frozen=True)
class CompressorState:
    """Pending rows of the compressor (official kv_state / score_state)."""
    kv: np.ndarray      # [b, o*m, o*d]  fp32 (float64 in float64 mode); unused rows 0
    score: np.ndarray   # [b, o*m, o*d]  same dtype; unused rows -inf

    @staticmethod
    def empty(batch: int, cfg, layer: int, *, head_dim: int, prec: str) -> "CompressorState":
        """A fresh state of layer's compressor (main: head_dim = d, indexer: j)."""
        coff = 2 if cfg.uses_overlap(layer) else 1
        shape = (batch, coff * cfg.compress_ratio(layer), coff * head_dim)
        dt = work_dtype(prec)
        return CompressorState(kv=np.zeros(shape, dt), score=np.full(shape, -np.inf, dt))


@swappable
def gated_pool(kv: np.ndarray, score: np.ndarray, prec: str) -> np.ndarray:
    """Σ_t softmax_t(score)·kv per channel over the pool axis 2 (M:L342, L352, L359). [b,n,P,d] -> [b,n,d] fp32."""
    return reduce_sum(kv * softmax(score, axis=2, prec=prec), 2, prec)   # softmax one op; fp32 products; exact sum


def compress(x: np.ndarray, start_pos: int, state: CompressorState, w: CompressorWeights, layer: Layer, ctx,
             *, head_dim: int, rotate: bool):
    """Pool the tokens start_pos .. start_pos+s-1 into the entries they complete (main: head_dim d; indexer: j, rotate).

    x: [b, s, dim] -> (entries [b, s_new, d], new state); s_new = (start_pos+s)//m - start_pos//m.
    """
    prec, dt = ctx.prec, ctx.dtype
    b, s, _ = x.shape
    m, d, overlap = layer.compress_ratio, head_dim, layer.overlap
    off = m if overlap else 0                                          # first row of the block in progress
    kv = fp32_linear(x.astype(dt), w.wkv, prec)                        # [b, s, o*d]  official: x.float() @ wkv
    ape = w.ape.astype(dt)
    score = fp32_linear(x.astype(dt), w.wgate, prec) + ape[(start_pos + np.arange(s)) % m]  # [b, s, o*d]

    # tokens of the blocks touched by this call: the pending rows, then the new ones
    first_block, n_pending = start_pos // m, start_pos % m
    tok_kv = np.concatenate([state.kv[:, off:off + n_pending], kv], axis=1)        # [b, n_pending+s, o*d]
    tok_score = np.concatenate([state.score[:, off:off + n_pending], score], axis=1)
    n_full = (start_pos + s) // m - first_block                         # blocks completed now
    blk_kv = tok_kv[:, :n_full * m].reshape(b, n_full, m, kv.shape[-1])  # [b, n_full, m, o*d]
    blk_score = tok_score[:, :n_full * m].reshape(b, n_full, m, kv.shape[-1])
    if overlap:
        # previous block of each completed block: the stored one, then the completed ones (M:L307-314)
        prev_kv = np.concatenate([state.kv[:, None, :m], blk_kv[:, :-1]], axis=1)[:, :n_full]
        prev_score = np.concatenate([state.score[:, None, :m], blk_score[:, :-1]], axis=1)[:, :n_full]
        pool_kv = np.concatenate([prev_kv[..., :d], blk_kv[..., d:]], axis=2)       # [b, n_full, 2m, d]
        pool_score = np.concatenate([prev_score[..., :d], blk_score[..., d:]], axis=2)
    else:
        pool_kv, pool_score = blk_kv, blk_score                                      # [b, n_full, m, d]
    e = gated_pool(pool_kv, pool_score, prec)                             # [b, n_full, d]

    # new state: pending rows = the incomplete tail; previous block = the last completed one
    n_tail = (start_pos + s) % m
    new_kv, new_score = np.zeros_like(state.kv), np.full_like(state.score, -np.inf)
    new_kv[:, off:off + n_tail] = tok_kv[:, n_full * m:]
    new_score[:, off:off + n_tail] = tok_score[:, n_full * m:]
    if overlap:
        new_kv[:, :m] = blk_kv[:, -1] if n_full else state.kv[:, :m]
        new_score[:, :m] = blk_score[:, -1] if n_full else state.score[:, :m]
    new_state = CompressorState(kv=new_kv, score=new_score)
    if n_full == 0:
        return np.zeros((b, 0, d), dt), new_state

    e = rms_norm(bf16(e, prec), w.norm, eps=ctx.cfg.norm_eps, prec=prec)   # official: norm(kv.to(bf16))
    positions = (first_block + np.arange(n_full)) * m                      # first token of each block
    e = apply_rope(e, layer_rope_table(positions, ctx.cfg, layer.id, prec), prec)
    if rotate:
        e = qdq_fp4(bf16(hadamard(e, prec), prec), prec, block=FP4_BLOCK)       # official: rotate_activation; fp4_act_quant
    elif ctx.revision == "current":
        nope = d - ctx.cfg.rope_head_dim                                      # rope dims stay bf16
        e = np.concatenate([qdq_fp8(e[..., :nope], prec, block=KV_FP8_BLOCK), e[..., nope:]], axis=-1)
    return e, new_state
