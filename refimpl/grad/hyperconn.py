"""mHC forward with its intermediates, and backward (refimpl/model/hyperconn.py, docs/gradients.md).

hc_pre:   v = flatten(h), ρ = (mean(v²) + norm_eps)^(-1/2), mixes = (v @ fnᵀ)·ρ,
          (pre, post, comb) = split_sinkhorn(mixes), x = Σ_j pre_j · h_j
hc_post:  y_k = post_k · x + Σ_j comb[j, k] · h_j
hc_head:  pre = sigmoid(mixes · scale[0] + base) + hc_eps (no Sinkhorn), x = Σ_j pre_j · h_j

The Sinkhorn backward runs the forward again keeping every iterate, then walks the steps back:
a step c' = c / (Σ_axis c + eps) has the backward dc = (dc' − Σ_axis(dc' ⊙ c')) / (Σ_axis c + eps),
a column step summing over j (axis -2), a row step over k (axis -1); the row softmax has the
softmax backward. The gradient of comb[j, k] is Σ_c dy_k · h_j: old stream j, new stream k.
"""
from __future__ import annotations

import numpy as np

from refimpl.model.hyperconn import HyperConnWeights, split_sinkhorn, weighted_streams
from refimpl.model.linear import fp32_linear
from refimpl.numerics import bf16, reduce_mean, rsqrt, sigmoid
from refimpl.grad.linear import linear_backward


def mixes_forward(h: np.ndarray, fn: np.ndarray, *, norm_eps: float, prec: str):
    """The spec's mixing logits (hyperconn._mixes, the same operations). h [b,s,n,c] -> (mixes [b,s,x], v [b,s,n*c])."""
    b, s, n, c = h.shape
    v = h.reshape(b, s, n * c).astype(np.float64)
    rho = rsqrt(reduce_mean(v * v, -1, prec, keepdims=True) + np.float64(norm_eps), prec)
    return fp32_linear(v, fn, prec) * rho, v


def mixes_backward(dmixes: np.ndarray, v: np.ndarray, fn: np.ndarray, *, norm_eps: float):
    """Backward of mixes = (v @ fnᵀ)·ρ(v). dmixes [b,s,x], v [b,s,n*c] -> (dv [b,s,n*c], dfn [x, n*c])."""
    rho = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + norm_eps)   # [b, s, 1]
    raw = v @ fn.T                                                     # [b, s, x]
    draw = dmixes * rho
    drho = np.sum(dmixes * raw, axis=-1, keepdims=True)               # [b, s, 1]
    dv, dfn = linear_backward(draw, v, fn)
    dv = dv - drho * rho ** 3 * v / v.shape[-1]                       # dρ/dv = -ρ³ v / (n·c)
    return dv, dfn


def _sigmoid_backward(dy: np.ndarray, z: np.ndarray) -> np.ndarray:
    sg = sigmoid(z, "float64")
    return dy * sg * (1 - sg)


def sinkhorn_steps(logits: np.ndarray, *, iters: int, eps: float):
    """The spec's comb from its logits [.., n, n], keeping every step: (p, [(axis, denominator, output), ...])."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)                             # row softmax
    comb, steps = p + eps, []
    for axis in [-2] + [-1, -2] * (iters - 1):                        # a column step, then (row, column) pairs
        den = comb.sum(axis=axis, keepdims=True) + eps
        comb = comb / den
        steps.append((axis, den, comb))
    return p, steps


def sinkhorn_backward(dcomb: np.ndarray, p: np.ndarray, steps) -> np.ndarray:
    """Backward of sinkhorn_steps to its logits. dcomb [.., n, n] (comb[j, k]) -> dlogits [.., n, n]."""
    g = dcomb
    for axis, den, out in reversed(steps):
        g = (g - np.sum(g * out, axis=axis, keepdims=True)) / den
    return p * (g - np.sum(g * p, axis=-1, keepdims=True))            # softmax backward (the + eps has none)


def split_sinkhorn_backward(dpre, dpost, dcomb, mixes, scale, base, *, n: int, iters: int, eps: float):
    """Backward of split_sinkhorn. dpre, dpost [.., n], dcomb [.., n, n], mixes [.., x]
    -> (dmixes [.., x], dscale [3], dbase [x])."""
    m = mixes.astype(np.float64)
    lead = tuple(range(m.ndim - 1))
    dz = np.empty_like(m)
    dz[..., :n] = _sigmoid_backward(dpre, m[..., :n] * scale[0] + base[:n])          # pre = sigmoid(z) + eps
    dz[..., n:2 * n] = 2 * _sigmoid_backward(dpost, m[..., n:2 * n] * scale[1] + base[n:2 * n])   # post = 2 sigmoid(z)
    logits = (m[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*m.shape[:-1], n, n)
    p, steps = sinkhorn_steps(logits, iters=iters, eps=eps)
    dz[..., 2 * n:] = sinkhorn_backward(dcomb, p, steps).reshape(*m.shape[:-1], n * n)
    which = np.repeat([0, 1, 2], [n, n, n * n])                       # the scale each mix uses
    dmixes = dz * np.asarray(scale, np.float64)[which]
    dscale = np.array([np.sum((dz * m)[..., which == k]) for k in range(3)])
    return dmixes, dscale, dz.sum(axis=lead)


def hc_pre_forward(h: np.ndarray, w: HyperConnWeights, site: str, ctx, probe):
    """The spec's hc_pre (same operations), its sites through probe. h [b,s,n,c] -> (x [b,s,c], post, comb, cache)."""
    cfg, prec = ctx.cfg, ctx.prec
    b, s, n, c = h.shape
    mixes, v = mixes_forward(h, w.fn, norm_eps=cfg.norm_eps, prec=prec)
    pre, post, comb = split_sinkhorn(mixes, w.scale, w.base, n=n, iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps,
                                     prec=prec)
    pre, post, comb = probe(f"{site}.pre", pre), probe(f"{site}.post", post), probe(f"{site}.comb", comb)
    x = bf16(weighted_streams(pre, v.reshape(b, s, n, c), prec), prec)
    return x, post, comb, {"h": h, "mixes": mixes, "pre": pre}


def hc_pre_backward(dx, dpost, dcomb, cache, w: HyperConnWeights, cfg):
    """Backward of hc_pre. dx [b,s,c], dpost [b,s,n], dcomb [b,s,n,n] -> (dh [b,s,n,c], dpre [b,s,n],
    {"fn", "base", "scale"} gradients)."""
    h, mixes, pre = cache["h"], cache["mixes"], cache["pre"]
    b, s, n, c = h.shape
    dpre = np.einsum("bsc,bsnc->bsn", dx, h)
    dh = pre[..., None] * dx[:, :, None, :]
    dmixes, dscale, dbase = split_sinkhorn_backward(dpre, dpost, dcomb, mixes, w.scale, w.base, n=n,
                                                    iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps)
    dv, dfn = mixes_backward(dmixes, h.reshape(b, s, n * c).astype(np.float64), w.fn, norm_eps=cfg.norm_eps)
    return dh + dv.reshape(b, s, n, c), dpre, {"fn": dfn, "base": dbase, "scale": dscale}


def hc_post_backward(dy, x, residual, post, comb):
    """Backward of hc_post. dy [b,s,n,c], x [b,s,c], residual [b,s,n,c]
    -> (dx [b,s,c], dresidual [b,s,n,c], dpost [b,s,n], dcomb [b,s,n,n])."""
    dx = np.einsum("bsk,bskc->bsc", post, dy)
    dres = np.einsum("bsjk,bskc->bsjc", comb, dy)                     # stream j feeds every k through comb[j, k]
    dpost = np.einsum("bskc,bsc->bsk", dy, x)
    dcomb = np.einsum("bskc,bsjc->bsjk", dy, residual)
    return dx, dres, dpost, dcomb


def hc_head_backward(dx, h, w: HyperConnWeights, cfg):
    """Backward of hc_head. dx [b,s,c], h [b,s,n,c] -> (dh [b,s,n,c], {"fn", "base", "scale"})."""
    b, s, n, c = h.shape
    mixes, v = mixes_forward(h, w.fn, norm_eps=cfg.norm_eps, prec="float64")
    z = mixes * w.scale[0] + w.base
    pre = sigmoid(z, "float64") + cfg.hc_eps
    dpre = np.einsum("bsc,bsnc->bsn", dx, h)
    dz = _sigmoid_backward(dpre, z)
    dv, dfn = mixes_backward(dz * w.scale[0], v, w.fn, norm_eps=cfg.norm_eps)
    dh = pre[..., None] * dx[:, :, None, :] + dv.reshape(b, s, n, c)
    return dh, {"fn": dfn, "base": dz.reshape(-1, n).sum(axis=0), "scale": np.array([np.sum(dz * mixes)])}
