"""Attention-side Numba kernels against their NumPy spec functions, at tiny and Flash dimensions.

    python benchmarks/attention_kernels.py ops [--precisions mirror float64] [--only NAME ...] [--dims flash]
                                               [--reps N]
        each kernel (refimpl/kernels/: sparse_attention, index_topk, split_sinkhorn, rms_norm,
        head_rms_norm, apply_rope, gated_pool) and its spec on random bf16-valued inputs of the
        tiny and Flash shapes (prefill and decode), with the speed-up and whether mirror is equal;
        --only keeps the cases whose name contains one of NAME (e.g. "decode"); --reps N: the best
        of N interleaved spec / kernel calls (default 2 at Flash dimensions, 10 at tiny)
    python benchmarks/attention_kernels.py layer LAYER TOKENS [--precision mirror] [--kernels K] [--profile]
        one attention layer at Flash dimensions (Config.preset("flash"); layer 2 is CSA, ratio 4
        with the indexer; layer 3 HCA, ratio 128) on random weights made in memory as the
        synthetic writer makes them (no checkpoint is written), a prefill of TOKENS tokens from
        position 0: time, state bytes, and with --profile the cProfile by function

Timings are wall-clock on whatever else the machine runs; run it alone. Numba compiles on the
first call of each kernel (cached in NUMBA_CACHE_DIR); every timing here is after one warm-up call.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import ml_dtypes
import numpy as np

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".numba-cache"))

from refimpl.context import RunContext
from refimpl.config import Config  # noqa: E402

KERNELS = "numpy," + ",".join(f"{op}=numba" for op in (
    "sparse_attention", "index_topk", "gated_pool", "split_sinkhorn", "rms_norm", "head_rms_norm", "apply_rope"))


def attention_case(rng, bf, h, d, W, s, ratio, topk, start=0):
    """q, kv, sink, index sets laid out as attention() lays them out (window part, then compressed)."""
    from refimpl.model.attention import compressed_indices, window_indices
    win, n_prev = window_indices(start, s, W)
    n_ent = (start + s) // ratio
    if topk:                                  # CSA: distinct visible entries in a random order
        comp = np.full((s, min(topk, n_ent)), -1)
        for i in range(s):
            c = rng.permutation((start + i + 1) // ratio)[:comp.shape[1]]
            comp[i, :len(c)] = c
    else:
        comp = compressed_indices(start, s, ratio)
    idx = np.concatenate([win, np.where(comp >= 0, comp + n_prev + s, -1)], axis=1)[None]
    return bf(1, s, h, d) * np.float32(0.5), bf(1, n_prev + s + n_ent, d), bf(h), idx


def op_cases(prec):
    from refimpl.kernels import attention as ka, compressor as kc, hyperconn as kh, indexer as ki, norm as kn, rope as kr
    from refimpl.model.attention import sparse_attention
    from refimpl.model.compressor import gated_pool
    from refimpl.model.hyperconn import split_sinkhorn
    from refimpl.model.indexer import index_topk
    from refimpl.model.norm import head_rms_norm, rms_norm
    from refimpl.model.rope import apply_rope, rope_table
    rng = np.random.default_rng(0)
    dt = np.float64 if prec == "float64" else np.float32

    def bf(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32).astype(dt)

    tiny, flash = Config.tiny(), Config.preset("flash")
    sc, base = np.float32([.3, .4, .5]), np.zeros(24, np.float32)
    for name, cfg, s in (("tiny", tiny, 64), ("flash", flash, 512)):
        h, d, W, p = cfg.n_heads, cfg.head_dim, cfg.window_size, cfg.rope_head_dim
        ih, j, c = cfg.index_n_heads, cfg.index_head_dim, cfg.dim
        for label, ratio, topk, start, n in (("CSA prefill", 4, cfg.index_topk, 0, s), ("HCA prefill", 128, 0, 0, s),
                                             ("CSA decode", 4, cfg.index_topk, 8191, 1),
                                             ("HCA decode", 128, 0, 65535, 1)):
            args = attention_case(rng, bf, h, d, W, n, ratio, topk, start)
            yield name, f"sparse_attention {label}", sparse_attention.spec, ka.sparse_attention, \
                (*args, cfg.softmax_scale, prec), {}
        table = rope_table(np.arange(s), dim=p, base=1e4, original_seq_len=0, factor=1, beta_fast=32, beta_slow=1,
                           prec=prec)
        q4 = bf(1, s, h, d)
        yield name, "index_topk prefill", index_topk.spec, ki.index_topk, \
            (bf(1, s, ih, j), bf(1, s // 4, j), bf(1, s, ih), 0, 4, cfg.index_topk, prec), {}
        yield name, "index_topk decode@8191", index_topk.spec, ki.index_topk, \
            (bf(1, 1, ih, j), bf(1, 2048, j), bf(1, 1, ih), 8191, 4, cfg.index_topk, prec), {}
        yield name, "split_sinkhorn", split_sinkhorn.spec, kh.split_sinkhorn, (bf(1, s, 24), sc, base), \
            dict(n=4, iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, prec=prec)
        yield name, "rms_norm", rms_norm.spec, kn.rms_norm, (bf(1, s, c), np.ones(c, ml_dtypes.bfloat16)), \
            dict(eps=cfg.norm_eps, prec=prec)
        yield name, "head_rms_norm", head_rms_norm.spec, kn.head_rms_norm, (q4,), dict(eps=cfg.norm_eps, prec=prec)
        yield name, "apply_rope", apply_rope.spec, kr.apply_rope, (q4, table, prec), {}
        yield name, "gated_pool (overlap)", gated_pool.spec, kc.gated_pool, \
            (bf(1, s // 4, 8, d), bf(1, s // 4, 8, d), prec), {}


def best_of(f, g, reps):
    """min over reps interleaved calls of f and of g (after one warm-up call of each)."""
    f(), g()
    tf = tg = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        tf = min(tf, time.perf_counter() - t)
        t = time.perf_counter()
        g()
        tg = min(tg, time.perf_counter() - t)
    return tf, tg


def run_ops(precisions, only=(), dims_only=None, reps=None):
    from refimpl.kernels.blas import _openblas
    lib = _openblas()
    if lib:   # a fresh process's OpenBLAS ran a 64 x 128 @ 128 x 2048 product 50x slower until its thread count
        lib[1](lib[0]())   # was set once (measured 2026-12-07); a model run's products (blas.run_tasks) set it
    print(f"load average {os.getloadavg()}", flush=True)
    for prec in precisions:
        for dims, name, spec, kernel, args, kw in op_cases(prec):
            if (only and not any(o in name for o in only)) or (dims_only and dims != dims_only):
                continue
            ts, tk = best_of(lambda: spec(*args, **kw), lambda: kernel(*args, **kw),
                             reps or (2 if dims == "flash" else 10))
            a, b = spec(*args, **kw), kernel(*args, **kw)
            same = all(np.array_equal(x, y) for x, y in zip(a if isinstance(a, tuple) else (a,),
                                                          b if isinstance(b, tuple) else (b,)))
            print(f"{prec:8s} {dims:6s} {name:30s} spec {ts * 1e3:10.2f} ms  kernel {tk * 1e3:9.2f} ms  "
                  f"x{ts / tk:7.1f}  equal={same}", flush=True)


def flash_layer_weights(cfg, layer):
    """AttentionWeights of one layer, made in memory by the synthetic writer's generator."""
    from refimpl.formats.weights import expected_tensors, load_attention
    from refimpl.synthetic.writer import _Producer

    class Source:
        def __init__(self):
            self.produce = _Producer(cfg, expected_tensors(cfg), 0)

        def get(self, name):
            return self.produce(name)
    return load_attention(Source(), f"layers.{layer}.", layer, cfg)


def run_layer(layer, tokens, prec, kernels, profile):
    from refimpl.model.attention import AttentionState, attention
    from refimpl.ops import use_kernels
    cfg = Config.preset("flash")
    w = flash_layer_weights(cfg, layer)
    x = np.random.default_rng(1).standard_normal((1, tokens, cfg.dim)).astype(np.float32)
    x = x.astype(ml_dtypes.bfloat16).astype(np.float64 if prec == "float64" else np.float32)
    state = AttentionState.empty(cfg, layer, 1, prec)
    prof = cProfile.Profile() if profile else None
    with use_kernels(kernels):
        t = time.perf_counter()
        if prof:
            prof.enable()
        _, state = attention(x, 0, state, w, cfg.layer(layer), RunContext(cfg, prec))
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - t
    print(f"layer {layer} (ratio {cfg.compress_ratio(layer)}) prefill {tokens} tokens, {prec}, kernels {kernels}: "
          f"{elapsed:.2f} s, state {state.nbytes()} B ({state.nbytes() / tokens:.0f} B/token)")
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumtime").print_stats(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ops")
    o.add_argument("--precisions", nargs="+", default=["mirror", "float64"])
    o.add_argument("--only", nargs="+", default=[])
    o.add_argument("--dims", choices=["tiny", "flash"], default=None)
    o.add_argument("--reps", type=int, default=None)
    la = sub.add_parser("layer")
    la.add_argument("layer", type=int)
    la.add_argument("tokens", type=int)
    la.add_argument("--precision", default="mirror")
    la.add_argument("--kernels", default=KERNELS)
    la.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    if a.cmd == "ops":
        run_ops(a.precisions, a.only, a.dims, a.reps)
    else:
        run_layer(a.layer, a.tokens, a.precision, a.kernels, a.profile)


if __name__ == "__main__":
    main()
