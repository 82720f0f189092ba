"""Every rounding point of `mirror`, pinned by a test that fails when that one step is removed or moved.

mirror = the official code's rounding points reproduced exactly, exact arithmetic (float64)
between them, rounded once per operation. Each test computes the expected mirror value on small
inputs, independently of the code under test: products in float64, each rounding written out with
the helpers below (`bf16r`, `f32r`, `fp8_act_ref`, `qdq_ref`, built on ml_dtypes, which
tests/test_numerics.py checks code by code and tie by tie). Each test asserts

  (a) the implementation equals the expected value bit for bit, and
  (b) the same computation with the step removed (or moved) gives a different value,

so (b) proves the inputs are sensitive to the step and (a) then fails when the code drops it.
tools/mutation_check.py removes each step in turn in a scratch copy and expects the suite to fail.

The rounding points of mirror, as the code has them (test names below without the `test_` prefix):

| where | rounding point | official | test |
|---|---|---|---|
| linear.quantized_linear | FP8 e4m3 activation quantization, 1x128 blocks, power-of-two scales (`act_fp8`) | M:L108-120, K:L40-125 | quantized_linear_fp8_and_fp4 |
| linear.quantized_linear | fp32 accumulator, output bf16 | K:L203-273 | quantized_linear_fp8_and_fp4 |
| numerics (every FP8/FP4 quantization) | block scale a power of two, 2^ceil(log2(amax/max)) from the bits | K:L22-37 | quantized_linear_fp8_and_fp4 (and tests/test_numerics.py) |
| linear.bf16_linear | fp32 accumulator, output bf16 (weights_proj, wo_a) | M:L380-433, M:L534-542 | fp32_and_bf16_linear |
| linear.fp32_linear | output fp32, not bf16 (compressor wkv/wgate, gate, hc fn, head) | M:L279-377, M:L564-584 | fp32_and_bf16_linear |
| linear.product | fp32 accumulator of attention/indexer products | K:L276-368 | product_rounds_once_to_fp32 |
| norm.rms_norm | fp32 math, output bf16 | M:L183-196 | rms_norm_output_is_rounded_to_bf16 |
| norm.head_rms_norm | five bf16 ops: q², mean, + eps, rsqrt, q·r | M:L496-499 | head_rms_norm_rounds_each_bf16_op |
| rope.apply_rope | rotated pair written back as bf16 | M:L232-244 | rope_writes_back_bf16 |
| hyperconn.hc_pre / hc_post / hc_head | sublayer input / new streams / head input bf16 | M:L674-687, M:L729-736 | hyperconn_outputs_are_bf16 |
| compressor.compress | bf16 of the pooled entry before its norm | M:L362-372 | compressor_rounds_to_bf16_before_the_norm |
| compressor.compress (main) | FP8 QDQ of the non-rope dims, block 64 (current revision) | M:L372 | compressor_rounds_to_bf16_before_the_norm |
| compressor.compress (indexer) | bf16 Hadamard, then FP4 QDQ block 32 | M:L368-370 | compressor_index_keys_hadamard_bf16_then_fp4 |
| indexer.indexer | q: bf16 Hadamard then FP4 QDQ; weights: bf16(weights_proj(x) · j^-0.5 · i^-0.5) | M:L380-433 | indexer_scores_against_independent_computation |
| indexer.index_scores | bf16 einsum output, bf16 ReLU·weight, fp32 head sum rounded to bf16 | M:L380-433 | index_scores_each_bf16_step |
| attention.attention | FP8 QDQ of the window KV's non-rope dims, block 64 (current revision) | M:L506 | window_layer_attention_composition |
| attention.sparse_attention | scores fp32, probabilities bf16 before P·V (unnormalised), output bf16 | K:L276-368 | sparse_attention_each_rounding |
| attention.attention | wo_a: bf16 einsum output per group | M:L534-542 | window_layer_attention_composition |
| moe.expert | bf16 of the SwiGLU product before w2 | M:L604-606 | expert_rounds_to_bf16_before_w2 |
| moe.moe | fp32 sum of expert outputs, output bf16 | M:L630-645 | moe_output_is_bf16_of_the_fp32_sum |
| moe.route | router logits and weights fp32, not bf16 | M:L564-584 | router_stays_fp32 |
| moe.moe | shared-expert SwiGLU clamp in the current revision only | M:L587-606 | moe_output_is_bf16_of_the_fp32_sum |
| transformer.head_logits | logits fp32 (NOT bf16) | M:L704-736 | logits_are_fp32_not_bf16 |
| transformer.mtp_forward | bf16(e_proj(e) + h_proj(h)) | M:L739-767 | mtp_input_is_bf16 |

Steps that are exact by construction have no test of their own (removing them changes nothing):
the bf16 rounding after an in-place FP8/FP4 QDQ (q·s has at most 4 significant bits), the fp32
rounding before a bf16 output (round_bf16 rounds to fp32 first), the embedding upcast and the
bf16 storage of caches (they hold bf16 values).
"""
import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

from refimpl import numerics as nx
from refimpl.config import Config
from refimpl.model.attention import AttentionState, attention, sparse_attention, window_indices
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.model.hyperconn import hc_head, hc_post, hc_pre
from refimpl.model.indexer import IndexerWeights, index_scores, indexer
from refimpl.model.linear import (Fp4Matrix, Fp8Matrix, bf16_linear, fp32_linear, product,
                                  quantized_linear)
from refimpl.model.moe import ExpertWeights, GateWeights, MoEWeights, expert, moe, route
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.model.rope import apply_rope, layer_rope_table
from refimpl.model.transformer import head_logits
from refimpl.oracle.trace import Trace
from refimpl.synthetic.quantize import quant_fp4_weight, quant_fp8_weight

TINY = Config.tiny()
M = "mirror"
EPS = TINY.norm_eps


# ------------------------------------------------------------------------------------------------
# independent roundings (float64 in, explicit rounding out)

def f32r(x):
    """Round once to fp32."""
    return np.asarray(x).astype(np.float32)


def bf16r(x):
    """Round to bf16 (via fp32, as the official code only rounds fp32 values), as float32."""
    return f32r(x).astype(ml_dtypes.bfloat16).astype(np.float32)


def is_bf16(x):
    return np.array_equal(x, bf16r(x))


def _scale(amax, inv_max):
    """2^ceil(log2(fp32(amax · fp32(1/max)))), computed in float64 from the fp32 product."""
    v = (f32r(amax) * np.float32(inv_max)).astype(np.float64)
    return np.exp2(np.ceil(np.log2(v)))


def fp8_act_ref(x, block=128):
    """The GEMM input quantization: e4m3(x / s) · s per block, s a power of two (float64)."""
    xb = np.asarray(x, np.float64).reshape(*np.shape(x)[:-1], -1, block)
    s = _scale(np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4), 1 / 448)
    q = np.clip(xb / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (q * s).reshape(np.shape(x))


def qdq_ref(x, block, fmt):
    """In-place QDQ: bf16(q · s) with q e4m3 (fmt "fp8") or e2m1 (fmt "fp4")."""
    mx, floor, dt = (448, 1e-4, ml_dtypes.float8_e4m3fn) if fmt == "fp8" else (6, 6 * 2.0**-126, ml_dtypes.float4_e2m1fn)
    xb = np.asarray(x, np.float64).reshape(*np.shape(x)[:-1], -1, block)
    s = _scale(np.maximum(np.abs(xb).max(-1, keepdims=True), floor), 1 / mx)
    q = np.clip(xb / s, -mx, mx).astype(dt).astype(np.float64)
    return bf16r(q * s).reshape(np.shape(x))


def hadamard_ref(x):
    """x · H / sqrt(n), Sylvester H, in float64."""
    n = x.shape[-1]
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return np.asarray(x, np.float64) @ h / math.sqrt(n)


def differs(a, b):
    return not np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def bf16_values(rng, shape, scale=1.0):
    return bf16r(rng.standard_normal(shape) * scale)


def fp8_matrix(rng, n, k, scale=None):
    return Fp8Matrix(*quant_fp8_weight(rng.standard_normal((n, k)) * (scale or k ** -0.5)))


def fp4_matrix(rng, n, k):
    return Fp4Matrix(*quant_fp4_weight(rng.standard_normal((n, k)) * k ** -0.5))


def exact_rows(x, w):
    """x [..., in] @ w[out, in]ᵀ in float64."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


# ------------------------------------------------------------------------------------------------
# products

@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_quantized_linear_fp8_and_fp4(kind):
    rng = np.random.default_rng(1)
    # input dims 64..127 are 2^-16 of the others (e4m3 subnormals under the scale of a 128-wide block,
    # not under a 64-wide one) and carry the output through weights 2^16 larger; dims 0..63 weigh 0
    x = bf16_values(rng, (3, 256), 3.0)
    x[:, 64:128] *= 2.0**-16
    wf = rng.standard_normal((64, 256)) / 16
    wf[:, :64], wf[:, 64:128] = 0.0, wf[:, 64:128] * 2.0**16
    w = Fp8Matrix(*quant_fp8_weight(wf)) if kind == "fp8" else Fp4Matrix(*quant_fp4_weight(wf))
    wd = w.dequantize()
    want = bf16r(f32r(exact_rows(fp8_act_ref(x), wd)))
    assert np.array_equal(quantized_linear(x, w, M), want)
    assert differs(want, bf16r(exact_rows(fp8_act_ref(x, 64), wd)))  # with blocks of 64
    assert differs(want, bf16r(exact_rows(x, wd)))                  # without the FP8 activation quantization
    assert differs(want, f32r(exact_rows(fp8_act_ref(x), wd)))      # without the bf16 output


def test_fp32_and_bf16_linear():
    rng = np.random.default_rng(2)
    x = f32r(rng.standard_normal((3, 256)))                          # fp32 activations (compressor, gate input)
    w = bf16_values(rng, (64, 256), 0.1)
    exact = exact_rows(x, w)
    y = fp32_linear(x, w, M)
    assert y.dtype == np.float32 and np.array_equal(y, f32r(exact))
    assert differs(f32r(exact), exact) and not is_bf16(y)            # fp32 output, not bf16
    assert np.array_equal(bf16_linear(x, w, M), bf16r(exact))
    assert differs(bf16r(exact), f32r(exact))


def test_product_rounds_once_to_fp32():
    rng = np.random.default_rng(3)
    a, b = bf16_values(rng, (4, 128)), bf16_values(rng, (128, 9))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = product(a, b, M)
    assert got.dtype == np.float32 and np.array_equal(got, f32r(exact)) and differs(f32r(exact), exact)


# ------------------------------------------------------------------------------------------------
# norms, RoPE, mHC

def test_rms_norm_output_is_rounded_to_bf16():
    rng = np.random.default_rng(4)
    x, w = bf16_values(rng, (4, 256), 3.0), bf16r(1 + 0.1 * rng.standard_normal(256))
    exact = x.astype(np.float64) / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + EPS) * w
    y = rms_norm(x, w, eps=EPS, prec=M)
    assert y.dtype == np.float32 and is_bf16(y) and not is_bf16(exact)
    assert np.all(np.abs(y - exact) <= np.abs(exact) * 2.0**-8 * 1.001)   # one bf16 rounding of the exact value


def head_norm_ref(q, skip=None):
    """The weightless q norm in the official bf16 ops; `skip` leaves out one rounding (fp32 ops between)."""
    rnd = lambda k, v: v if k == skip else bf16r(v)                  # noqa: E731
    q = np.asarray(q, np.float32)
    sq = rnd("square", q * q)
    mean = rnd("mean", np.mean(sq, axis=-1, keepdims=True, dtype=np.float32))
    rs = rnd("rsqrt", np.float32(1) / np.sqrt(rnd("eps", mean + np.float32(EPS))))
    return rnd("product", q * rs)


def test_head_rms_norm_rounds_each_bf16_op():
    rng = np.random.default_rng(5)
    # magnitudes from 1e-3 (mean(q²) near eps, so "+ eps" rounds) to 10
    q = bf16r(rng.standard_normal((1, 6, 8, 128)) * 10.0 ** rng.uniform(-3, 1, (1, 6, 8, 1)))
    want = head_norm_ref(q)
    assert np.array_equal(head_rms_norm(q, eps=EPS, prec=M), want)
    for step in ("square", "mean", "eps", "rsqrt", "product"):
        assert differs(want, head_norm_ref(q, skip=step)), step


def test_rope_writes_back_bf16():
    rng = np.random.default_rng(6)
    x = bf16_values(rng, (1, 5, 128))
    table = layer_rope_table(np.arange(3, 8), TINY, 2, M)
    a, b = x[..., 64::2], x[..., 65::2]                              # interleaved pairs of the last 64 dims
    re, im = a * table.cos - b * table.sin, a * table.sin + b * table.cos   # fp32, as the official complex product
    want = x.copy()
    want[..., 64::2], want[..., 65::2] = bf16r(re), bf16r(im)
    assert np.array_equal(apply_rope(x, table, M), want)
    assert not is_bf16(re) or not is_bf16(im)


def test_hyperconn_outputs_are_bf16(tiny_model):
    w = tiny_model(M).weights.layers[1]
    rng = np.random.default_rng(7)
    h = bf16_values(rng, (1, 3, TINY.hc_mult, TINY.dim))
    t = Trace(("hc.pre",))
    x, post, comb = hc_pre(h, w.hc_attn, TINY, M, t)
    pre = t.tensors["hc.pre"][None]
    unrounded = np.sum(pre[..., None] * h, axis=2)                   # Σ_j pre_j · h_j in fp32
    assert np.array_equal(x, bf16r(unrounded)) and differs(x, unrounded)
    f = bf16_values(rng, (1, 3, TINY.dim))
    y = hc_post(f, h, post, comb, M)
    mixed = post[..., None] * f[:, :, None, :] + np.sum(comb[..., None] * h[:, :, :, None, :], axis=2)
    assert np.array_equal(y, bf16r(mixed)) and differs(y, mixed)
    z = hc_head(h, tiny_model(M).weights.hc_head, TINY, M)
    assert z.dtype == np.float32 and is_bf16(z)
    z64 = hc_head(h.astype(np.float64), tiny_model("float64").weights.hc_head, TINY, "float64")
    assert not is_bf16(z64) and np.allclose(z, z64, rtol=2.0**-7, atol=0)


# ------------------------------------------------------------------------------------------------
# compressor and indexer

def _flat_compressor(rng, ratio, d, c_in=16, uneven=False):
    """A compressor whose pool is a plain mean of identical rows: input rows are one-hot, ape 0,
    and the pooled value of each entry is wkv[:, 0], a 12-bit fp32 value that is not a bf16 value
    (its multiples up to 16 are exact, so the fp32 pooling is exact). uneven: norm weights of dims
    32..63 are 2^-16 of the others: e4m3 subnormals under a block-64 scale, normal under a block-32 one."""
    coff = 2 if ratio == 4 else 1
    col = np.round(rng.standard_normal(coff * d) * 2**10) / 2**10 + 2.0**-11   # 12-13 significant bits
    wkv = np.zeros((coff * d, c_in))
    wkv[:, 0] = col
    norm = 1 + 0.1 * rng.standard_normal(d)
    if uneven:
        norm[32:64] *= 2.0**-16
    w = CompressorWeights(wkv=wkv, wgate=np.zeros((coff * d, c_in)), ape=np.zeros((ratio, coff * d)),
                          norm=bf16r(norm))
    x = np.zeros((1, ratio, c_in), np.float32)
    x[..., 0] = 1.0
    return w, x, f32r(col[-d:])                                      # the entry's pooled value (current block)


def _entry_ref(pooled, w, layer, *, round_first=True):
    e = bf16r(pooled) if round_first else pooled
    e = rms_norm(e[None, None], w.norm, eps=EPS, prec=M)
    return apply_rope(e, layer_rope_table(np.array([0]), TINY, layer, M), M)[0, 0]


@pytest.mark.parametrize("revision", ["initial", "current"])
def test_compressor_rounds_to_bf16_before_the_norm(revision):
    rng = np.random.default_rng(8)
    layer, d = 3, TINY.head_dim                                      # HCA: ratio 16
    w, x, pooled = _flat_compressor(rng, 16, d, uneven=True)
    e, _ = compress(x, 0, CompressorState.empty(1, TINY, layer, head_dim=d, prec=M), w, TINY, layer, M,
                    ratio=16, head_dim=d, rotate=False, revision=revision)
    want, unrounded = _entry_ref(pooled, w, layer), _entry_ref(pooled, w, layer, round_first=False)
    nope = d - TINY.rope_head_dim
    if revision == "current":                                        # FP8 QDQ of the non-rope dims, block 64
        qdq = lambda v, blk=64: np.concatenate([qdq_ref(v[:nope], blk, "fp8"), v[nope:]])   # noqa: E731
        assert differs(qdq(want), want) and differs(qdq(want), qdq(want, 32))
        want, unrounded = qdq(want), qdq(unrounded)
    assert np.array_equal(e[0, 0], want)
    assert differs(want, unrounded)


def test_compressor_index_keys_hadamard_bf16_then_fp4():
    # the bf16 rounding between the Hadamard and the FP4 QDQ only matters next to an e2m1 tie;
    # the seed is chosen so that it does for this entry (checked by the second assert)
    rng = np.random.default_rng(4)
    layer, d = 2, TINY.index_head_dim                                # CSA: ratio 4, overlap
    w, x, pooled = _flat_compressor(rng, 4, d)
    keys, _ = compress(x, 0, CompressorState.empty(1, TINY, layer, head_dim=d, prec=M), w, TINY, layer, M,
                       ratio=4, head_dim=d, rotate=True, revision="current")
    rotated = hadamard_ref(_entry_ref(pooled, w, layer))
    want = qdq_ref(bf16r(rotated), 32, "fp4")
    assert np.array_equal(keys[0, 0], want)
    assert differs(want, qdq_ref(f32r(rotated), 32, "fp4"))          # without the bf16 before the FP4 QDQ
    assert differs(want, bf16r(rotated))                             # without the FP4 QDQ


def index_scores_ref(q, keys, w, skip=None):
    """Σ_h bf16(ReLU(bf16(q_h·K)) · w_h): exact products and sum, each official rounding explicit."""
    rnd = lambda k, v: v if k == skip else bf16r(v)                  # noqa: E731
    qk = rnd("einsum", f32r(np.asarray(q, np.float64) @ np.asarray(keys, np.float64).T))   # [i, n]
    prod = rnd("weight", f32r(np.maximum(qk, 0).astype(np.float64) * w[:, None]))
    return rnd("sum", f32r(np.sum(prod.astype(np.float64), axis=0)))


def test_index_scores_each_bf16_step():
    rng = np.random.default_rng(9)
    q = qdq_ref(bf16_values(rng, (16, 128), 2.0), 32, "fp4")
    keys = qdq_ref(bf16_values(rng, (12, 128)), 32, "fp4")
    w = bf16r(rng.uniform(-0.05, 0.1, 16))
    want = index_scores_ref(q, keys, w)
    assert np.array_equal(index_scores(q, keys, w, M), want)
    for step in ("einsum", "weight", "sum"):
        assert differs(want, index_scores_ref(q, keys, w, skip=step)), step


def _indexer_weights(rng):
    i, j, c = TINY.index_n_heads, TINY.index_head_dim, TINY.dim
    comp = CompressorWeights(wkv=bf16_values(rng, (2 * j, c), c ** -0.5), wgate=bf16_values(rng, (2 * j, c), c ** -0.5),
                             ape=f32r(rng.standard_normal((4, 2 * j)) * 0.1), norm=bf16r(1 + 0.1 * rng.standard_normal(j)))
    return IndexerWeights(wq_b=fp8_matrix(rng, i * j, TINY.q_lora_rank), weights_proj=bf16_values(rng, (i, c), c ** -0.5),
                          compressor=comp)


def test_indexer_scores_against_independent_computation():
    rng = np.random.default_rng(10)
    layer, s = 2, 12
    w = _indexer_weights(rng)
    x, qr = bf16_values(rng, (1, s, TINY.dim)), bf16_values(rng, (1, s, TINY.q_lora_rank))
    table = layer_rope_table(np.arange(s), TINY, layer, M)
    t = Trace(("*",))
    topk, st = indexer(x, qr, 0, AttentionState.empty(TINY, layer, 1, M).indexer, w, table, TINY, layer, M,
                       "current", t)
    i, j = TINY.index_n_heads, TINY.index_head_dim
    keys = st.keys[0].astype(np.float32)                             # [3, j] made by the compressor (pinned above)
    q = apply_rope(quantized_linear(qr, w.wq_b, M).reshape(1, s, i, j), table, M)[0]      # [s, i, j]
    proj = bf16r(exact_rows(x[0], w.weights_proj))                   # bf16 einsum output, [s, i]
    scale = np.float32(j ** -0.5 * i ** -0.5)

    def scores(q_of, weights):
        out = np.full((s, keys.shape[0]), -np.inf)
        for ti in range(s):
            vis = (ti + 1) // 4
            if vis:
                out[ti, :vis] = index_scores_ref(q_of(q[ti]), keys[:vis], weights[ti])
        return out

    fp4_bf16 = lambda v: qdq_ref(bf16r(hadamard_ref(v)), 32, "fp4")     # noqa: E731
    want = scores(fp4_bf16, bf16r(proj * scale))
    assert np.array_equal(t.tensors[f"layers.{layer}.attn.indexer.scores"], want)
    for ti in range(s):                                              # top-k by the same scores, lower index on ties
        vis = (ti + 1) // 4
        ref = sorted(range(vis), key=lambda e: (-want[ti, e], e))[:TINY.index_topk]
        assert topk[0, ti, :len(ref)].tolist() == ref
    assert differs(want, scores(fp4_bf16, bf16r(proj)))              # without the weight scale
    assert differs(want, scores(fp4_bf16, f32r(proj * scale)))       # without the bf16 of the weights
    assert differs(want, scores(lambda v: qdq_ref(f32r(hadamard_ref(v)), 32, "fp4"), bf16r(proj * scale)))
    assert differs(want, scores(lambda v: bf16r(hadamard_ref(v)), bf16r(proj * scale)))   # without q's FP4 QDQ


# ------------------------------------------------------------------------------------------------
# attention

def sparse_ref(q, kv, sink, idx, scale, *, round_p=True, normalise_first=False, round_out=True):
    """Sink attention of one batch element in the official kernel's fp32 ops; the P·V input bf16."""
    s, h, d = q.shape
    o = np.empty((s, h, d), np.float32)
    for si in range(s):
        rows = kv[idx[si][idx[si] >= 0]]
        sc = np.asarray(q[si], np.float64) @ np.asarray(rows, np.float64).T
        sc = f32r(sc) * np.float32(scale)
        mx = sc.max(-1, keepdims=True)
        p = np.exp(sc - mx)
        denom = p.sum(-1, keepdims=True) + np.exp(sink[:, None].astype(sc.dtype) - mx)
        if normalise_first:
            p, denom = p / denom, 1.0
        pv = bf16r(p) if round_p else p
        o[si] = f32r(np.asarray(pv, np.float64) @ np.asarray(rows, np.float64)) / denom
    return bf16r(o) if round_out else o


def test_sparse_attention_each_rounding():
    rng = np.random.default_rng(12)
    q, kv = bf16_values(rng, (1, 4, 4, 128)), bf16_values(rng, (1, 24, 128))
    sink = f32r(rng.standard_normal(4))
    idx = np.array([[np.r_[np.arange(k), -np.ones(20 - k, int)] for k in (3, 9, 15, 20)]])
    scale = 128 ** -0.5
    want = sparse_ref(q[0], kv[0], sink, idx[0], scale)
    assert np.array_equal(sparse_attention(q, kv, sink, idx, scale, M)[0], want)
    for kw in ({"round_p": False}, {"normalise_first": True}, {"round_out": False}):
        assert differs(want, sparse_ref(q[0], kv[0], sink, idx[0], scale, **kw)), kw


def test_window_layer_attention_composition(tiny_model):
    """A window-only layer from its parts, each pinned above: q path, KV with its FP8 QDQ (block 64),
    sparse attention, inverse RoPE, the bf16 wo_a per group, wo_b. kv_norm's dims 32..63 are scaled
    by 2^-16, so FP8 blocks of 32 and of 64 give different values."""
    layer, s = 0, 6
    w = tiny_model(M).weights.layers[layer].attn
    w = dataclasses.replace(w, kv_norm=bf16r(np.where((np.arange(TINY.head_dim) // 32) == 1, 2.0**-16, 1.0)
                                             * w.kv_norm.astype(np.float32)))
    rng = np.random.default_rng(13)
    x = bf16_values(rng, (1, s, TINY.dim))
    t = Trace(("*",))
    out, _ = attention(x, 0, AttentionState.empty(TINY, layer, 1, M), w, TINY, layer, M, "current", t)
    h, d, p, g = TINY.n_heads, TINY.head_dim, TINY.rope_head_dim, TINY.o_groups
    table = layer_rope_table(np.arange(s), TINY, layer, M)
    qr = rms_norm(quantized_linear(x, w.wq_a, M), w.q_norm, eps=EPS, prec=M)
    q = apply_rope(head_rms_norm(quantized_linear(qr, w.wq_b, M).reshape(1, s, h, d), eps=EPS, prec=M), table, M)
    kv = apply_rope(rms_norm(quantized_linear(x, w.wkv, M), w.kv_norm, eps=EPS, prec=M), table, M)
    kv_q = np.concatenate([qdq_ref(kv[..., :d - p], 64, "fp8"), kv[..., d - p:]], axis=-1)
    assert np.array_equal(t.tensors[f"layers.{layer}.attn.kv"], kv_q[0])
    assert differs(kv_q, kv)                                         # without the FP8 QDQ
    assert differs(kv_q, np.concatenate([qdq_ref(kv[..., :d - p], 32, "fp8"), kv[..., d - p:]], axis=-1))  # block 32
    idx, _ = window_indices(0, s, TINY.window_size)
    o = sparse_ref(q[0], kv_q[0], w.attn_sink.astype(np.float32), idx, TINY.softmax_scale)[None]
    o = apply_rope(o, table, M, inverse=True).reshape(1, s, g, -1)
    wo_a = w.wo_a.dequantize().reshape(g, TINY.o_lora_rank, -1)
    u = np.stack([exact_rows(o[:, :, gi], wo_a[gi]) for gi in range(g)], axis=2).reshape(1, s, -1)
    want = quantized_linear(bf16r(u), w.wo_b, M)
    assert np.array_equal(out, want)
    assert differs(want, quantized_linear(f32r(u), w.wo_b, M))      # wo_a's output not rounded to bf16


# ------------------------------------------------------------------------------------------------
# MoE

def _expert(rng, kind=fp4_matrix, n=TINY.moe_inter_dim, c=TINY.dim):
    return ExpertWeights(w1=kind(rng, n, c), w2=kind(rng, c, n), w3=kind(rng, n, c))


def test_expert_rounds_to_bf16_before_w2():
    rng = np.random.default_rng(14)
    w = _expert(rng)
    x = bf16_values(rng, (6, TINY.dim), 4.0)
    weight = f32r(rng.uniform(0.2, 1.2, (6, 1)))
    gate, up = quantized_linear(x, w.w1, M), quantized_linear(x, w.w3, M)       # pinned above
    up, gate = np.clip(up, -10, 10), np.minimum(gate, np.float32(10))
    hidden = weight * (nx.silu(gate) * up)                            # fp32 SwiGLU, routing weight before w2
    want = quantized_linear(bf16r(hidden), w.w2, M)
    assert np.array_equal(expert(x, w, M, swiglu_limit=10.0, weights=weight), want)
    assert differs(want, quantized_linear(f32r(hidden), w.w2, M))     # without the bf16 before w2


@pytest.mark.parametrize("revision", ["current", "initial"])
def test_moe_output_is_bf16_of_the_fp32_sum(revision):
    """y = Σ_e ascending expert_e(x) (fp32) + shared(x); out = bf16(y). The shared expert's w1/w3 are
    large, so its SwiGLU clamp (current revision only) fires."""
    rng = np.random.default_rng(15)
    e, c, f = TINY.n_routed_experts, TINY.dim, TINY.moe_inter_dim
    gate = GateWeights(weight=bf16_values(rng, (e, c), 0.1), bias=f32r(rng.standard_normal(e) * 0.01), tid2eid=None)
    shared = ExpertWeights(w1=fp8_matrix(rng, f, c, 3.0), w2=fp8_matrix(rng, c, f), w3=fp8_matrix(rng, f, c, 3.0))
    w = MoEWeights(gate=gate, experts=tuple(_expert(rng) for _ in range(e)), shared=shared)
    x, tokens = bf16_values(rng, (1, 5, c), 2.0), np.arange(5)[None]
    got = moe(x, tokens, w, TINY, 3, M, revision)
    weights, ids = route(x[0], tokens[0], gate, TINY, M)
    y = np.zeros((5, c), np.float32)
    for ex in np.unique(ids):
        rows, slot = np.nonzero(ids == ex)
        y[rows] += expert(x[0, rows], w.experts[ex], M, swiglu_limit=10.0, weights=weights[rows, slot][:, None])

    def out(limit):
        return bf16r(y + expert(x[0], w.shared, M, swiglu_limit=limit))
    want = out(10.0 if revision == "current" else 0.0)
    assert np.array_equal(got[0], want)
    assert differs(want, y + expert(x[0], w.shared, M, swiglu_limit=10.0 if revision == "current" else 0.0))
    assert differs(out(10.0), out(0.0))                             # the clamp fires


def test_router_stays_fp32():
    rng = np.random.default_rng(16)
    e = TINY.n_routed_experts
    gate = GateWeights(weight=bf16_values(rng, (e, TINY.dim), 0.1), bias=np.zeros(e, np.float32), tid2eid=None)
    x = bf16_values(rng, (7, TINY.dim), 2.0)
    weights, ids = route(x, np.arange(7), gate, TINY, M)

    def ref(z):
        sc = np.sqrt(nx.softplus(z))
        wsel = np.take_along_axis(sc, ids, -1)
        return wsel / wsel.sum(-1, keepdims=True) * np.float32(TINY.route_scale)
    z = f32r(exact_rows(x, gate.weight))
    assert weights.dtype == np.float32 and np.array_equal(weights, ref(z))
    assert differs(ref(z), ref(bf16r(z)))                           # the logits are not bf16


# ------------------------------------------------------------------------------------------------
# head and MTP

def test_logits_are_fp32_not_bf16(tiny_model):
    w = tiny_model(M).weights
    rng = np.random.default_rng(17)
    h = bf16_values(rng, (1, 3, TINY.hc_mult, TINY.dim))
    logits = head_logits(h, w.hc_head, w.norm, w.head, TINY, M)
    x = rms_norm(hc_head(h, w.hc_head, TINY, M), w.norm, eps=EPS, prec=M)      # pinned above
    want = f32r(exact_rows(x, w.head))
    assert logits.dtype == np.float32 and np.array_equal(logits, want)
    assert differs(want, bf16r(want))


def test_mtp_input_is_bf16(tiny_model):
    model = tiny_model(M)
    w, m = model.weights, model.weights.mtp
    rng = np.random.default_rng(18)
    s = 4
    h = bf16_values(rng, (1, s, TINY.hc_mult, TINY.dim))
    ids = rng.integers(0, TINY.vocab_size, (1, s))
    layer = TINY.mtp_layer
    t = Trace((f"layers.{layer}.hc_attn.pre",))
    model.mtp_forward(h, ids, t)
    e = rms_norm(np.asarray(w.embed[ids[:, 1:]]).astype(np.float32), m.enorm, eps=EPS, prec=M)
    hs = rms_norm(h[:, :-1], m.hnorm, eps=EPS, prec=M)
    summed = quantized_linear(e, m.e_proj, M)[:, :, None, :] + quantized_linear(hs, m.h_proj, M)

    def pre(x):                                                     # the MTP block's first mHC pre mix
        tr = Trace(("p.pre",))
        hc_pre(x, m.block.hc_attn, TINY, M, tr, "p")
        return tr.tensors["p.pre"]
    assert np.array_equal(t.tensors[f"layers.{layer}.hc_attn.pre"], pre(bf16r(summed)))
    assert differs(pre(bf16r(summed)), pre(summed))
