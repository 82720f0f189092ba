"""RMSNorm, in the three variants the model uses (docs/architecture.md §5).

    rms_norm       y = w ⊙ x / sqrt(mean(x²) + eps)     fp32 math, bf16 out     (attn_norm, q_norm, kv_norm, ...)
    head_rms_norm  y = x / sqrt(mean(x²) + eps)         per head, in bf16 ops   (the weightless q norm, §19.5)
    (the weightless RMS over the flattened n*c streams of hc_pre / hc_head lives in hyperconn.py)

Official: model.py RMSNorm (M:L183-196), Attention.forward q norm (M:L498).
"""
from __future__ import annotations

import numpy as np

from refimpl.numerics import bf16, work_dtype


def rms_norm(x: np.ndarray, weight: np.ndarray, *, eps: float, prec: str) -> np.ndarray:
    """Weighted RMSNorm over the last axis. x: [..., c] -> [..., c]."""
    dt = work_dtype(prec)
    xf = x.astype(dt)                                                  # official: x.float()
    var = np.mean(xf * xf, axis=-1, keepdims=True)                     # [..., 1]
    y = xf * (dt(1.0) / np.sqrt(var + dt(eps)))                        # official: x * rsqrt(var + eps)
    return bf16(np.asarray(weight).astype(dt) * y, prec)               # weight fp32 (upcast of bf16); .to(bf16)


def head_rms_norm(q: np.ndarray, *, eps: float, prec: str) -> np.ndarray:
    """Weightless per-head RMS norm of q, emulating the official bf16 tensor ops. q: [..., d] -> [..., d]."""
    dt = work_dtype(prec)
    q = q.astype(dt)
    sq = bf16(q * q, prec)                                             # official: q.square() (bf16)
    mean = bf16(np.mean(sq, axis=-1, keepdims=True, dtype=dt), prec)   # .mean(-1): fp32 accumulate, bf16 out
    r = bf16(dt(1.0) / np.sqrt(bf16(mean + dt(eps), prec)), prec)      # + eps (bf16), rsqrt (bf16)
    return bf16(q * r, prec)                                           # q *= ... (bf16)
