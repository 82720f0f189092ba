"""One transformer block: mHC around attention, then mHC around the MoE (docs/architecture.md §12).

    R = h;  x, post, comb = hc_pre(h);  x = attn_norm(x);  x = attention(x);  h = hc_post(x, R, post, comb)
    R = h;  x, post, comb = hc_pre(h);  x = ffn_norm(x);   x = moe(x, ids);   h = hc_post(x, R, post, comb)
Official: model.py Block.forward (M:L689-701).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.model.attention import AttentionState, AttentionWeights, attention
from refimpl.model.hyperconn import HyperConnWeights, hc_post, hc_pre
from refimpl.model.moe import MoEWeights, moe
from refimpl.model.norm import rms_norm
from refimpl.sites import record


@dataclass(frozen=True)
class BlockWeights:
    """All weights of one block (layers.{i}.* or mtp.0.*)."""
    hc_attn: HyperConnWeights      # hc_attn_fn / hc_attn_base / hc_attn_scale
    attn_norm: np.ndarray          # [c] bf16   attn_norm.weight
    attn: AttentionWeights
    hc_ffn: HyperConnWeights       # hc_ffn_fn / hc_ffn_base / hc_ffn_scale
    ffn_norm: np.ndarray           # [c] bf16   ffn_norm.weight
    ffn: MoEWeights


def block(h: np.ndarray, tokens: np.ndarray, start_pos: int, state: AttentionState, w: BlockWeights,
          layer: Layer, ctx):
    """One block. h [b,s,n,c] streams, tokens [b,s] from start_pos -> ([b,s,n,c], new attention state)."""
    eps, i = ctx.cfg.norm_eps, layer.id
    residual = h
    x, post, comb = hc_pre(h, w.hc_attn, f"layers.{i}.hc_attn", ctx)   # [b, s, c]
    x = rms_norm(x, w.attn_norm, eps=eps, prec=ctx.prec)
    x, state = attention(x, start_pos, state, w.attn, layer, ctx)
    h = hc_post(x, residual, post, comb, ctx)                          # [b, s, n, c]
    record(ctx, f"layers.{i}.hc_attn.out", h)

    residual = h
    x, post, comb = hc_pre(h, w.hc_ffn, f"layers.{i}.hc_ffn", ctx)
    x = rms_norm(x, w.ffn_norm, eps=eps, prec=ctx.prec)
    x = moe(x, tokens, start_pos, w.ffn, layer, ctx)
    h = hc_post(x, residual, post, comb, ctx)
    record(ctx, f"layers.{i}.out", h)
    return h, state
