"""Numba kernel of the interleaved rotary embedding (spec: refimpl/model/rope.py apply_rope).

    apply_rope(x, table, prec, *, inverse=False)    x [b, s, (heads,) d], table [s, p/2] -> same shape

Pair i of the last p dims, (a, b) = (x[2i], x[2i+1]), becomes (a·cos - b·sin, a·sin + b·cos)
(sin negated for the inverse). mirror: the complex product in float64 (each a·cos exact, one
rounding in the difference, no fused multiply-add), rounded once to fp32, then to bf16; float64
and float32: the same separate ops in the working dtype. The same IEEE operations as the spec's
NumPy ufuncs, so the results are bit-identical in every mode. One (batch, position) per task.
"""
from __future__ import annotations

import numba
import numpy as np

from refimpl.kernels.rounding import bf16_f32, rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.numerics import check_precision, work_dtype


@numba.njit(cache=True, parallel=True)
def _apply_rope(x, cos, sin, sign, mirror, out):
    """x, out [b, s, heads, d] (out may be x); cos, sin [s, half] in the inside dtype."""
    b, s, h, d = x.shape
    half = cos.shape[1]
    first = d - 2 * half
    for task in numba.prange(b * s):
        bi, si = task // s, task % s
        for hh in range(h):
            for i in range(half):
                c = cos[si, i]
                sn = sin[si, i] * sign
                a = x[bi, si, hh, first + 2 * i]
                bb = x[bi, si, hh, first + 2 * i + 1]
                if mirror:
                    a64, b64 = np.float64(a), np.float64(bb)
                    re = a64 * c - b64 * sn
                    im = a64 * sn + b64 * c
                    out[bi, si, hh, first + 2 * i] = bf16_f32(rounded_once_f32(re))
                    out[bi, si, hh, first + 2 * i + 1] = bf16_f32(rounded_once_f32(im))
                else:
                    out[bi, si, hh, first + 2 * i] = a * c - bb * sn
                    out[bi, si, hh, first + 2 * i + 1] = a * sn + bb * c


def apply_rope(x, table, prec, *, inverse=False):
    """Kernel of model.rope.apply_rope (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    x = np.asarray(x)
    half = table.cos.shape[-1]
    if x.ndim not in (3, 4) or table.cos.shape != table.sin.shape or table.cos.ndim != 2 \
            or table.cos.shape[0] != x.shape[1] or 2 * half > x.shape[-1]:
        raise ValueError(f"apply_rope: need x [b, s, (heads,) d] and a table [s, p/2] with p <= d; got x "
                         f"{x.shape}, table {table.cos.shape}")
    inside = np.float64 if prec == "mirror" else dt
    out = np.array(x, dtype=dt, copy=True, order="C")            # the spec: x.astype(dt), non-rope dims kept
    x4 = out if out.ndim == 4 else out[:, :, None, :]           # [b, s, heads, d] view of out
    if x4.size:                                                  # in place: each pair is read, then written
        with serial_below(x4.size * 4):
            _apply_rope(x4, table.cos.astype(inside), table.sin.astype(inside), inside(-1.0 if inverse else 1.0),
                        prec == "mirror", x4)
    return out
