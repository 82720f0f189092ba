"""Numba kernel of model.moe.expert_sum: the routed experts grouped by expert, then the shared expert.

Tokens are grouped by expert (ascending id, as the spec does), and each expert's three packed
matrices are read once per call by `linear.product_kernel` for all of that expert's tokens. The
FP8 activation quantization of the layer input (act_fp8, row-wise) is done once for every expert
instead of once per expert and matrix; SwiGLU is the spec's own `swiglu` (NumPy on [tokens, f],
small next to the products). Results are those of the spec: the same products (linear.py) and
the same roundings in the same order.

Many rows per expert (a Flash prefill: about 24 rows per routed expert at 1024 tokens; from
EXPERT_TASK_MIN multiply-adds per expert on average): each routed expert is one task of the BLAS pool
(kernels/blas.py `run_ordered`): its three products, SwiGLU and the activation quantization on
one thread, its products' panels one after another there, while the calling thread adds the
finished experts' outputs into the fp32 accumulator in ascending expert id (the spec's order; a
result waits for those before it). Before, each product spread its panels over the pool and the
calling thread did every expert's glue alone between them while the pool waited: three pool
calls per expert, 1,536 per 1024-token prefill of two layers. The bits are those of the experts
taken in turn (the same products on the same rows, added in the same order).

One token (decode) takes `_one_token`: the w1 and w3 of every selected expert in one call of
linear.matvec_many (one parallel region instead of one per matrix), SwiGLU on all the experts' rows
at once (element by element: the same values), their w2 in a second call, the shared expert's the
same way; then the same fp32 additions in ascending expert id, the shared expert last. A Flash
decode step made 21 product calls per layer here before, each a parallel region of about 1 ms.
"""
from __future__ import annotations

import numpy as np

from refimpl.kernels.blas import run_ordered
from refimpl.kernels.linear import _finish, _rows, checked_codes, matvec_many, product, spec_matmul
from refimpl.model.moe import ExpertWeights, MoEWeights, swiglu
from refimpl.numerics import act_fp8, bf16, work_dtype


EXPERT_TASK_MIN = 1 << 26    # multiply-adds per routed expert (on average) from which each expert is one pool task


def _linear(xq: np.ndarray, w, prec: str) -> np.ndarray:
    """quantized_linear on an already FP8-quantized float64 input xq [T, in] -> [T, out] (bf16 values in mirror)."""
    fmt, codes, scale, nan = checked_codes(w)
    n, k = w.shape
    if xq.shape[1] != k:
        raise ValueError(f"expert_sum: input has {xq.shape[1]} columns, the expert matrix {w.shape} needs {k}")
    if nan:                                                        # NaN weights: the spec's NaN outputs
        return bf16(spec_matmul(xq, w.dequantize(), prec), prec)
    return bf16(_finish(product(fmt, xq, codes, scale, n, 0, prec=prec, exact_blocks=prec == "mirror"),
                            (xq.shape[0],), prec),
                prec)


def _expert(xq: np.ndarray, w: ExpertWeights, prec: str, swiglu_limit: float, weights) -> np.ndarray:
    """model.moe.expert on the quantized input xq [T, c] float64 -> [T, c] (bf16 values in mirror)."""
    gate = _linear(xq, w.w1, prec)                                 # [T, f]  official: w1(x)
    up = _linear(xq, w.w3, prec)                                   # [T, f]  official: w3(x)
    h = swiglu(gate, up, prec, swiglu_limit=swiglu_limit, weights=weights)   # [T, f] fp32
    hq = act_fp8(bf16(h, prec), prec)                              # official: w2(x.to(bf16)), act_quant inside
    return _linear(_rows(hq, hq.shape[-1], "expert_sum"), w.w2, prec)


def expert_sum(flat: np.ndarray, ids: np.ndarray, weights: np.ndarray, w: MoEWeights, cfg, prec: str,
               revision: str) -> np.ndarray:
    """Kernel of model.moe.expert_sum. flat [T, c], ids / weights [T, a] -> y [T, c] fp32 (float64 in float64 mode)."""
    dt = work_dtype(prec)
    flat = np.asarray(flat)
    if flat.ndim != 2 or ids.shape != weights.shape or ids.shape[0] != flat.shape[0]:
        raise ValueError(f"expert_sum: flat {flat.shape}, ids {ids.shape} and weights {weights.shape} do not match")
    xq = _rows(act_fp8(flat, prec), flat.shape[1], "expert_sum")   # [T, c] float64, quantized once (row-wise)
    if flat.shape[0] == 1:
        y = _one_token(xq, ids[0], weights[0], w, cfg, prec, revision)
        if y is not None:
            return y
    y = np.zeros(flat.shape, dt)                                   # fp32 accumulator
    groups = [(e, *np.nonzero(ids == e)) for e in np.unique(ids)]  # ascending expert id (docs/architecture.md §19.31)
    if ids.size * 3 * flat.shape[1] * cfg.moe_inter_dim >= EXPERT_TASK_MIN * len(groups):
        def one(g):
            e, rows, slot = g
            return _expert(xq[rows], experts[e], prec, cfg.swiglu_limit, weights[rows, slot][:, None])

        def add(i, out):
            y[groups[i][1]] += out                                 # fp32 add of the bf16 output, ascending id
        experts = {e: w.experts[e] for e, _, _ in groups}          # read here: a lazy sequence stays on this thread
        run_ordered(one, groups, add)
    else:
        for e, rows, slot in groups:
            out = _expert(xq[rows], w.experts[e], prec, cfg.swiglu_limit, weights[rows, slot][:, None])
            y[rows] += out                                         # fp32 add of the bf16 output
    limit = cfg.swiglu_limit if revision == "current" else 0.0     # shared expert: clamp in the current revision
    return y + _expert(xq, w.shared, prec, limit, None)            # shared expert last


def _many(xq: np.ndarray, mats, prec: str, rows=None):
    """quantized_linear of row rows[i] of xq [M', K] float64 (FP8-quantized; rows None: row i) by matrix i of mats
    (one format and shape) -> [len(mats), n] (bf16 values in mirror), in one call of linear.matvec_many; None if a
    matrix holds a NaN code."""
    checked = [checked_codes(m) for m in mats]
    if any(nan for _, _, _, nan in checked) or len({f for f, _, _, _ in checked}) > 1:
        return None
    n, k = mats[0].shape
    if xq.shape[1] != k or any(m.shape != (n, k) for m in mats):
        raise ValueError(f"expert_sum: input has {xq.shape[1]} columns, the expert matrices "
                         f"{sorted({m.shape for m in mats})} need {k}")
    y = matvec_many(checked[0][0], xq, [c for _, c, _, _ in checked], [sc for _, _, sc, _ in checked],
                    np.zeros(len(mats), np.int64), n, rows)
    return bf16(_finish(y, (len(mats),), prec), prec)


def _experts_of_one_token(xq: np.ndarray, experts, prec: str, swiglu_limit: float, weights) -> np.ndarray | None:
    """_expert for one token xq [1, c] and several experts at once (w1 and w3 of all in one call, w2 of all in
    another): -> [len(experts), c], row i = _expert(xq, experts[i], ..., weights[i]); None where _many declines."""
    a = len(experts)
    gu = _many(xq, [m for e in experts for m in (e.w1, e.w3)], prec, np.zeros(2 * a, np.int64))   # [2a, f], one x
    if gu is None:
        return None
    h = swiglu(gu[0::2], gu[1::2], prec, swiglu_limit=swiglu_limit, weights=weights)   # [a, f] fp32, row by row
    hq = act_fp8(bf16(h, prec), prec)                              # row-wise, as for each expert alone
    return _many(_rows(hq, hq.shape[-1], "expert_sum"), [e.w2 for e in experts], prec)


def _one_token(xq: np.ndarray, ids: np.ndarray, weights: np.ndarray, w: MoEWeights, cfg, prec: str,
               revision: str) -> np.ndarray | None:
    """expert_sum for one token (decode): xq [1, c] quantized, ids / weights [a] -> y [1, c], the general path's
    bits (the same products, SwiGLU element by element, the fp32 adds in ascending expert id, then the shared
    expert); None (the general path) for no ids, repeated ids or NaN weight codes."""
    order = np.argsort(ids, kind="stable")
    e_ids = ids[order]
    if len(e_ids) == 0 or len(np.unique(e_ids)) != len(e_ids):
        return None
    routed = _experts_of_one_token(xq, [w.experts[e] for e in e_ids], prec, cfg.swiglu_limit,
                                   weights[order][:, None])
    limit = cfg.swiglu_limit if revision == "current" else 0.0     # shared expert: clamp in the current revision
    shared = _experts_of_one_token(xq, [w.shared], prec, limit, None)
    if routed is None or shared is None:
        return None
    y = np.zeros(xq.shape, work_dtype(prec))                       # fp32 accumulator
    for out in routed:                                             # ascending expert id
        y[0] += out
    return y + shared
