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

from refimpl.model.linear import Fp4Matrix, Fp8Matrix, fp32_linear, quantized_linear
from refimpl.numerics import bf16, reduce_sum, silu, softplus, top_k, work_dtype
from refimpl.oracle.replay import replay_of
from refimpl.oracle.trace import record
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


@swappable
def route(x: np.ndarray, tokens: np.ndarray, w: GateWeights, cfg, prec: str, layer: int | None = None,
          trace=None, batch: int = 1, forced: np.ndarray | None = None):
    """Choose experts and their weights. x [T, c], tokens [T] -> (weights [T, a], ids [T, a] int64).

    In score-routed layers the biased scores the top-k chooses on are the site `ffn.gate_scores`
    (a comparison reads the margin at the selection boundary from them); hash layers have none.
    batch: the b of the rows T = b*s, to record the site as [b, s, e].
    forced [T, a]: use these expert ids instead of choosing (replay); the weights are still the
    model's own scores at those ids, normalised, and gate_scores is still recorded.
    """
    dt = work_dtype(prec)
    z = fp32_linear(x.astype(dt), w.weight, prec)                  # [T, e]  official: x.float() @ W.float()
    scores = np.sqrt(softplus(z, prec))                            # F.softplus one op; sqrt (IEEE, correctly rounded)
    if w.tid2eid is not None:                                      # hash layer: ids from the token id only
        ids = np.asarray(w.tid2eid[tokens], dtype=np.int64)        # [T, a]
    else:
        biased = scores + w.bias.astype(dt)                        # [T, e]
        # checked always: a NaN/Inf in the bias would silently change the choice
        record(trace, f"layers.{layer}.ffn.gate_scores", biased.reshape(batch, -1, biased.shape[-1]))
        ids = top_k(biased, cfg.n_activated_experts)               # bias chooses, never weighs
    if forced is not None:                                         # replay: the choice comes from elsewhere
        ids = np.asarray(forced, dtype=np.int64)
    weights = np.take_along_axis(scores, ids, axis=-1)             # [T, a]  unbiased scores
    weights = weights / reduce_sum(weights, -1, prec, keepdims=True)   # official: weights /= weights.sum(): exact sum
    return weights * dt(cfg.route_scale), ids


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


@swappable
def moe(x: np.ndarray, tokens: np.ndarray, w: MoEWeights, cfg, layer: int, prec: str, revision: str,
        trace=None, *, start_pos: int = 0) -> np.ndarray:
    """The MoE sublayer. x [b,s,c], tokens [b,s] (positions start_pos..) -> [b,s,c]."""
    dt = work_dtype(prec)
    b, s, c = x.shape
    flat = x.reshape(b * s, c)
    replay = replay_of(trace)                                      # forced routing (oracle/replay.py)
    forced = None if replay is None else replay.route(layer, start_pos, s)   # (ids, weights) or None
    if forced and b != 1:
        raise ValueError("replay forces the choices of one sequence; run a batch of 1")
    weights, ids = route(flat, tokens.reshape(-1), w.gate, cfg, prec, layer, trace, b,
                         forced=forced[0] if forced else None)   # [b*s, a]
    if forced and forced[1] is not None:                           # replay the weights too
        weights = forced[1].astype(dt)
    record(trace, f"layers.{layer}.ffn.expert_ids", ids.reshape(b, s, -1).astype(np.int32))
    record(trace, f"layers.{layer}.ffn.expert_weights", weights.reshape(b, s, -1))
    y = expert_sum(flat, ids, weights, w, cfg, prec, revision)    # [b*s, c] fp32
    out = bf16(y, prec).reshape(b, s, c)                           # official: y.type_as(x)
    record(trace, f"layers.{layer}.ffn.out", out)
    return out
