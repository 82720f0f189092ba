"""One transformer block: mHC around attention, then mHC around the MoE (docs/architecture.md §12).

    R = h;  x, post, comb = hc_pre(h);  x = attn_norm(x);  x = attention(x);  h = hc_post(x, R, post, comb)
    R = h;  x, post, comb = hc_pre(h);  x = ffn_norm(x);   x = moe(x, ids);   h = hc_post(x, R, post, comb)
Official: model.py Block.forward (M:L689-701).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.model import chunks
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
          layer: Layer, ctx, *, overwrite: bool = False):
    """One block. h [b,s,n,c] streams, tokens [b,s] from start_pos -> ([b,s,n,c], new attention state).

    The row-wise steps run in chunks of positions (chunks.py; the same results): mHC before and after
    the attention, and the whole MoE half (hc_pre, norm, MoE, hc_post) chunk by chunk. overwrite: h
    is the caller's to give up (the forward pass's own streams, no trace holding them): the new
    streams are written over it, each chunk's rows after they are read.
    """
    eps, i = ctx.cfg.norm_eps, layer.id
    s = h.shape[1]
    part, finish = chunks.chunked(ctx)
    x, post, comb = _hc_pre(h, w.hc_attn, f"layers.{i}.hc_attn", part)   # [b, s, c], [b, s, n], [b, s, n, n]
    finish()                                     # hc_attn's sites into the trace before the attention's
    x = rms_norm(x, w.attn_norm, eps=eps, prec=ctx.prec)
    x, state = attention(x, start_pos, state, w.attn, layer, ctx)
    h = _hc_post(x, h, post, comb, ctx, h if overwrite and h.dtype == ctx.dtype else np.empty(h.shape, ctx.dtype), 0)
    record(ctx, f"layers.{i}.hc_attn.out", h)

    # the MoE half, chunk by chunk, written over the attention half's streams (read before they are written;
    # a new array where a trace keeps them: a recording holds a view)
    kept = ctx.trace is not None and ctx.trace.wants(f"layers.{i}.hc_attn.out")
    out = np.empty(h.shape, ctx.dtype) if kept else h
    part, finish = chunks.chunked(ctx)
    for lo, hi in chunks.spans(s):
        residual = h[:, lo:hi]
        x, post, comb = _hc_pre(residual, w.hc_ffn, f"layers.{i}.hc_ffn", part)
        x = rms_norm(x, w.ffn_norm, eps=eps, prec=ctx.prec)
        x = moe(x, tokens[:, lo:hi], start_pos + lo, w.ffn, layer, part)
        out = _hc_post(x, residual, post, comb, part, out, lo)
    finish()
    record(ctx, f"layers.{i}.out", out)
    return out, state


def _wide(h: np.ndarray) -> int:
    """Bytes of mHC's widest temporary per position: hc_post's [n, n, c] (float64 inside hc_pre's product)."""
    return h.shape[2] * h.shape[2] * h.shape[3] * 8


def _hc_pre(h: np.ndarray, w: HyperConnWeights, site: str, ctx):
    """hc_pre in chunks of positions. h [b,s,n,c] -> x [b,s,c], post [b,s,n], comb [b,s,n,n]."""
    pieces = [hc_pre(h[:, lo:hi], w, site, ctx) for lo, hi in chunks.spans(h.shape[1], _wide(h))]
    return tuple(p[0] if len(pieces) == 1 else np.concatenate(p, axis=1) for p in zip(*pieces))


def _hc_post(x, residual, post, comb, ctx, out, at: int) -> np.ndarray:
    """hc_post in chunks of positions, written into out[:, at:at+s]. -> out"""
    for lo, hi in chunks.spans(residual.shape[1], _wide(residual)):
        out[:, at + lo:at + hi] = hc_post(x[:, lo:hi], residual[:, lo:hi], post[:, lo:hi], comb[:, lo:hi], ctx)
    return out
