"""Numba kernel of the compressor's gated pooling (spec: refimpl/model/compressor.py gated_pool).

    gated_pool(kv, score, prec)     kv, score [b, n, P, d] -> [b, n, d]
    e[ch] = Σ_t softmax_t(score[t, ch]) · kv[t, ch]      per channel, over the P pooled positions

One (entry, channel) per inner step, the entries of a call in a prange. mirror: the softmax is one
op (float64 exp of score - max, divided by the float64 sum over positions, rounded once to fp32),
kv·p an fp32 product, the sum over positions float64 rounded once; both sums run over the
positions in order, as NumPy reduces a non-last axis. float64: the same in float64;
float32: float64 inside, rounded once.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from refimpl.kernels.rounding import rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.numerics import check_precision, work_dtype


@numba.njit(cache=True, parallel=True)
def _gated_pool(kv, score, mirror, out):
    b, n, P, d = kv.shape
    for task in numba.prange(b * n):
        bi, ei = task // n, task % n
        e = np.empty(P, np.float64)
        for ch in range(d):
            mx = -np.inf
            for t in range(P):
                v = np.float64(score[bi, ei, t, ch])
                if v > mx:
                    mx = v
            tot = 0.0
            for t in range(P):
                e[t] = math.exp(np.float64(score[bi, ei, t, ch]) - mx)
                tot += e[t]
            acc = 0.0
            for t in range(P):
                if mirror:
                    p = rounded_once_f32(e[t] / tot)                              # softmax: one op, one rounding
                    acc += np.float64(np.float32(np.float32(kv[bi, ei, t, ch]) * p))   # kv * p in fp32
                else:
                    acc += np.float64(kv[bi, ei, t, ch]) * (e[t] / tot)
            out[bi, ei, ch] = acc


def gated_pool(kv, score, prec):
    """Kernel of model.compressor.gated_pool (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    kv, score = np.asarray(kv), np.asarray(score)
    if kv.ndim != 4 or score.shape != kv.shape:
        raise ValueError(f"gated_pool: need kv and score of one shape [b, n, P, d]; got {kv.shape} and {score.shape}")
    if kv.shape[2] and np.isneginf(score.max(axis=2)).any():
        raise ValueError("softmax: a slice is entirely -inf (no position to attend to)")
    kv = np.require(kv if kv.dtype in (np.float32, np.float64) else kv.astype(dt), None, ["C", "W"])
    score = np.require(score if score.dtype in (np.float32, np.float64) else score.astype(dt), None, ["C", "W"])
    b, n, P, d = kv.shape
    out = np.empty((b, n, d), dt)
    if b * n * d:
        with serial_below(kv.size * 8):
            _gated_pool(kv, score, prec == "mirror", out)
    return out
