"""CUDA kernels of the lightning indexer's scoring and top-k (spec: refimpl/model/indexer.py).

`indexer` has the spec's signature and runs the spec's steps (the q projection, RoPE, Hadamard +
FP4 QDQ, the indexer's compressor, weights_proj: each a swappable operation, so the products run
on the device too), then scores and selects for every query of the call in two launches instead
of the spec's loop over queries:

    index_scores_kernel   one thread per (batch, query, entry): I = Σ_h w[h]·ReLU(q[h]·K_e) with the
                          spec's roundings (mirror: bf16(fp32(q·K)), bf16(fp32(relu·w)), the sum
                          over heads float64 rounded once, bf16); -inf for entries not yet visible
    topk_kernel           one thread per (batch, query, entry): its rank = the number of visible
                          entries that beat it (a higher score, or an equal one at a lower index;
                          NaN the largest, as numerics.top_k); rank < k writes the entry's id there

The rank rule is exactly numerics.top_k's order (descending, ties to the lower index), so the
selected sets and their order equal the spec's whenever the scores do. The top-k costs O(n) per
entry (O(s·n²) per call): fine at the lengths a check runs, slow for 1M-token contexts.
`index_scores` (one query, the spec's per-query signature) runs the same scoring kernel.
Modes: mirror as the spec; float64 plain float64; float32 the mirror arithmetic without the bf16
roundings (within float32 error of the spec's fp32 BLAS product).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODE_FLOAT64, MODE_MIRROR, bf16_if, device_function, mul, rnd
from refimpl.cuda.host import check_mode, launch_1d, to_device, to_host
from refimpl.model.compressor import compress
from refimpl.model.indexer import IndexerState
from refimpl.model.linear import bf16_linear, quantized_linear
from refimpl.model.rope import apply_rope
from refimpl.numerics import FP4_BLOCK, bf16, hadamard, qdq_fp4, work_dtype
from refimpl.oracle.replay import replay_of
from refimpl.oracle.trace import record

__all__ = ["indexer", "index_scores"]


@cuda.jit
def index_scores_kernel(q, keys, weights, start_pos, ratio, mode, out):
    """q [b,s,i,j], keys [b,n,j], weights [b,s,i] -> out [b,s,n]; entry e visible iff e < (start_pos+si+1)//ratio."""
    item = cuda.grid(1)
    b, s, n_heads, hd = q.shape
    n = keys.shape[1]
    if item >= b * s * n:
        return
    bi, si, e = item // (s * n), (item // n) % s, item % n
    if e >= (start_pos + si + 1) // ratio:
        out[bi, si, e] = -np.inf
        return
    fp32, mirror = mode != MODE_FLOAT64, mode == MODE_MIRROR
    total = 0.0
    for h in range(n_heads):
        dot = 0.0
        for jj in range(hd):
            dot += np.float64(q[bi, si, h, jj]) * np.float64(keys[bi, e, jj])
        qk = bf16_if(rnd(dot, fp32), mirror)                              # bf16 einsum output
        if qk < 0.0:
            qk = 0.0                                                       # relu_()
        total += bf16_if(mul(qk, np.float64(weights[bi, si, h]), fp32), mirror)   # * weights (bf16)
    out[bi, si, e] = bf16_if(rnd(total, fp32), mirror)                     # .sum(dim=2): exact, fp32, bf16


@device_function
def _beats(a, ia, b, ib):
    """True if score a at index ia comes before score b at index ib: larger, NaN largest, ties to the lower index."""
    a_nan, b_nan = a != a, b != b
    if a_nan or b_nan:
        if a_nan and b_nan:
            return ia < ib
        return a_nan
    return a > b or (a == b and ia < ib)


@cuda.jit
def topk_kernel(scores, start_pos, ratio, topk, out):
    """scores [b,s,n] -> out [b,s,width] (pre-filled with -1): the k = min(topk, visible) best visible entries, best first."""
    item = cuda.grid(1)
    b, s, n = scores.shape
    if item >= b * s * n:
        return
    bi, si, e = item // (s * n), (item // n) % s, item % n
    visible = min((start_pos + si + 1) // ratio, n)
    if e >= visible:
        return
    mine = scores[bi, si, e]
    rank = 0
    for other in range(visible):
        if other != e and _beats(scores[bi, si, other], other, mine, e):
            rank += 1
    if rank < min(topk, visible):
        out[bi, si, rank] = e


def _scores(q, keys, weights, start_pos: int, ratio: int, mode: int, dt):
    """Device scores [b, s, n] (a device array) of every query of a call."""
    b, s = q.shape[:2]
    out = cuda.device_array((b, s, keys.shape[1]), dt)
    launch_1d(index_scores_kernel, out.size, to_device(q.astype(dt, copy=False)), to_device(keys.astype(dt, copy=False)),
              to_device(weights.astype(dt, copy=False)), start_pos, ratio, mode, out)
    return out


def index_scores(q: np.ndarray, keys: np.ndarray, weights: np.ndarray, prec: str) -> np.ndarray:
    """Same signature and results as indexer.index_scores: q [i, j], keys [n, j], weights [i] -> [n]."""
    mode, dt = check_mode(prec)
    q, keys, weights = np.asarray(q), np.asarray(keys), np.asarray(weights)
    if q.ndim != 2 or keys.ndim != 2 or keys.shape[1] != q.shape[1] or weights.shape != q.shape[:1]:
        raise ValueError(f"index_scores: need q [i, j], keys [n, j], weights [i]; got {q.shape}, {keys.shape}, "
                         f"{weights.shape}")
    n = keys.shape[0]                       # every entry visible: start_pos + 1 = n with ratio 1
    d = _scores(q[None, None], keys[None], weights[None, None], max(n - 1, 0), 1, mode, dt)
    return to_host(d)[0, 0]


def indexer(x: np.ndarray, qr: np.ndarray, start_pos: int, state: IndexerState, w, table, cfg, layer: int,
            prec: str, revision: str, trace=None):
    """Same signature and results as indexer.indexer: x [b,s,c], qr [b,s,q] -> (topk [b,s,k] int64 -1 padded, state)."""
    mode, _ = check_mode(prec)
    dt = work_dtype(prec)
    b, s, _ = x.shape
    n_heads, hd, m = cfg.index_n_heads, cfg.index_head_dim, cfg.compress_ratio(layer)
    # the spec's steps (official: model.py Indexer, M:L380-433)
    q = quantized_linear(qr, w.wq_b, prec).reshape(b, s, n_heads, hd)   # [b, s, i, j]
    q = apply_rope(q, table, prec)
    q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=FP4_BLOCK)   # official: rotate_activation; fp4 sim
    new_keys, cstate = compress(x, start_pos, state.compressor, w.compressor, cfg, layer, prec,
                                ratio=m, head_dim=hd, rotate=True, revision=revision)
    keys = np.concatenate([state.keys, new_keys.astype(state.keys.dtype)], axis=1)  # [b, (start_pos+s)//m, j]
    weights = bf16_linear(x, w.weights_proj, prec)                      # [b, s, i]
    weights = bf16(weights * dt(hd ** -0.5 * n_heads ** -0.5), prec)    # official: * (softmax_scale * i^-0.5)

    width = min(cfg.index_topk, (start_pos + s) // m)                   # official: topk(min(topk, end_pos//m))
    replay = replay_of(trace)
    if replay is not None and layer in replay.topk and b != 1:
        raise ValueError("replay forces the choices of one sequence; run a batch of 1")
    d_scores = _scores(q, keys.astype(dt), weights, start_pos, m, mode, dt)   # [b, s, n] on the device
    d_topk = cuda.to_device(np.full((b, s, width), -1, dtype=np.int64))
    if width:
        launch_1d(topk_kernel, d_scores.size, d_scores, start_pos, m, cfg.index_topk, d_topk)
    scores, topk = to_host(d_scores), to_host(d_topk)
    if replay is not None:                                              # replay: the source's set, its order
        for bi in range(b):
            for si in range(s):
                forced = replay.entries(layer, start_pos + si)
                if forced is not None and (start_pos + si + 1) // m > 0:
                    topk[bi, si] = -1
                    topk[bi, si, :len(forced)] = forced
    t = start_pos + np.arange(s)                                        # query positions
    hidden = np.arange(keys.shape[1])[None, :] >= ((t + 1) // m)[:, None]   # [s, n] not visible: -inf
    record(trace, f"layers.{layer}.attn.indexer.scores", scores, hidden=hidden)
    record(trace, f"layers.{layer}.attn.indexer.topk", topk.astype(np.int32))
    return topk, IndexerState(keys=keys, compressor=cstate)


def PTX_SIGNATURES():
    """(kernel, [signatures]) for the PTX compile check (refimpl/cuda/ptx.py)."""
    from numba import types as T
    fp = (T.float32, T.float64)
    return [
        (index_scores_kernel, [(dt[:, :, :, :], dt[:, :, :], dt[:, :, :], T.int64, T.int64, T.int64, dt[:, :, :])
                               for dt in fp]),
        (topk_kernel, [(dt[:, :, :], T.int64, T.int64, T.int64, T.int64[:, :, :]) for dt in fp]),
    ]
