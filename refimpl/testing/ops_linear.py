"""Records of the number-format operations and the quantized products (docs/architecture.md §3-4, §16).

    act_quant_fp8   x [rows, K] -> e4m3 values and power-of-two scales per 1xblock (K:L40-125)
    fp8_linear      y = bf16(act_fp8(x) @ W^T), W e4m3 [N, K] with E8M0 128x128 block scales (M:L116-118)
    fp4_linear      the same with packed FP4 e2m1 W [N, K/2] and E8M0 1x32 scales (M:L113-115)

The block of an FP8 weight is ALWAYS 128x128: element [o, i] takes scale [o // 128, i // 128], also
where N or K is not a multiple of 128 and the last block is partial (never N / grid rows). The
activation quantization of mirror needs K % 128 == 0 (the official act_quant asserts it), so the
strategies draw partial K blocks only at float32 / float64, partial N blocks at every precision.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refimpl.model.linear import Fp4Matrix, Fp8Matrix, quantized_linear
from refimpl.numerics import FP8_AMAX_FLOOR, FP8_BLOCK, FP8_MAX, act_quant_fp8, round_bf16, work_dtype
from refimpl.testing.record import OpRecord, register


def bf16_values(rng, shape, spread: float = 0.0) -> np.ndarray:
    """float32 array of bf16 values: standard normal times 2^U(-spread, spread) per element."""
    x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape))
    return round_bf16(x)


def as_dtype(x, prec: str) -> np.ndarray:
    """An activation input in the precision's working dtype (exact: bf16 values)."""
    return np.asarray(x).astype(work_dtype(prec))


# ------------------------------------------------------------------------------------------------ act_quant_fp8

@st.composite
def act_quant_inputs(draw, precision: str = "mirror"):
    seed = draw(st.integers(0, 2**32 - 1))
    rows = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    block = draw(st.sampled_from([FP8_BLOCK, 64]))                      # 64: the KV QDQ of attention (M:L506)
    nblocks = draw(st.integers(1, 3))
    spread = draw(st.sampled_from([0.0, 4.0, 40.0]))                    # binades between blocks
    rng = np.random.default_rng(seed)
    x = bf16_values(rng, (rows, nblocks, block)) * np.exp2(rng.integers(-spread, spread + 1, (rows, nblocks, 1)))
    x = round_bf16(x)
    if rows and draw(st.booleans()):                                    # a block whose max is 448·2^k exactly
        r, b, k = rng.integers(rows), rng.integers(nblocks), int(rng.integers(-20, 20))
        x[r, b] = round_bf16(np.clip(x[r, b], -(FP8_MAX - 32) * 2.0**k, (FP8_MAX - 32) * 2.0**k))
        x[r, b, rng.integers(block)] = FP8_MAX * 2.0**k * rng.choice([-1, 1])
    if rows and draw(st.booleans()):                                    # tiny values next to a large amax: subnormals
        r, b = rng.integers(rows), rng.integers(nblocks)
        x[r, b, : block // 2] = round_bf16(x[r, b, : block // 2] * 2.0**-14)
    if rows and draw(st.booleans()):                                    # a block below the amax floor 1e-4
        r, b = rng.integers(rows), rng.integers(nblocks)
        x[r, b] = round_bf16(x[r, b] * 1e-7) if draw(st.booleans()) else 0.0
    return {"x": x.reshape(rows, nblocks * block).astype(np.float32), "block": block}


def _act_quant_run(inp, prec):
    q, s = act_quant_fp8(np.asarray(inp["x"], np.float32), block=inp["block"])
    return {"values": q, "scale": s}


def _act_quant_edges(inp) -> set:
    x, block = inp["x"], inp["block"]
    out = {"one_row"} if x.shape[0] == 1 else {"empty"} if x.shape[0] == 0 else set()
    if block != FP8_BLOCK:
        out.add("block_64")
    if x.size:
        q, s = act_quant_fp8(x, block=block)
        xb = np.abs(x.reshape(x.shape[0], -1, block)).max(axis=-1)
        out |= {"e4m3_max"} if (np.abs(q) == FP8_MAX).any() else set()
        out |= {"subnormal"} if ((np.abs(q) > 0) & (np.abs(q) < 2.0**-6)).any() else set()
        out |= {"amax_floor"} if (xb < FP8_AMAX_FLOOR).any() else set()
        ls = np.log2(s)
        out |= {"scales_over_16_binades"} if ls.max() - ls.min() >= 16 else set()
    return out


register(OpRecord(
    name="act_quant_fp8",
    summary="FP8 e4m3 activation quantization with power-of-two (E8M0) scales per 1 x block",
    official="K:L40-125 act_quant (scale = 2^ceil(log2(max(amax, 1e-4) / 448)), RNE cast, saturating)",
    inputs={"x": "[rows, K] float32 (bf16 values)", "block": "int: 128 (GEMM inputs) or 64 (KV QDQ)"},
    outputs=("values", "scale"),
    axes={"values": ("r rows", "k columns"), "scale": ("r rows", "b blocks")},
    run=_act_quant_run, strategy=act_quant_inputs, edges=_act_quant_edges,
    edge_cases=("one_row", "empty", "block_64", "e4m3_max", "subnormal", "amax_floor", "scales_over_16_binades"),
    precisions=("mirror",), exact=True))


# ------------------------------------------------------------------------------------------------ fp8_linear

def fp8_weight(rng, n: int, k: int, spread: int = 3, base: int = 120):
    """Random e4m3 codes (every finite code, subnormals and ±448 included) and E8M0 scales spread over binades."""
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01                              # no NaN code: 0x7F/0xFF -> 0x7E/0xFE
    grid = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    scale = np.clip(base + rng.integers(-spread, spread + 1, grid), 1, 254).astype(np.uint8)
    return codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu)


N_SIZES = [1, 2, 64, 96, 127, 128, 129, 192, 200, 256, 300]          # many not multiples of 128: partial row blocks


@st.composite
def fp8_linear_inputs(draw, precision: str = "float32"):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.sampled_from(N_SIZES))
    k = draw(st.sampled_from([128, 256] if precision == "mirror" else [2, 64, 128, 192, 200, 256, 320]))
    rows = draw(st.sampled_from([0, 1, 1, 2, 4]))
    spread = draw(st.sampled_from([0, 3, 12]))                          # binades between weight blocks
    rng = np.random.default_rng(seed)
    w, s = fp8_weight(rng, n, k, spread)
    x = bf16_values(rng, (rows, k), draw(st.sampled_from([0.0, 6.0])))
    return {"x": x, "weight": w, "scale": s}


def _fp8_run(inp, prec):
    w = Fp8Matrix(np.asarray(inp["weight"]), np.asarray(inp["scale"]))
    return {"y": quantized_linear(as_dtype(inp["x"], prec), w, prec)}


def _weight_edges(inp) -> set:
    x, w = inp["x"], inp["weight"]
    n = w.shape[0]
    k = x.shape[-1]
    out = {"one_row"} if x.shape[0] == 1 else {"empty"} if x.shape[0] == 0 else set()
    out |= {"partial_row_block"} if n % FP8_BLOCK else set()
    out |= {"partial_column_block"} if k % FP8_BLOCK else set()
    out |= {"several_row_blocks_partial"} if n > FP8_BLOCK and n % FP8_BLOCK else set()
    sc = np.asarray(inp["scale"]).view(np.uint8).astype(int)
    out |= {"scales_over_8_binades"} if sc.max() - sc.min() >= 8 else set()
    codes = np.asarray(w).view(np.uint8)
    if w.dtype == ml_dtypes.float8_e4m3fn:
        out |= {"e4m3_max"} if ((codes & 0x7F) == 0x7E).any() else set()
        out |= {"e4m3_subnormal"} if (((codes & 0x78) == 0) & ((codes & 0x07) != 0)).any() else set()
    return out


register(OpRecord(
    name="fp8_linear",
    summary="y = x @ W^T with an FP8 e4m3 weight and E8M0 scales per 128x128 block (partial blocks at the edges)",
    official="M:L108-120 linear (act_quant of x in mirror, fp32 accumulate, bf16 out); C:L137-141 block layout",
    inputs={"x": "[rows, K] float32 (bf16 values)", "weight": "[N, K] float8_e4m3fn",
            "scale": "[ceil(N/128), ceil(K/128)] float8_e8m0fnu: element [o, i] uses scale [o//128, i//128]"},
    outputs=("y",), axes={"y": ("r rows", "o output channels")},
    run=_fp8_run, strategy=fp8_linear_inputs, edges=_weight_edges,
    edge_cases=("one_row", "empty", "partial_row_block", "partial_column_block", "several_row_blocks_partial",
                "scales_over_8_binades", "e4m3_max", "e4m3_subnormal")))


# ------------------------------------------------------------------------------------------------ fp4_linear

@st.composite
def fp4_linear_inputs(draw, precision: str = "float32"):
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.sampled_from([1, 3, 32, 100, 128, 160]))
    k = draw(st.sampled_from([128, 256] if precision == "mirror" else [32, 64, 96, 128, 256]))
    rows = draw(st.sampled_from([0, 1, 1, 2, 4]))
    spread = draw(st.sampled_from([0, 4, 12]))
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8).view(np.int8)
    scale = np.clip(122 + rng.integers(-spread, spread + 1, (n, -(-k // 32))), 1, 254).astype(np.uint8)
    x = bf16_values(rng, (rows, k), draw(st.sampled_from([0.0, 6.0])))
    return {"x": x, "weight": packed, "scale": scale.view(ml_dtypes.float8_e8m0fnu)}


def _fp4_run(inp, prec):
    w = Fp4Matrix(np.asarray(inp["weight"]), np.asarray(inp["scale"]))
    return {"y": quantized_linear(as_dtype(inp["x"], prec), w, prec)}


def _fp4_edges(inp) -> set:
    x, w = inp["x"], np.asarray(inp["weight"]).view(np.uint8)
    out = {"one_row"} if x.shape[0] == 1 else {"empty"} if x.shape[0] == 0 else set()
    sc = np.asarray(inp["scale"]).view(np.uint8).astype(int)
    out |= {"scales_over_8_binades"} if sc.max() - sc.min() >= 8 else set()
    nib = np.concatenate([w & 0x0F, w >> 4])
    out |= {"e2m1_max"} if ((nib & 7) == 7).any() else set()
    out |= {"odd_rows"} if w.shape[0] % 2 else set()
    return out


register(OpRecord(
    name="fp4_linear",
    summary="y = x @ W^T with a packed FP4 e2m1 weight (two per byte, low nibble first) and E8M0 1x32 scales",
    official="M:L108-120 linear (FP4 experts: act_quant of x in mirror, fp32 accumulate, bf16 out); C:L30-33 packing",
    inputs={"x": "[rows, K] float32 (bf16 values)", "weight": "[N, K/2] int8: element 2j in bits 0-3, 2j+1 in 4-7",
            "scale": "[N, K/32] float8_e8m0fnu"},
    outputs=("y",), axes={"y": ("r rows", "o output channels")},
    run=_fp4_run, strategy=fp4_linear_inputs, edges=_fp4_edges,
    edge_cases=("one_row", "empty", "scales_over_8_binades", "e2m1_max", "odd_rows")))
