"""The CUDA kernels against their spec functions, run in Numba's CUDA simulator (no GPU needed).

Not collected by a plain pytest run (the file name does not start with test_): tests/cuda/test_cuda.py
runs it in a subprocess with NUMBA_ENABLE_CUDASIM=1, which must be set before numba is imported:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/cuda/sim_kernels.py

The simulator runs every CUDA thread as a Python thread (~0.5 ms each to start), so shapes are tiny
and each Hypothesis test draws a few examples. Bounds:
  mirror   bit-identical to the spec. The kernels sum in float64 in another order than NumPy and use
           libdevice's float64 exp; the fp32 result could differ only where the exact value lies within
           ~1e-16 relative of an fp32 rounding boundary (the chance per element is ~1e-8 or less).
           Every element compared is counted (MIRROR_COMPARED) and the differences (MIRROR_DIFFERENT)
           are asserted to be zero; a flip would fail the test and must be looked at, not waved through.
  float64  within 1e-12 relative of the spec (float64 sums in another order).
  float32  within 1e-5 relative of the site's largest magnitude: the spec rounds every fp32 step
           (BLAS fp32 products, fp32 exp), the kernels sum in float64 and round once, so the two differ
           by the spec's own fp32 error (a few ulps times the sum lengths here, < 1e-6).
"""
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("run with NUMBA_ENABLE_CUDASIM=1 (tests/cuda/test_cuda.py does)", allow_module_level=True)

from numba import config  # noqa: E402

assert config.ENABLE_CUDASIM, "numba was imported before NUMBA_ENABLE_CUDASIM was set"

from refimpl import ops  # noqa: E402
from refimpl.cuda import attention as cu_attention, compressor as cu_compressor  # noqa: E402
from refimpl.cuda import hyperconn as cu_hyperconn, indexer as cu_indexer, linear as cu_linear  # noqa: E402
from refimpl.model.attention import sparse_attention  # noqa: E402
from refimpl.model.compressor import gated_pool  # noqa: E402
from refimpl.model.hyperconn import split_sinkhorn  # noqa: E402
from refimpl.model.indexer import index_scores  # noqa: E402
from refimpl.model.linear import Fp4Matrix, Fp8Matrix, matmul, quantized_linear  # noqa: E402
from refimpl.numerics import pack_fp4, round_bf16  # noqa: E402
from refimpl.synthetic.quantize import quant_fp4_weight, quant_fp8_weight  # noqa: E402
from refimpl.testing import OPS, assert_matches  # noqa: E402

PRECS = ("float64", "float32", "mirror")
FEW = settings(deadline=None, max_examples=8, derandomize=True)
MIRROR_COMPARED, MIRROR_DIFFERENT = [0], [0]


def check(got, want, prec: str) -> None:
    """got (kernel) against want (spec) with the bound of prec (module docstring)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if prec == "mirror":
        different = int(np.sum(got.view(np.uint32 if got.dtype == np.float32 else got.dtype) !=
                               want.view(np.uint32 if want.dtype == np.float32 else want.dtype)))
        MIRROR_COMPARED[0] += got.size
        MIRROR_DIFFERENT[0] += different
        assert different == 0, f"mirror: {different} of {got.size} elements differ"
        return
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0)) / scale
    assert err <= (1e-12 if prec == "float64" else 1e-5), f"{prec}: relative error {err:.3g}"


def activations(rng, shape, prec):
    """bf16-valued activations in the working dtype of prec (what the model passes)."""
    x = round_bf16(rng.standard_normal(shape))
    return x.astype(np.float64) if prec == "float64" else x


# ---------------------------------------------------------------- sparse attention

@FEW
@given(seed=st.integers(0, 2**31), s=st.integers(1, 2), h=st.integers(1, 2), d=st.sampled_from([8, 16]),
       k=st.integers(1, 72), prec=st.sampled_from(PRECS))
def test_sparse_attention(seed, s, h, d, k, prec):
    """Index sets of 1..72 entries (two steps of 64), -1 padded anywhere except the first entry."""
    rng = np.random.default_rng(seed)
    n = k + 8
    q, kv = activations(rng, (1, s, h, d), prec), activations(rng, (1, n, d), prec) * 2
    sink = rng.standard_normal(h).astype(np.float32)
    idx = np.stack([rng.permutation(n)[:k] for _ in range(s)])[None]
    idx[..., 1:] = np.where(rng.random(idx[..., 1:].shape) < 0.2, -1, idx[..., 1:])
    check(cu_attention.sparse_attention(q, kv, sink, idx, d ** -0.5, prec),
          sparse_attention.spec(q, kv, sink, idx, d ** -0.5, prec), prec)


def test_sparse_attention_query_alone_equals_query_in_a_batch():
    """A query's output does not depend on the other queries of the call (mirror, bit for bit)."""
    rng = np.random.default_rng(3)
    q, kv = activations(rng, (1, 3, 2, 8), "mirror"), activations(rng, (1, 70, 8), "mirror")
    idx = np.stack([rng.permutation(70)[:66] for _ in range(3)])[None]
    sink = np.zeros(2, np.float32)
    full = cu_attention.sparse_attention(q, kv, sink, idx, 0.3, "mirror")
    one = cu_attention.sparse_attention(q[:, 1:2], kv, sink, idx[:, 1:2], 0.3, "mirror")
    assert np.array_equal(full[:, 1:2], one)


def test_more_rows_than_the_grid_holds(monkeypatch):
    """Rows (products) and queries (attention) beyond the grid's y limit are looped over by the blocks."""
    monkeypatch.setattr(cu_linear, "MAX_GRID_Y", 2)
    monkeypatch.setattr(cu_attention, "MAX_GRID_Y", 2)
    rng = np.random.default_rng(4)
    w, x = fp8_matrix(rng, 8, 128), activations(rng, (5, 128), "mirror")
    check(cu_linear.quantized_linear(x, w, "mirror"), quantized_linear.spec(x, w, "mirror"), "mirror")
    wd = round_bf16(rng.standard_normal((3, 128)))
    check(cu_linear.matmul(x, wd, "mirror"), matmul.spec(x, wd, "mirror"), "mirror")
    q, kv = activations(rng, (1, 5, 1, 8), "mirror"), activations(rng, (1, 9, 8), "mirror")
    idx = np.tile(np.arange(9), (1, 5, 1))
    sink = np.zeros(1, np.float32)
    check(cu_attention.sparse_attention(q, kv, sink, idx, 0.5, "mirror"),
          sparse_attention.spec(q, kv, sink, idx, 0.5, "mirror"), "mirror")


def test_sparse_attention_refuses_what_the_spec_refuses():
    q, kv = np.zeros((1, 1, 1, 8), np.float32), np.zeros((1, 70, 8), np.float32)
    no_entry = np.full((1, 1, 4), -1)
    for fn in (cu_attention.sparse_attention, sparse_attention.spec):
        with pytest.raises(ValueError, match="no entry to attend to"):
            fn(q, kv, np.zeros(1, np.float32), no_entry, 1.0, "float32")
        late = np.full((1, 1, 66), -1)
        late[..., 65] = 3                                    # the first block of 64 is empty
        with pytest.raises(ValueError, match="first block of 64"):
            fn(q, kv, np.zeros(1, np.float32), late, 1.0, "mirror")
    with pytest.raises(ValueError, match="unknown precision"):
        cu_attention.sparse_attention(q, kv, np.zeros(1, np.float32), np.zeros((1, 1, 1), int), 1.0, "fp16")
    with pytest.raises(ValueError, match="q \\[b,s,h,d\\]"):
        cu_attention.sparse_attention(q[0], kv, np.zeros(1, np.float32), np.zeros((1, 1, 1), int), 1.0, "mirror")


# ---------------------------------------------------------------- FP8 / FP4 / dense products

def fp8_matrix(rng, n, k):
    v, s = quant_fp8_weight(rng.standard_normal((n, k)) * rng.choice([0.01, 1.0, 30.0]))
    return Fp8Matrix(v.view(ml_dtypes.float8_e4m3fn), s.view(ml_dtypes.float8_e8m0fnu))


def fp4_matrix(rng, n, k):
    p, s = quant_fp4_weight(rng.standard_normal((n, k)) * rng.choice([0.01, 1.0, 30.0]))
    return Fp4Matrix(p, s.view(ml_dtypes.float8_e8m0fnu))


@FEW
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 2), n=st.integers(1, 24), kb=st.integers(1, 2),
       fp4=st.booleans(), prec=st.sampled_from(PRECS))
def test_quantized_linear(seed, rows, n, kb, fp4, prec):
    """FP8 (128x128 scale blocks, a partial row block) and packed FP4 (1x32 blocks) weights."""
    rng = np.random.default_rng(seed)
    k = 128 * kb
    w = (fp4_matrix if fp4 else fp8_matrix)(rng, n, k)
    x = activations(rng, (rows, k), prec) * float(rng.choice([2.0 ** -10, 1.0, 2.0 ** 7]))
    check(cu_linear.quantized_linear(x, w, prec), quantized_linear.spec(x, w, prec), prec)


def test_quantized_linear_adds_the_spec_block_sums_in_order():
    """mirror: the blocks' sums added in ascending order (model/linear.py block_sums), not one pass over the row.
    Hand-worked, each output exact in fp32 (0, 1 or 256) and one pass giving another value:
    FP4, K = 256, outputs one per ordering (a, b, c) of (1, 2^60, -2^60) through e2m1 ±1 weights whose 1x32
    scales are 2^0 or 2^60: a at column 0 (block 0), b and c in the first two 1x32 blocks of block 1.
    Spec: a + (b + c); one pass (and the old kernel, which added each 1x32 sum to the running total):
    (a + b) + c; they differ on 4 of the 6 orderings. Six more outputs put a, b, c in the first three
    1x32 blocks of block 1: (a + b) + c, where the 1x32 sums in descending order give (c + b) + a.
    FP8, K = 384 (one activation per column and 1x128 block, each quantized exactly): 2^60 in block 0,
    96 and 96 in block 1, -2^60 in block 2: (2^60 + 192) + -2^60 = 256; one pass: ((2^60 + 96) + 96) + -2^60 = 0
    (96 is below half an ulp of 2^60, 192 above)."""
    import itertools
    big = 2.0 ** 60
    perms = list(itertools.permutations([1.0, big, -big]))
    spec_order = [a + (b + c) for a, b, c in perms]
    one_pass = [(a + b) + c for a, b, c in perms]
    assert sum(p != q for p, q in zip(spec_order, one_pass)) == 4
    assert [(c + b) + a for a, b, c in perms] != one_pass
    nib = np.zeros((12, 256), np.uint8)
    scale = np.full((12, 8), 127, np.uint8)                           # E8M0 2^0
    for o, values in enumerate(perms * 2):
        cols = [0, 128, 160] if o < 6 else [128, 160, 192]            # block 0 and block 1's 1x32 blocks
        for col, v in zip(cols, values):
            nib[o, col] = 2 if v > 0 else 10                          # e2m1 +1.0 / -1.0
            scale[o, col // 32] = 187 if abs(v) == big else 127       # 2^60 / 2^0
    w4 = Fp4Matrix(pack_fp4(nib), scale.view(ml_dtypes.float8_e8m0fnu))
    x4 = np.zeros((2, 256), np.float32)
    x4[:, [0, 128, 160, 192]] = 1.0
    want = quantized_linear.spec(x4, w4, "mirror")
    assert np.array_equal(want, np.tile(np.array(spec_order + one_pass, np.float32), (2, 1)))
    check(cu_linear.quantized_linear(x4, w4, "mirror"), want, "mirror")

    codes = np.zeros((1, 384), np.uint8)
    codes[0, [0, 128, 129, 256]] = 0x38                               # e4m3 1.0, block scales 2^0
    w8 = Fp8Matrix(codes.view(ml_dtypes.float8_e4m3fn), np.full((1, 3), 127, np.uint8).view(ml_dtypes.float8_e8m0fnu))
    x8 = np.zeros((1, 384), np.float32)
    x8[0, [0, 128, 129, 256]] = [big, 96.0, 96.0, -big]
    assert ((big + 96.0) + 96.0) - big == 0.0                         # one pass
    want = quantized_linear.spec(x8, w8, "mirror")
    assert want[0, 0] == 256.0
    check(cu_linear.quantized_linear(x8, w8, "mirror"), want, "mirror")


def test_quantized_linear_act_quant_edges_and_row_independence():
    """Activation blocks at the e4m3 edges (subnormals, ties, 448, the amax floor); one row alone = in a batch."""
    rng = np.random.default_rng(5)
    w = fp8_matrix(rng, 8, 256)
    x = activations(rng, (3, 256), "mirror")
    # block 0 of row 0 has amax 448 (scale 1): RNE ties 1+1/16 -> 1, 1+3/16 -> 1.25, subnormal ties
    # 2^-10 -> 0, 3·2^-10 -> 2^-8, and the largest value 448
    x[0, :8] = [448.0, 1 + 1 / 16, 1 + 3 / 16, 2.0 ** -10, 3 * 2.0 ** -10, -(1 + 1 / 16), 2.0 ** -7 + 2.0 ** -11, -448.0]
    x[1, :128] = 1e-6                                                           # below the amax floor 1e-4
    x[2, 5] = 0.0
    got = cu_linear.quantized_linear(x, w, "mirror")
    check(got, quantized_linear.spec(x, w, "mirror"), "mirror")
    assert np.array_equal(got[1:2], cu_linear.quantized_linear(x[1:2], w, "mirror"))
    with pytest.raises(ValueError, match="non-finite"):
        cu_linear.quantized_linear(np.where(x == 0, np.inf, x).astype(np.float32), w, "mirror")
    with pytest.raises(TypeError, match="float32"):
        cu_linear.quantized_linear(x.astype(np.float64), w, "mirror")
    with pytest.raises(ValueError, match="256 inputs"):
        cu_linear.quantized_linear(x[:, :128], w, "float32")
    bad_scale = Fp8Matrix(w.values, np.full((1, 2), 255, np.uint8))        # E8M0 0xFF is NaN
    for fn in (cu_linear.quantized_linear, quantized_linear.spec):
        with pytest.raises(ValueError, match="scale is NaN"):
            fn(x, bad_scale, "mirror")
        with pytest.raises(TypeError, match="1-byte codes"):
            fn(x, Fp8Matrix(np.zeros((8, 256), np.float32), w.scale), "mirror")


@FEW
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 3), n=st.integers(1, 12), k=st.integers(1, 40),
       prec=st.sampled_from(PRECS))
def test_matmul(seed, rows, n, k, prec):
    rng = np.random.default_rng(seed)
    x = activations(rng, (rows, k), prec)
    w = round_bf16(rng.standard_normal((n, k)))
    check(cu_linear.matmul(x, w, prec), matmul.spec(x, w, prec), prec)


# ---------------------------------------------------------------- compressor pooling

@FEW
@given(seed=st.integers(0, 2**31), n=st.integers(1, 2), pool=st.sampled_from([4, 8, 16]), d=st.integers(1, 16),
       pad=st.booleans(), prec=st.sampled_from(PRECS))
def test_gated_pool(seed, n, pool, d, pad, prec):
    """The overlap's padding (score -inf in the first half of the first entry's pool) included."""
    rng = np.random.default_rng(seed)
    dt = np.float64 if prec == "float64" else np.float32
    kv = (rng.standard_normal((1, n, pool, d)) * 3).astype(dt)
    score = (rng.standard_normal((1, n, pool, d)) * 4).astype(dt)
    if pad:
        score[0, 0, :pool // 2] = -np.inf
        kv[0, 0, :pool // 2] = 0
    check(cu_compressor.gated_pool(kv, score, prec), gated_pool.spec(kv, score, prec), prec)


def test_gated_pool_refuses_an_all_minus_inf_slice():
    kv = np.zeros((1, 1, 4, 2), np.float32)
    score = np.full((1, 1, 4, 2), -np.inf, np.float32)
    for fn in (cu_compressor.gated_pool, gated_pool.spec):
        with pytest.raises(ValueError, match="entirely -inf"):
            fn(kv, score, "mirror")


# ---------------------------------------------------------------- indexer

@FEW
@given(seed=st.integers(0, 2**31), heads=st.integers(1, 4), n=st.integers(1, 12), j=st.sampled_from([8, 32]),
       prec=st.sampled_from(PRECS))
def test_index_scores(seed, heads, n, j, prec):
    rng = np.random.default_rng(seed)
    q, keys = activations(rng, (heads, j), prec), activations(rng, (n, j), prec)
    w = activations(rng, (heads,), prec) * 0.1
    check(cu_indexer.index_scores(q, keys, w, prec), index_scores.spec(q, keys, w, prec), prec)


@pytest.mark.parametrize("prec, decode_from", [("float64", None), ("mirror", None), ("mirror", 7)])   # about 25 s
def test_tiny_model_indexer_pool_and_sinkhorn_on_the_device_give_every_site(tiny_ckpt, prec, decode_from):
    """The tiny model (CSA layers with the indexer, HCA, mHC everywhere), 10 tokens, under
    "numpy,index_topk=cuda,gated_pool=cuda,split_sinkhorn=cuda" against "numpy": every trace site equal in
    mirror (scores, top-k sets, compressed entries, logits), within the bound otherwise; also a 7-token
    prefill followed by decode steps at positions 7 (it completes a compressed entry) and 8."""
    import refimpl
    from refimpl.oracle.trace import run_trace
    tokens = np.random.default_rng(1).integers(2, 1280, 9 if decode_from else 10)
    ref = run_trace(refimpl.load(tiny_ckpt, precision=prec), tokens, decode_from=decode_from)
    dev = run_trace(refimpl.load(tiny_ckpt, precision=prec,
                                 kernels="numpy,index_topk=cuda,gated_pool=cuda,split_sinkhorn=cuda"), tokens,
                    decode_from=decode_from)
    assert ref.tensors.keys() == dev.tensors.keys()
    for name, want in ref.tensors.items():
        if want.dtype.kind == "i":
            assert np.array_equal(dev.tensors[name], want), name
        else:
            check(np.where(np.isinf(want), 0, dev.tensors[name]), np.where(np.isinf(want), 0, want), prec)
            assert np.array_equal(np.isinf(dev.tensors[name]), np.isinf(want)), name


def test_tiny_model_indexer_with_replayed_topk(tiny_ckpt):
    """A replay forcing layer 2's entries (another set and order than the model's own): the device indexer
    records and returns the forced sets, as the spec does; every site equal (mirror)."""
    import refimpl
    from refimpl.oracle.replay import Replay
    from refimpl.oracle.trace import run_trace
    tokens = np.random.default_rng(2).integers(2, 1280, 10)
    forced = np.full((10, 2), -1, np.int64)
    for t in range(10):
        visible = (t + 1) // 4
        row = [visible - 1, 0][:visible] if visible else []
        forced[t, :len(row)] = row
    runs = [run_trace(refimpl.load(tiny_ckpt, precision="mirror", kernels=k), tokens, replay=Replay(topk={2: forced}))
            for k in ("numpy", "numpy,index_topk=cuda")]
    assert np.array_equal(runs[1].tensors["layers.2.attn.indexer.topk"], forced.astype(np.int32))
    for name, want in runs[0].tensors.items():
        assert np.array_equal(runs[1].tensors[name], want), name


def test_topk_ties_and_order():
    """Ties go to the lower entry index and the order is descending, as numerics.top_k (checked on scores
    made equal on purpose: all-zero keys give every entry the score 0)."""
    from refimpl.cuda.host import to_device, to_host
    from numba import cuda
    scores = np.array([[[1.0, 3.0, 3.0, 2.0, 3.0, np.nan, 0.5, -1.0]]])
    out = cuda.to_device(np.full((1, 1, 5), -1, np.int64))
    cu_indexer.topk_kernel[1, 8](to_device(scores), 7, 1, 5, out)       # query at position 7: 8 entries visible
    assert to_host(out).tolist() == [[[5, 1, 2, 4, 3]]]                  # NaN largest, then 3s by index, then 2


# ---------------------------------------------------------------- mHC Sinkhorn

@FEW
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 3), n=st.integers(1, 4), iters=st.integers(1, 20),
       prec=st.sampled_from(PRECS))
def test_split_sinkhorn(seed, rows, n, iters, prec):
    rng = np.random.default_rng(seed)
    x = (2 + n) * n
    mixes = (rng.standard_normal((rows, x)) * 3).astype(np.float32)
    scale = rng.uniform(0.2, 2, 3).astype(np.float32)
    base = rng.standard_normal(x).astype(np.float32)
    got = cu_hyperconn.split_sinkhorn(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    want = split_sinkhorn.spec(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    for g, w in zip(got, want):
        check(g, w, prec)


def test_split_sinkhorn_more_streams_than_the_local_array_runs_the_spec():
    n = cu_hyperconn.MAX_STREAMS + 1
    rng = np.random.default_rng(6)
    args = ((rng.standard_normal((1, (2 + n) * n))).astype(np.float32), np.ones(3, np.float32),
            np.zeros((2 + n) * n, np.float32))
    got = cu_hyperconn.split_sinkhorn(*args, n=n, iters=2, eps=1e-6, prec="mirror")
    for g, w in zip(got, split_sinkhorn.spec(*args, n=n, iters=2, eps=1e-6, prec="mirror")):
        check(g, w, "mirror")


def test_split_sinkhorn_refuses_bad_shapes():
    with pytest.raises(ValueError, match="mixes"):
        cu_hyperconn.split_sinkhorn(np.zeros((2, 23), np.float32), np.ones(3, np.float32), np.zeros(24, np.float32),
                                    n=4, iters=2, eps=1e-6, prec="mirror")


@pytest.mark.parametrize("prec", PRECS)
def test_cuda_kernels_through_the_kit(prec):
    """Dogfood: the CUDA sparse attention and Sinkhorn on inputs drawn by refimpl.testing's records, checked with
    its assertion at their precision (what another implementation's kernel must pass), 3 examples each."""

    @settings(deadline=None, max_examples=3, derandomize=True)
    @given(inputs=OPS["sparse_attention"].strategy(prec))
    def attention(inputs):
        dt = np.float64 if prec == "float64" else np.float32
        o = cu_attention.sparse_attention(inputs["q"].astype(dt), inputs["kv"].astype(dt), inputs["attn_sink"],
                                          inputs["topk_idxs"], inputs["softmax_scale"], prec)
        assert_matches(o, "sparse_attention", inputs, prec)

    @settings(deadline=None, max_examples=3, derandomize=True)
    @given(inputs=OPS["split_sinkhorn"].strategy(prec))
    def sinkhorn(inputs):
        dt = np.float64 if prec == "float64" else np.float32
        out = cu_hyperconn.split_sinkhorn(inputs["mixes"].astype(dt), inputs["scale"], inputs["base"], n=inputs["n"],
                                          iters=inputs["iters"], eps=inputs["eps"], prec=prec)
        assert_matches(out, "split_sinkhorn", inputs, prec)
    attention()
    sinkhorn()


def test_zz_mirror_comparisons_were_made():
    """Runs last: how many mirror elements were compared and how many differed (0; see the docstring)."""
    print(f"\nmirror: {MIRROR_DIFFERENT[0]} of {MIRROR_COMPARED[0]} elements differed from the spec")
    assert MIRROR_COMPARED[0] > 1000 and MIRROR_DIFFERENT[0] == 0
    assert ops.KERNELS["cuda"]                                              # the registry this file covers
