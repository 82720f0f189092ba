"""Records of the attention path: the compressor, the indexer and sparse attention with the sink
(docs/architecture.md §8-10).

    compress          gated pooling of m-token blocks into entries (m = 4: overlapping windows of 2m, the
                      previous block's first d channels; m > 4: one block), rms_norm, RoPE at the block's
                      first position, then FP8 QDQ of the non-rope dims (main) or Hadamard + FP4 QDQ
                      (rotate: the indexer's compressor); the decode state carries incomplete blocks   (M:L279-377)
    hadamard          x · H_n / sqrt(n) on the last axis, Sylvester (natural) order: the indexer rotates its
                      queries and keys with it before their FP4 QDQ (rotate_activation)              (M:L247-251)
    act_quant_fp4     the FP4 QDQ of the index queries and keys: per 1x32 block, scale 2^ceil(log2(amax/6)),
                      e2m1 values (round half to even, saturating at ±6); QDQ = bf16(values·scale) (K:L128-200)
    index_topk        I[t, e] = Σ_h w[t, h]·ReLU(q[t, h]·K[e]) for e < (t+1)//m, top-k descending, ties to the
                      lower entry, -1 padded                                                           (M:L380-433)
    index_layout      which kv entries each query sees, in the order attention lists them: the window part
                      (positions max(0, t-W+1) .. t oldest first, -1 padded to min(s, W) in a prefill from 0
                      and to W in a decode step or with layout "canonical"), then the compressed part
                      (entries e < (t+1)//m ascending, -1 padded)                          (M:L254-276)
    sparse_attention  o = Σ_j softmax-with-sink(scale·q·kv_j)·kv_j over each query's index set (-1 = none):
                      the sink attn_sink[h] of the query's OWN head enters the denominator only       (K:L276-368)
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refimpl.config import Config, Layer
from refimpl.context import RunContext
from refimpl.model.attention import compressed_indices, sparse_attention, window_indices
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.model.indexer import index_topk
from refimpl.numerics import FP4_AMAX_FLOOR, FP4_BLOCK, FP4_MAX, act_quant_fp4, hadamard, round_bf16
from refimpl.testing.ops_linear import as_dtype, bf16_values
from refimpl.testing.record import OpRecord, register

_TINY = Config.tiny()
COMPRESSED_ROPE = dict(base=_TINY.compress_rope_theta, original_seq_len=_TINY.original_seq_len,
                       factor=_TINY.rope_factor, beta_fast=_TINY.beta_fast, beta_slow=_TINY.beta_slow)


# ------------------------------------------------------------------------------------------------ compressor

def _compress(inp, prec, start_pos, x, kv, score):
    m, d = inp["ratio"], inp["head_dim"]
    layer = Layer(id=3, compress_ratio=m, overlap=m == 4, uses_indexer=False)   # a compressed layer of tiny: its RoPE
    ctx = RunContext(cfg=_TINY, prec=prec)
    w = CompressorWeights(wkv=inp["wkv"], wgate=inp["wgate"], ape=inp["ape"], norm=inp["norm"])
    e, st_ = compress(as_dtype(x, prec), start_pos, CompressorState(kv=as_dtype(kv, prec), score=as_dtype(score, prec)),
                      w, layer, ctx, head_dim=d, rotate=inp["rotate"])
    return e, st_


@st.composite
def compressor_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = draw(st.sampled_from([4, 8, 16]))
    d = draw(st.sampled_from([_TINY.head_dim, 256]))                   # p = 64 rope dims; 64 or 192 FP8 QDQ dims
    c = draw(st.sampled_from([16, 64]))
    o = 2 if m == 4 else 1
    start = draw(st.sampled_from([0, 0, 1, m - 1, m, m + 1, 3 * m - 1]))
    s = draw(st.sampled_from([1, 2, m - 1, m, m + 1, 2 * m + 3]))
    inp = {"ratio": m, "head_dim": d, "rotate": draw(st.booleans()), "start_pos": start,
           "wkv": (rng.standard_normal((o * d, c)) * c ** -0.5).astype(ml_dtypes.bfloat16),
           "wgate": (rng.standard_normal((o * d, c)) * c ** -0.5).astype(ml_dtypes.bfloat16),
           "ape": (rng.standard_normal((m, o * d)) * 0.5).astype(np.float32),
           "norm": (1 + 0.1 * rng.standard_normal(d)).astype(ml_dtypes.bfloat16), **COMPRESSED_ROPE}
    shape = (1, o * m, o * d)
    kv, score = np.zeros(shape, np.float32), np.full(shape, -np.inf, np.float32)
    if start:                         # the decode state after `start` tokens: refimpl's own, from a float32 prefill
        _, state = _compress(inp, "float32", 0, bf16_values(rng, (1, start, c)), kv, score)
        kv, score = state.kv, state.score
    inp.update(x=bf16_values(rng, (1, s, c)).astype(np.float32), state_kv=kv, state_score=score)
    return inp


def _compressor_run(inp, prec):
    e, state = _compress(inp, prec, inp["start_pos"], inp["x"], inp["state_kv"], inp["state_score"])
    return {"entries": e, "state_kv": state.kv, "state_score": state.score}


def _compressor_edges(inp) -> set:
    m, start, s = inp["ratio"], inp["start_pos"], inp["x"].shape[1]
    out = {"overlap"} if m == 4 else {"no_overlap"}
    out |= {"rotate"} if inp["rotate"] else set()
    new = (start + s) // m - start // m
    out |= {"no_entry"} if new == 0 else {"several_entries"} if new > 1 else set()
    out |= {"incomplete_group"} if (start + s) % m else set()
    out |= {"decode_state"} if start % m else set()
    out |= {"first_block_padding"} if m == 4 and start < m and new > 0 else set()
    out |= {"head_dim_256"} if inp["head_dim"] == 256 else set()
    return out


register(OpRecord(
    name="compress",
    summary="compressor: gated pooling of m-token blocks (overlap at m = 4), norm, RoPE at the block start, QDQ",
    official="M:L279-377 Compressor (forward and the decode state kv_state / score_state)",
    inputs={"x": "[b, s, c] float32 (bf16 values): tokens start_pos .. start_pos+s-1", "start_pos": "int",
            "ratio": "int m (4: overlap, o = 2; else o = 1)", "head_dim": "int d", "rotate": "bool (indexer's compressor)",
            "wkv": "[o·d, c] bfloat16", "wgate": "[o·d, c] bfloat16", "ape": "[m, o·d] float32", "norm": "[d] bfloat16",
            "state_kv": "[b, o·m, o·d] float32: rows 0..m-1 the previous block (overlap), then the pending rows t mod m",
            "state_score": "[b, o·m, o·d] float32 (-inf where unused; scores include ape)",
            "base, original_seq_len, factor, beta_fast, beta_slow": "the compressed layers' RoPE/YaRN (rope_dim 64)"},
    outputs=("entries", "state_kv", "state_score"),
    axes={"entries": ("b batch", "e entries", "d dims"), "state_kv": ("b batch", "r rows", "d channels"),
          "state_score": ("b batch", "r rows", "d channels")},
    run=_compressor_run, strategy=compressor_inputs, edges=_compressor_edges,
    edge_cases=("overlap", "no_overlap", "rotate", "no_entry", "several_entries", "incomplete_group", "decode_state",
                "first_block_padding", "head_dim_256")))


# ------------------------------------------------------------------------------------------------ hadamard

@st.composite
def hadamard_inputs(draw, precision: str = "float32"):
    """Rows of one head dim n (128: the released index_head_dim), rows 2^±20 apart, and rows made to cancel:
    a constant row (all outputs but the first exactly 0) and a row of one Walsh function (one output nonzero)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.sampled_from([2, 32, 64, 128]))
    shape = draw(st.sampled_from([(0,), (1,), (3,), (1, 2, 4)]))         # (1, 2, 4): [b, s, i] heads
    x = bf16_values(rng, shape + (n,)) * np.exp2(rng.integers(-20, 21, shape + (1,)))
    rows = x.reshape(-1, n)
    if len(rows) and draw(st.booleans()):
        rows[0] = round_bf16(rng.standard_normal())                      # constant: H·x has one nonzero
    if len(rows) > 1 and draw(st.booleans()):
        rows[-1] = _sylvester(n)[rng.integers(n)] * round_bf16(rng.standard_normal())   # one Walsh function
    return {"x": round_bf16(x).astype(np.float32)}


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _hadamard_edges(inp) -> set:
    x = np.asarray(inp["x"], np.float64)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = {"one_row"} if len(rows) == 1 else {"empty"} if len(rows) == 0 else set()
    out |= {"heads_axis"} if x.ndim == 4 else set()
    out |= {"index_head_dim_128"} if n == 128 else {"two_dims"} if n == 2 else set()
    if len(rows):
        y = rows @ _sylvester(n)
        cancels = ((y == 0).sum(-1) >= n - 1) & (np.abs(rows).max(-1) > 0)   # all outputs but one exactly 0
        out |= {"exact_zeros"} if n > 2 and cancels.any() else set()
        rms = np.sqrt((rows * rows).mean(-1))
        rms = rms[rms > 0]
        out |= {"rows_over_16_binades"} if rms.size and np.log2(rms.max() / rms.min()) >= 16 else set()
    return out


register(OpRecord(
    name="hadamard",
    summary="the indexer's rotation: x · H_n / sqrt(n) along the last axis, Sylvester (natural) order, n a power of two",
    official="M:L247-251 rotate_activation (fast_hadamard_transform, scale = dim ** -0.5); on the index queries "
             "(Indexer, M:L380-433) and keys (the indexer's Compressor, M:L279-377)",
    inputs={"x": "[..., n] float32 (bf16 values; n a power of two: 128 in the indexer)"},
    outputs=("y",), axes={"y": (("r rows", "n dims"), ("b batch", "s positions", "h heads", "n dims"))},
    run=lambda inp, prec: {"y": hadamard(as_dtype(inp["x"], prec), prec)},
    strategy=hadamard_inputs, edges=_hadamard_edges,
    edge_cases=("one_row", "empty", "heads_axis", "index_head_dim_128", "two_dims", "exact_zeros",
                "rows_over_16_binades")))


# ------------------------------------------------------------------------------------------------ act_quant_fp4

E2M1_TIES = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])          # halfway between e2m1 neighbours


@st.composite
def act_quant_fp4_inputs(draw, precision: str = "mirror"):
    """Blocks of 32 whose amax is 6·2^k exactly (values at ±6 after scaling) and whose other values sit exactly
    halfway between e2m1 neighbours (ties, round half to even), blocks 2^±40 apart, blocks below the amax floor
    6·2^-126 (zero or bf16 subnormals), and values that round to 0."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.sampled_from([0, 1, 2, 3]))
    nblocks = draw(st.integers(1, 4))
    spread = draw(st.sampled_from([0, 40]))
    x = bf16_values(rng, (rows, nblocks, FP4_BLOCK)) * np.exp2(rng.integers(-spread, spread + 1, (rows, nblocks, 1)))
    x = round_bf16(x)
    if rows and draw(st.booleans()):                                    # amax 6·2^k, the rest ties at scale 2^k
        r, b, k = rng.integers(rows), rng.integers(nblocks), int(rng.integers(-30, 30))
        x[r, b] = rng.choice(E2M1_TIES, FP4_BLOCK) * rng.choice([-1, 1], FP4_BLOCK) * 2.0**k
        x[r, b, rng.integers(FP4_BLOCK)] = FP4_MAX * 2.0**k * rng.choice([-1, 1])
    if rows and draw(st.booleans()):                                    # below the amax floor
        r, b = rng.integers(rows), rng.integers(nblocks)
        x[r, b] = 0.0 if draw(st.booleans()) else round_bf16(x[r, b] * 2.0**-128)
    return {"x": x.reshape(rows, nblocks * FP4_BLOCK).astype(np.float32)}


def _act_quant_fp4_run(inp, prec):
    q, s = act_quant_fp4(np.asarray(inp["x"], np.float32), block=FP4_BLOCK)
    return {"values": q, "scale": s}


def _act_quant_fp4_edges(inp) -> set:
    x = np.asarray(inp["x"], np.float32)
    out = {"one_row"} if x.shape[0] == 1 else {"empty"} if x.shape[0] == 0 else set()
    if x.size:
        q, s = act_quant_fp4(x, block=FP4_BLOCK)
        r = np.abs(x.astype(np.float64).reshape(x.shape[0], -1, FP4_BLOCK)) / s[..., None]
        out |= {"e2m1_max"} if (np.abs(q) == FP4_MAX).any() else set()
        out |= {"exact_ties"} if np.isin(r, E2M1_TIES).any() else set()
        out |= {"rounds_to_zero"} if ((r > 0) & (q.reshape(r.shape) == 0)).any() else set()
        out |= {"amax_floor"} if (np.abs(x.reshape(x.shape[0], -1, FP4_BLOCK)).max(-1) < FP4_AMAX_FLOOR).any() else set()
        ls = np.log2(s)
        out |= {"scales_over_16_binades"} if ls.max() - ls.min() >= 16 else set()
    return out


register(OpRecord(
    name="act_quant_fp4",
    summary="FP4 e2m1 quantization of the index queries / keys per 1x32 block, power-of-two scales (QDQ: values·scale)",
    official="K:L128-200 fp4_act_quant (scale = 2^ceil(log2(max(amax, 6·2^-126) / 6)), e2m1 cast RNE, saturating); "
             "in place on the index queries (M:L380-433) and keys (M:L279-377)",
    inputs={"x": "[rows, K] float32 (bf16 values, K a multiple of 32)"},
    outputs=("values", "scale"),
    axes={"values": ("r rows", "k columns"), "scale": ("r rows", "b blocks")},
    run=_act_quant_fp4_run, strategy=act_quant_fp4_inputs, edges=_act_quant_fp4_edges,
    edge_cases=("one_row", "empty", "e2m1_max", "exact_ties", "rounds_to_zero", "amax_floor", "scales_over_16_binades"),
    precisions=("mirror",), exact=True))


# ------------------------------------------------------------------------------------------------ index_topk

@st.composite
def index_topk_inputs(draw, precision: str = "float32"):
    """Integer-valued q, keys and weights times powers of two: every score is exact at every precision, so
    scores are either equal (exact ties, often) or far apart, and the top-k is decided without near-ties."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = draw(st.sampled_from([1, 2, 6]))
    start = draw(st.sampled_from([0, 1, 3, 10, 40]))
    ratio = draw(st.sampled_from([4]))
    heads = draw(st.sampled_from([1, 4]))
    j = draw(st.sampled_from([8, 32]))
    k = draw(st.sampled_from([1, 2, 4, 16]))
    levels = draw(st.sampled_from([1, 2, 5]))                           # few levels: many exact ties
    n = (start + s) // ratio + draw(st.sampled_from([0, 2]))            # keys may run past the visible ones
    pick = lambda *sh: rng.integers(-levels, levels + 1, sh).astype(np.float32)      # noqa: E731
    return {"q": pick(1, s, heads, j) * 0.5, "keys": pick(1, n, j) * 0.25, "weights": np.abs(pick(1, s, heads)) + 1,
            "start_pos": start, "ratio": ratio, "index_topk": k}


def _index_topk_run(inp, prec):
    topk, scores = index_topk(as_dtype(inp["q"], prec), as_dtype(inp["keys"], prec), as_dtype(inp["weights"], prec),
                                   inp["start_pos"], inp["ratio"], inp["index_topk"], prec)
    return {"topk": topk, "scores": scores}


def _index_topk_edges(inp) -> set:
    out = set()
    start, s, m, k = inp["start_pos"], inp["q"].shape[1], inp["ratio"], inp["index_topk"]
    vis = (start + np.arange(s) + 1) // m
    out |= {"query_sees_nothing"} if (vis == 0).any() else set()
    out |= {"padding_-1"} if ((vis > 0) & (vis < k)).any() else set()
    out |= {"topk_drops_entries"} if (vis > k).any() else set()
    out |= {"keys_past_visible"} if inp["keys"].shape[1] > vis.max() else set()
    sc = _index_topk_run(inp, "float64")["scores"][0]
    for t, v in enumerate(vis):
        row = sc[t, :v]
        if v > k and len(row) and np.sort(row)[::-1][k - 1] == np.sort(row)[::-1][k]:
            out.add("tie_at_the_boundary")
        if len(np.unique(row)) < len(row):
            out.add("exact_ties")
    return out


register(OpRecord(
    name="index_topk",
    summary="indexer scores Σ_h w·ReLU(q·K) of the visible entries and their top-k (ties: the lower entry), -1 padded",
    official="M:L380-433 Indexer.forward (score, the causal mask, topk)",
    inputs={"q": "[b, s, i, j] float32 (after RoPE, Hadamard and FP4 QDQ)", "keys": "[b, n, j] float32 (entries)",
            "weights": "[b, s, i] float32 (weights_proj · j^-0.5 · i^-0.5)", "start_pos": "int",
            "ratio": "int m (4)", "index_topk": "int k"},
    outputs=("topk", "scores"),
    axes={"topk": ("b batch", "s positions", "k slots"), "scores": ("b batch", "s positions", "e entries")},
    run=_index_topk_run, strategy=index_topk_inputs, edges=_index_topk_edges,
    edge_cases=("query_sees_nothing", "padding_-1", "topk_drops_entries", "keys_past_visible", "exact_ties",
                "tie_at_the_boundary"),
    selections={"topk": "scores"}))


# ------------------------------------------------------------------------------------------------ index_layout

@st.composite
def index_layout_inputs(draw, precision: str = "float32"):
    """Calls placed at the window and compression boundaries: a prefill from 0 shorter and longer than the
    window, decode steps at t = W-2, W-1, W (the first full window) and at t+1 = k·m (an entry completes),
    chunks from start_pos > 0, both layouts."""
    w = draw(st.sampled_from([4, 8, 128]))
    m = draw(st.sampled_from([0, 4, 8]))                                # 0: a window-only layer
    kind = draw(st.sampled_from(["prefill", "decode", "chunk"]))
    if kind == "prefill":
        start, s = 0, draw(st.sampled_from([1, w - 1, w, w + 1, 2 * w + 3]))
    else:
        start = draw(st.sampled_from([w - 2, w - 1, w, 2 * w + 1, max(m, 1) * 3 - 1]))
        s = 1 if kind == "decode" else draw(st.sampled_from([2, w + 1]))
    return {"start_pos": max(start, 0 if kind == "prefill" else 1), "s": s, "window_size": w, "ratio": m,
            "layout": draw(st.sampled_from(["official", "canonical"]))}


def _index_layout_run(inp, prec):
    start, s, w, m = inp["start_pos"], inp["s"], inp["window_size"], inp["ratio"]
    idx, n_prev = window_indices(start, s, w, inp["layout"])
    window = np.where(idx >= 0, idx + (start - n_prev), -1)            # rows of [previous rows ++ call] -> positions
    comp = compressed_indices(start, s, m) if m else np.zeros((s, 0), np.int64)
    return {"window": window.astype(np.int64), "compressed": comp.astype(np.int64)}


def _index_layout_edges(inp) -> set:
    start, s, w, m = inp["start_pos"], inp["s"], inp["window_size"], inp["ratio"]
    t = start + np.arange(s)
    out = {"prefill_shorter_than_window"} if start == 0 and s < w else set()
    out |= {"prefill_longer_than_window"} if start == 0 and s > w else set()
    out |= {"decode_step"} if start > 0 and s == 1 else {"chunk_after_start"} if start > 0 else set()
    out |= {"window_padding_-1"} if (start > 0 or inp["layout"] == "canonical") and (t < w - 1).any() else set()
    out |= {"first_full_window"} if (t == w - 1).any() else set()
    out |= {"window_slides"} if (t >= w).any() else set()
    out |= {"canonical"} if inp["layout"] == "canonical" else set()
    if m:
        out |= {"entry_completes"} if ((t + 1) % m == 0).any() else set()
        out |= {"no_entry_visible"} if (t + 1 < m).any() else set()
        out |= {"compressed_padding_-1"} if ((t + 1) // m < (start + s) // m).any() else set()
    else:
        out.add("window_only")
    return out


register(OpRecord(
    name="index_layout",
    summary="the index set of each query: window positions (oldest first, -1 padded), then visible compressed entries",
    official="M:L254-276 get_window_topk_idxs (prefill from 0: min(s, W) wide; decode: W, the ring oldest first) and "
             "get_compress_topk_idxs (entries e < (t+1)//m)",
    inputs={"start_pos": "int: the call's first position", "s": "int: tokens in the call", "window_size": "int W",
            "ratio": "int m (0: a window-only layer)", "layout": '"official" or "canonical" (always W wide)'},
    outputs=("window", "compressed"),
    axes={"window": ("s positions", "k slots"), "compressed": ("s positions", "k slots")},
    run=_index_layout_run, strategy=index_layout_inputs, edges=_index_layout_edges,
    edge_cases=("prefill_shorter_than_window", "prefill_longer_than_window", "decode_step", "chunk_after_start",
                "window_padding_-1", "first_full_window", "window_slides", "canonical", "entry_completes",
                "no_entry_visible", "compressed_padding_-1", "window_only"),
    precisions=("mirror", "float32", "float64"), exact=True))


# ------------------------------------------------------------------------------------------------ sparse_attention

@st.composite
def sparse_attention_inputs(draw, precision: str = "float32"):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = draw(st.sampled_from([1, 1, 3]))
    h = draw(st.sampled_from([1, 2, 8]))
    d = draw(st.sampled_from([8, 64]))
    n = draw(st.sampled_from([1, 5, 70, 200]))
    k = draw(st.sampled_from([1, 3, 64, 65, 150]))
    pad = draw(st.sampled_from([0.0, 0.3, 0.95]))
    spread = draw(st.sampled_from([1.0, 8.0]))
    q = bf16_values(rng, (1, s, h, d)) * spread
    kv = bf16_values(rng, (1, n, d))
    sink = (rng.standard_normal(h) * draw(st.sampled_from([1.0, 4.0]))
            + draw(st.sampled_from([0.0, 12.0]))).astype(np.float32)    # +12: the sink outweighs the scores
    idx = rng.integers(0, n, (1, s, k))
    idx[rng.random((1, s, k)) < pad] = -1
    idx[:, :, 0] = rng.integers(0, n, (1, s))                           # the first block has an entry (K:L276-368)
    scale = float(draw(st.sampled_from([d ** -0.5, 1.0])))
    # scores at most 60 in size: exp(sink - max) stays finite in fp32 (a correct fp32 kernel overflows beyond)
    sc = np.abs(np.einsum("bshd,bnd->bshn", q, kv) * scale).max(axis=(-1, -2), keepdims=True)[..., 0]   # [b, s, 1]
    q = q * np.minimum(1.0, 60.0 / np.maximum(sc, 1e-30))[..., None]
    return {"q": round_bf16(q), "kv": kv.astype(np.float32), "attn_sink": sink, "topk_idxs": idx,
            "softmax_scale": scale}


def _sparse_run(inp, prec):
    return {"o": sparse_attention(as_dtype(inp["q"], prec), as_dtype(inp["kv"], prec), inp["attn_sink"],
                                       np.asarray(inp["topk_idxs"]), inp["softmax_scale"], prec)}


def _sparse_edges(inp) -> set:
    idx, h = np.asarray(inp["topk_idxs"]), inp["q"].shape[2]
    valid = (idx >= 0).sum(-1)
    out = {"padding_-1"} if (idx < 0).any() else set()
    out |= {"one_valid_entry"} if (valid == 1).any() else set()
    out |= {"several_blocks_of_64"} if idx.shape[-1] > 64 else set()
    out |= {"one_query"} if inp["q"].shape[1] == 1 else set()
    out |= {"sink_heads_differ"} if h > 1 and np.ptp(inp["attn_sink"]) > 0.5 else set()
    sc = np.einsum("bshd,bnd->bshn", inp["q"].astype(np.float64), inp["kv"].astype(np.float64)) * inp["softmax_scale"]
    out |= {"sink_dominates"} if (inp["attn_sink"][None, None, :] > sc.max(-1) + 5).any() else set()
    out |= {"large_logits"} if np.abs(sc).max() > 50 else set()
    return out


register(OpRecord(
    name="sparse_attention",
    summary="attention over each query's gathered KV rows with a per-head sink in the softmax denominator",
    official="K:L276-368 sparse_attn (block-64 online softmax in mirror)",
    inputs={"q": "[b, s, h, d] float32 (bf16 values)", "kv": "[b, n, d] float32 (bf16 values): K = V",
            "attn_sink": "[h] float32 (each head its own)", "topk_idxs": "[b, s, k] int64, -1 = no entry",
            "softmax_scale": "float"},
    outputs=("o",), axes={"o": ("b batch", "s positions", "h heads", "d dims")},
    run=_sparse_run, strategy=sparse_attention_inputs, edges=_sparse_edges,
    edge_cases=("padding_-1", "one_valid_entry", "several_blocks_of_64", "one_query", "sink_heads_differ",
                "sink_dominates", "large_logits"),
    suspects=tuple((f"every head group using the sinks of the first of {g} groups (tensor-parallel rank 0's)",
                    lambda i, g=g: {**i, "attn_sink": np.tile(i["attn_sink"][:len(i["attn_sink"]) // g], g)}
                    if len(i["attn_sink"]) % g == 0 and len(i["attn_sink"]) > 1 else None) for g in (2, 4, 8))
    + (("each head using the sink of the head before it (an off-by-one head index)",
        lambda i: {**i, "attn_sink": np.roll(i["attn_sink"], 1)} if len(i["attn_sink"]) > 1 else None),
       ("each head using the sink of the head after it (an off-by-one head index)",
        lambda i: {**i, "attn_sink": np.roll(i["attn_sink"], -1)} if len(i["attn_sink"]) > 2 else None),
       ("the sink rounded to bf16", lambda i: {**i, "attn_sink": round_bf16(i["attn_sink"])}),
       ("attention without the sink", lambda i: {**i, "attn_sink": np.full_like(i["attn_sink"], -np.inf)})),
    ))
