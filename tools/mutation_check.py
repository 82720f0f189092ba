"""Mutation check: remove or change each step the tests must pin, in turn, and expect the tests to fail.

    python tools/mutation_check.py            # every mutation; exit 1 if any survives
    python tools/mutation_check.py --list     # the mutations, one a line
    python tools/mutation_check.py --only NAME [--only NAME ...]

Two lists. MUTATIONS: mirror's rounding steps, each removed or moved. ORDER_AND_THREADS (issue 27):
the kinds a rounding-step list does not reach: the order of an accumulation of more than two terms
(the MoE's routed experts, the shared expert last), the order or precision of a reduction whose
result sits next to an fp32 rounding midpoint (the sparse-attention kernel's block sum, P·V and
q·kv), a scratch buffer shared by the threads of a prange (hoisted out of it), and the MTP pairing.
Each entry is (name, file, [(exact source text, replacement), ...]); PINNED_BY names the test files
that pin an ORDER_AND_THREADS entry. Source texts are kept short, so that they are easy to re-point
when the code around them changes.

The script first checks that every source text occurs exactly once in the current code (so it
fails loudly, exit 2, when the code drifts and the list needs updating), copies the repository
(tracked and untracked, not ignored files) to a scratch folder, and then, per mutation: applies it
to the copy, runs its pinning tests (PINNED_BY, else PINNING: tests/model/test_rounding.py,
tests/test_numerics.py, tests/model/test_sparse_kernel.py, tests/model/test_index_layout.py;
`pytest -x`, a caught mutation fails there within seconds to a minute), and only if they pass,
the whole default suite. A mutation of refimpl/kernels/ runs with an empty Numba cache of its own
(Numba's cache does not see an edit to a module whose functions a kernel calls). It prints a
table (mutation, caught, by which test, seconds) and exits 1 if any mutation survives. The tests
run with this Python (use the project's venv) on the scratch copy, never on the working tree.
Measured: 33 min for the 78 rounding mutations on 2 cores shared with other jobs (load average
~6; every one caught by the pinning tests, 6-25 s each, most of it pytest's start-up);
tests/test_tools.py runs it as a `slow` test.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINNING = ["tests/model/test_rounding.py", "tests/test_numerics.py", "tests/model/test_sparse_kernel.py",
           "tests/model/test_index_layout.py"]

L, N, R, H = "refimpl/model/linear.py", "refimpl/model/norm.py", "refimpl/model/rope.py", "refimpl/model/hyperconn.py"
C, I, A = "refimpl/model/compressor.py", "refimpl/model/indexer.py", "refimpl/model/attention.py"
E, T, X = "refimpl/model/moe.py", "refimpl/model/transformer.py", "refimpl/numerics.py"

MUTATIONS = [
    # products
    ("linear: no FP8 activation quantization before FP8/FP4 products", L,
     [("    x = act_fp8(x, prec)", "    x = x")]),
    ("linear: quantized product output not bf16", L,
     [("    return bf16(y, prec)", "    return y")]),
    ("linear: bf16_linear output not bf16", L,
     [("return bf16(matmul(x, dense(w, prec), prec), prec)", "return matmul(x, dense(w, prec), prec)")]),
    ("linear: row-wise products not rounded to fp32", L,
     [("return rounded_once(lambda rows: _row_by_row(rows, w), x, prec=prec)", "return _row_by_row(x, w)")]),
    ("linear: product() not rounded to fp32", L,
     [("return rounded_once(np.matmul, a.astype(inside), b.astype(inside), prec=prec)", "return a.astype(inside) @ b.astype(inside)")]),
    ("linear: mirror FP8/FP4 product as one float64 sum per row, not block sums in ascending order", L,
     [("return rounded_once(lambda rows, w64: block_sums(rows, w64, sub=sub), x, wd, prec=prec)",
       "return matmul(x, wd, prec)")]),
    ("linear: FP4 block sums taken over 128 columns, not as four 32-column sums", L,
     [("sub = FP4_BLOCK if isinstance(w, Fp4Matrix) else FP8_BLOCK", "sub = FP8_BLOCK")]),
    ("numerics: GEMM activation blocks of 64 instead of 128", X,
     [("q, s = act_quant_fp8(x, block=FP8_BLOCK)", "q, s = act_quant_fp8(x, block=64)"),
      ("return q * np.repeat(s, FP8_BLOCK, axis=-1)", "return q * np.repeat(s, 64, axis=-1)")]),
    ("numerics: activation scale not a power of two", X,
     [("s = pow2_scale(amax, FP8_MAX_INV)", "s = amax * FP8_MAX_INV")]),
    # one official op: exact inside, rounded once
    ("numerics: one-op functions evaluated in float32, not exactly (all of them)", X,
     [("return round_f32(f(*(np.asarray(a, np.float64) for a in args)))", "return round_f32(f(*(np.asarray(a) for a in args)))")]),
    ("numerics: Hadamard not exact then rounded once in mirror", X,
     [("return rounded_once(_hadamard, x, prec=prec)", "return _hadamard(x)")]),
    ("numerics: top-k ties, the higher index wins", X,
     [("rev = np.flip(x, axis=axis)", "rev = x"), ("idx = (n - 1) - order", "idx = order")]),
    # norms, RoPE, mHC
    ("norm: rms_norm output not bf16", N,
     [("return bf16(np.asarray(weight).astype(dt) * y, prec)", "return np.asarray(weight).astype(dt) * y")]),
    ("norm: q norm, q² not bf16", N, [("sq = bf16(q * q, prec)", "sq = q * q")]),
    ("norm: rms_norm mean in float32, not exact", N,
     [("var = reduce_mean(xf * xf, -1, prec, keepdims=True)", "var = np.mean(xf * xf, axis=-1, keepdims=True)")]),
    ("norm: rms_norm rsqrt as 1/sqrt (two roundings)", N,
     [("y = xf * rsqrt(var + dt(eps), prec)", "y = xf * (dt(1.0) / np.sqrt(var + dt(eps)))")]),
    ("norm: q norm, mean not bf16", N,
     [("mean = bf16(reduce_mean(sq, -1, prec, keepdims=True), prec)", "mean = reduce_mean(sq, -1, prec, keepdims=True)")]),
    ("norm: q norm, mean in float32, not exact", N,
     [("mean = bf16(reduce_mean(sq, -1, prec, keepdims=True), prec)", "mean = bf16(np.mean(sq, axis=-1, keepdims=True), prec)")]),
    ("norm: q norm, mean + eps not bf16", N, [("rsqrt(bf16(mean + dt(eps), prec), prec)", "rsqrt(mean + dt(eps), prec)")]),
    ("norm: q norm, rsqrt not bf16", N,
     [("r = bf16(rsqrt(bf16(mean + dt(eps), prec), prec), prec)", "r = rsqrt(bf16(mean + dt(eps), prec), prec)")]),
    ("norm: q norm, q·r not bf16", N, [("return bf16(q * r, prec)", "return q * r")]),
    ("rope: rotated pairs not written back as bf16", R,
     [("out[..., -2 * half:] = bf16(rotated.reshape(*x.shape[:-1], 2 * half), prec)", "out[..., -2 * half:] = rotated.reshape(*x.shape[:-1], 2 * half)")]),
    ("rope: complex product in float32 ops, not exact then rounded once", R,
     [("rotated = rounded_once(_complex_product, pairs[..., 0], pairs[..., 1], cos, sin, prec=prec)", "rotated = _complex_product(pairs[..., 0], pairs[..., 1], cos, sin)")]),
    ("mhc: mixes' RMS mean in float32, not exact", H,
     [("rsqrt(reduce_mean(v * v, -1, prec, keepdims=True)", "rsqrt(np.mean(v * v, axis=-1, keepdims=True)")]),
    ("mhc: mixes' rsqrt as 1/sqrt", H,
     [("rho = rsqrt(reduce_mean(v * v, -1, prec, keepdims=True) + dt(norm_eps), prec)",
       "rho = dt(1.0) / np.sqrt(reduce_mean(v * v, -1, prec, keepdims=True) + dt(norm_eps))")]),
    ("mhc: pre/post sigmoid in float32, not one op", H,
     [("pre = sigmoid(m[..., :n] * scale[0] + base[:n], prec) + eps", "pre = sigmoid(m[..., :n] * scale[0] + base[:n], \"float32\") + eps"),
      ("post = dt(2) * sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n], prec)",
       "post = dt(2) * sigmoid(m[..., n:2 * n] * scale[1] + base[n:2 * n], \"float32\")")]),
    ("mhc: Sinkhorn exp in float32, not one op", H,
     [("e = exp(logits - logits.max(axis=-1, keepdims=True), prec)", "e = np.exp(logits - logits.max(axis=-1, keepdims=True))")]),
    ("mhc: Sinkhorn softmax row sum in float32", H,
     [("comb = e / reduce_sum(e, -1, prec, keepdims=True) + eps", "comb = e / e.sum(axis=-1, keepdims=True) + eps")]),
    ("mhc: Sinkhorn iteration sums in float32", H,
     [("comb = comb / (reduce_sum(comb, -1, prec, keepdims=True) + eps)          # row step",
       "comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)          # row step"),
      ("comb = comb / (reduce_sum(comb, -2, prec, keepdims=True) + eps)          # column step",
       "comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)          # column step")]),
    ("mhc: hc_pre / hc_head stream sum in float32", H,
     [("return reduce_sum(pre[..., None] * v, 2, prec)", "return np.sum(pre[..., None] * v, axis=2)")]),
    ("mhc: hc_post stream sum in float32", H,
     [("mixed = reduce_sum(comb[..., None] * residual.astype(dt)[:, :, :, None, :], 2, prec)",
       "mixed = np.sum(comb[..., None] * residual.astype(dt)[:, :, :, None, :], axis=2)")]),
    ("mhc: hc_head sigmoid in float32", H,
     [("pre = sigmoid(mixes * w.scale.astype(dt)[0] + w.base.astype(dt), prec)",
       "pre = sigmoid(mixes * w.scale.astype(dt)[0] + w.base.astype(dt), \"float32\")")]),
    ("mhc: hc_pre output not bf16", H, [("return bf16(x, prec), post, comb", "return x, post, comb")]),
    ("mhc: hc_post output not bf16", H, [("return bf16(y, prec)", "return y")]),
    ("mhc: hc_head output not bf16", H, [("    return bf16(x, prec)\n", "    return x\n")]),
    # compressor
    ("compressor: pool softmax in float32, not one op", C,
     [("return reduce_sum(kv * softmax(score, axis=2, prec=prec), 2, prec)",
       "return reduce_sum(kv * softmax(score, axis=2, prec=\"float32\"), 2, prec)")]),
    ("compressor: pool sum in float32", C,
     [("return reduce_sum(kv * softmax(score, axis=2, prec=prec), 2, prec)",
       "return np.sum(kv * softmax(score, axis=2, prec=prec), axis=2)")]),
    ("compressor: no bf16 before the norm", C,
     [("e = rms_norm(bf16(e, prec), w.norm,", "e = rms_norm(e, w.norm,")]),
    ("compressor: index keys, no bf16 after the Hadamard", C,
     [("e = qdq_fp4(bf16(hadamard(e, prec), prec), prec, block=FP4_BLOCK)", "e = qdq_fp4(hadamard(e, prec), prec, block=FP4_BLOCK)")]),
    ("compressor: index keys, no FP4 QDQ", C,
     [("e = qdq_fp4(bf16(hadamard(e, prec), prec), prec, block=FP4_BLOCK)", "e = bf16(hadamard(e, prec), prec)")]),
    ("compressor: no FP8 QDQ of the compressed KV", C,
     [("qdq_fp8(e[..., :nope], prec, block=KV_FP8_BLOCK)", "e[..., :nope]")]),
    ("compressor: compressed KV FP8 block 32 instead of 64", C,
     [("qdq_fp8(e[..., :nope], prec, block=KV_FP8_BLOCK)", "qdq_fp8(e[..., :nope], prec, block=32)")]),
    ("compressor: compressed KV FP8 QDQ on the rope dims too", C,
     [("e = np.concatenate([qdq_fp8(e[..., :nope], prec, block=KV_FP8_BLOCK), e[..., nope:]], axis=-1)",
       "e = qdq_fp8(e, prec, block=KV_FP8_BLOCK)")]),
    # indexer
    ("indexer: q, no bf16 after the Hadamard", I,
     [("q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=FP4_BLOCK)", "q = qdq_fp4(hadamard(q, prec), prec, block=FP4_BLOCK)")]),
    ("indexer: q, no FP4 QDQ", I,
     [("q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=FP4_BLOCK)", "q = bf16(hadamard(q, prec), prec)")]),
    ("indexer: weight scale dropped", I,
     [("weights = bf16(weights * dt(hd ** -0.5 * n_heads ** -0.5), prec)", "weights = bf16(weights, prec)")]),
    ("indexer: weight scale applied after the bf16 (moved)", I,
     [("weights = bf16(weights * dt(hd ** -0.5 * n_heads ** -0.5), prec)", "weights = bf16(weights, prec) * dt(hd ** -0.5 * n_heads ** -0.5)")]),
    ("indexer: q FP4 blocks of 16 instead of 32", I,
     [("q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=FP4_BLOCK)", "q = qdq_fp4(bf16(hadamard(q, prec), prec), prec, block=16)")]),
    ("indexer: scaled weights not bf16", I,
     [("weights = bf16(weights * dt(hd ** -0.5 * n_heads ** -0.5), prec)", "weights = weights * dt(hd ** -0.5 * n_heads ** -0.5)")]),
    ("indexer: q·K not bf16", I, [("qk = bf16(product(q, keys.T, prec), prec)", "qk = product(q, keys.T, prec)")]),
    ("indexer: ReLU·weight not bf16", I,
     [("prod = bf16(np.maximum(qk, 0) * weights[:, None], prec)", "prod = np.maximum(qk, 0) * weights[:, None]")]),
    ("indexer: head sum not bf16", I,
     [("return bf16(reduce_sum(prod, 0, prec), prec)", "return reduce_sum(prod, 0, prec)")]),
    ("indexer: head sum in float32, not exact", I,
     [("return bf16(reduce_sum(prod, 0, prec), prec)", "return bf16(np.sum(prod, axis=0), prec)")]),
    # attention
    ("attention: no FP8 QDQ of the window KV", A,
     [("qdq_fp8(kv[..., :d - p], prec, block=KV_FP8_BLOCK)", "kv[..., :d - p]")]),
    ("attention: window KV FP8 block 32 instead of 64", A,
     [("qdq_fp8(kv[..., :d - p], prec, block=KV_FP8_BLOCK)", "qdq_fp8(kv[..., :d - p], prec, block=32)")]),
    ("attention: window KV FP8 QDQ on the rope dims too", A,
     [("kv = np.concatenate([qdq_fp8(kv[..., :d - p], prec, block=KV_FP8_BLOCK), kv[..., d - p:]], axis=-1)",
       "kv = qdq_fp8(kv, prec, block=KV_FP8_BLOCK)")]),
    ("attention: one max over the whole index set (no blocks of 64)", X,
     [("SPARSE_ATTN_BLOCK = 64", "SPARSE_ATTN_BLOCK = 1 << 30")]),
    ("attention: blocks of 32 index entries instead of 64", X, [("SPARSE_ATTN_BLOCK = 64", "SPARSE_ATTN_BLOCK = 32")]),
    ("attention: block probabilities not bf16 before P·V", A,
     [('product(bf16(p, MIRROR), rows, MIRROR)', 'product(p, rows, MIRROR)')]),
    ("attention: running max restarted in every block", A,
     [("m_new = np.maximum(m, sc.max(axis=-1))", "m_new = sc.max(axis=-1)")]),
    ("attention: rescale exp in float32 (NumPy), not one op", A,
     [('r = exp(m - m_new, MIRROR)', "r = np.exp(m - m_new)")]),
    ("attention: probabilities exp in float32 (NumPy), not one op", A,
     [('p = exp(sc - m_new[:, None], MIRROR)', "p = np.exp(sc - m_new[:, None])")]),
    ("attention: sink exp in float32 (NumPy), not one op", A,
     [('den = den + exp(sink - m, MIRROR)', "den = den + np.exp(sink - m)")]),
    ("attention: block sum in float32, not exact", A,
     [('den = den * r + reduce_sum(p, -1, MIRROR)', "den = den * r + p.sum(axis=-1)")]),
    ("attention: denominator rescale fused (one rounding)", A,
     [('den = den * r + reduce_sum(p, -1, MIRROR)',
       'den = (den.astype(np.float64) * r + reduce_sum(p, -1, MIRROR)).astype(np.float32)')]),
    ("attention: accumulator rescale fused (one rounding)", A,
     [('acc = acc * r[:, None] + product(bf16(p, MIRROR), rows, MIRROR)',
       'acc = (acc.astype(np.float64) * r[:, None] + product(bf16(p, MIRROR), rows, MIRROR)).astype(np.float32)')]),
    ("attention: sparse attention output not bf16", A,
     [("o[bi, si] = bf16(sparse_attn_query(q[bi, si], kv[bi], sink, idx, softmax_scale), prec)",
       "o[bi, si] = sparse_attn_query(q[bi, si], kv[bi], sink, idx, softmax_scale)")]),
    ("attention: official decode window part min(t+1, W) wide (one dense layout)", A,
     [('return min(s, window) if layout == "official" and start_pos == 0 else window',
       'return min(start_pos + s, window) if layout == "official" else window')]),
    ("attention: official prefill window part W wide (the decode layout everywhere)", A,
     [('return min(s, window) if layout == "official" and start_pos == 0 else window', "return window")]),
    ("attention: wo_a output not bf16", A,
     [("return np.stack([bf16_linear(o[:, :, gi], w[gi], prec)", "return np.stack([fp32_linear(o[:, :, gi], w[gi], prec)"),
      ("import Fp8Matrix, bf16_linear, product,", "import Fp8Matrix, bf16_linear, fp32_linear, product,")]),
    # MoE
    ("moe: silu in float32, not one op", E, [("h = silu(gate, prec) * up", "h = silu(gate, \"float32\") * up")]),
    ("moe: router softplus in float32, not one op", E,
     [("scores = np.sqrt(softplus(z, prec))", "scores = np.sqrt(softplus(z, \"float32\"))")]),
    ("moe: router normalisation sum in float32", E,
     [("weights = weights / reduce_sum(weights, -1, prec, keepdims=True)",
       "weights = weights / weights.sum(axis=-1, keepdims=True)")]),
    ("moe: SwiGLU product not bf16 before w2", E,
     [("return quantized_linear(bf16(h, prec), w.w2, prec)", "return quantized_linear(h, w.w2, prec)")]),
    ("moe: output not bf16", E, [("out = bf16(y, ctx.prec).reshape(b, s, c)", "out = y.reshape(b, s, c)")]),
    ("moe: shared expert clamped in both revisions", E,
     [('limit = cfg.swiglu_limit if revision == "current" else 0.0', "limit = cfg.swiglu_limit")]),
    ("moe: shared expert never clamped", E,
     [('limit = cfg.swiglu_limit if revision == "current" else 0.0', "limit = 0.0")]),
    ("moe: router logits rounded to bf16", E,
     [("z = fp32_linear(x.astype(dt), w.weight, prec)", "z = bf16(fp32_linear(x.astype(dt), w.weight, prec), prec)")]),
    # head and MTP
    ("head: logits rounded to bf16", T,
     [("y = fp32_linear(x[:, lo:hi], head[v0:v1], ctx.prec)", "y = bf16(fp32_linear(x[:, lo:hi], head[v0:v1], ctx.prec), ctx.prec)")]),
    ("mtp: e_proj + h_proj not bf16", T,
     [("= bf16(quantized_linear(e, e_proj, prec)[:, :, None, :] + quantized_linear(hs, h_proj, prec), prec)",
       "= quantized_linear(e, e_proj, prec)[:, :, None, :] + quantized_linear(hs, h_proj, prec)")]),
]

K_ATTN, K_POOL, K_NORM, K_IDX = ("refimpl/kernels/attention.py", "refimpl/kernels/compressor.py",
                                 "refimpl/kernels/norm.py", "refimpl/kernels/indexer.py")
K_MOE = "refimpl/kernels/moe.py"
K_HC, HC_KERNEL = "refimpl/kernels/hyperconn.py", "tests/kernels/test_hyperconn_kernel.py"
SIDE_THREADS = "tests/kernels/test_threads_kernel.py::test_thread_count_does_not_change_results"
ATTN_KERNEL = "tests/kernels/test_attention_kernel.py"
K_LIN, K_FMT = "refimpl/kernels/linear.py", "refimpl/kernels/formats.py"
LIN_KERNEL = "tests/kernels/test_linear_kernel.py"

ORDER_AND_THREADS = [
    # accumulation order of more than two terms (the tiny model routes 2 experts a token: 0 + a + b commutes)
    ("moe: routed experts summed in descending id", E,
     [("for e in np.unique(ids):", "for e in np.unique(ids)[::-1]:")]),
    ("moe: shared expert added first, not last", E,
     [("y = np.zeros(flat.shape, dt)", "y = np.zeros(flat.shape, dt) + expert(flat, w.shared, prec, "
       "swiglu_limit=cfg.swiglu_limit if revision == \"current\" else 0.0)"),
      ("return y + expert(flat, w.shared, prec, swiglu_limit=limit)", "return y")]),
    ("moe kernel: routed experts summed in descending id", K_MOE,
     [("for e in np.unique(ids)]", "for e in np.unique(ids)[::-1]]")]),
    # reductions next to an fp32 rounding midpoint
    ("attention kernel: block sum of p sequential, not NumPy's pairwise order", K_ATTN,
     [("bsum = pairwise_sum(s64, 0, nb)", "bsum = 0.0\n            for jj in range(nb):\n                bsum += s64[jj]")]),
    ("attention kernel: P·V in float32 (sgemm)", K_ATTN,
     [("np.matmul(Pb, rows3, out=PV)", "PV[:] = np.matmul(Pb.astype(np.float32), rows3.astype(np.float32))")]),
    ("attention kernel: q·kv in float32 (sgemm)", K_ATTN,
     [("np.matmul(q[bi, si, h0:h0 + hs].astype(np.float64), rows.T, out=S)",
       "S[:] = np.matmul(q[bi, si, h0:h0 + hs].astype(np.float32), rows.T.astype(np.float32))")]),
    # a scratch buffer shared by the threads of a prange
    ("compressor kernel: pool scratch shared by the threads", K_POOL,
     [("    for task in numba.prange(b * n):\n        bi, ei = task // n, task % n\n        e = np.empty(P, np.float64)\n",
       "    e = np.empty(P, np.float64)\n    for task in numba.prange(b * n):\n        bi, ei = task // n, task % n\n")]),
    ("norm kernel: rms_norm scratch shared by the threads", K_NORM,
     [("    for r in numba.prange(rows):\n        sq = np.empty(c, np.float64)\n",
       "    sq = np.empty(c, np.float64)\n    for r in numba.prange(rows):\n")]),
    ("indexer kernel: top-k scratch shared by the tasks", K_IDX,
     [("    def select(task):\n", "    shared = np.empty(max(n_vis, 1))\n\n    def select(task):\n"),
      ("topk, np.empty(max(n_vis, 1)))", "topk, shared)")]),
    ("attention kernel: scratch shared by the tasks", K_ATTN,
     [("    def task(span):\n", "    shared = _scratch(kp, hs, d)\n\n    def task(span):\n"),
      ("jbuf = _scratch(kp, hs, d)", "jbuf = shared")]),
    # the MTP pairing (seen only by the golden set before issue 27)
    ("mtp: streams h_{t+1} paired with token t+1", T, [("rms_norm(h[:, lo:hi],", "rms_norm(h[:, lo + 1:hi + 1],")]),
    # one-row products' shortcuts (issue 23, decode): each holds only where its precondition does
    ("linear kernel: FP4 integer block sums scaled by 2^(S-128+g)", K_LIN,
     [("E = np.int64(scale[n, j]) - 129 + xg[j]", "E = np.int64(scale[n, j]) - 128 + xg[j]")]),
    ("linear kernel: FP4 integer block sums outside float64's normal range", K_LIN,
     [("if not checked or -1022 <= E <= 992:", "if not checked or E <= 992:")]),
    ("linear kernel: FP4 rows never checked block by block", K_LIN,
     [("checked = g_hi == NO_GRAIN or s_lo - 129 + g_lo < -1022 or s_hi - 129 + g_hi > 992", "checked = False")]),
    ("linear kernel: FP8 any-order block sums without the exactness check", K_LIN,
     [("(-938 <= lo <= 850 and top < math.ldexp(float(FP8_XQ_LIMIT), int(lo)))", "True")]),
    ("linear kernel: dense lanes with fused multiply-adds", K_FMT,
     [("acc = builder.fadd(acc, builder.fmul(builder.load(builder.gep(px, [k]), align=8), w))",
       "acc = builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]), "
       "'llvm.fma.v16f64'), [builder.load(builder.gep(px, [k]), align=8), w, acc])")]),
    # hc_post's kernel (issue 23, long context): the sum over the old streams, post·x, the bf16 store
    ("hyperconn kernel: hc_post stream sum rounded to fp32 at each term", K_HC,
     [("acc[e] += np.float64(cj * res[r, j, e])", "acc[e] = np.float32(acc[e] + cj * res[r, j, e])")]),
    ("hyperconn kernel: hc_post stream sum from -0, not from +0", K_HC,
     [("acc[:] = 0.0                                           # NumPy's sum starts at +0 (never -0)",
       "acc[:] = -0.0")]),
    ("hyperconn kernel: hc_post post·x and the add as one float64 op", K_HC,
     [("bf16_f32(pk * x[r, e] + rounded_once_f32(acc[e]))",
       "bf16_f32(rounded_once_f32(np.float64(pk) * np.float64(x[r, e]) + acc[e]))")]),
    ("hyperconn kernel: hc_post without the bf16 store", K_HC,
     [("bf16_f32(pk * x[r, e] + rounded_once_f32(acc[e]))", "pk * x[r, e] + rounded_once_f32(acc[e])")]),
    # decode's one-region paths (issue 23, Flash decode second pass)
    ("moe kernel: one token's routed experts summed in descending id", K_MOE,
     [("    for out in routed:", "    for out in routed[::-1]:")]),
    ("moe kernel: one token's routing weights not sorted with its ids", K_MOE,
     [("weights[order][:, None]", "weights[:, None]")]),
    ("linear kernel: decode's wo_a groups read the scale grid from row 0", K_LIN,
     [("[scale] * groups, [gi * r for gi in range(groups)], r)", "[scale] * groups, [0] * groups, r)")]),
    ("linear kernel: FP4 lookup table decodes 1.5 as 1", K_FMT,
     [("values = ir.Constant(v32, [fp4_times4(k) for k in range(16)])",
       "values = ir.Constant(v32, [4 if k == 3 else fp4_times4(k) for k in range(16)])")]),
    # Flash prefill, second pass (issue 23): the BLAS paths' FP4 panel decode, the dense products' bound
    ("linear kernel: FP4 panel decode with the previous 1x32 block's scale", K_LIN,
     [("s = fp4_block_scale(srow[b])", "s = fp4_block_scale(srow[max(b - 1, 0)])")]),
    ("linear kernel: dense products' bound on Σ|x·w| from block means, not maxima", K_LIN,
     [("m = max(m, abs(w[n, k]))", "m += abs(w[n, k]) / B")]),
    ("linear kernel: FP4 128-column sums with scales spanning 25 binades", K_LIN,
     [("if np.int32(hi) - np.int32(lo) > 24:", "if np.int32(hi) - np.int32(lo) > 25:")]),
    # Flash prefill, third pass (issue 23): FP8 panel decode, the dense products' rounding check
    ("linear kernel: FP8 panel decode with the previous 128-column block's scale", K_LIN,
     [("s = fp8_block_scale(srow[b])", "s = fp8_block_scale(srow[max(b - 1, 0)])")]),
    ("linear kernel: rounding check's fast pass without widening its interval's ends", K_LIN,
     [("e = b + ay * 2.0 ** -51", "e = b")]),
    ("linear kernel: dense products' interval without BLAS's error term", K_LIN,
     [("return (gamma(K + 2) + gamma(BLOCK // LANES", "return (0 * gamma(K + 2) + gamma(BLOCK // LANES")]),
    ("linear kernel: mirror FP8/FP4 BLAS outputs never recomputed", K_LIN,
     [("if len(ts) * RECOMPUTE_MAX > y.size:", "if False:"), ("elif len(ts):", "elif False:")]),
    ("linear kernel: FP4 scale bounds without e2m1's largest value 6", K_LIN,
     [("wm[i, b] = 6.0 * hi", "wm[i, b] = hi")]),
    ("linear kernel: FP4 scale bounds with a grain of 1, not 0.5", K_LIN,
     [("gw[i] = 0.5 * lo", "gw[i] = lo")]),
    # Flash decode, third pass (issue 23): dense rows eight at a time, fused where exact; FP4 scaling in vectors
    ("linear kernel: dense eight-row lane sums added in descending lane order", K_FMT,
     [("for lane in _transpose_ir(builder, acc):", "for lane in _transpose_ir(builder, acc)[::-1]:")]),
    ("linear kernel: dense one-row products fused for any finite input", K_LIN,
     [("if not (abs(v) <= F32_MAX and np.float64(np.float32(v)) == v):", "if not abs(v) <= F32_MAX:")]),
    ("linear kernel: FP4 block's scaled 1x32 sums added in descending order", K_FMT,
     [("b = builder.extract_element(s, ir.Constant(i32, 0))\n            for q in range(1, 4):",
       "b = builder.extract_element(s, ir.Constant(i32, 3))\n            for q in (2, 1, 0):")]),
    ("linear kernel: FP4 block's vector scaling by 2^(S-128+g)", K_FMT,
     [("[1023 - 129] * 4", "[1023 - 128] * 4")]),
    # the thread policy (issue 23, the small model, third pass)
    ("threads: Numba's OpenMP workers left spinning between regions", "refimpl/kernels/threads.py",
     [('    return {"OMP_WAIT_POLICY": WAIT_POLICY}', "    return {}")]),
]

PINNED_BY = {
    "moe: routed experts summed in descending id": ["tests/model/test_moe.py"],
    "moe: shared expert added first, not last": ["tests/model/test_moe.py"],
    "moe kernel: routed experts summed in descending id": ["tests/kernels/test_moe_kernel.py"],
    "attention kernel: block sum of p sequential, not NumPy's pairwise order": [ATTN_KERNEL],
    "attention kernel: P·V in float32 (sgemm)": [ATTN_KERNEL],
    "attention kernel: q·kv in float32 (sgemm)": [ATTN_KERNEL],
    "compressor kernel: pool scratch shared by the threads": [SIDE_THREADS],
    "norm kernel: rms_norm scratch shared by the threads": [SIDE_THREADS],
    "indexer kernel: top-k scratch shared by the tasks": [SIDE_THREADS],
    "attention kernel: scratch shared by the tasks":
        [f"{ATTN_KERNEL}::test_thread_count_does_not_change_results"],
    "mtp: streams h_{t+1} paired with token t+1": ["tests/model/test_transformer.py"],
    "linear kernel: FP4 integer block sums scaled by 2^(S-128+g)": [f"{LIN_KERNEL}::test_fp4_integer_one_row_path_is_the_float_lanes_bit_for_bit"],
    "linear kernel: FP4 integer block sums outside float64's normal range":
        [f"{LIN_KERNEL}::test_fp4_integer_one_row_path_is_the_float_lanes_bit_for_bit"],
    "linear kernel: FP4 rows never checked block by block":
        [f"{LIN_KERNEL}::test_fp4_integer_one_row_path_is_the_float_lanes_bit_for_bit"],
    "linear kernel: FP8 any-order block sums without the exactness check":
        [f"{LIN_KERNEL}::test_fp8_exact_block_sums_are_the_float_lanes_bit_for_bit",
         f"{LIN_KERNEL}::test_fp8_exact_blocks_hand_worked"],
    "linear kernel: dense lanes with fused multiply-adds": [f"{LIN_KERNEL}::test_dense_lanes128_is_the_lane_order_bit_for_bit"],
    "hyperconn kernel: hc_post stream sum rounded to fp32 at each term": [HC_KERNEL],
    "hyperconn kernel: hc_post stream sum from -0, not from +0": [HC_KERNEL],
    "hyperconn kernel: hc_post post·x and the add as one float64 op": [HC_KERNEL],
    "hyperconn kernel: hc_post without the bf16 store": [HC_KERNEL],
    "moe kernel: one token's routed experts summed in descending id":
        ["tests/kernels/test_moe_kernel.py::test_one_token_path_is_the_general_path_bit_for_bit"],
    "moe kernel: one token's routing weights not sorted with its ids":
        ["tests/kernels/test_moe_kernel.py::test_one_token_path_is_the_general_path_bit_for_bit"],
    "linear kernel: decode's wo_a groups read the scale grid from row 0":
        [f"{LIN_KERNEL}::test_grouped_wo_a_decode_is_the_per_group_product"],
    "linear kernel: FP4 lookup table decodes 1.5 as 1": [f"{LIN_KERNEL}::test_fp4_dot128_decodes_every_byte_as_the_reference"],
    "linear kernel: FP4 panel decode with the previous 1x32 block's scale":
        [f"{LIN_KERNEL}::test_fp4_decode_rows_is_the_spec_dequantization"],
    "linear kernel: dense products' bound on Σ|x·w| from block means, not maxima":
        [f"{LIN_KERNEL}::test_abs_bound_is_an_upper_bound", f"{LIN_KERNEL}::test_abs_bound_blocks_hand_worked"],
    "linear kernel: FP4 128-column sums with scales spanning 25 binades": [f"{LIN_KERNEL}::test_fp4_spans_fit_hand_worked"],
    "linear kernel: FP8 panel decode with the previous 128-column block's scale":
        [f"{LIN_KERNEL}::test_fp8_decode_rows_is_the_spec_dequantization"],
    "linear kernel: rounding check's fast pass without widening its interval's ends":
        [f"{LIN_KERNEL}::test_rounding_safe_trusts_only_intervals_that_round_as_one"],
    "linear kernel: dense products' interval without BLAS's error term": [f"{LIN_KERNEL}::test_half_width_hand_worked"],
    "linear kernel: mirror FP8/FP4 BLAS outputs never recomputed":
        [f"{LIN_KERNEL}::test_mirror_quantized_products_are_the_spec_on_every_path",
         f"{LIN_KERNEL}::test_mirror_block_order_hand_worked_on_every_path"],
    "linear kernel: FP4 scale bounds without e2m1's largest value 6":
        [f"{LIN_KERNEL}::test_fp4_scale_bounds_hold_for_the_decoded_weights"],
    "linear kernel: FP4 scale bounds with a grain of 1, not 0.5":
        [f"{LIN_KERNEL}::test_fp4_scale_bounds_hold_for_the_decoded_weights"],
    "linear kernel: dense eight-row lane sums added in descending lane order":
        [f"{LIN_KERNEL}::test_dense_lanes128x8_hand_worked", f"{LIN_KERNEL}::test_dense_lanes128x8_is_eight_dense_lanes128"],
    "linear kernel: dense one-row products fused for any finite input":
        [f"{LIN_KERNEL}::test_dense_exact_hand_worked", f"{LIN_KERNEL}::test_dense_one_row_path_is_the_lane_order"],
    "linear kernel: FP4 block's scaled 1x32 sums added in descending order":
        [f"{LIN_KERNEL}::test_fp4_block128_is_the_scaled_sums_in_order"],
    "linear kernel: FP4 block's vector scaling by 2^(S-128+g)":
        [f"{LIN_KERNEL}::test_fp4_block128_is_the_scaled_sums_in_order",
         f"{LIN_KERNEL}::test_fp4_integer_one_row_path_is_the_float_lanes_bit_for_bit"],
    "threads: Numba's OpenMP workers left spinning between regions": ["tests/kernels/test_thread_policy.py"],
}
ALL = MUTATIONS + ORDER_AND_THREADS


def check_sources(mutations) -> list[str]:
    """Every source text must occur exactly once in its file; returns the problems."""
    problems = []
    for name, rel, edits in mutations:
        text = (ROOT / rel).read_text()
        for old, _ in edits:
            n = text.count(old)
            if n != 1:
                problems.append(f"{name}: {rel} has {n} occurrences of {old!r} (expected 1)")
    return problems


def scratch_copy() -> Path:
    """A copy of the repository's tracked and untracked (not ignored) files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="refimpl-mutation-"))
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def pytest(copy: Path, args: list[str], numba_cache: Path | None = None) -> tuple[bool, str]:
    """Run pytest in the copy (numba_cache: the NUMBA_CACHE_DIR to use); (passed, first failing test id or "")."""
    # the spec path: a model runs the (mutated) spec functions, not the kernels that replace them
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", REFIMPL_KERNELS="numpy")
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args],
                       cwd=copy, env=env, capture_output=True, text=True)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return r.returncode == 0, (failed.group(1) if failed else f"exit {r.returncode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only mutations containing NAME")
    args = ap.parse_args(argv)
    mutations = [m for m in ALL if not args.only or any(o in m[0] for o in args.only)]
    if args.list:
        print("\n".join(m[0] for m in mutations))
        return 0
    problems = check_sources(mutations)
    if problems:
        print("the code has drifted from the mutation list (tools/mutation_check.py):", *problems, sep="\n  ",
              file=sys.stderr)
        return 2
    copy = scratch_copy()
    try:
        where = subprocess.run([sys.executable, "-c", "import refimpl; print(refimpl.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True).stdout
        if not where.startswith(str(copy)):
            print(f"the scratch copy does not shadow the installed package ({where.strip()})", file=sys.stderr)
            return 2
        cache = copy / ".numba-cache"                    # the copy's own: its files have new paths and times
        pinning = list(dict.fromkeys(PINNING + [t for m in mutations for t in PINNED_BY.get(m[0], [])]))
        ok, failed = pytest(copy, pinning, cache)
        if not ok:
            print(f"the unmutated pinning tests fail ({failed}); fix them first", file=sys.stderr)
            return 2
        start, rows = time.perf_counter(), []
        for name, rel, edits in mutations:
            path = copy / rel
            original = path.read_text()
            mutated = original
            for old, new in edits:
                mutated = mutated.replace(old, new, 1)
            path.write_text(mutated)
            t0 = time.perf_counter()
            # a kernel's mutation: an empty Numba cache (the cached kernels of other files may call it)
            own = Path(tempfile.mkdtemp(prefix="numba-", dir=copy)) if rel.startswith("refimpl/kernels/") else cache
            try:
                passed, failed = pytest(copy, PINNED_BY.get(name, PINNING), own)
                if passed:                                   # not caught by the pinning tests: the whole suite
                    passed, failed = pytest(copy, ["--ignore=tests/test_tools.py"], own)   # (its list check always fails)
            finally:
                path.write_text(original)
                if own != cache:
                    shutil.rmtree(own, ignore_errors=True)
            rows.append((name, not passed, failed if not passed else "-", time.perf_counter() - t0))
            print(f"{name:<66} {'yes' if not passed else 'NO':<4} {rows[-1][2]:<78} {rows[-1][3]:5.1f}s", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    survivors = [r[0] for r in rows if not r[1]]
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} mutations caught in {time.perf_counter() - start:.0f} s")
    if survivors:
        print("SURVIVED:", *survivors, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
