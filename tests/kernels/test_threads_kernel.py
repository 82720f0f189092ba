"""The side kernels (indexer, compressor, hyperconn, norm, rope) give the same bits on any number of threads
(refimpl/kernels/threads.py) and as plain Python (NUMBA_DISABLE_JIT); the refusals of bad shapes."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from refimpl.kernels import compressor as kc, hyperconn as kh, indexer as ki, norm as kn, rope as kr
from refimpl.model.rope import RopeTable


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


SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    from refimpl.kernels import compressor as kc, hyperconn as kh, indexer as ki, norm as kn, rope as kr
    import refimpl.kernels.threads
    refimpl.kernels.threads.SMALL_WORK = 0            # small calls too run in the parallel regions
    from refimpl.model.compressor import gated_pool
    from refimpl.config import Config
    from refimpl.context import RunContext
    from refimpl.model.hyperconn import hc_post, split_sinkhorn
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
        ctx = RunContext(cfg=Config.tiny(), prec=prec)
        res, post, comb = bf(rng.standard_normal((1, 3, 4, 200))).astype(dt), rng.random((1, 3, 4)).astype(dt), \\
            rng.random((1, 3, 4, 4)).astype(dt)
        calls = [(ki.index_topk, index_topk.spec, (q, keys, w, 1197, 4, 5, prec), dict()),
                 (kc.gated_pool, gated_pool.spec, (kv, sc, prec), dict()),
                 (kh.split_sinkhorn, split_sinkhorn.spec, (mixes, np.float32([.3, .4, .5]), np.zeros(24, np.float32)),
                  dict(n=4, iters=5, eps=1e-6, prec=prec)),
                 (kn.rms_norm, rms_norm.spec, (x, np.ones(200, np.float32)), dict(eps=1e-6, prec=prec)),
                 (kn.head_rms_norm, head_rms_norm.spec, (q,), dict(eps=1e-6, prec=prec)),
                 (kr.apply_rope, apply_rope.spec, (q, table, prec), dict(inverse=True)),
                 (kh.hc_post, hc_post.spec, (x, res, post, comb, ctx), dict())]
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
                 (3, kr.apply_rope, (qh, table, prec), dict(inverse=False)),
                 (5, kh.hc_post, (x.reshape(1, 2048, 4096), bf(rng.standard_normal((1, 2048, 4, 4096))),
                                  rng.random((1, 2048, 4)).astype(np.float32),
                                  rng.random((1, 2048, 4, 4)).astype(np.float32), RunContext(cfg=Config.tiny(), prec=prec)),
                  dict())]
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
