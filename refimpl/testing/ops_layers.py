"""Records of RMSNorm, the per-head q norm, RoPE/YaRN and the mHC mixing (docs/architecture.md §5-7).

    rms_norm        y = bf16(w ⊙ x · rsqrt(mean(x²) + eps))                            (M:L183-196)
    head_rms_norm   the weightless per-head q norm, in bf16 ops                         (M:L498)
    apply_rope      interleaved pairs (x[2i], x[2i+1]) rotated by t·f_i on the last p dims, YaRN
                    frequencies where original_seq_len > 0; inverse = the conjugate      (M:L199-244)
    split_sinkhorn  mixes -> pre, post, comb (Sinkhorn: softmax rows + eps, a column step, then
                    iters-1 times row and column)                                      (K:L371-438)
    hc_pre          RMS of the flattened streams, mixes, split_sinkhorn, Σ_j pre_j·h_j (M:L674-681)
    hc_post         y[k] = post[k]·x + Σ_j comb[j, k]·h[j]: comb[j, k] is old stream j's weight in
                    new stream k (a transposed mix is a field bug)                       (M:L683-687)
    hc_head         the final collapse of the streams before the head: RMS of the FLATTENED streams,
                    pre = sigmoid(mixes·scale + base) + eps (no Sinkhorn, no post), Σ_j pre_j·h_j  (M:L729-736)
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refimpl.config import Config
from refimpl.context import RunContext
from refimpl.model.hyperconn import HyperConnWeights, hc_head, hc_post, hc_pre, split_sinkhorn
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.model.rope import apply_rope, rope_table
from refimpl.testing.ops_linear import as_dtype, bf16_values
from refimpl.testing.record import OpRecord, register

_TINY = Config.tiny()


def _ctx(prec: str, **cfg) -> RunContext:
    return RunContext(cfg=_TINY.replace(**cfg) if cfg else _TINY, prec=prec)


def _rows(x) -> set:
    n = int(np.prod(x.shape[:-1]))
    return {"one_row"} if n == 1 else {"empty"} if n == 0 else set()


# ------------------------------------------------------------------------------------------------ rms_norm

@st.composite
def rms_norm_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.sampled_from([0, 1, 2, 5]))
    c = draw(st.sampled_from([1, 7, 64, 200, 256]))
    x = bf16_values(rng, (rows, c)) * np.exp2(rng.integers(-20, 21, (rows, 1)))   # rows 40 binades apart
    if rows and draw(st.booleans()):
        x[0] = bf16_values(rng, c) * 2.0**-12                           # mean(x²) next to eps: eps matters
    w = (1 + 0.2 * rng.standard_normal(c)).astype(ml_dtypes.bfloat16)
    return {"x": x.astype(np.float32), "weight": w, "eps": 1e-6}


def _rms_norm_run(inp, prec):
    return {"y": rms_norm(as_dtype(inp["x"], prec), np.asarray(inp["weight"]), eps=inp["eps"], prec=prec)}


def _rms_norm_edges(inp) -> set:
    x = np.asarray(inp["x"], np.float64)
    out = _rows(x)
    if x.size:
        ms = (x * x).mean(axis=-1)
        out |= {"eps_matters"} if (ms < 100 * inp["eps"]).any() else set()
        nz = ms[ms > 0]
        out |= {"rows_over_16_binades"} if nz.size and np.log2(nz.max() / nz.min()) / 2 >= 16 else set()
        out |= {"width_one"} if x.shape[-1] == 1 else set()
    return out


register(OpRecord(
    name="rms_norm", summary="weighted RMSNorm over the last axis, fp32 math, bf16 out",
    official="M:L183-196 RMSNorm.forward",
    inputs={"x": "[rows, c] float32 (bf16 values)", "weight": "[c] bfloat16", "eps": "float (1e-6)"},
    outputs=("y",), axes={"y": ("r rows", "c channels")},
    run=_rms_norm_run, strategy=rms_norm_inputs, edges=_rms_norm_edges,
    edge_cases=("one_row", "empty", "eps_matters", "rows_over_16_binades", "width_one")))


# ------------------------------------------------------------------------------------------------ head_rms_norm

@st.composite
def head_rms_norm_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b, s, h = draw(st.sampled_from([(1, 1, 1), (1, 3, 4), (2, 2, 8), (1, 0, 2)]))
    d = draw(st.sampled_from([16, 64, 128]))
    q = bf16_values(rng, (b, s, h, d)) * np.exp2(rng.integers(-12, 13, (b, s, h, 1)))
    if q.size and draw(st.booleans()):
        q[0, 0, 0] = bf16_values(rng, d) * 2.0**-13                       # next to eps
    return {"q": q.astype(np.float32), "eps": 1e-6}


def _head_rms_norm_edges(inp) -> set:
    q = np.asarray(inp["q"], np.float64)
    out = _rows(q)
    if q.size:
        ms = (q * q).mean(axis=-1)
        out |= {"eps_matters"} if (ms < 100 * inp["eps"]).any() else set()
        out |= {"one_head"} if q.shape[2] == 1 else set()
        out |= {"heads_over_8_binades"} if np.log2(ms.max() / max(ms.min(), 1e-300)) / 2 >= 8 else set()
    return out


register(OpRecord(
    name="head_rms_norm", summary="the weightless per-head RMS norm of q, in bf16 tensor ops",
    official="M:L498 q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps) (bf16)",
    inputs={"q": "[b, s, h, d] float32 (bf16 values)", "eps": "float (1e-6)"},
    outputs=("y",), axes={"y": ("b batch", "s positions", "h heads", "d head dims")},
    run=lambda inp, prec: {"y": head_rms_norm(as_dtype(inp["q"], prec), eps=inp["eps"], prec=prec)},
    strategy=head_rms_norm_inputs, edges=_head_rms_norm_edges,
    edge_cases=("one_row", "empty", "eps_matters", "one_head", "heads_over_8_binades")))


# ------------------------------------------------------------------------------------------------ apply_rope

ROPE_KINDS = {   # the two layer kinds of V4 Flash (Config.rope_base / rope_original_seq_len)
    "window": dict(base=10000.0, original_seq_len=0, factor=16.0, beta_fast=32, beta_slow=1),
    "compressed": dict(base=160000.0, original_seq_len=65536, factor=16.0, beta_fast=32, beta_slow=1),
}


@st.composite
def rope_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(sorted(ROPE_KINDS)))
    heads = draw(st.sampled_from([None, 1, 4]))
    s = draw(st.sampled_from([1, 2, 5]))
    p = draw(st.sampled_from([16, 64]))
    d = p + draw(st.sampled_from([0, 8, 64]))
    start = draw(st.sampled_from([0, 1, 127, 4095, 65535, 65536 * 4, 1 << 20]))
    shape = (1, s, d) if heads is None else (1, s, heads, d)
    return {"x": bf16_values(rng, shape).astype(np.float32), "positions": start + np.arange(s),
            "rope_dim": p, **ROPE_KINDS[kind], "inverse": draw(st.booleans())}


def _rope_run(inp, prec):
    table = rope_table(np.asarray(inp["positions"]), dim=inp["rope_dim"], base=inp["base"],
                       original_seq_len=inp["original_seq_len"], factor=inp["factor"], beta_fast=inp["beta_fast"],
                       beta_slow=inp["beta_slow"], prec=prec)
    return {"y": apply_rope(as_dtype(inp["x"], prec), table, prec, inverse=inp["inverse"])}


def _rope_edges(inp) -> set:
    out = {"yarn"} if inp["original_seq_len"] > 0 else {"no_yarn"}
    out |= {"inverse"} if inp["inverse"] else set()
    out |= {"heads_axis"} if np.asarray(inp["x"]).ndim == 4 else set()
    out |= {"position_0"} if 0 in np.asarray(inp["positions"]) else set()
    out |= {"past_original_context"} if np.max(inp["positions"]) >= 65536 else set()
    out |= {"rope_only"} if np.asarray(inp["x"]).shape[-1] == inp["rope_dim"] else set()
    return out


register(OpRecord(
    name="apply_rope", summary="RoPE on the last rope_dim dims, interleaved pairs, YaRN frequencies; inverse: conjugate",
    official="M:L199-229 precompute_freqs_cis, M:L232-244 apply_rotary_emb (inverse: the output de-rotation, M:L534)",
    inputs={"x": "[b, s, d] or [b, s, h, d] float32 (bf16 values)", "positions": "[s] int64 absolute positions",
            "rope_dim": "int p (the last p dims rotate)", "base": "float", "original_seq_len": "int (0: no YaRN)",
            "factor": "float", "beta_fast": "int", "beta_slow": "int", "inverse": "bool"},
    outputs=("y",), axes={"y": (("b batch", "s positions", "d dims"), ("b batch", "s positions", "h heads", "d dims"))},
    run=_rope_run, strategy=rope_inputs, edges=_rope_edges,
    edge_cases=("yarn", "no_yarn", "inverse", "heads_axis", "position_0", "past_original_context", "rope_only"),
    suspects=(("RoPE without YaRN (original_seq_len 0)", lambda i: {**i, "original_seq_len": 0} if i["original_seq_len"] else None),
              ("the rotation in the other direction (inverse flipped)", lambda i: {**i, "inverse": not i["inverse"]}))))


# ------------------------------------------------------------------------------------------------ split_sinkhorn

@st.composite
def sinkhorn_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.sampled_from([1, 2, 4]))
    rows = draw(st.sampled_from([1, 3, 8]))
    iters = draw(st.sampled_from([1, 2, 3, 20]))
    gain = draw(st.sampled_from([1.0, 10.0]))
    x = (2 + n) * n
    return {"mixes": (rng.standard_normal((1, rows, x)) * gain).astype(np.float32),
            "scale": rng.uniform(0.2, 0.6, 3).astype(np.float32), "base": rng.standard_normal(x).astype(np.float32),
            "n": n, "iters": iters, "eps": 1e-6}


def _sinkhorn_run(inp, prec):
    pre, post, comb = split_sinkhorn(as_dtype(inp["mixes"], prec), inp["scale"], inp["base"], n=inp["n"],
                                          iters=inp["iters"], eps=inp["eps"], prec=prec)
    return {"pre": pre, "post": post, "comb": comb}


def _sinkhorn_edges(inp) -> set:
    out = {"one_iteration"} if inp["iters"] == 1 else {"released_20_iterations"} if inp["iters"] == 20 else set()
    out |= {"one_stream"} if inp["n"] == 1 else set()
    out |= {"large_logits"} if np.abs(inp["mixes"]).max() * inp["scale"][2] > 8 else set()
    return out


register(OpRecord(
    name="split_sinkhorn", summary="mHC mixing logits -> pre (sigmoid + eps), post (2·sigmoid), comb (Sinkhorn)",
    official="K:L371-438 hc_split_sinkhorn_kernel",
    inputs={"mixes": "[b, s, (2+n)·n] float32: pre n | post n | comb n·n (row-major [j, k])",
            "scale": "[3] float32", "base": "[(2+n)·n] float32", "n": "int", "iters": "int (20)", "eps": "float (1e-6)"},
    outputs=("pre", "post", "comb"),
    axes={"pre": ("b batch", "s positions", "n streams"), "post": ("b batch", "s positions", "n streams"),
          "comb": ("b batch", "s positions", "j old stream", "k new stream")},
    run=_sinkhorn_run, strategy=sinkhorn_inputs, edges=_sinkhorn_edges,
    edge_cases=("one_iteration", "released_20_iterations", "one_stream", "large_logits"),
    suspects=(("Sinkhorn one iteration short", lambda i: {**i, "iters": i["iters"] - 1} if i["iters"] > 1 else None),
              ("Sinkhorn one iteration too many", lambda i: {**i, "iters": i["iters"] + 1}))))


# ------------------------------------------------------------------------------------------------ hc_pre

@st.composite
def hc_pre_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.sampled_from([1, 2, 4]))
    s = draw(st.sampled_from([1, 3]))
    c = 128
    x = (2 + n) * n
    h = bf16_values(rng, (1, s, n, c)) * np.exp2(rng.integers(-3, 4, (1, s, n, 1)))
    return {"h": h.astype(np.float32), "fn": (rng.standard_normal((x, n * c)) * (n * c) ** -0.5).astype(np.float32),
            "scale": rng.uniform(0.2, 2.0, 3).astype(np.float32), "base": rng.standard_normal(x).astype(np.float32),
            "norm_eps": 1e-6, "iters": draw(st.sampled_from([1, 20])), "hc_eps": 1e-6}


def _hc_pre_run(inp, prec):
    n, c = inp["h"].shape[2:]
    ctx = _ctx(prec, dim=c, hc_mult=n, hc_sinkhorn_iters=inp["iters"], hc_eps=inp["hc_eps"], norm_eps=inp["norm_eps"])
    w = HyperConnWeights(fn=inp["fn"], base=inp["base"], scale=inp["scale"])
    x, post, comb = hc_pre(as_dtype(inp["h"], prec), w, "hc", ctx)
    return {"x": x, "post": post, "comb": comb}


register(OpRecord(
    name="hc_pre", summary="mHC pre: RMS over the flattened streams, mixes = (v @ fn^T)·rsqrt, split_sinkhorn, Σ_j pre_j·h_j",
    official="M:L674-681 Block.hc_pre",
    inputs={"h": "[b, s, n, c] float32 (bf16 values)", "fn": "[(2+n)·n, n·c] float32", "scale": "[3] float32",
            "base": "[(2+n)·n] float32", "norm_eps": "float", "iters": "int", "hc_eps": "float"},
    outputs=("x", "post", "comb"),
    axes={"x": ("b batch", "s positions", "c channels"), "post": ("b batch", "s positions", "n streams"),
          "comb": ("b batch", "s positions", "j old stream", "k new stream")},
    run=_hc_pre_run, strategy=hc_pre_inputs,
    edges=lambda inp: {f"streams_{inp['h'].shape[2]}", "one_iteration" if inp["iters"] == 1 else "20_iterations"},
    edge_cases=("streams_1", "streams_2", "streams_4", "one_iteration", "20_iterations")))


# ------------------------------------------------------------------------------------------------ hc_post

@st.composite
def hc_post_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.sampled_from([1, 2, 4]))
    s = draw(st.sampled_from([1, 3]))
    c = draw(st.sampled_from([8, 128]))
    logits = rng.standard_normal((1, s, (2 + n) * n)).astype(np.float32) * 3
    _, post, comb = split_sinkhorn.spec(logits, np.ones(3, np.float32), np.zeros((2 + n) * n, np.float32), n=n,
                                        iters=draw(st.sampled_from([1, 20])), eps=1e-6, prec="float32")
    return {"x": bf16_values(rng, (1, s, c)).astype(np.float32),
            "residual": bf16_values(rng, (1, s, n, c)).astype(np.float32), "post": post, "comb": comb}


def _hc_post_run(inp, prec):
    return {"y": hc_post(as_dtype(inp["x"], prec), as_dtype(inp["residual"], prec), as_dtype(inp["post"], prec),
                         as_dtype(inp["comb"], prec), _ctx(prec))}


def _hc_post_edges(inp) -> set:
    comb = inp["comb"]
    n = comb.shape[-1]
    out = {f"streams_{n}"}
    out |= {"asymmetric_comb"} if n > 1 and np.abs(comb - np.swapaxes(comb, -1, -2)).max() > 0.05 else set()
    out |= {"rows_not_normalised"} if np.abs(comb.sum(-1) - 1).max() > 1e-3 else set()
    return out


register(OpRecord(
    name="hc_post", summary="mHC post: y[k] = post[k]·x + Σ_j comb[j, k]·h[j] (column k of comb forms new stream k)",
    official="M:L683-687 Block.hc_post",
    inputs={"x": "[b, s, c] float32 (bf16 values): the sublayer output", "residual": "[b, s, n, c] float32 (bf16)",
            "post": "[b, s, n] float32", "comb": "[b, s, n, n] float32, [.., j, k]: old stream j -> new stream k"},
    outputs=("y",), axes={"y": ("b batch", "s positions", "n streams", "c channels")},
    run=_hc_post_run, strategy=hc_post_inputs, edges=_hc_post_edges,
    edge_cases=("streams_1", "streams_2", "streams_4", "asymmetric_comb", "rows_not_normalised"),
    suspects=(("a transposed mixing matrix (comb read as [k, j])",
               lambda i: {**i, "comb": np.ascontiguousarray(np.swapaxes(i["comb"], -1, -2))} if i["comb"].shape[-1] > 1
               else None),)))


# ------------------------------------------------------------------------------------------------ hc_head

@st.composite
def hc_head_inputs(draw, precision: str = "float32"):
    """Streams up to 2^±6 apart (the RMS is over the flattened streams, not per stream), mixing logits from
    small to saturating (pre near its eps floor and near 1), c 128 or 256."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.sampled_from([1, 2, 4]))
    s = draw(st.sampled_from([1, 3]))
    c = draw(st.sampled_from([128, 256]))
    spread = draw(st.sampled_from([0, 6]))
    h = bf16_values(rng, (1, s, n, c)) * np.exp2(rng.integers(-spread, spread + 1, (1, s, n, 1)))
    gain = draw(st.sampled_from([1.0, 40.0]))                           # 40: sigmoids saturate at 0 and 1
    return {"h": h.astype(np.float32), "fn": (rng.standard_normal((n, n * c)) * (n * c) ** -0.5).astype(np.float32),
            "scale": (rng.uniform(0.2, 2.0, 1) * gain).astype(np.float32),
            "base": rng.standard_normal(n).astype(np.float32), "norm_eps": 1e-6, "hc_eps": 1e-6}


def _hc_head_run(inp, prec):
    n, c = inp["h"].shape[2:]
    ctx = _ctx(prec, dim=c, hc_mult=n, hc_eps=inp["hc_eps"], norm_eps=inp["norm_eps"])
    return {"x": hc_head(as_dtype(inp["h"], prec), HyperConnWeights(fn=inp["fn"], base=inp["base"],
                                                                    scale=inp["scale"]), ctx)}


def _hc_head_edges(inp) -> set:
    h = np.asarray(inp["h"], np.float64)
    n = h.shape[2]
    out = {f"streams_{n}"}
    rms = np.sqrt((h * h).mean(-1))                                     # [b, s, n]
    out |= {"streams_differ_in_scale"} if n > 1 and (rms.max(-1) / rms.min(-1)).max() >= 16 else set()
    v = h.reshape(*h.shape[:2], -1)
    mixes = v @ np.asarray(inp["fn"], np.float64).T / np.sqrt((v * v).mean(-1, keepdims=True) + inp["norm_eps"])
    z = mixes * float(inp["scale"][0]) + np.asarray(inp["base"], np.float64)
    out |= {"pre_saturated"} if (np.abs(z) > 20).any() else set()
    return out


register(OpRecord(
    name="hc_head", summary="mHC head: RMS over the flattened streams, pre = sigmoid(mixes·scale + base) + eps, Σ_j pre_j·h_j",
    official="M:L729-736 ParallelHead.hc_head",
    inputs={"h": "[b, s, n, c] float32 (bf16 values)", "fn": "[n, n·c] float32 (hc_head_fn)",
            "scale": "[1] float32 (hc_head_scale)", "base": "[n] float32 (hc_head_base)", "norm_eps": "float",
            "hc_eps": "float"},
    outputs=("x",), axes={"x": ("b batch", "s positions", "c channels")},
    run=_hc_head_run, strategy=hc_head_inputs, edges=_hc_head_edges,
    edge_cases=("streams_1", "streams_2", "streams_4", "streams_differ_in_scale", "pre_saturated")))
