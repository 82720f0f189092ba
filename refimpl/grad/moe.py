"""MoE forward with its intermediates, and backward (refimpl/model/moe.py, docs/gradients.md).

Routing: z = x @ gateᵀ, sc = sqrt(softplus(z)), weights = route_scale · sc[ids] / Σ sc[ids]. The
ids (top-a of sc + bias, or the hash table) are held fixed, so the bias receives nothing and the
gradient reaches z only through the selected experts' scores:
    dsc[ids] = route_scale · (dweights − Σ dweights ⊙ weights / route_scale) / Σ sc[ids]
    dz = dsc · softplus'(z) / (2 sc),   softplus'(z) = sigmoid(z) (1 where the spec's softplus is z, z > 20)
Expert (SwiGLU with the clamp, limit L): gate' = min(gate, L), up' = clip(up, −L, L),
    h = weight · silu(gate') · up',  out = h @ w2ᵀ
    dgate = dh ⊙ up' ⊙ silu'(gate') where gate ≤ L, else 0;  dup = dh ⊙ silu(gate') where −L ≤ up ≤ L, else 0
(the clamp's subgradient: 1 inside the closed interval, 0 outside, as torch's clamp), and
dweight = Σ_f dh ⊙ silu(gate') ⊙ up'. The shared expert is the same with weight 1 (and no clamp in
the initial revision).
"""
from __future__ import annotations

import numpy as np

from refimpl.config import Layer
from refimpl.model.moe import ExpertWeights, MoEWeights, expert_sum, route
from refimpl.numerics import bf16, sigmoid, softplus
from refimpl.grad.linear import linear_backward


def moe_forward(x: np.ndarray, tokens: np.ndarray, w: MoEWeights, layer: Layer, ctx, probe):
    """The spec's moe for x [b,s,c] from position 0, its sites through probe -> (out [b,s,c], cache)."""
    b, s, c = x.shape
    i = layer.id
    weights, ids = route(x, tokens, 0, w.gate, layer, ctx)                     # [b, s, a]
    weights = probe(f"layers.{i}.ffn.expert_weights", weights)
    y = expert_sum(x.reshape(b * s, c), ids.reshape(b * s, -1), weights.reshape(b * s, -1), w, ctx.cfg, ctx.prec,
                   ctx.revision)
    out = probe(f"layers.{i}.ffn.out", bf16(y, ctx.prec).reshape(b, s, c))
    return out, {"x": x, "ids": ids, "weights": weights}


def swiglu_backward(dh: np.ndarray, gate: np.ndarray, up: np.ndarray, *, swiglu_limit: float):
    """Backward of silu(min(gate, L)) · clip(up, -L, L). dh, gate, up [T, f] -> (dgate, dup, the product [T, f])."""
    if swiglu_limit > 0:
        gate_in, up_in = gate <= swiglu_limit, (up >= -swiglu_limit) & (up <= swiglu_limit)
        gate, up = np.minimum(gate, swiglu_limit), np.clip(up, -swiglu_limit, swiglu_limit)
    else:
        gate_in = up_in = np.ones(gate.shape, bool)
    sg = sigmoid(gate, "float64")
    silu = gate * sg
    dgate = np.where(gate_in, dh * up * sg * (1 + gate * (1 - sg)), 0.0)
    dup = np.where(up_in, dh * silu, 0.0)
    return dgate, dup, silu * up


def expert_backward(dy: np.ndarray, x: np.ndarray, w: ExpertWeights, *, swiglu_limit: float,
                    weights: np.ndarray | None = None):
    """Backward of expert(x, w, weights=). dy, x [T, c], weights [T, 1] or None
    -> (dx [T, c], dweights [T] or None, {"w1", "w2", "w3"} gradients)."""
    w1, w2, w3 = w.w1.dequantize(), w.w2.dequantize(), w.w3.dequantize()
    gate, up = x @ w1.T, x @ w3.T                                              # [T, f]
    dh = dy @ w2                                                               # [T, f]
    _, _, act = swiglu_backward(dh, gate, up, swiglu_limit=swiglu_limit)
    hidden = act if weights is None else weights * act
    dweights = None if weights is None else np.sum(dh * act, axis=-1)
    dact = dh if weights is None else dh * weights
    dgate, dup, _ = swiglu_backward(dact, gate, up, swiglu_limit=swiglu_limit)
    dx1, dw1 = linear_backward(dgate, x, w1)
    dx3, dw3 = linear_backward(dup, x, w3)
    return dx1 + dx3, dweights, {"w1": dw1, "w2": dy.T @ hidden, "w3": dw3}


def route_backward(dweights: np.ndarray, x: np.ndarray, ids: np.ndarray, gate_weight: np.ndarray, cfg):
    """Backward of route with the ids held fixed. dweights, ids [b,s,a], x [b,s,c] -> (dx [b,s,c], dgate_weight [e, c])."""
    z = x.astype(np.float64) @ gate_weight.T                                  # [b, s, e]
    sc = np.sqrt(softplus(z, "float64"))
    picked = np.take_along_axis(sc, ids, axis=-1)                             # [b, s, a]
    total = picked.sum(axis=-1, keepdims=True)
    dpicked = cfg.route_scale * (dweights - np.sum(dweights * picked, axis=-1, keepdims=True) / total) / total
    dsc = np.zeros_like(sc)
    np.put_along_axis(dsc, ids, dpicked, axis=-1)                             # the a ids of a row are distinct
    dz = dsc * np.where(z > 20, 1.0, sigmoid(z, "float64")) / (2 * sc)
    return linear_backward(dz, x, gate_weight)


def moe_backward(dout: np.ndarray, cache: dict, w: MoEWeights, layer: Layer, cfg, revision: str, sites: dict):
    """Backward of moe_forward. dout [b,s,c] -> (dx [b,s,c], parameter gradients by short name).

    sites receives grad.layers.{i}.ffn.expert_weights.
    """
    x, ids, weights = cache["x"], cache["ids"], cache["weights"]
    b, s, c = x.shape
    flat, dy = x.reshape(b * s, c).astype(np.float64), dout.reshape(b * s, c)
    flat_ids, flat_w = ids.reshape(b * s, -1), weights.reshape(b * s, -1)
    dflat, dweights, grads = np.zeros_like(flat), np.zeros(flat_w.shape), {}
    for e in np.unique(flat_ids):
        rows, slot = np.nonzero(flat_ids == e)
        dx, dwe, g = expert_backward(dy[rows], flat[rows], w.experts[e], swiglu_limit=cfg.swiglu_limit,
                                     weights=flat_w[rows, slot][:, None])
        dflat[rows] += dx
        dweights[rows, slot] = dwe
        grads.update({f"experts.{e}.{k}": v for k, v in g.items()})
    limit = cfg.swiglu_limit if revision == "current" else 0.0
    dx, _, g = expert_backward(dy, flat, w.shared, swiglu_limit=limit)
    grads.update({f"shared_experts.{k}": v for k, v in g.items()})
    dweights = dweights.reshape(b, s, -1)
    sites[f"grad.layers.{layer.id}.ffn.expert_weights"] = dweights
    dx_route, grads["gate"] = route_backward(dweights, x, ids, w.gate.weight, cfg)
    return (dflat + dx).reshape(b, s, c) + dx_route, grads
