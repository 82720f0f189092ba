"""Finite differences: the gradients checked against central differences of the float64 forward.

For a parameter (or a site) X, a direction U and a step ε:
    fd = (L(X + εU) − L(X − εU)) / 2ε        analytic = Σ grad(X) ⊙ U
agree within |fd − analytic| ≤ RTOL · max(|fd|, |analytic|) + ATOL (float64; the central difference's
error is O(ε²) from the third derivative plus the loss's own rounding divided by ε: a loss of about
10 computed through thousands of operations carries about 1e-14 of it, 1e-9 after the division,
hence ATOL 1e-8, which matters only for directional derivatives near 0).

A step may cross a point where the forward is not differentiable: a router or indexer top-k
changing its choice, or an expert's gate or up value crossing the SwiGLU clamp. `choices` lists
every such discrete fact of a forward; `directional` refuses a step whose two forwards differ
from the base in any of them (`NearTie`), so a test draws another direction instead of comparing
a finite difference taken across a jump.
"""
from __future__ import annotations

import numpy as np

from refimpl.grad.model import Tape, forward
from refimpl.grad.params import Params, block_prefix, expert_weights

RTOL = 1e-6
ATOL = 1e-8
STEP = 1e-5


class NearTie(Exception):
    """A finite-difference step changed a discrete choice of the forward (a selection or the clamp)."""


def choices(tape: Tape, P: Params, ctx) -> dict[str, np.ndarray]:
    """Every discrete fact of a forward: the expert ids, the index sets, and which SwiGLU inputs the clamp holds."""
    cfg, out = ctx.cfg, {}
    for n, cache in enumerate(tape.blocks):
        layer = n if n < cfg.n_layers else cfg.mtp_layer
        out[f"{layer}.ids"] = cache["ffn"]["ids"]
        out[f"{layer}.topk"] = np.asarray(cache["attn"]["topk_idxs"])
        x = cache["ffn"]["x"].reshape(-1, cfg.dim).astype(np.float64)
        ids = cache["ffn"]["ids"].reshape(x.shape[0], -1)
        p = block_prefix(cfg, layer)
        used = [(f"experts.{e}", ids == e) for e in np.unique(ids)] + [("shared_experts", None)]
        limit = cfg.swiglu_limit
        for name, rows in used:
            w = expert_weights(P, f"{p}ffn.{name}.")
            xr = x if rows is None else x[rows.any(axis=-1)]
            gate, up = xr @ w.w1.dequantize().T, xr @ w.w3.dequantize().T
            out[f"{layer}.{name}.clamp"] = np.stack([gate > limit, up > limit, up < -limit])
        z = x @ P[f"{p}ffn.gate.weight"].T
        out[f"{layer}.softplus"] = z > 20
    return out


def directional(loss, P: Params, ids: np.ndarray, ctx, *, param: str | None = None, site: str | None = None,
                direction: np.ndarray, step: float = STEP, base: dict | None = None) -> float:
    """The central difference of loss(tape) along `direction` at parameter `param` or site `site`.

    loss: Tape -> float. base: choices() of the unperturbed forward; NearTie if a step changes one.
    """
    values = []
    for sign in (1.0, -1.0):
        delta = sign * step * direction
        if param is not None:
            tape = forward(P.replace({param: P[param] + delta}), ids, ctx)
        else:
            tape = forward(P, ids, ctx, perturb={site: delta})
        if base is not None:
            moved = [k for k, v in choices(tape, P, ctx).items() if not np.array_equal(v, base[k])]
            if moved:
                raise NearTie(f"a step of {step:g} along the direction changes {moved[0]}")
        values.append(loss(tape))
    return (values[0] - values[1]) / (2 * step)


def agrees(fd: float, analytic: float, *, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return abs(fd - analytic) <= rtol * max(abs(fd), abs(analytic)) + atol
