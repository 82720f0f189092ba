"""Record of the multi-token-prediction pairing (docs/architecture.md §14).

    mtp_input   X[t] = e_proj(enorm(embed[token t+1])) (broadcast over the streams) + h_proj(hnorm(h[t])), bf16:
                position t pairs the main model's final streams of t with the NEXT token; the MTP block then
                predicts token t+2 from X (M:L739-767). A call of s tokens gives s-1 rows (none for s = 1).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refimpl.model.linear import Fp8Matrix
from refimpl.model.transformer import mtp_input
from refimpl.testing.ops_linear import as_dtype, bf16_values, fp8_weight
from refimpl.testing.record import OpRecord, register


@st.composite
def mtp_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = draw(st.sampled_from([1, 2, 5]))
    n = draw(st.sampled_from([1, 4]))
    c, vocab = 128, 40
    inp = {"h": bf16_values(rng, (1, s, n, c)).astype(np.float32) * np.float32(draw(st.sampled_from([1, 8]))),
           "ids": rng.integers(0, vocab, (1, s)), "embed": rng.standard_normal((vocab, c)).astype(ml_dtypes.bfloat16),
           "enorm": (1 + 0.1 * rng.standard_normal(c)).astype(ml_dtypes.bfloat16),
           "hnorm": (1 + 0.1 * rng.standard_normal(c)).astype(ml_dtypes.bfloat16), "norm_eps": 1e-6}
    for name in ("e_proj", "h_proj"):
        inp[name], inp[f"{name}.scale"] = fp8_weight(rng, c, c, 1, 120)
    return inp


def _mtp_run(inp, prec):
    x = mtp_input(as_dtype(inp["h"], prec), np.asarray(inp["ids"]), inp["embed"],
                  Fp8Matrix(inp["e_proj"], inp["e_proj.scale"]), Fp8Matrix(inp["h_proj"], inp["h_proj.scale"]),
                  inp["enorm"], inp["hnorm"], norm_eps=inp["norm_eps"], prec=prec)
    return {"x": x}


def _mtp_edges(inp) -> set:
    s, n = inp["ids"].shape[1], inp["h"].shape[2]
    out = {"one_token_no_row"} if s == 1 else {"two_tokens_one_row"} if s == 2 else {"several_rows"}
    out |= {"one_stream"} if n == 1 else {"four_streams"}
    return out


def _token_t(inp):
    """The inputs as an implementation that pairs the streams of t with token t reads them: row t takes ids[t]."""
    ids = np.asarray(inp["ids"])
    return {**inp, "ids": np.roll(ids, 1, axis=1)} if ids.shape[1] >= 2 else None


register(OpRecord(
    name="mtp_input",
    summary="the MTP block's input: streams of position t paired with the embedding of token t+1",
    official="M:L739-767 MTPBlock.forward (e_proj, h_proj, enorm, hnorm); docs/architecture.md §14 (the pairing)",
    inputs={"h": "[b, s, n, c] float32 (bf16 values): the main model's final streams", "ids": "[b, s] int64 tokens",
            "embed": "[v, c] bfloat16", "e_proj / h_proj": "[c, c] float8_e4m3fn, .scale [c/128, c/128] float8_e8m0fnu",
            "enorm / hnorm": "[c] bfloat16", "norm_eps": "float"},
    outputs=("x",), axes={"x": ("b batch", "t positions 0..s-2", "n streams", "c channels")},
    run=_mtp_run, strategy=mtp_inputs, edges=_mtp_edges,
    edge_cases=("one_token_no_row", "two_tokens_one_row", "several_rows", "one_stream", "four_streams"),
    suspects=(("pairing the streams of t with token t itself (no shift)", _token_t),)))
