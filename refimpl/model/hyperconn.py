"""Manifold-constrained hyper-connections (mHC): n residual streams mixed around every sublayer.

    v      = flatten(h)  [n*c],   ρ = 1/sqrt(mean(v²) + norm_eps)
    mixes  = (v @ fnᵀ) · ρ                                        [(2+n)·n]: pre n | post n | comb n·n
    pre_j  = sigmoid(mixes_j · scale[0] + base_j) + hc_eps
    post_j = 2 · sigmoid(mixes_{n+j} · scale[1] + base_{n+j})
    comb   = SinkhornKnopp(mixes_{2n+jn+k} · scale[2] + base_{2n+jn+k})
    x      = Σ_j pre[j] · h[j]                                    (hc_pre)
    h'[k]  = post[k] · f(x) + Σ_j comb[j, k] · h[j]               (hc_post: column k forms stream k)

comb[j, k] is the weight of old stream j in new stream k. Sinkhorn: a row softmax + eps, one
column normalisation, then (iters - 1) times (row, column); every denominator has + eps, so the
columns sum to 1 within eps and the rows approach 1 as iterations grow. pre is not normalised.
Rounding (mirror): the sums (the mean inside ρ, every Sinkhorn row and column sum, the sums over
streams), sigmoid, exp and rsqrt are each one official op (numerics.rounded_once); the rest are
fp32 ops.
Official: model.py Block.hc_pre / hc_post (M:L674-687), ParallelHead.hc_head (M:L729-736),
kernel.py hc_split_sinkhorn_kernel (K:L371-438).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.model.linear import fp32_linear
from refimpl.numerics import bf16, exp, reduce_mean, reduce_sum, rsqrt, sigmoid, work_dtype
from refimpl.sites import record
from refimpl.ops import swappable


@dataclass(frozen=True)
class HyperConnWeights:
    """Mixing weights of one sublayer (loaded from hc_attn_* or hc_ffn_*), or of the head (hc_head_*)."""
    fn: np.ndarray      # [x, n*c] float32    layers.{i}.hc_{attn,ffn}_fn    (head: [n, n*c] hc_head_fn)
    base: np.ndarray    # [x]      float32    layers.{i}.hc_{attn,ffn}_base  (head: [n])
    scale: np.ndarray   # [3]      float32    layers.{i}.hc_{attn,ffn}_scale (head: [1])


@swappable
def split_sinkhorn(mixes: np.ndarray, scale: np.ndarray, base: np.ndarray, *, n: int, iters: int,
                   eps: float, prec: str):
    """Split mixing logits [.., x] into pre [.., n], post [.., n], comb [.., n, n] (K:L386-425)."""
    dt = work_dtype(prec)
    m, scale, base = mixes.astype(dt), scale.astype(dt), base.astype(dt)
    eps = dt(eps)
    pre = sigmoid(m[..., :n] * scale[0] + base[:n], prec) + eps                  # [.., n]  T.sigmoid: one op
    post = dt(2) * sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n], prec)     # [.., n]
    logits = (m[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*m.shape[:-1], n, n)  # [.., j, k]
    # comb = comb.softmax(-1) + eps, written out in the kernel: T.exp, T.reduce_sum, divide
    e = exp(logits - logits.max(axis=-1, keepdims=True), prec)
    comb = e / reduce_sum(e, -1, prec, keepdims=True) + eps
    # comb = comb / (comb.sum(-2) + eps)                                         (column step)
    comb = comb / (reduce_sum(comb, -2, prec, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (reduce_sum(comb, -1, prec, keepdims=True) + eps)          # row step
        comb = comb / (reduce_sum(comb, -2, prec, keepdims=True) + eps)          # column step
    return pre, post, comb


def _mixes(h: np.ndarray, fn: np.ndarray, *, norm_eps: float, prec: str):
    """Weightless RMS over the flattened streams, then the projection. h: [b,s,n,c] -> ([b,s,x], v [b,s,n*c])."""
    dt = work_dtype(prec)
    b, s, n, c = h.shape
    v = h.reshape(b, s, n * c).astype(dt)                                        # official: x.flatten(2).float()
    rho = rsqrt(reduce_mean(v * v, -1, prec, keepdims=True) + dt(norm_eps), prec)  # [b, s, 1] official: torch.rsqrt(...)
    return fp32_linear(v, fn, prec) * rho, v                                      # [b, s, x]


def weighted_streams(pre: np.ndarray, v: np.ndarray, prec: str) -> np.ndarray:
    """Σ_j pre_j · v_j over the n streams (M:L681, L735). pre [b,s,n], v [b,s,n,c] fp32 -> [b,s,c] fp32."""
    return reduce_sum(pre[..., None] * v, 2, prec)                               # fp32 products, exact sum


def hc_pre(h: np.ndarray, w: HyperConnWeights, site: str, ctx):
    """Collapse the n streams into one sublayer input. h: [b,s,n,c] -> x [b,s,c], post [b,s,n], comb [b,s,n,n]."""
    cfg, prec = ctx.cfg, ctx.prec
    b, s, n, c = h.shape
    assert (n, c) == (cfg.hc_mult, cfg.dim), h.shape
    mixes, v = _mixes(h, w.fn, norm_eps=cfg.norm_eps, prec=prec)                  # [b, s, x]
    pre, post, comb = split_sinkhorn(mixes, w.scale, w.base, n=n, iters=cfg.hc_sinkhorn_iters,
                                     eps=cfg.hc_eps, prec=prec)
    record(ctx, f"{site}.pre", pre)
    record(ctx, f"{site}.post", post)
    record(ctx, f"{site}.comb", comb)
    x = weighted_streams(pre, v.reshape(b, s, n, c), prec)                        # [b, s, c]
    return bf16(x, prec), post, comb                                             # official: y.to(bf16)


@swappable
def hc_post(x: np.ndarray, residual: np.ndarray, post: np.ndarray, comb: np.ndarray, ctx) -> np.ndarray:
    """Expand a sublayer output back into n streams. x [b,s,c], residual [b,s,n,c] -> [b,s,n,c]."""
    prec, dt = ctx.prec, ctx.dtype
    mixed = reduce_sum(comb[..., None] * residual.astype(dt)[:, :, :, None, :], 2, prec)  # [b,s,k,c]: Σ_j comb[j,k]·h[j]
    y = post[..., None] * x.astype(dt)[:, :, None, :] + mixed                        # [b, s, n, c] fp32
    return bf16(y, prec)                                                             # official: .type_as(x)


def hc_head(h: np.ndarray, w: HyperConnWeights, ctx) -> np.ndarray:
    """Final collapse of the streams: sigmoid pre weights, no Sinkhorn, no post. h [b,s,n,c] -> [b,s,c]."""
    cfg, prec, dt = ctx.cfg, ctx.prec, ctx.dtype
    b, s, n, c = h.shape
    mixes, v = _mixes(h, w.fn, norm_eps=cfg.norm_eps, prec=prec)                  # [b, s, n]
    pre = sigmoid(mixes * w.scale.astype(dt)[0] + w.base.astype(dt), prec) + dt(cfg.hc_eps)  # [b, s, n]
    x = weighted_streams(pre, v.reshape(b, s, n, c), prec)                        # [b, s, c]
    return bf16(x, prec)
