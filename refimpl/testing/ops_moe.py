"""Records of the mixture of experts: routing and the expert dispatch (docs/architecture.md §11).

    route        sc = sqrt(softplus(x @ gate^T)); ids = tid2eid[token] (hash layers) or top-a of sc + bias
                 (ties: the lower expert id); weights = sc[ids] / Σ sc[ids] · route_scale     (M:L546-584)
    expert_sum   Σ over the chosen experts, in ascending id, of weight · SwiGLU expert (FP4 w1/w3/w2,
                 the weight applied before w2), plus the shared expert (FP8), fp32 accumulator  (M:L587-645)
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refimpl.config import Config, Layer
from refimpl.context import RunContext
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.model.moe import ExpertWeights, GateWeights, MoEWeights, expert_sum, route
from refimpl.numerics import top_k
from refimpl.testing.ops_linear import as_dtype, bf16_values, fp8_weight
from refimpl.testing.record import OpRecord, register

_TINY = Config.tiny()


# ------------------------------------------------------------------------------------------------ route

@st.composite
def route_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    e = draw(st.sampled_from([2, 8, 16]))
    a = draw(st.sampled_from([1, 2, min(6, e)]))
    c = draw(st.sampled_from([8, 64]))
    s = draw(st.sampled_from([1, 4]))
    vocab = 32
    w = rng.standard_normal((e, c)) * c ** -0.5
    bias = (rng.standard_normal(e) * 0.1).astype(np.float32)
    if draw(st.booleans()):                                   # duplicate experts: exactly equal scores, ties
        src = rng.integers(0, e, e // 2)
        w[: e // 2] = w[src]
        bias[: e // 2] = bias[src]
    hashed = draw(st.booleans())
    tid2eid = np.stack([rng.permutation(e)[:a] for _ in range(vocab)]).astype(np.int64) if hashed else None
    return {"x": bf16_values(rng, (1, s, c)).astype(np.float32), "tokens": rng.integers(0, vocab, (1, s)),
            "gate_weight": w.astype(ml_dtypes.bfloat16), "bias": None if hashed else bias, "tid2eid": tid2eid,
            "n_activated_experts": a, "route_scale": float(draw(st.sampled_from([1.0, 1.5, 2.5])))}


def _route_run(inp, prec):
    e, _ = inp["gate_weight"].shape
    cfg = _TINY.replace(n_routed_experts=e, n_activated_experts=inp["n_activated_experts"],
                        route_scale=inp["route_scale"])
    hashed = inp["tid2eid"] is not None
    layer = Layer(id=0 if hashed else 3, compress_ratio=0, overlap=False, uses_indexer=False)
    gw = GateWeights(weight=inp["gate_weight"], bias=inp["bias"], tid2eid=inp["tid2eid"])
    x = as_dtype(inp["x"], prec)
    weights, ids = route(x, np.asarray(inp["tokens"]), 0, gw, layer, RunContext(cfg=cfg, prec=prec))
    # the biased scores the choice is made on, in float64 (for the near-tie rule of check.py; NaN in hash layers)
    z = np.asarray(inp["gate_weight"]).astype(np.float64) @ x[0].astype(np.float64).T
    sc = np.sqrt(np.logaddexp(0, z)).T[None] + (0 if hashed else inp["bias"].astype(np.float64))
    if hashed:
        sc = np.full_like(sc, np.nan)                          # hash ids come from the table: no near-tie excuse
    return {"weights": weights, "ids": ids, "scores": sc}


def _route_edges(inp) -> set:
    out = {"hash_layer"} if inp["tid2eid"] is not None else {"score_layer"}
    out |= {"route_scale_not_1"} if inp["route_scale"] != 1 else set()
    out |= {"one_expert"} if inp["n_activated_experts"] == 1 else set()
    if inp["tid2eid"] is None:
        sc = _route_run(inp, "float64")["scores"][0]
        a = inp["n_activated_experts"]
        for row in sc:
            srt = np.sort(row)[::-1]
            if a < len(row) and srt[a - 1] == srt[a]:
                out.add("tie_at_the_boundary")
        unbiased = sc - inp["bias"].astype(np.float64)
        if not np.array_equal(np.sort(top_k(sc, a), -1), np.sort(top_k(unbiased, a), -1)):
            out.add("bias_changes_the_choice")
    return out


register(OpRecord(
    name="route",
    summary="MoE router: sqrt(softplus) scores, ids by hash table or top-a of scores + bias, normalised weights",
    official="M:L546-584 Gate.forward",
    inputs={"x": "[b, s, c] float32 (bf16 values)", "tokens": "[b, s] int64", "gate_weight": "[e, c] bfloat16",
            "bias": "[e] float32 (score layers) or None", "tid2eid": "[v, a] int64 (hash layers) or None",
            "n_activated_experts": "int a", "route_scale": "float"},
    outputs=("weights", "ids"),
    axes={"weights": ("b batch", "s positions", "a slots"), "ids": ("b batch", "s positions", "a slots")},
    run=_route_run, strategy=route_inputs, edges=_route_edges,
    edge_cases=("hash_layer", "score_layer", "one_expert", "tie_at_the_boundary", "bias_changes_the_choice",
                "route_scale_not_1"),
    selections={"ids": "scores"}, extra=("scores",)))


# ------------------------------------------------------------------------------------------------ expert_sum

def _fp4(rng, n, k):
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8).view(np.int8)
    scale = rng.integers(119, 124, (n, k // 32)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    return packed, scale


@st.composite
def expert_sum_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c, f = 128, 128
    e = draw(st.sampled_from([2, 4]))
    a = draw(st.sampled_from([1, 2]))
    rows = draw(st.sampled_from([1, 3, 6]))
    inp = {"x": bf16_values(rng, (rows, c)).astype(np.float32) * draw(st.sampled_from([1.0, 16.0])),
           "ids": np.stack([rng.permutation(e)[:a] for _ in range(rows)]).astype(np.int64),
           "weights": rng.uniform(0.1, 1.0, (rows, a)).astype(np.float32),
           "swiglu_limit": float(draw(st.sampled_from([10.0, 0.5]))), "revision": draw(st.sampled_from(["current",
                                                                                                       "initial"]))}
    for wname, (n, k) in (("w1", (f, c)), ("w2", (c, f)), ("w3", (f, c))):
        parts = [_fp4(rng, n, k) for _ in range(e)]
        inp[f"experts.{wname}"] = np.stack([p for p, _ in parts])
        inp[f"experts.{wname}.scale"] = np.stack([s for _, s in parts])
        inp[f"shared.{wname}"], inp[f"shared.{wname}.scale"] = fp8_weight(rng, n, k, 1, 118)
    return inp


def _expert_sum_run(inp, prec):
    e = inp["experts.w1"].shape[0]
    experts = tuple(ExpertWeights(*(Fp4Matrix(inp[f"experts.{w}"][i], inp[f"experts.{w}.scale"][i])
                                    for w in ("w1", "w2", "w3"))) for i in range(e))
    shared = ExpertWeights(*(Fp8Matrix(inp[f"shared.{w}"], inp[f"shared.{w}.scale"]) for w in ("w1", "w2", "w3")))
    cfg = _TINY.replace(n_routed_experts=e, n_activated_experts=inp["ids"].shape[1], swiglu_limit=inp["swiglu_limit"])
    w = MoEWeights(gate=None, experts=experts, shared=shared)
    y = expert_sum(as_dtype(inp["x"], prec), inp["ids"], as_dtype(inp["weights"], prec), w, cfg, prec,
                        inp["revision"])
    return {"y": y}


def _expert_sum_edges(inp) -> set:
    e = inp["experts.w1"].shape[0]
    out = {"one_row"} if inp["x"].shape[0] == 1 else set()
    out |= {"unused_expert"} if len(np.unique(inp["ids"])) < e else set()
    out |= {"revision_initial"} if inp["revision"] == "initial" else set()
    out |= {"clamp_active"} if inp["swiglu_limit"] < 1 else set()
    out |= {"one_expert_per_token"} if inp["ids"].shape[1] == 1 else set()
    return out


register(OpRecord(
    name="expert_sum",
    summary="MoE dispatch: Σ_e (ascending id) weight·SwiGLU expert (FP4) + the shared expert (FP8), fp32 accumulator",
    official="M:L587-645 Expert.forward, MoE.forward (the shared expert's clamp: current revision only)",
    inputs={"x": "[T, c] float32 (bf16 values)", "ids": "[T, a] int64", "weights": "[T, a] float32",
            "experts.w1 / w3": "[e, f, c/2] int8 packed FP4, .scale [e, f, c/32] float8_e8m0fnu",
            "experts.w2": "[e, c, f/2] int8, .scale [e, c, f/32]",
            "shared.w1 / w3": "[f, c] float8_e4m3fn, .scale [ceil(f/128), ceil(c/128)]; shared.w2 [c, f]",
            "swiglu_limit": "float (10)", "revision": "'current' or 'initial'"},
    outputs=("y",), axes={"y": ("t tokens", "c channels")},
    run=_expert_sum_run, strategy=expert_sum_inputs, edges=_expert_sum_edges,
    edge_cases=("one_row", "unused_expert", "revision_initial", "clamp_active", "one_expert_per_token"),
    suspects=(("the shared expert's clamp of the other revision",
               lambda i: {**i, "revision": "initial" if i["revision"] == "current" else "current"}),)))
