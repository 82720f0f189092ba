"""Numba kernels of the mHC mix split with Sinkhorn normalisation and of hc_post (spec: refimpl/model/hyperconn.py).

    split_sinkhorn(mixes, scale, base, *, n, iters, eps, prec)
        mixes [.., (2+n)·n] -> pre [.., n], post [.., n], comb [.., n, n]      (K:L386-425)
    hc_post(x, residual, post, comb, ctx)
        x [b,s,c], residual [b,s,n,c] -> [b,s,n,c]: stream k = post[k]·x + Σ_j comb[j,k]·residual[j]   (M:L683-687)

hc_post: one position per task, no [n, n, c] temporary (the spec's broadcast makes one); the spec's
operations in its order: each product comb[j,k]·h[j] one op in the working dtype, the sum over j
in ascending order starting from +0 (NumPy's reduction over that axis: in mirror the float64 sum
of the fp32 products, rounded once; otherwise in the working dtype), post[k]·x one op, the add,
then bf16 in mirror. Bit-identical to the spec in all three modes.

split_sinkhorn: one row of mixes per task (prange). mirror: every fp32 op of the official kernel is one fp32 op
here (products, sums with base and eps, divisions); sigmoid and exp are computed in float64 and
rounded once to fp32 (numerics.sigmoid / exp), and each row or column sum of comb is a float64
sum in index order (what NumPy does for these short axes), rounded once. float64: the same steps
in float64; float32: in float64, rounded once at the end (the spec rounds each step to fp32; the
two agree within float32 rounding of the Sinkhorn iterations, see the tests).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from refimpl.kernels.rounding import bf16_f32, rounded_once_f32
from refimpl.kernels.threads import serial_below
from refimpl.model.hyperconn import hc_post as _hc_post_op
from refimpl.numerics import check_precision, work_dtype

spec_hc_post = _hc_post_op.spec


@numba.njit(cache=True, inline="always")
def _sigmoid64(v):
    """numerics.sigmoid's formula in float64: 1/(1+e) or e/(1+e), e = exp(-|v|)."""
    e = math.exp(-abs(v))
    return 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)


@numba.njit(cache=True)
def _mirror_normalize_rows(c, eps32):
    """c[j, :] /= fp32(Σ_k c[j, k]) + eps for every row j (the sum exact, rounded once; fp32 ops)."""
    n_rows, n = c.shape
    for j in range(n_rows):
        tot = 0.0
        for k in range(n):
            tot += np.float64(c[j, k])
        den = rounded_once_f32(tot) + eps32
        for k in range(n):
            c[j, k] = np.float32(c[j, k] / den)


@numba.njit(cache=True)
def _exact_normalize_rows(c, eps):
    """c[j, :] /= Σ_k c[j, k] + eps for every row j, in float64."""
    n_rows, n = c.shape
    for j in range(n_rows):
        tot = 0.0
        for k in range(n):
            tot += c[j, k]
        for k in range(n):
            c[j, k] = c[j, k] / (tot + eps)


@numba.njit(cache=True)
def _mirror_row(mx, scale, base, n, iters, eps, pre, post, comb, r):
    """Row r in mirror rounding (fp32 ops, float64 sigmoid/exp/sums rounded once)."""
    eps32 = np.float32(eps)
    for j in range(n):
        v = np.float32(np.float32(np.float32(mx[r, j]) * scale[0]) + base[j])
        pre[r, j] = rounded_once_f32(_sigmoid64(np.float64(v))) + eps32
        v = np.float32(np.float32(np.float32(mx[r, n + j]) * scale[1]) + base[n + j])
        post[r, j] = np.float32(2.0) * rounded_once_f32(_sigmoid64(np.float64(v)))
    c = np.empty((n, n), np.float32)
    for j in range(n):
        for k in range(n):
            c[j, k] = np.float32(np.float32(np.float32(mx[r, 2 * n + j * n + k]) * scale[2]) + base[2 * n + j * n + k])
    for j in range(n):                                   # comb.softmax(-1) + eps: T.exp, T.reduce_sum, divide
        m = c[j, 0]
        for k in range(1, n):
            if c[j, k] > m:
                m = c[j, k]
        tot = 0.0
        for k in range(n):
            c[j, k] = rounded_once_f32(math.exp(np.float64(np.float32(c[j, k] - m))))
            tot += np.float64(c[j, k])
        tot32 = rounded_once_f32(tot)
        for k in range(n):
            c[j, k] = np.float32(c[j, k] / tot32) + eps32
    for it in range(iters):
        if it > 0:
            _mirror_normalize_rows(c, eps32)             # row step (every iteration after the first)
        _mirror_normalize_rows(c.T, eps32)               # column step: the rows of the transpose
    for j in range(n):
        for k in range(n):
            comb[r, j, k] = c[j, k]


@numba.njit(cache=True)
def _exact_row(mx, scale, base, n, iters, eps, pre, post, comb, r):
    """Row r in float64 (outputs in their own dtype)."""
    for j in range(n):
        pre[r, j] = _sigmoid64(np.float64(mx[r, j]) * scale[0] + base[j]) + eps
        post[r, j] = 2.0 * _sigmoid64(np.float64(mx[r, n + j]) * scale[1] + base[n + j])
    c = np.empty((n, n), np.float64)
    for j in range(n):
        for k in range(n):
            c[j, k] = np.float64(mx[r, 2 * n + j * n + k]) * scale[2] + base[2 * n + j * n + k]
    for j in range(n):
        m = c[j, 0]
        for k in range(1, n):
            if c[j, k] > m:
                m = c[j, k]
        tot = 0.0
        for k in range(n):
            c[j, k] = math.exp(c[j, k] - m)
            tot += c[j, k]
        for k in range(n):
            c[j, k] = c[j, k] / tot + eps
    for it in range(iters):
        if it > 0:
            _exact_normalize_rows(c, eps)                # row step
        _exact_normalize_rows(c.T, eps)                  # column step
    for j in range(n):
        for k in range(n):
            comb[r, j, k] = c[j, k]


@numba.njit(cache=True, parallel=True)
def _split_sinkhorn(mx, scale, base, n, iters, eps, mirror, pre, post, comb):
    for r in numba.prange(mx.shape[0]):
        if mirror:
            _mirror_row(mx, scale, base, n, iters, eps, pre, post, comb, r)
        else:
            _exact_row(mx, scale, base, n, iters, eps, pre, post, comb, r)


def split_sinkhorn(mixes, scale, base, *, n, iters, eps, prec):
    """Kernel of model.hyperconn.split_sinkhorn (same signature and results; see the module docstring)."""
    check_precision(prec)
    dt = work_dtype(prec)
    mixes = np.asarray(mixes)
    x = (2 + n) * n
    if mixes.shape[-1:] != (x,) or np.shape(base) != (x,) or np.shape(scale) != (3,):
        raise ValueError(f"split_sinkhorn: need mixes [.., {x}], base [{x}], scale [3] for n={n}; got "
                         f"{mixes.shape}, {np.shape(base)}, {np.shape(scale)}")
    if iters < 1:
        raise ValueError(f"split_sinkhorn: iters must be >= 1, got {iters}")
    lead = mixes.shape[:-1]
    mx = np.require(mixes.reshape(-1, x).astype(dt, copy=False), None, ["C", "W"])
    inside = np.float32 if prec == "mirror" else np.float64
    sc, bs = np.asarray(scale).astype(dt).astype(inside), np.asarray(base).astype(dt).astype(inside)
    rows = mx.shape[0]
    pre, post = np.empty((rows, n), dt), np.empty((rows, n), dt)
    comb = np.empty((rows, n, n), dt)
    eps_in = float(dt(eps))                              # spec: eps = dt(eps)
    if rows:
        with serial_below(rows * n * n * (2 * iters + 4) * 8):
            _split_sinkhorn(mx, sc, bs, n, int(iters), eps_in, prec == "mirror", pre, post, comb)
    return pre.reshape(*lead, n), post.reshape(*lead, n), comb.reshape(*lead, n, n)


# ------------------------------------------------------------------------------------------------ hc_post

@numba.njit(cache=True, parallel=True)
def _hc_post(x, res, post, comb, mirror, zero, out):
    """out[r, k, c] = post[r, k]·x[r, c] + Σ_j comb[r, j, k]·res[r, j, c] (module docstring), r = a position.
    The sums run j-outer over a row of accumulators, so the loops over c vectorize (each sum's order is j's)."""
    rows, n, c = res.shape
    for r in numba.prange(rows):
        acc = np.empty(c)                                              # mirror: float64 sums
        m = np.empty(c, res.dtype)                                     # otherwise: the working dtype
        for k in range(n):
            pk = post[r, k]
            if mirror:
                acc[:] = 0.0                                           # NumPy's sum starts at +0 (never -0)
                for j in range(n):
                    cj = comb[r, j, k]
                    for e in range(c):
                        acc[e] += np.float64(cj * res[r, j, e])        # fp32 products, exact float64 sum
                for e in range(c):
                    out[r, k, e] = bf16_f32(pk * x[r, e] + rounded_once_f32(acc[e]))   # fp32 ops, then bf16
            else:
                m[:] = zero
                for j in range(n):
                    cj = comb[r, j, k]
                    for e in range(c):
                        m[e] += cj * res[r, j, e]                      # the working dtype throughout
                for e in range(c):
                    out[r, k, e] = pk * x[r, e] + m[e]


def hc_post(x, residual, post, comb, ctx):
    """Kernel of model.hyperconn.hc_post (same signature and results). x [b,s,c], residual [b,s,n,c] -> [b,s,n,c].

    See the module docstring for the order of operations. Inputs whose dtypes differ from the working
    dtype (NumPy would promote them) take the spec.
    """
    prec, dt = ctx.prec, ctx.dtype
    x, residual, post, comb = (np.asarray(a) for a in (x, residual, post, comb))
    if residual.ndim != 4 or x.shape != residual.shape[:2] + residual.shape[3:] \
            or post.shape != residual.shape[:3] or comb.shape != residual.shape[:3] + residual.shape[2:3]:
        raise ValueError(f"hc_post: need x [b,s,c], residual [b,s,n,c], post [b,s,n], comb [b,s,n,n]; got "
                         f"{x.shape}, {residual.shape}, {post.shape}, {comb.shape}")
    if post.dtype != dt or comb.dtype != dt or x.dtype not in (np.float32, dt) \
            or residual.dtype not in (np.float32, dt):
        return spec_hc_post(x, residual, post, comb, ctx)
    b, s, n, c = residual.shape
    rows = b * s
    flat = [np.ascontiguousarray(a.astype(dt, copy=False).reshape(rows, *a.shape[2:]))
            for a in (x, residual, post, comb)]
    out = np.empty((rows, n, c), dt)
    if rows:
        # work counted as outputs, not multiply-adds: a parallel region costs more than a short call takes
        # (16 positions x 4 x 4096: 0.65 ms on one thread, 2.6 ms on two, measured at load 2.7)
        with serial_below(rows * n * c):
            _hc_post(*flat, prec == "mirror", dt(0), out)
    return out.reshape(b, s, n, c)
