"""Backward of the RMS norms of refimpl/model/norm.py, in float64.

    y = w ⊙ x̂,  x̂ = x·r,  r = (mean(x²) + eps)^(-1/2)                       (rms_norm)
    dw = Σ_rows dy ⊙ x̂
    dx = r · (g − x̂ · mean(g ⊙ x̂)),   g = dy ⊙ w                            (the -r³·x·Σ(g·x)/c term is
                                                                            the dependence of r on x)
head_rms_norm is the same with w = 1, per head (its bf16 steps are identities in float64).
"""
from __future__ import annotations

import numpy as np


def _normalized(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # [.., 1]
    return x * r, r


def rms_norm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, *, eps: float):
    """Backward of rms_norm(x, weight, eps=eps). dy, x [.., c], weight [c] -> (dx [.., c], dweight [c])."""
    xhat, r = _normalized(x, eps)
    g = dy * np.asarray(weight, np.float64)
    dx = r * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, x.shape[-1]).sum(axis=0)


def head_rms_norm_backward(dy: np.ndarray, q: np.ndarray, *, eps: float) -> np.ndarray:
    """Backward of head_rms_norm(q, eps=eps) (weightless, per head). dy, q [.., d] -> dq [.., d]."""
    qhat, r = _normalized(q, eps)
    return r * (dy - qhat * np.mean(dy * qhat, axis=-1, keepdims=True))
