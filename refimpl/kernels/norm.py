"""Numba kernel of the weighted RMSNorm (spec: refimpl/model/norm.py rms_norm).

    rms_norm(x, weight, *, eps, prec)     x [..., c], weight [c] -> [..., c]

One row per task (prange). mirror: x² is an fp32 product; the mean is a float64 sum in NumPy's
pairwise order divided by c, rounded once to fp32 (numerics.reduce_mean); + eps in fp32; rsqrt
one float64 op rounded once; x·rsqrt and weight·y fp32 products; bf16 out. float64: the same
steps in float64 (bit-identical to the spec: same sum order). float32: float64 inside, rounded
once to fp32 (the spec's float32 sum and rsqrt differ from it by float32 rounding).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from refimpl.kernels.rounding import bf16_f32, pairwise_sum, rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.numerics import check_precision, work_dtype


@numba.njit(cache=True, parallel=True)
def _rms_norm(x, w, eps, mirror, out):
    rows, c = x.shape
    for r in numba.prange(rows):
        sq = np.empty(c, np.float64)
        if mirror:
            for i in range(c):
                xi = np.float32(x[r, i])
                sq[i] = np.float64(np.float32(xi * xi))          # x.square() in fp32
            var = rounded_once_f32(pairwise_sum(sq, 0, c) / c)          # .mean(-1): exact-ish float64, one rounding
            rs = rounded_once_f32(1.0 / math.sqrt(np.float64(np.float32(var + np.float32(eps)))))   # torch.rsqrt: one op
            for i in range(c):
                y = np.float32(np.float32(x[r, i]) * rs)
                out[r, i] = bf16_f32(np.float32(np.float32(w[i]) * y))   # weight * y, .to(bf16)
        else:
            for i in range(c):
                xi = np.float64(x[r, i])
                sq[i] = xi * xi
            rs = 1.0 / math.sqrt(pairwise_sum(sq, 0, c) / c + eps)
            for i in range(c):
                out[r, i] = np.float64(w[i]) * (np.float64(x[r, i]) * rs)


def rms_norm(x, weight, *, eps, prec):
    """Kernel of model.norm.rms_norm (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    x, weight = np.asarray(x), np.asarray(weight)
    c = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or weight.shape != (c,):
        raise ValueError(f"rms_norm: need x [..., c] and weight [c]; got {x.shape} and {weight.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(dt)
    rows = np.require(x.reshape(-1, c), None, ["C", "W"])
    w = weight.astype(dt)                                        # bf16 -> f32/f64 exact
    out = np.empty(rows.shape, dt)
    if rows.shape[0] and c:
        with serial_below(rows.size * 8):
            _rms_norm(rows, w, float(dt(eps)), prec == "mirror", out)
    return out.reshape(x.shape)


@numba.njit(cache=True, parallel=True)
def _head_rms_norm(q, eps, mirror, out):
    rows, d = q.shape
    for r in numba.prange(rows):
        sq = np.empty(d, np.float64)
        if mirror:
            eps32 = np.float32(eps)
            for i in range(d):
                qi = np.float32(q[r, i])
                sq[i] = np.float64(bf16_f32(np.float32(qi * qi)))         # q.square() (bf16)
            mean = bf16_f32(rounded_once_f32(pairwise_sum(sq, 0, d) / d))       # .mean(-1): exact, fp32, bf16
            v = bf16_f32(np.float32(mean + eps32))                        # + eps (bf16)
            rs = bf16_f32(rounded_once_f32(1.0 / math.sqrt(np.float64(v))))    # torch.rsqrt (bf16), one rounding
            for i in range(d):
                out[r, i] = bf16_f32(np.float32(np.float32(q[r, i]) * rs))   # q *= ... (bf16)
        else:
            for i in range(d):
                qi = np.float64(q[r, i])
                sq[i] = qi * qi
            rs = 1.0 / math.sqrt(pairwise_sum(sq, 0, d) / d + eps)
            for i in range(d):
                out[r, i] = np.float64(q[r, i]) * rs


def head_rms_norm(q, *, eps, prec):
    """Kernel of model.norm.head_rms_norm: mirror bit-identical (bf16 ops, one rounding each);
    float64 the same math in float64; float32 float64 inside, rounded once."""
    check_precision(prec)
    dt = work_dtype(prec)
    q = np.asarray(q)
    if q.ndim == 0:
        raise ValueError(f"head_rms_norm: need q [..., d], got shape {q.shape}")
    d = q.shape[-1]
    if q.dtype not in (np.float32, np.float64):
        q = q.astype(dt)
    rows = np.require(q.reshape(-1, d), None, ["C", "W"])
    out = np.empty(rows.shape, dt)
    if rows.shape[0] and d:
        with serial_below(rows.size * 8):
            _head_rms_norm(rows, float(dt(eps)), prec == "mirror", out)
    return out.reshape(q.shape)
