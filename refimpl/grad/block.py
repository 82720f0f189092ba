"""One block forward with its intermediates, and backward (refimpl/model/block.py).

    R = h;  x, post, comb = hc_pre(h);  x = attn_norm(x);  x = attention(x);  h = hc_post(x, R, post, comb)
    R = h;  x, post, comb = hc_pre(h);  x = ffn_norm(x);   x = moe(x, ids);   h = hc_post(x, R, post, comb)
Backward: the same steps in reverse; a stream array h feeds both hc_pre and the residual of
hc_post, so its gradient is the sum of the two.
"""
from __future__ import annotations

import numpy as np

from refimpl.config import Layer
from refimpl.model.hyperconn import hc_post
from refimpl.model.norm import rms_norm
from refimpl.grad.attention import attention_backward, attention_forward
from refimpl.grad.hyperconn import hc_post_backward, hc_pre_backward, hc_pre_forward
from refimpl.grad.moe import moe_backward, moe_forward
from refimpl.grad.norm import rms_norm_backward
from refimpl.grad.params import Params, attention_weights, block_prefix, hyperconn_weights, moe_weights

BARE = ("attn_sink", "ape")      # parameters whose checkpoint name has no ".weight"


def full_names(prefix: str, grads: dict) -> dict:
    """Short gradient names ("wq_a", "compressor.ape", "experts.3.w1") as checkpoint names under prefix."""
    return {prefix + k + ("" if k.rsplit(".", 1)[-1] in BARE else ".weight"): v for k, v in grads.items()}


def block_forward(h: np.ndarray, tokens: np.ndarray, P: Params, layer: Layer, ctx, probe):
    """The spec's block for streams h [b,s,n,c] from position 0 -> (h [b,s,n,c], cache)."""
    cfg, i, p = ctx.cfg, layer.id, block_prefix(ctx.cfg, layer.id)
    x, post, comb, hc1 = hc_pre_forward(h, hyperconn_weights(P, f"{p}hc_attn"), f"layers.{i}.hc_attn", ctx, probe)
    xn = rms_norm(x, P[f"{p}attn_norm.weight"], eps=cfg.norm_eps, prec=ctx.prec)
    a, attn = attention_forward(xn, attention_weights(P, p, cfg, i), layer, ctx, probe)
    h1 = probe(f"layers.{i}.hc_attn.out", hc_post(a, h, post, comb, ctx))
    cache = {"hc_attn": hc1, "x_attn": x, "attn": attn, "a": a, "post_attn": post, "comb_attn": comb, "h0": h}
    x, post, comb, hc2 = hc_pre_forward(h1, hyperconn_weights(P, f"{p}hc_ffn"), f"layers.{i}.hc_ffn", ctx, probe)
    xn = rms_norm(x, P[f"{p}ffn_norm.weight"], eps=cfg.norm_eps, prec=ctx.prec)
    f, ffn = moe_forward(xn, tokens, moe_weights(P, p, cfg), layer, ctx, probe)
    h2 = probe(f"layers.{i}.out", hc_post(f, h1, post, comb, ctx))
    cache.update({"hc_ffn": hc2, "x_ffn": x, "ffn": ffn, "f": f, "post_ffn": post, "comb_ffn": comb, "h1": h1})
    return h2, cache


def block_backward(dh2: np.ndarray, cache: dict, P: Params, layer: Layer, cfg, revision: str, sites: dict,
                   grads: dict) -> np.ndarray:
    """Backward of block_forward. dh2 [b,s,n,c] -> dh [b,s,n,c]; fills sites ("grad." names) and grads (checkpoint names)."""
    i, p, eps = layer.id, block_prefix(cfg, layer.id), cfg.norm_eps
    sites[f"grad.layers.{i}.out"] = dh2
    # the MoE half
    df, dh1, dpost, dcomb = hc_post_backward(dh2, cache["f"], cache["h1"], cache["post_ffn"], cache["comb_ffn"])
    sites[f"grad.layers.{i}.ffn.out"] = df
    dxn, g = moe_backward(df, cache["ffn"], moe_weights(P, p, cfg), layer, cfg, revision, sites)
    grads.update(full_names(f"{p}ffn.", g))
    dx, grads[f"{p}ffn_norm.weight"] = rms_norm_backward(dxn, cache["x_ffn"], P[f"{p}ffn_norm.weight"], eps=eps)
    dh, dpre, g = hc_pre_backward(dx, dpost, dcomb, cache["hc_ffn"], hyperconn_weights(P, f"{p}hc_ffn"), cfg)
    _hc_sites(sites, f"layers.{i}.hc_ffn", dpre, dpost, dcomb)
    grads.update({f"{p}hc_ffn_{k}": v for k, v in g.items()})
    dh1 = dh1 + dh
    sites[f"grad.layers.{i}.hc_attn.out"] = dh1
    # the attention half
    da, dh0, dpost, dcomb = hc_post_backward(dh1, cache["a"], cache["h0"], cache["post_attn"], cache["comb_attn"])
    sites[f"grad.layers.{i}.attn.out"] = da
    dxn, g = attention_backward(da, cache["attn"], attention_weights(P, p, cfg, i), layer, cfg, sites)
    grads.update(full_names(f"{p}attn.", g))
    dx, grads[f"{p}attn_norm.weight"] = rms_norm_backward(dxn, cache["x_attn"], P[f"{p}attn_norm.weight"], eps=eps)
    dh, dpre, g = hc_pre_backward(dx, dpost, dcomb, cache["hc_attn"], hyperconn_weights(P, f"{p}hc_attn"), cfg)
    _hc_sites(sites, f"layers.{i}.hc_attn", dpre, dpost, dcomb)
    grads.update({f"{p}hc_attn_{k}": v for k, v in g.items()})
    return dh0 + dh


def _hc_sites(sites: dict, site: str, dpre, dpost, dcomb) -> None:
    sites[f"grad.{site}.pre"], sites[f"grad.{site}.post"], sites[f"grad.{site}.comb"] = dpre, dpost, dcomb
