"""RMSNorm, in the three variants the model uses (docs/architecture.md §5).

    rms_norm       y = w ⊙ x / sqrt(mean(x²) + eps)     fp32 math, bf16 out     (attn_norm, q_norm, kv_norm, ...)
    head_rms_norm  y = x / sqrt(mean(x²) + eps)         per head, in bf16 ops   (the weightless q norm, §19.5)
    (the weightless RMS over the flattened n*c streams of hc_pre / hc_head lives in hyperconn.py)

Official: model.py RMSNorm (M:L183-196), Attention.forward q norm (M:L498).
"""
from __future__ import annotations

import numpy as np

from refimpl.numerics import bf16, reduce_mean, rsqrt, work_dtype
from refimpl.ops import swappable


@swappable
def rms_norm(x: np.ndarray, weight: np.ndarray, *, eps: float, prec: str) -> np.ndarray:
    """Weighted RMSNorm over the last axis. x: [..., c] -> [..., c]."""
    dt = work_dtype(prec)
    xf = x.astype(dt)                                                  # official: x.float()
    var = reduce_mean(xf * xf, -1, prec, keepdims=True)                # [..., 1] x.square() fp32; .mean exact, one rounding
    y = xf * rsqrt(var + dt(eps), prec)                                # official: x * torch.rsqrt(var + eps), rsqrt one op
    return bf16(np.asarray(weight).astype(dt) * y, prec)               # weight fp32 (upcast of bf16); .to(bf16)


@swappable
def head_rms_norm(q: np.ndarray, *, eps: float, prec: str) -> np.ndarray:
    """Weightless per-head RMS norm of q, emulating the official bf16 tensor ops. q: [..., d] -> [..., d].

    Each bf16 op is computed exactly, rounded to fp32, then to bf16 (as a GPU does); the rsqrt is
    one correctly rounded op (PyTorch's CPU bf16 rsqrt is not: rsqrt(1.59375) gives 0.7890625,
    the nearest bf16 is 0.79296875; docs/architecture.md §19.5).
    """
    dt = work_dtype(prec)
    q = q.astype(dt)
    sq = bf16(q * q, prec)                                             # official: q.square() (bf16; exact in fp32)
    mean = bf16(reduce_mean(sq, -1, prec, keepdims=True), prec)        # .mean(-1): exact, fp32, bf16 out
    r = bf16(rsqrt(bf16(mean + dt(eps), prec), prec), prec)            # + eps (bf16), torch.rsqrt (bf16)
    return bf16(q * r, prec)                                           # q *= ... (bf16)
