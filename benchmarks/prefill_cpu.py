"""One Flash-dimension prefill measured by CPU time, for a machine shared with other jobs.

    python benchmarks/prefill_cpu.py --ckpt /tmp/flash2 --precision mirror --tokens 1024 [--sample]

Prints the prefill's process CPU seconds, its FLOP (kernels.py's `prefill_flops`), the one-thread
dgemm (float64 / mirror) or sgemm (float32) rate measured in the same process before and after it
(best of 3, 2048³, OpenBLAS at one thread), and the CPU efficiency: FLOP / that rate (the higher of
the two) / CPU seconds. On an idle machine this agrees with kernels.py's wall-clock ratio to the
many-thread rate (main's 1024-token mirror prefill: 0.345 against 0.343, benchmarks/README.md);
under load it stays meaningful where wall time does not. Also the peak RSS against the touched
weights + logits, as kernels.py counts them, and with --sample the largest RSS seen (every 50 ms)
per stack of the main thread (its four innermost frames).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: tokens, FLOP count, touched bytes)

from refimpl.formats.weights import load  # noqa: E402
from refimpl.kernels.blas import _openblas  # noqa: E402
from refimpl.oracle.trace import Trace  # noqa: E402

GiB = 2 ** 30


def one_thread_rate(dtype) -> float:
    """GFLOP/s of one 2048³ product on one OpenBLAS thread (thread CPU time, best of 3)."""
    lib = _openblas()
    before = int(lib[0]()) if lib else None
    if lib:
        lib[1](ctypes.c_int(1))
    try:
        x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(dtype)
        x @ x
        best = min(_timed(lambda: x @ x) for _ in range(3))
    finally:
        if lib:
            lib[1](ctypes.c_int(before))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ckpt", default="/tmp/flash2")
    ap.add_argument("--precision", default="mirror", choices=["mirror", "float64", "float32"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--kernels", default="numba")
    ap.add_argument("--sample", action="store_true", help="sample RSS with the main thread's stack")
    a = ap.parse_args(argv)
    if not Path(a.ckpt).is_dir():
        print(f"prefill_cpu: no checkpoint at {a.ckpt}", file=sys.stderr)
        return 2
    model = load(a.ckpt, precision=a.precision, kernels=a.kernels, max_seq_len=max(4096, a.tokens))
    cfg = model.cfg
    toks = kb.fixed_tokens(a.tokens, cfg.vocab_size, seed=1)
    model.prefill(toks[:16])                                     # warm-up: kernels compiled, pool started
    dtype = np.float32 if a.precision == "float32" else np.float64
    limit = "sgemm" if dtype == np.float32 else "dgemm"
    before = one_thread_rate(dtype)
    samples, stop = [], threading.Event()
    page, main_id = os.sysconf("SC_PAGE_SIZE"), threading.main_thread().ident

    def sampler():
        while True:                                              # at least one sample, however short the prefill
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            frame = sys._current_frames().get(main_id)
            stack = [f"{Path(fs.filename).name}:{fs.lineno} {fs.name}" for fs in traceback.extract_stack(frame)] if frame else []
            samples.append((rss, stack[-4:]))
            if stop.wait(0.05):
                return
    thread = threading.Thread(target=sampler, daemon=True)
    if a.sample:
        thread.start()
    trace = Trace(("layers.*.ffn.expert_ids",))
    t0, c0 = time.perf_counter(), time.process_time()
    model.prefill(toks, trace=trace)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    if a.sample:
        thread.join()
    after = one_thread_rate(dtype)
    flops = kb.prefill_flops(cfg, range(cfg.n_layers), 0, a.tokens)["total"]
    sizes = kb.tensor_bytes(cfg)
    ids = {int(k.split(".")[1]): v for k, v in trace.tensors.items()}
    touched = (sum(kb.non_expert_bytes(cfg, sizes, range(cfg.n_layers), distinct_tokens=len(set(toks.tolist()))).values())
               + kb.touched_expert_bytes(sizes, ids)[0])
    logits = a.tokens * cfg.vocab_size * 4
    peak = kb.peak_rss_bytes()
    print(f"{a.precision} {a.tokens} tokens: wall {wall:.1f} s, process CPU {cpu:.1f} s, {flops / 1e12:.3f} TFLOP; "
          f"one-thread {limit} {before:.1f} / {after:.1f} GFLOP/s (before / after); "
          f"CPU efficiency {flops / max(before, after) / 1e9 / cpu:.3f}; peak RSS {peak / GiB:.2f} GiB against "
          f"{touched / GiB:.2f} GiB touched + {logits / GiB:.2f} GiB of logits (excess {(peak - touched - logits) / GiB:.2f} "
          f"GiB); load average {os.getloadavg()[0]:.1f}")
    by: dict[str, int] = {}
    for rss, stack in samples:
        key = " < ".join(reversed(stack))
        by[key] = max(by.get(key, 0), rss)
    for key, rss in sorted(by.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {rss / GiB:6.2f} GiB  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
