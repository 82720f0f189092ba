"""The whole model's forward with its intermediates (a Tape), its backward, and the losses.

    forward(P, ids, ctx)                    -> Tape: logits, MTP logits, every site, each block's cache
    backward_from(tape, P, dlogits, dmtp)   -> (parameter gradients by checkpoint name, "grad.<site>" gradients)
    cross_entropy(logits, targets)          -> (mean next-token loss, dlogits); targets -1 are left out

The forward is refimpl's float64 forward, from position 0, run on the spec's functions (kernels
"numpy"): with a model's own weights every site is bit-identical to `Model.forward` in float64
(tests/grad/test_model.py). The MTP block pairs the final streams h_t with token t+1 and predicts
token t+2 (refimpl/model/transformer.py); it reads the main model's final streams and the shared
embedding and head, so its loss reaches them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.context import RunContext
from refimpl.model.hyperconn import hc_head
from refimpl.model.linear import fp32_linear, quantized_linear
from refimpl.model.norm import rms_norm
from refimpl.numerics import bf16
from refimpl.ops import use_kernels
from refimpl.grad.block import block_backward, block_forward
from refimpl.grad.hyperconn import hc_head_backward
from refimpl.grad.linear import linear_backward
from refimpl.grad.norm import rms_norm_backward
from refimpl.grad.params import Dense, Params, hyperconn_weights
from refimpl.grad.probe import Probe


@dataclass
class Tape:
    """What one forward keeps for its backward."""
    ids: np.ndarray              # [b, s] int64
    logits: np.ndarray           # [b, s, v]
    mtp_logits: np.ndarray | None   # [b, s-1, v]
    sites: dict                  # site name -> value [b, ...] (sites.SITES, the differentiable ones)
    blocks: list                 # block caches, main layers in order, then the MTP block
    heads: dict                  # "" / "mtp.0." -> (streams [b,s,n,c], x before the norm [b,s,c], x after [b,s,c])
    mtp: dict | None             # the MTP block's input: en, hs, e_in


def run_context(cfg, revision: str = "current", layout: str = "official") -> RunContext:
    """The float64 run context of the gradient forward (the spec's NumPy functions)."""
    return RunContext(cfg, "float64", revision, layout, "numpy")


def _head_forward(h, P: Params, prefix: str, site: str, ctx, probe, heads: dict):
    """head_logits of refimpl/model/transformer.py with its intermediates. h [b,s,n,c] -> logits [b,s,v]."""
    xh = hc_head(h, hyperconn_weights(P, f"{prefix}hc_head"), ctx)                     # [b, s, c]
    x = probe(f"{site}final.x", rms_norm(xh, P[f"{prefix}norm.weight"], eps=ctx.cfg.norm_eps, prec=ctx.prec))
    heads[prefix] = (h, xh, x)
    return probe(f"{site}logits", fp32_linear(x, P["head.weight"], ctx.prec))


def forward(P: Params, ids: np.ndarray, ctx: RunContext, *, mtp: bool = True, perturb: dict | None = None) -> Tape:
    """refimpl's float64 forward of ids [b, s] from position 0 on parameters P, keeping what backward_from needs.

    perturb: site name -> array added to that site's value (a finite-difference step on an activation).
    """
    cfg, prec = ctx.cfg, ctx.prec
    probe, blocks, heads = Probe(perturb), [], {}
    with use_kernels(ctx.kernels):
        e = probe("embed", P["embed.weight"][ids])                                     # [b, s, c]
        h = np.repeat(e[:, :, None, :], cfg.hc_mult, axis=2)                          # [b, s, n, c]
        for i in range(cfg.n_layers):
            h, cache = block_forward(h, ids, P, ctx.layers[i], ctx, probe)
            blocks.append(cache)
        logits = _head_forward(h, P, "", "", ctx, probe, heads)
        mtp_logits, mtp_in = None, None
        if mtp and cfg.n_mtp_layers and ids.shape[1] >= 2:
            nxt = ids[:, 1:]                                                           # token t+1
            e_in = P["embed.weight"][nxt]
            en = rms_norm(e_in, P["mtp.0.enorm.weight"], eps=cfg.norm_eps, prec=prec)
            hs = rms_norm(h[:, :-1], P["mtp.0.hnorm.weight"], eps=cfg.norm_eps, prec=prec)   # [b, s-1, n, c]
            x = bf16(quantized_linear(en, Dense(P["mtp.0.e_proj.weight"]), prec)[:, :, None, :]
                     + quantized_linear(hs, Dense(P["mtp.0.h_proj.weight"]), prec), prec)
            x, cache = block_forward(x, nxt, P, ctx.layers[cfg.mtp_layer], ctx, probe)
            blocks.append(cache)
            mtp_logits = _head_forward(x, P, "mtp.0.", "mtp.", ctx, probe, heads)
            mtp_in = {"nxt": nxt, "e_in": e_in, "en": en, "hs": hs}
    return Tape(ids, logits, mtp_logits, probe.values, blocks, heads, mtp_in)


def _head_backward(dlogits, P: Params, prefix: str, site: str, tape: Tape, cfg, sites: dict, grads: dict):
    """Backward of _head_forward. dlogits [b,s,v] -> dh [b,s,n,c]."""
    h, xh, x = tape.heads[prefix]
    sites[f"grad.{site}logits"] = dlogits
    dx, dhead = linear_backward(dlogits, x, P["head.weight"])
    _add(grads, "head.weight", dhead)
    sites[f"grad.{site}final.x"] = dx
    dxh, grads[f"{prefix}norm.weight"] = rms_norm_backward(dx, xh, P[f"{prefix}norm.weight"], eps=cfg.norm_eps)
    dh, g = hc_head_backward(dxh, h, hyperconn_weights(P, f"{prefix}hc_head"), cfg)
    grads.update({f"{prefix}hc_head_{k}": v for k, v in g.items()})
    return dh


def _add(grads: dict, name: str, g: np.ndarray) -> None:
    grads[name] = grads[name] + g if name in grads else g


def backward_from(tape: Tape, P: Params, ctx: RunContext, dlogits=None, dmtp_logits=None):
    """The gradients of Σ dlogits·logits + Σ dmtp_logits·mtp_logits (either may be None).

    -> (params: every parameter of P by checkpoint name, zeros where the loss does not reach it;
        sites: "grad.<site>" -> [b, ...] for every differentiable site the forward passed).
    """
    cfg, grads, sites = ctx.cfg, {}, {}
    b, s = tape.ids.shape
    dh = np.zeros(tape.heads[""][0].shape)                                           # [b, s, n, c] final streams
    dembed = np.zeros_like(P["embed.weight"])
    if dmtp_logits is not None:
        if tape.mtp_logits is None:
            raise ValueError("an MTP gradient needs a forward with the MTP block (mtp=True, at least 2 tokens)")
        dx = _head_backward(dmtp_logits, P, "mtp.0.", "mtp.", tape, cfg, sites, grads)
        dx = block_backward(dx, tape.blocks[-1], P, ctx.layers[cfg.mtp_layer], cfg, ctx.revision, sites, grads)
        m = tape.mtp
        den, grads["mtp.0.e_proj.weight"] = linear_backward(dx.sum(axis=2), m["en"], P["mtp.0.e_proj.weight"])
        dhs, grads["mtp.0.h_proj.weight"] = linear_backward(dx, m["hs"], P["mtp.0.h_proj.weight"])
        de, grads["mtp.0.enorm.weight"] = rms_norm_backward(den, m["e_in"], P["mtp.0.enorm.weight"], eps=cfg.norm_eps)
        np.add.at(dembed, m["nxt"].reshape(-1), de.reshape(-1, de.shape[-1]))
        dtail, grads["mtp.0.hnorm.weight"] = rms_norm_backward(dhs, tape.heads[""][0][:, :-1], P["mtp.0.hnorm.weight"],
                                                               eps=cfg.norm_eps)
        dh[:, :-1] += dtail
    if dlogits is not None:
        dh = dh + _head_backward(dlogits, P, "", "", tape, cfg, sites, grads)
    for i in reversed(range(cfg.n_layers)):
        dh = block_backward(dh, tape.blocks[i], P, ctx.layers[i], cfg, ctx.revision, sites, grads)
    de = dh.sum(axis=2)                                                              # the n identical streams
    sites["grad.embed"] = de
    np.add.at(dembed, tape.ids.reshape(-1), de.reshape(-1, de.shape[-1]))
    grads["embed.weight"] = dembed
    params = {name: grads.get(name, np.zeros_like(a)) for name, a in P.arrays.items()}
    extra = sorted(set(grads) - set(params))
    assert not extra, f"gradients of parameters that do not exist: {extra[:3]}"
    return params, sites


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean -log softmax(logits)[target] over the positions whose target is >= 0. logits [.., v], targets [..]
    -> (loss, dlogits [.., v])."""
    valid = targets >= 0
    count = int(valid.sum())
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    safe = np.where(valid, targets, 0)
    picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    loss = -float(np.sum(np.where(valid, picked, 0.0))) / count
    dlogits = np.exp(logp)
    np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], axis=-1) - 1, axis=-1)
    return loss, np.where(valid[..., None], dlogits, 0.0) / count
