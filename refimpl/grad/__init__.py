"""Reference gradients: refimpl's float64 forward differentiated by hand, one backward beside each forward.

The contract: for token ids and a scalar loss (next-token cross-entropy on given targets, for the
main head and, separately, the MTP head; or any upstream gradient for the logits), `backward`
returns the gradient of the loss with respect to every float parameter (FP8/FP4 matrices: their
dequantized float64 matrix) and to every differentiable site of docs/trace-format.md, named
"grad." + the site. The forward differentiated is refimpl's float64 forward from position 0 on
the spec's NumPy functions, bit for bit. Discrete choices are held fixed (the router's experts,
the indexer's top-k), the SwiGLU clamp has subgradient 0 outside its interval: docs/gradients.md.

    g = refimpl.grad.backward(model, tokens, targets)              # main-head loss
    g = refimpl.grad.backward(model, tokens, mtp_targets=t2)        # the MTP head's loss alone
    g.loss, g.params["layers.0.attn.wq_a.weight"], g.sites["grad.layers.0.attn.q"]

Modules, each pairing backward functions with the forward they differentiate: linear.py, norm.py,
rope.py, hyperconn.py, compressor.py, attention.py, moe.py, block.py, model.py; params.py holds the
float64 parameters, probe.py the forward's hook at its sites, check.py the finite differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refimpl.formats.weights import load
from refimpl.model.transformer import Model, token_ids
from refimpl.grad.model import Tape, backward_from, cross_entropy, forward, run_context
from refimpl.grad.params import Params, params_of


class GradError(ValueError):
    """An argument the backward cannot take (targets, upstream gradients, a model)."""


@dataclass(frozen=True)
class Gradients:
    """The result of `backward` (one sequence: site gradients in the trace layout, without the batch axis)."""
    loss: float | None              # main-head cross-entropy (None when given dlogits or no targets)
    mtp_loss: float | None          # MTP-head cross-entropy
    params: dict                    # checkpoint name -> float64 gradient, the parameter's shape
    sites: dict                     # "grad.<site>" -> float64 [s, ...] (MTP sites [s-1, ...])
    logits: np.ndarray              # [s, v] the forward's logits (float64)
    mtp_logits: np.ndarray | None   # [s-1, v]


def _targets(t, length: int, vocab: int, what: str) -> np.ndarray:
    try:
        ids = token_ids(t)
    except ValueError as e:
        raise GradError(f"{what}: {e}") from None
    if ids.shape != (length,):
        raise GradError(f"{what} must be {length} integers (one per position), got shape {ids.shape}")
    bad = (ids < -1) | (ids >= vocab)
    if bad.any():
        raise GradError(f"{what}: {int(ids[bad][0])} is neither a token id in [0, {vocab}) nor -1 (left out)")
    if not (ids >= 0).any():
        raise GradError(f"{what}: every target is -1; the loss would be empty")
    return ids


def _upstream(d, shape: tuple, what: str) -> np.ndarray:
    d = np.asarray(d)
    if d.shape != shape or d.dtype.kind not in "fiu" or not np.isfinite(d).all():
        raise GradError(f"{what} must be a finite real array of shape {shape}, got {d.dtype} {d.shape}")
    return d.astype(np.float64)[None]


def backward(model, tokens, targets=None, *, mtp_targets=None, dlogits=None, dmtp_logits=None) -> Gradients:
    """Gradients of a loss of one sequence's logits (docs/gradients.md).

    model: a refimpl Model (its weights, revision and layout; any precision: the backward is float64),
    or a checkpoint folder. tokens [s]. targets [s] (main head, the token each position predicts, -1 =
    left out) or dlogits [s, v]; mtp_targets [s-1] (the token t+2 of each position t) or dmtp_logits
    [s-1, v]. Losses given together are added.
    """
    if isinstance(model, (str, Path)):
        model = load(model, precision="float64", kernels="numpy")
    if not isinstance(model, Model):
        raise GradError(f"backward needs a refimpl Model or a checkpoint folder, got {type(model).__name__}")
    ids = model.check_tokens(tokens)
    if ids.ndim != 1:
        raise GradError(f"backward takes one sequence: tokens [s], got shape {ids.shape}")
    cfg, s = model.cfg, ids.shape[0]
    if targets is not None and dlogits is not None or mtp_targets is not None and dmtp_logits is not None:
        raise GradError("give targets or an upstream gradient for a head, not both")
    wants_mtp = mtp_targets is not None or dmtp_logits is not None
    if wants_mtp and (not cfg.n_mtp_layers or s < 2):
        raise GradError("an MTP loss needs a model with an MTP block and at least 2 tokens")
    if targets is None and dlogits is None and not wants_mtp:
        raise GradError("nothing to differentiate: give targets, mtp_targets, dlogits or dmtp_logits")
    v = cfg.vocab_size
    main_t = None if targets is None else _targets(targets, s, v, "targets")
    mtp_t = None if mtp_targets is None else _targets(mtp_targets, s - 1, v, "mtp_targets")
    d_main = None if dlogits is None else _upstream(dlogits, (s, v), "dlogits")
    d_mtp = None if dmtp_logits is None else _upstream(dmtp_logits, (s - 1, v), "dmtp_logits")

    P = params_of(model.weights, cfg)
    ctx = run_context(cfg, model.revision, model.layout)
    tape = forward(P, ids[None], ctx, mtp=wants_mtp)
    loss = mtp_loss = None
    if main_t is not None:
        loss, d_main = cross_entropy(tape.logits, main_t[None])
    if mtp_t is not None:
        mtp_loss, d_mtp = cross_entropy(tape.mtp_logits, mtp_t[None])
    params, sites = backward_from(tape, P, ctx, d_main, d_mtp)
    return Gradients(loss, mtp_loss, params, {k: v[0] for k, v in sites.items()}, tape.logits[0],
                     None if tape.mtp_logits is None else tape.mtp_logits[0])


__all__ = ["GradError", "Gradients", "Params", "Tape", "backward", "backward_from", "cross_entropy", "forward",
           "params_of", "run_context"]
