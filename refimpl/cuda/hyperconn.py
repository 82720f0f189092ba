"""CUDA kernel of the mHC split + Sinkhorn (spec: refimpl/model/hyperconn.py split_sinkhorn).

One thread per row (token) of mixes; the n x n comb matrix is normalised in a local array of
MAX_STREAMS² values (n <= 16; Flash has n = 4); a larger n runs the spec function instead. In mirror and float32 every op is the
fp32 op of the spec (mul32 / add32 / div32, never fused) and every sum (row and column sums over
n values) is taken in float64 and rounded once; exp and sigmoid are float64, rounded once.
Differences from the spec (which evaluates these in NumPy float64): a float64 sum in another
order or a libdevice exp one float64 ulp off can change an fp32 result only where the exact
value lies within ~1e-16 relative of an fp32 rounding boundary. float64 mode: plain float64.
Official: kernel.py hc_split_sinkhorn_kernel (K:L371-438).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_FLOAT64, add, device_function, div, ex, mul, rnd, sigmoid, sub
from refimpl.cuda.host import check_mode, launch_1d, to_device, to_host
from refimpl.model import hyperconn as spec_hyperconn

__all__ = ["split_sinkhorn"]

MAX_STREAMS = 16                        # n of the local n x n array (hc_mult may be up to 64: the spec runs those)
MAX_COMB = 256                          # MAX_STREAMS², a literal: a local array's size must be a compile-time constant


@cuda.jit
def split_sinkhorn_kernel(mixes, scale, base, n, iters, eps, mode, pre, post, comb):
    """mixes [R, (2+n)*n], scale [3], base [(2+n)*n] -> pre [R, n], post [R, n], comb [R, n*n] (row j, column k)."""
    r = cuda.grid(1)
    if r >= mixes.shape[0]:
        return
    fp32 = mode != MODE_FLOAT64
    eps = rnd(eps, fp32)                                                   # dt(eps)
    s0, s1, s2 = np.float64(scale[0]), np.float64(scale[1]), np.float64(scale[2])
    for j in range(n):
        # pre = sigmoid(m * scale[0] + base) + eps; post = 2 * sigmoid(m * scale[1] + base)   (K:L386-395)
        z = add(mul(np.float64(mixes[r, j]), s0, fp32), np.float64(base[j]), fp32)
        pre[r, j] = add(sigmoid(z, fp32), eps, fp32)
        z = add(mul(np.float64(mixes[r, n + j]), s1, fp32), np.float64(base[n + j]), fp32)
        post[r, j] = mul(2.0, sigmoid(z, fp32), fp32)
    c = cuda.local.array(MAX_COMB, np.float64)          # comb[j, k] = c[j * n + k]
    # comb = softmax(logits, -1) + eps, written out: exp(l - max), / row sum, + eps     (K:L397-407)
    for j in range(n):
        mx = -np.inf
        for k in range(n):
            col = 2 * n + j * n + k
            logit = add(mul(np.float64(mixes[r, col]), s2, fp32), np.float64(base[col]), fp32)
            c[j * n + k] = logit
            if logit > mx:
                mx = logit
        total = 0.0
        for k in range(n):
            e = ex(sub(c[j * n + k], mx, fp32), fp32)
            c[j * n + k] = e
            total += e
        total = rnd(total, fp32)                                           # reduce_sum: exact, one rounding
        for k in range(n):
            c[j * n + k] = add(div(c[j * n + k], total, fp32), eps, fp32)
    _normalize(c, n, eps, fp32, 1, n)               # comb / (comb.sum(-2) + eps)
    for _ in range(iters - 1):
        _normalize(c, n, eps, fp32, n, 1)               # comb / (comb.sum(-1) + eps)
        _normalize(c, n, eps, fp32, 1, n)               # comb / (comb.sum(-2) + eps)
    for i in range(n * n):
        comb[r, i] = c[i]


@device_function
def _normalize(c, n, eps, fp32, line, step):
    """Line i (elements c[i*line + k*step], k < n) /= its sum + eps: the rows (line n, step 1) or the
    columns (line 1, step n) of the n x n matrix c."""
    for i in range(n):
        total = 0.0
        for k in range(n):
            total += c[i * line + k * step]
        den = add(rnd(total, fp32), eps, fp32)
        for k in range(n):
            c[i * line + k * step] = div(c[i * line + k * step], den, fp32)


def split_sinkhorn(mixes: np.ndarray, scale: np.ndarray, base: np.ndarray, *, n: int, iters: int,
                   eps: float, prec: str):
    """Same signature and results as hyperconn.split_sinkhorn: mixes [.., (2+n)*n] -> pre [.., n], post [.., n], comb [.., n, n]."""
    mode, dt = check_mode(prec)
    mixes = np.asarray(mixes)
    x = (2 + n) * n
    if mixes.shape[-1:] != (x,) or np.shape(base) != (x,) or np.shape(scale) != (3,):
        raise ValueError(f"split_sinkhorn: mixes [.., {x}], base [{x}] and scale [3] expected for n = {n}, got "
                         f"{mixes.shape}, {np.shape(base)}, {np.shape(scale)}")
    if iters < 1:
        raise ValueError(f"split_sinkhorn: iters must be >= 1, got {iters}")
    if n > MAX_STREAMS:
        return spec_hyperconn.split_sinkhorn.spec(mixes, scale, base, n=n, iters=iters, eps=eps, prec=prec)
    lead = mixes.shape[:-1]
    rows = mixes.reshape(-1, x).astype(dt)
    R = rows.shape[0]
    pre, post, comb = (cuda.device_array((R, w), dt) for w in (n, n, n * n))
    launch_1d(split_sinkhorn_kernel, R, to_device(rows), to_device(np.asarray(scale).astype(dt)),
              to_device(np.asarray(base).astype(dt)), n, iters, float(eps), mode, pre, post, comb)
    return (to_host(pre).reshape(*lead, n), to_host(post).reshape(*lead, n),
            to_host(comb).reshape(*lead, n, n))


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py): float32 and float64 arrays."""
    from numba import types as T
    sigs = [(dt[:, :], dt[:], dt[:], T.int64, T.int64, T.float64, T.int64, dt[:, :], dt[:, :], dt[:, :])
            for dt in (T.float32, T.float64)]
    return [(split_sinkhorn_kernel, sigs)]
