"""Numba kernels of the indexer, compressor pooling, mHC Sinkhorn, norms and RoPE against their specs.

Kernels: refimpl/kernels/{indexer,compressor,hyperconn,norm,rope,rounding}.py.
mirror: bit-identical to the spec (the kernels keep NumPy's summation orders, see
rounding.pairwise_sum, and the spec's separate IEEE ops), except where a float64 value that is
not exact (a sum, an exp: Numba calls the C library's exp, NumPy its own) lands on an fp32
rounding boundary; each case allows at most one such element in 10,000 (none seen).
float64: within 1e-12 relative (mostly bit-identical; exp may differ in the last bit).
float32: the kernels work in float64 and round once; the spec rounds every step to fp32, so the
bound is a few fp32 ulps of the result's scale (stated per kernel).
"""
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels import compressor as kc, hyperconn as kh, indexer as ki, norm as kn, rope as kr
from refimpl.kernels.rounding import bf16_f32, pairwise_sum
from refimpl.model.compressor import gated_pool
from refimpl.model.hyperconn import split_sinkhorn
from refimpl.model.indexer import index_topk
from refimpl.model.norm import head_rms_norm, rms_norm
from refimpl.model.rope import RopeTable, apply_rope, rope_table
from refimpl.numerics import round_bf16

PRECS = ["mirror", "float64", "float32"]


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def dtype_of(prec):
    return np.float64 if prec == "float64" else np.float32


def check(got, want, prec, f32_atol):
    """Equal in mirror (up to counted one-ulp boundary cases) and float64; f32_atol in float32."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if prec == "float32":
        np.testing.assert_allclose(got, want, rtol=0, atol=f32_atol)
        return
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite) and np.array_equal(got[~finite], want[~finite])
    if prec == "float64":                        # exp / sum order may differ from NumPy's in the last bit
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=0)
        return
    diff = got != want
    assert diff.sum() <= max(1, want.size * 1e-4), f"mirror: {int(diff.sum())} of {want.size} elements differ"
    if diff.any():                               # one bf16/fp32 ulp at a rounding boundary, and rare
        print(f"mirror boundary case: {int(diff.sum())} of {want.size} element(s)")
        ulp = np.abs(got[diff].astype(np.float32).view(np.int32) - want[diff].astype(np.float32).view(np.int32))
        assert (ulp <= 1 << 16).all()
        assert diff.mean() <= 1e-3 if want.size >= 1000 else diff.sum() <= 1


# ------------------------------------------------------------------------------------------------ helpers

@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 3000), spread=st.sampled_from([0.0, 10.0, 60.0]))
def test_pairwise_sum_is_numpys_order(seed, n, spread):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n + 5) * np.exp(rng.uniform(-spread, spread, n + 5))).astype(np.float32).astype(np.float64)
    assert pairwise_sum(a, 5, n) == np.sum(a[5:])             # bit-identical, not just close


def test_bf16_rounding_matches_ml_dtypes_on_ties_edges_and_specials():
    rng = np.random.default_rng(1)
    bits = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                           np.uint32([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x00008000,
                                      0x80000000, 0x7FC00000, 0x3F807FFF])])
    x = bits.view(np.float32)
    got = np.array([bf16_f32(v) for v in x], np.float32)
    want = round_bf16(x)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


# ------------------------------------------------------------------------------------------------ indexer

@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), s=st.integers(1, 12), heads=st.sampled_from([1, 3, 4]),
       hd=st.sampled_from([8, 32]), start=st.integers(0, 40), ratio=st.sampled_from([1, 4]),
       k=st.integers(1, 12), coarse=st.booleans())
def test_index_topk(prec, seed, b, s, heads, hd, start, ratio, k, coarse):
    """coarse: integer-valued inputs, so many scores tie and the stable tie rule decides."""
    rng = np.random.default_rng(seed)
    n = (start + s) // ratio + int(rng.integers(0, 3))          # the keys may run past the visible ones
    draw = (lambda *sh: rng.integers(-2, 3, sh).astype(np.float32)) if coarse else \
        (lambda *sh: bf16(rng.standard_normal(sh)))
    dt = dtype_of(prec)
    q, keys, w = draw(b, s, heads, hd).astype(dt), draw(b, n, hd).astype(dt), draw(b, s, heads).astype(dt)
    want_idx, want_sc = index_topk.spec(q, keys, w, start, ratio, k, prec)
    got_idx, got_sc = ki.index_topk(q, keys, w, start, ratio, k, prec)
    check(got_sc, want_sc, prec, f32_atol=1e-5 * max(1.0, np.abs(want_sc[np.isfinite(want_sc)]).max(initial=0)))
    if prec != "float32" or coarse:                             # float32 scores may order near-ties differently
        assert np.array_equal(got_idx, want_idx)
    assert got_idx.dtype == np.int64 and got_idx.shape == want_idx.shape


# ------------------------------------------------------------------------------------------------ compressor

@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), n=st.integers(1, 4), P=st.sampled_from([4, 8, 16, 32]),
       d=st.integers(1, 40), pad=st.booleans())
def test_gated_pool(prec, seed, b, n, P, d, pad):
    """pad: the first half of the first entry's positions is padding (score -inf, kv 0), as with overlap."""
    rng = np.random.default_rng(seed)
    dt = dtype_of(prec)
    kv = rng.standard_normal((b, n, P, d)).astype(np.float32).astype(dt)
    score = (rng.standard_normal((b, n, P, d)) * 3).astype(np.float32).astype(dt)
    if pad:
        kv[:, 0, :P // 2], score[:, 0, :P // 2] = 0, -np.inf
    check(kc.gated_pool(kv, score, prec), gated_pool.spec(kv, score, prec), prec, f32_atol=1e-5 * np.abs(kv).max())


def test_gated_pool_refuses_an_all_padding_slice():
    kv, score = np.zeros((1, 1, 4, 2), np.float32), np.full((1, 1, 4, 2), -np.inf, np.float32)
    for fn in (gated_pool.spec, kc.gated_pool):
        with pytest.raises(ValueError, match="entirely -inf"):
            fn(kv, score, "mirror")


# ------------------------------------------------------------------------------------------------ mHC

@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 30), n=st.sampled_from([1, 2, 4]),
       iters=st.sampled_from([1, 2, 20]), gain=st.sampled_from([1.0, 10.0]))
def test_split_sinkhorn(prec, seed, rows, n, iters, gain):
    rng = np.random.default_rng(seed)
    x = (2 + n) * n
    dt = dtype_of(prec)
    mixes = (rng.standard_normal((rows, x)) * gain).astype(np.float32).astype(dt).reshape(1, rows, x)
    scale, base = rng.uniform(0.2, 0.6, 3).astype(np.float32), rng.standard_normal(x).astype(np.float32)
    want = split_sinkhorn.spec(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    got = kh.split_sinkhorn(mixes, scale, base, n=n, iters=iters, eps=1e-6, prec=prec)
    for g, w in zip(got, want):            # values in [0, 2]; 20 float32 Sinkhorn steps: ~20 ulps of 1
        check(g, w, prec, f32_atol=5e-6)


# ------------------------------------------------------------------------------------------------ norms, RoPE

@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), lead=st.sampled_from([(1,), (3,), (2, 5), (1, 2, 4)]),
       c=st.sampled_from([1, 7, 64, 200, 1024]), spread=st.sampled_from([0.0, 8.0]))
def test_rms_norm(prec, seed, lead, c, spread):
    rng = np.random.default_rng(seed)
    dt = dtype_of(prec)
    x = bf16(rng.standard_normal((*lead, c)) * np.exp(rng.uniform(-spread, spread, (*lead, c)))).astype(dt)
    w = bf16(1 + 0.1 * rng.standard_normal(c)).astype(ml_dtypes.bfloat16)
    want = rms_norm.spec(x, w, eps=1e-6, prec=prec)
    check(kn.rms_norm(x, w, eps=1e-6, prec=prec), want, prec, f32_atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from([(1, 1, 4, 16), (2, 3, 2, 64), (1, 5, 1, 128)]))
def test_head_rms_norm(prec, seed, shape):
    rng = np.random.default_rng(seed)
    q = bf16(rng.standard_normal(shape) * 3).astype(dtype_of(prec))
    want = head_rms_norm.spec(q, eps=1e-6, prec=prec)
    check(kn.head_rms_norm(q, eps=1e-6, prec=prec), want, prec, f32_atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), heads=st.sampled_from([None, 1, 3]), s=st.integers(1, 6),
       start=st.integers(0, 70000), inverse=st.booleans())
def test_apply_rope(prec, seed, heads, s, start, inverse):
    rng = np.random.default_rng(seed)
    shape = (2, s, 24) if heads is None else (2, s, heads, 24)
    x = bf16(rng.standard_normal(shape)).astype(dtype_of(prec))
    table = rope_table(start + np.arange(s), dim=16, base=10000.0, original_seq_len=4096, factor=16,
                       beta_fast=32, beta_slow=1, prec=prec)
    want = apply_rope.spec(x, table, prec, inverse=inverse)
    got = kr.apply_rope(x, table, prec, inverse=inverse)
    assert np.array_equal(got, want)                            # the same IEEE ops in every mode


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="weight"):
        kn.rms_norm(np.zeros((2, 8), np.float32), np.zeros(4, np.float32), eps=1e-6, prec="mirror")
    with pytest.raises(ValueError, match="apply_rope"):
        kr.apply_rope(np.zeros((2, 8), np.float32), RopeTable(np.zeros((2, 2)), np.zeros((2, 2))), "mirror")
    with pytest.raises(ValueError, match="split_sinkhorn"):
        kh.split_sinkhorn(np.zeros((2, 23)), np.ones(3), np.zeros(24), n=4, iters=2, eps=1e-6, prec="float64")
    with pytest.raises(ValueError, match="keys"):
        ki.index_topk(np.zeros((1, 8, 2, 4)), np.zeros((1, 1, 4)), np.zeros((1, 8, 2)), 0, 4, 2, "float64")
    with pytest.raises(ValueError, match="unknown precision"):
        kc.gated_pool(np.zeros((1, 1, 4, 2)), np.zeros((1, 1, 4, 2)), "fp8")


# ------------------------------------------------------------------------------------------------ determinism

SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    from refimpl.kernels import compressor as kc, hyperconn as kh, indexer as ki, norm as kn, rope as kr
    import refimpl.kernels.threads
    refimpl.kernels.threads.SMALL_WORK = 0            # small calls too run in the parallel regions
    from refimpl.model.compressor import gated_pool
    from refimpl.model.hyperconn import split_sinkhorn
    from refimpl.model.indexer import index_topk
    from refimpl.model.norm import head_rms_norm, rms_norm
    from refimpl.model.rope import apply_rope, rope_table
    rng = np.random.default_rng(3)
    h = hashlib.sha256()
    def bf(x):
        import ml_dtypes
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    for prec in ("mirror", "float64"):
        dt = np.float64 if prec == "float64" else np.float32
        q, keys, w = bf(rng.standard_normal((1, 3, 4, 16))).astype(dt), bf(rng.standard_normal((1, 300, 16))).astype(dt), \\
            bf(rng.standard_normal((1, 3, 4))).astype(dt)
        kv, sc = rng.standard_normal((2, 3, 8, 16)).astype(dt), rng.standard_normal((2, 3, 8, 16)).astype(dt)
        mixes, x = rng.standard_normal((1, 5, 24)).astype(dt), bf(rng.standard_normal((1, 3, 200))).astype(dt)
        table = rope_table(np.arange(3), dim=8, base=1e4, original_seq_len=0, factor=1, beta_fast=32, beta_slow=1,
                           prec=prec)
        calls = [(ki.index_topk, index_topk.spec, (q, keys, w, 1197, 4, 5, prec), dict()),
                 (kc.gated_pool, gated_pool.spec, (kv, sc, prec), dict()),
                 (kh.split_sinkhorn, split_sinkhorn.spec, (mixes, np.float32([.3, .4, .5]), np.zeros(24, np.float32)),
                  dict(n=4, iters=5, eps=1e-6, prec=prec)),
                 (kn.rms_norm, rms_norm.spec, (x, np.ones(200, np.float32)), dict(eps=1e-6, prec=prec)),
                 (kn.head_rms_norm, head_rms_norm.spec, (q,), dict(eps=1e-6, prec=prec)),
                 (kr.apply_rope, apply_rope.spec, (q, table, prec), dict(inverse=True))]
        for kernel, spec, args, kw in calls:
            got = kernel(*args, **kw)
            if {check_spec}:
                want = spec(*args, **kw)
                for g, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    if prec == "mirror":
                        assert np.array_equal(g, w_), kernel
                    else:   # NumPy's float64 exp is SIMD code on AVX-512 CPUs, an ulp from libm's (the kernels')
                        g, w_ = np.asarray(g, np.float64), np.asarray(w_, np.float64)
                        fin = np.isfinite(w_)
                        assert np.array_equal(g[~fin], w_[~fin], equal_nan=True), kernel
                        tol = 1e-14 * np.abs(w_[fin]).max(initial=0.0)
                        assert np.allclose(g[fin], w_[fin], rtol=1e-14, atol=tol), kernel
            for g in (got if isinstance(got, tuple) else (got,)):
                h.update(np.ascontiguousarray(g).tobytes())
    # thread-count test: calls long enough that two threads overlap in each prange, each repeated 3-8
    # times; a scratch buffer the threads share corrupts some calls (measured on 2 loaded cores: 40-100%
    # of them), so one of the repeats differs from the one-thread run
    if {large}:
        prec = "mirror"
        kv, sc = rng.standard_normal((2, 1, 4096, 8, 128)).astype(np.float32)
        q, keys, w = bf(rng.standard_normal((1, 128, 4, 64))), bf(rng.standard_normal((1, 4096, 64))), \\
            bf(rng.standard_normal((1, 128, 4)))
        x, qh = bf(rng.standard_normal((1, 16384, 512))), bf(rng.standard_normal((1, 4096, 16, 128)))
        mixes = rng.standard_normal((1, 16384, 24)).astype(np.float32)
        table = rope_table(np.arange(4096), dim=64, base=1e4, original_seq_len=0, factor=1, beta_fast=32,
                           beta_slow=1, prec=prec)
        calls = [(5, kc.gated_pool, (kv, sc, prec), dict()),
                 (4, ki.index_topk, (q, keys, w, 4 * 4096 - 128, 4, 512, prec), dict()),
                 (5, kh.split_sinkhorn, (mixes, np.float32([.3, .4, .5]), np.zeros(24, np.float32)),
                  dict(n=4, iters=20, eps=1e-6, prec=prec)),
                 (8, kn.rms_norm, (x, np.ones(512, np.float32)), dict(eps=1e-6, prec=prec)),
                 (8, kn.head_rms_norm, (qh,), dict(eps=1e-6, prec=prec)),
                 (3, kr.apply_rope, (qh, table, prec), dict(inverse=False))]
        for repeats, kernel, args, kw in calls:
            for _ in range(repeats):
                got = kernel(*args, **kw)
                for g in (got if isinstance(got, tuple) else (got,)):
                    h.update(np.ascontiguousarray(g).tobytes())
    print(h.hexdigest())
""")


def run_script(env_extra, check_spec=False, large=False):
    env = dict(os.environ, **env_extra)
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(check_spec=check_spec, large=large)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_thread_count_does_not_change_results():
    """One thread and two give the same bits, on small inputs and on inputs where two threads
    overlap in every parallel loop (a [1, 4096, 8, 128] pool, 16384 norm rows, ...), each called
    3-8 times: a scratch buffer shared by the threads of a prange fails this on every run."""
    assert run_script({"NUMBA_NUM_THREADS": "1"}, large=True) == run_script({"NUMBA_NUM_THREADS": "2"}, large=True)


def test_runs_with_jit_disabled():
    assert run_script({"NUMBA_DISABLE_JIT": "1"}, check_spec=True) == run_script({})
