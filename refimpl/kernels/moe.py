"""Numba kernel of model.moe.expert_sum: the routed experts grouped by expert, then the shared expert.

Tokens are grouped by expert (ascending id, as the spec does), and each expert's three packed
matrices are read once per call by `linear.product_kernel` for all of that expert's tokens. The
FP8 activation quantization of the layer input (act_fp8, row-wise) is done once for every expert
instead of once per expert and matrix; SwiGLU is the spec's own `swiglu` (NumPy on [tokens, f],
small next to the products). Results are those of the spec: the same products (linear.py) and
the same roundings in the same order.
"""
from __future__ import annotations

import numpy as np

from refimpl.kernels.linear import _finish, _rows, checked_codes, product, spec_matmul
from refimpl.model.moe import ExpertWeights, MoEWeights, swiglu
from refimpl.numerics import act_fp8, bf16, work_dtype


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
    y = np.zeros(flat.shape, dt)                                   # fp32 accumulator
    for e in np.unique(ids):                                       # ascending expert id (docs/architecture.md §19.31)
        rows, slot = np.nonzero(ids == e)
        out = _expert(xq[rows], w.experts[e], prec, cfg.swiglu_limit, weights[rows, slot][:, None])
        y[rows] += out                                             # fp32 add of the bf16 output
    limit = cfg.swiglu_limit if revision == "current" else 0.0     # shared expert: clamp in the current revision
    return y + _expert(xq, w.shared, prec, limit, None)            # shared expert last
