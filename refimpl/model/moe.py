"""Mixture of experts: sqrt-softplus router, SwiGLU experts, one shared expert (docs/architecture.md §11).

    z       = x @ gate.weightᵀ (fp32);   sc = sqrt(softplus(z))
    ids     = tid2eid[token]                 (hash layers: layer < n_hash_layers)
            = top_a(sc + bias)               (other layers: the bias only chooses)
    weights = sc[ids] / Σ sc[ids] · route_scale
    expert  = w2( bf16( weight · silu(min(w1 x, L)) · clamp(w3 x, -L, L) ) )   (weight applied BEFORE w2)
    y       = Σ_e ascending expert(x)  (fp32)  + shared(x);   out = bf16(y)
The shared expert has the clamp in the current official revision and none in the initial one.
Official: model.py Gate (M:L546-584), Expert (M:L587-606), MoE (M:L609-645).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Layer
from refimpl.model.linear import Fp4Matrix, Fp8Matrix, fp32_linear, quantized_linear
from refimpl.numerics import bf16, reduce_sum, silu, softplus, top_k, work_dtype
from refimpl.sites import record, replayed
from refimpl.ops import swappable


@dataclass(frozen=True)
class GateWeights:
    """Router of one MoE layer."""
    weight: np.ndarray            # [e, c]  bf16 (used as fp32)   layers.{i}.ffn.gate.weight
    bias: np.ndarray | None       # [e]     float32              layers.{i}.ffn.gate.bias     (score-routed layers)
    tid2eid: np.ndarray | None    # [v, a]  int64                layers.{i}.ffn.gate.tid2eid  (hash layers)


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: routed (FP4) or shared (FP8)."""
    w1: Fp4Matrix | Fp8Matrix     # [f, c]   gate projection    ffn.experts.{e}.w1 / ffn.shared_experts.w1
    w2: Fp4Matrix | Fp8Matrix     # [c, f]   down projection
    w3: Fp4Matrix | Fp8Matrix     # [f, c]   up projection


@dataclass(frozen=True)
class MoEWeights:
    """The feed-forward sublayer of one block (layers.{i}.ffn.*)."""
    gate: GateWeights
    experts: tuple                # n_routed_experts ExpertWeights (a lazy sequence is fine)
    shared: ExpertWeights


def route(x: np.ndarray, tokens: np.ndarray, start_pos: int, w: GateWeights, layer: Layer, ctx):
    """Choose experts and their weights. x [b,s,c], tokens [b,s] -> (weights [b,s,a], ids [b,s,a] int64).

    In score-routed layers the biased scores the top-a chooses on are the site `ffn.gate_scores`
    (a comparison reads the margin at the selection boundary from them); hash layers have none.
    A replay may force the ids (the weights are then the model's own scores at those ids,
    normalised) and the weights (sites.replayed).
    """
    cfg, prec, dt, i = ctx.cfg, ctx.prec, ctx.dtype, layer.id
    z = fp32_linear(x.astype(dt), w.weight, prec)                  # [b, s, e]  official: x.float() @ W.float()
    scores = np.sqrt(softplus(z, prec))                            # F.softplus one op; sqrt (IEEE, correctly rounded)
    if w.tid2eid is not None:                                      # hash layer: ids from the token id only
        ids = np.asarray(w.tid2eid[tokens], dtype=np.int64)        # [b, s, a]
    else:
        biased = scores + w.bias.astype(dt)                        # [b, s, e]
        # checked always: a NaN/Inf in the bias would silently change the choice
        record(ctx, f"layers.{i}.ffn.gate_scores", biased)
        ids = top_k(biased, cfg.n_activated_experts)               # bias chooses, never weighs
    ids = replayed(ctx, f"layers.{i}.ffn.expert_ids", ids, start_pos)
    weights = np.take_along_axis(scores, ids, axis=-1)             # [b, s, a]  unbiased scores
    weights = weights / reduce_sum(weights, -1, prec, keepdims=True)   # official: weights /= weights.sum(): exact sum
    weights = weights * dt(cfg.route_scale)
    return replayed(ctx, f"layers.{i}.ffn.expert_weights", weights, start_pos), ids


def swiglu(gate: np.ndarray, up: np.ndarray, prec: str, *, swiglu_limit: float,
           weights: np.ndarray | None = None) -> np.ndarray:
    """The fp32 hidden activation of an expert (M:L598-604). gate, up [T, f] (.float() of bf16), weights [T, 1] -> [T, f]."""
    dt = work_dtype(prec)
    gate, up = gate.astype(dt), up.astype(dt)
    if swiglu_limit > 0:                                           # asymmetric clamp (docs/architecture.md §19.18)
        up = np.clip(up, -swiglu_limit, swiglu_limit)
        gate = np.minimum(gate, dt(swiglu_limit))
    h = silu(gate, prec) * up                                      # [T, f] fp32; F.silu one op
    if weights is not None:
        h = weights.astype(dt) * h                                 # routing weight before w2 (docs/architecture.md §19.17)
    return h


def expert(x: np.ndarray, w: ExpertWeights, prec: str, *, swiglu_limit: float,
           weights: np.ndarray | None = None) -> np.ndarray:
    """SwiGLU expert. x [T, c] (bf16 values), weights [T, 1] or None -> [T, c] (bf16 values)."""
    gate = quantized_linear(x, w.w1, prec)                         # [T, f]  bf16 GEMM out
    up = quantized_linear(x, w.w3, prec)
    h = swiglu(gate, up, prec, swiglu_limit=swiglu_limit, weights=weights)   # [T, f] fp32
    return quantized_linear(bf16(h, prec), w.w2, prec)             # official: w2(x.to(bf16))


@swappable
def expert_sum(flat: np.ndarray, ids: np.ndarray, weights: np.ndarray, w: MoEWeights, cfg, prec: str,
               revision: str) -> np.ndarray:
    """The fp32 accumulator of the MoE output: routed experts in ascending id, then the shared expert.

    flat [T, c] (bf16 values), ids [T, a] int64, weights [T, a] -> y [T, c] (fp32; float64 in float64 mode).
    """
    dt = work_dtype(prec)
    y = np.zeros(flat.shape, dt)                                   # fp32 accumulator
    for e in np.unique(ids):                                       # ascending expert id (docs/architecture.md §19.31)
        rows, slot = np.nonzero(ids == e)
        out = expert(flat[rows], w.experts[e], prec, swiglu_limit=cfg.swiglu_limit,
                     weights=weights[rows, slot][:, None])
        y[rows] += out                                             # fp32 add of the bf16 output
    # the shared expert: clamp only in the current revision (docs/architecture.md §18)
    limit = cfg.swiglu_limit if revision == "current" else 0.0
    return y + expert(flat, w.shared, prec, swiglu_limit=limit)   # shared expert last


def moe(x: np.ndarray, tokens: np.ndarray, start_pos: int, w: MoEWeights, layer: Layer, ctx) -> np.ndarray:
    """The MoE sublayer. x [b,s,c], tokens [b,s] (positions start_pos..) -> [b,s,c]."""
    b, s, c = x.shape
    i = layer.id
    weights, ids = route(x, tokens, start_pos, w.gate, layer, ctx)   # [b, s, a]
    record(ctx, f"layers.{i}.ffn.expert_ids", ids.astype(np.int32))
    record(ctx, f"layers.{i}.ffn.expert_weights", weights)
    y = expert_sum(x.reshape(b * s, c), ids.reshape(b * s, -1), weights.reshape(b * s, -1), w, ctx.cfg, ctx.prec,
                   ctx.revision)                                   # [b*s, c] fp32
    out = bf16(y, ctx.prec).reshape(b, s, c)                       # official: y.type_as(x)
    record(ctx, f"layers.{i}.ffn.out", out)
    return out
