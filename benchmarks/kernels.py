"""Kernel benchmark: the fast path against its NumPy spec and against the machine's own limits.

Every figure is a ratio to a limit measured IN THE SAME RUN on the same machine (figures from
another run or machine are never mixed in), and the last line printed is one JSON object with all
of them (`ratios` gathers the ratios). Each measurement runs in its own subprocess, so that its
peak RSS (ru_maxrss of that process) is its own.

    python benchmarks/kernels.py                       # everything (an hour or more on 2 cores)
    python benchmarks/kernels.py --quick               # a subset in a few minutes
    python benchmarks/kernels.py --smallest --tiny-ckpt DIR   # seconds: the tiny model only (tests)
    python benchmarks/kernels.py --profile             # cProfile of one Flash-dimension decode step
    python benchmarks/kernels.py --long-only           # the limits and the 65,536-token long context alone (~35 min)
    options: --ckpt /tmp/flash2 (Flash dims, 2 layers: `refimpl make-checkpoint flash /tmp/flash2 --layers 2`)
             --long-ckpt DIR (4 Flash layers SWA, SWA, CSA, HCA, 8 experts; made there if missing)
             --kernels numba (the selection measured against "numpy"), --precision mirror
             --prefill 1024,4096  --budget-s S  --long-tokens 65536  --long-budget-s S  --long-rate N,N,..
             --decode-position 128  --markdown (the README's table)  --job-timeout-s S

What is measured (the JSON keys):
  limits        read bandwidth: NumPy sum of a float32 array (1 GiB, best of 5; one thread, as
                NumPy's sum is); float32 / float64 matmul rates: NumPy sgemm / dgemm of a square (4096,
                best of 3, 2n^3 FLOPs, BLAS threads as configured); CPU and thread counts.
  tiny          the built-in tiny model as `refimpl demo` runs it (mirror, canonical layout, the demo
                prompt): prefill and decode ms/token with kernels="numpy" (the spec) and with the
                kernels, interleaved, best of 3; each kernel's speed-up over its spec function on
                the calls one prefill + decode step makes (below); and `refimpl demo --kernels K`
                as a subprocess with an empty NUMBA_CACHE_DIR (cold compile), then with that cache.
  flash_decode  the Flash-dimension checkpoint (all 256 experts): decode steps from --decode-position
                (reached by a prefill with the kernels in chunks of 1, 2, 4, ... tokens within a time
                budget; the spec run decodes the same tokens from the same, pickled, state), after
                warm-up steps; the fastest step's ms/token, per layer and for the head; weight bytes
                read per token, counted from the checkpoint's tensor table: every non-expert weight
                of the main layers, the selected experts' packed FP4 bytes (values + scales, from
                the recorded expert ids), hc_head, norm, head, one embedding row and one tid2eid row
                per hash layer (the MTP block is not run by a decode step and not counted).
                Effective GB/s = bytes / time, as a fraction of the read bandwidth. Peak RSS against
                the bytes the process touched (non-expert weights, embedding rows, every expert it
                selected), for the kernels and for the spec run; end to end: spec ms/token over
                kernel ms/token.
  flash_prefill prefill of N tokens from position 0, in --precision and in float32: FLOP/s (the products'
                FLOPs counted from the config: projections, experts, router, mHC, attention scores and
                P.V over the valid index entries, the head for every position) as a fraction of the
                same run's dgemm rate (mirror, float64: exact float64 sums) or sgemm rate (float32); peak
                RSS against non-expert bytes + the experts the run touched. A length whose time,
                extrapolated by FLOPs from a short calibration prefill, exceeds --budget-s is skipped
                and marked so.
  long_context  prefill through one CSA and one HCA layer (the first of each kind: layers 2 and 3 of
                a 4-layer Flash checkpoint) in chunks of at most --long-chunk tokens up to
                --long-tokens, each chunk sized to fit the rest of --long-budget-s; stopped early, it
                marks itself incomplete. Time, tokens/s, state bytes per token per layer (total
                State.nbytes() / tokens, and the growth: compressed entries and index keys). After
                each chunk a progress line: tokens done, tokens/s, and the projected total time
                (seconds per token fitted as a + b·position over the chunks so far, integrated to
                --long-tokens), so that a run that will not fit its budget says so early.
  long_rate     (before long_context, full mode) one chunk at each of --long-rate context positions,
                from a synthetic state (random bf16 entries and keys as a prefill to that position
                would hold): seconds, tokens/s, wall time per swappable operation, and the total of
                a --long-tokens prefill projected from them (the same fit).
  ops           (in tiny, flash_decode, long_context) each kernel's speed-up over its spec function:
                the arguments of every call a kernel gets during one step (tiny: a prefill and a
                decode step; Flash: one decode step; long: one 32-token chunk after the prefill) are
                recorded, then each call is timed with the kernel and with the spec on the same
                inputs, and the results compared bit for bit.
Timings are wall-clock (time.perf_counter) on a machine that may be shared: the load average at
the start and end is recorded in the JSON ("machine").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT_TAG = "BENCH-RESULT "
PROGRESS_TAG = "BENCH-PROGRESS "        # a worker's progress line: printed by the parent as it arrives
GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
EXPERT_MATRICES = ("w1", "w2", "w3")
DEFAULT_TINY_DIR = Path(tempfile.gettempdir()) / "refimpl-bench" / "tiny"
DEFAULT_LONG_DIR = Path(tempfile.gettempdir()) / "refimpl-flash-long"
# --long-budget-s: what 65,536 tokens through the two layers need on an idle 2-core machine, with a margin
# (benchmarks/README.md, "Issue 23: long context, second pass": measured rates and the projection)
LONG_BUDGET_S = 3600.0
LONG_BUDGET_QUICK_S = 120.0
# Cost of a token of the long context relative to one at position 0, per token of context: a + b·p with
# b/a = LONG_GROWTH (the indexer's scores and the HCA layer's attention grow with p; the products do
# not). Measured: CPU seconds of a 2048-token chunk at 2,048 / 16,384 / 32,768 / 63,488 tokens of
# context, 93.4 / 99.7 / 108.3 / 122.8 s (benchmarks/README.md, "Issue 23: long context, second pass"):
# a least-squares line through the seconds per token has b/a = 5.2e-6, a token at 65,536 costs x1.34.
LONG_GROWTH = 5e-6


# ============================================================== helpers (both sides)

def best_of(fn, repeats: int) -> float:
    """The least wall time of `repeats` calls of fn() (seconds)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fixed_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """The benchmark's input ids: reproducible random tokens (random weights: any ids do)."""
    return np.random.default_rng(seed).integers(2, vocab, n)


# ============================================================== weight bytes (from the tensor table)

def tensor_bytes(cfg) -> dict[str, int]:
    """name -> bytes of every tensor the checkpoint of `cfg` holds (formats/weights.py's table)."""
    from refimpl.formats.checkpoint import DTYPES
    from refimpl.formats.weights import expected_tensors
    return {name: int(np.prod(t.shape, dtype=np.int64)) * DTYPES[t.dtype].itemsize
            for name, t in expected_tensors(cfg).items()}


def expert_bytes(sizes: dict[str, int], layer: int, e: int) -> int:
    """Packed bytes of one routed expert (w1, w2, w3: FP4 values + E8M0 scales)."""
    p = f"layers.{layer}.ffn.experts.{e}."
    return sum(sizes[f"{p}{w}.{part}"] for w in EXPERT_MATRICES for part in ("weight", "scale"))


def non_expert_bytes(cfg, sizes: dict[str, int], layers, distinct_tokens: int) -> dict[str, int]:
    """Bytes of the weights a forward pass over `layers` reads besides the routed experts, by kind.

    Embedding and tid2eid: only the rows of the tokens run (distinct_tokens rows each);
    hc_head, norm and head: the model's last part (always run); the MTP block: not counted.
    """
    from refimpl.formats.weights import expected_tensors
    kinds: dict[str, int] = {}
    for name, t in expected_tensors(cfg).items():
        if t.kind in ("experts", "mtp"):
            continue
        m = re.match(r"layers\.(\d+)\.", name)
        if m and int(m.group(1)) not in layers:
            continue
        n = sizes[name]
        if name == "embed.weight" or name.endswith("ffn.gate.tid2eid"):
            n = min(n, distinct_tokens * n // t.shape[0])          # rows touched
        kinds[t.kind] = kinds.get(t.kind, 0) + n
    return kinds


def touched_expert_bytes(sizes, ids_by_layer: dict[int, np.ndarray]) -> tuple[int, int]:
    """(bytes, count) of the distinct routed experts the recorded ids select, summed over layers."""
    total = count = 0
    for layer, ids in ids_by_layer.items():
        for e in np.unique(ids):
            total += expert_bytes(sizes, layer, int(e))
            count += 1
    return total, count


# ============================================================== FLOPs of the products (from the config)

def prefill_flops(cfg, layers, start: int, s: int, *, head: bool = True) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of the products of a prefill of s tokens from position `start`.

    Per token and layer: the mHC projections (attention and MoE), wq_a, wq_b, wkv, wo_a, wo_b,
    the compressor(s) and indexer where the layer has them, the router, the selected experts and
    the shared expert (3 matrices each); attention: q.k and p.v over the valid index entries of
    each query (window min(t+1, W) + compressed: all visible (HCA) or min(topk, visible) (CSA));
    the indexer's scores over the visible entries. The head: hc_head and [v, c] for every position.
    """
    c, h, d, q = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    nc, f = cfg.hc_mult * cfg.dim, cfg.moe_inter_dim
    t = start + np.arange(s, dtype=np.float64)                      # query positions
    out = {"projections": 0.0, "experts": 0.0, "attention": 0.0, "indexer": 0.0, "head": 0.0}
    for i in layers:
        m = cfg.compress_ratio(i)
        proj = 2 * 2 * cfg.n_mix * nc                                # hc_attn, hc_ffn
        proj += 2 * (c * q + q * h * d + c * d + h * d * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * c)
        proj += 2 * c * cfg.n_routed_experts                         # router
        visible = np.minimum(t + 1, cfg.window_size)
        if m:
            coff = 2 if cfg.uses_overlap(i) else 1
            proj += 2 * 2 * c * coff * d                             # compressor wkv, wgate
            n_vis = np.floor((t + 1) / m)
            if cfg.uses_indexer(i):
                ij = cfg.index_n_heads * cfg.index_head_dim
                proj += 2 * (q * ij + c * cfg.index_n_heads + 2 * c * coff * cfg.index_head_dim)
                out["indexer"] += float(2 * ij * n_vis.sum())
                visible = visible + np.minimum(cfg.index_topk, n_vis)
            else:
                visible = visible + n_vis
        out["projections"] += proj * s
        out["experts"] += 2 * 3 * c * f * (cfg.n_activated_experts + cfg.n_shared_experts) * s
        out["attention"] += float(4 * h * d * visible.sum())
    if head:
        out["head"] = float(s * (2 * cfg.hc_mult * nc + 2 * c * cfg.vocab_size))
    out["total"] = float(sum(out.values()))
    return out


# ============================================================== kernel-vs-spec timing of each operation

def _leaves(x) -> list:
    """The arrays (and numbers) of a result: arrays, tuples/lists, dataclasses such as states."""
    if x is None:
        return []
    if isinstance(x, (tuple, list)):
        return [a for v in x for a in _leaves(v)]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [a for fld in dataclasses.fields(x) for a in _leaves(getattr(x, fld.name))]
    return [np.asarray(x)]


def same_result(a, b) -> tuple[bool, float]:
    """(bit-identical, max relative difference) of two results of one operation."""
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False, float("inf")
    same, worst = True, 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False, float("inf")
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(x64, y64, equal_nan=True):
            same = False
            diff = np.abs(x64 - y64)
            finite = np.isfinite(diff)
            scale = np.max(np.abs(y64[np.isfinite(y64)]), initial=0.0)
            worst = max(worst, float(diff[finite].max(initial=0.0)) / scale if scale else float("inf"))
            if not finite.all() and not np.array_equal(np.isfinite(x64), np.isfinite(y64)):
                worst = float("inf")
    return same, worst


class OpCapture:
    """Records the arguments of every call a kernel gets while a model runs, to time it against its spec.

    Only operations that run a kernel under the selection are recorded (the others have nothing to
    compare). The calls are recorded under a selection equal in meaning to the model's but distinct
    as a key (one redundant override), so the dispatch caches of earlier runs do not hide them.
    budget: bytes of (non-memory-mapped) array arguments kept; past it, an operation keeps its
    first call only.
    """

    def __init__(self, model, budget_bytes: int = 2 << 30):
        self.model, self.budget, self.held = model, budget_bytes, 0
        self.calls: dict[str, list] = {}

    @staticmethod
    def _bytes(args, kwargs) -> int:
        """Bytes of the array arguments that live in memory (views of the mapped checkpoint cost nothing)."""
        import mmap
        n = 0
        for v in list(args) + list(kwargs.values()):
            if not isinstance(v, np.ndarray):
                continue
            base = v
            while base is not None and not isinstance(base, (np.memmap, mmap.mmap)):
                base = getattr(base, "base", None)
            n += 0 if base is not None else v.nbytes
        return n

    @contextlib.contextmanager
    def recording(self):
        from refimpl import ops
        sel = self.model.kernels
        op0 = sorted(ops.SPEC)[0]
        capture_sel = ops.Kernels(sel.default, sel.overrides + ((op0, sel.backend(op0)),))
        orig_impl = ops.Kernels.impl

        def impl(kernels_self, op):
            fn = orig_impl(kernels_self, op)
            if fn is None or kernels_self != capture_sel:
                return fn

            def record(*args, **kwargs):
                calls = self.calls.setdefault(op, [])
                nbytes = self._bytes(args, kwargs)
                if not calls or self.held + nbytes <= self.budget:
                    calls.append((args, kwargs))
                    self.held += nbytes
                return fn(*args, **kwargs)
            return record

        ops.Kernels.impl = impl
        self.model.ctx = dataclasses.replace(self.model.ctx, kernels=capture_sel)   # the run context is frozen
        try:
            yield
        finally:
            ops.Kernels.impl = orig_impl
            self.model.ctx = dataclasses.replace(self.model.ctx, kernels=sel)

    def time_ops(self, repeats: int, spec_repeats: int | None = None) -> dict[str, dict]:
        """Per operation: spec and kernel time over the recorded calls (each call best of repeats)."""
        from refimpl import ops
        sel = self.model.kernels
        out = {}
        for op, calls in sorted(self.calls.items()):
            spec, kernel = ops.SPEC[op], sel.impl(op)
            t_spec = t_kernel = 0.0
            identical, worst = 0, 0.0
            for args, kwargs in calls:
                ref = spec(*args, **kwargs)                      # outside use_kernels: nested ops run their spec
                t_spec += best_of(lambda: spec(*args, **kwargs), spec_repeats or repeats)
                with ops.use_kernels(sel):                       # the kernel, with nested ops as selected
                    got = kernel(*args, **kwargs)
                    t_kernel += best_of(lambda: kernel(*args, **kwargs), repeats)
                same, rel = same_result(got, ref)
                identical += same
                worst = max(worst, rel)
            out[op] = {"calls": len(calls), "spec_ms": 1000 * t_spec, "kernel_ms": 1000 * t_kernel,
                       "speedup": t_spec / t_kernel if t_kernel > 0 else None,
                       "identical_calls": identical, "max_rel_diff": worst}
        return out


# ============================================================== per-layer timing of a forward pass

class LayerTimer:
    """Wall time of each block and of the head inside Model._forward (patched module globals)."""

    def __init__(self):
        import refimpl.model.transformer as tr
        self.tr, self.block = tr, tr.block
        self.head = {name: getattr(tr, name) for name in ("head_input", "head_product")}   # the head: both parts
        self.layer_s: dict[int, float] = {}
        self.head_s = 0.0

    def __enter__(self):
        def block(*args, **kwargs):
            t0 = time.perf_counter()
            out = self.block(*args, **kwargs)
            layer = args[5] if len(args) > 5 else kwargs["layer"]   # block(h, tokens, start_pos, state, w, layer, ctx)
            layer = getattr(layer, "id", layer)                    # a context's Layer: its index
            self.layer_s[layer] = self.layer_s.get(layer, 0.0) + time.perf_counter() - t0
            return out

        def timed(fn):
            def head_part(*args, **kwargs):
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.head_s += time.perf_counter() - t0
                return out
            return head_part
        self.tr.block = block
        for name, fn in self.head.items():
            setattr(self.tr, name, timed(fn))
        return self

    def __exit__(self, *exc):
        self.tr.block = self.block
        for name, fn in self.head.items():
            setattr(self.tr, name, fn)

    def reset(self):
        self.layer_s, self.head_s = {}, 0.0


# ============================================================== worker jobs (each in its own subprocess)

def job_limits(read_bytes: int, read_repeats: int, sgemm_n: int, sgemm_repeats: int) -> dict:
    """Memory read bandwidth (NumPy streaming sum) and the float32 / float64 matmul rates (NumPy sgemm, dgemm)."""
    a = np.ones(read_bytes // 4, np.float32)                # written once: every page resident
    t_read = best_of(lambda: float(a.sum()), read_repeats)
    del a
    rng = np.random.default_rng(0)
    x = rng.standard_normal((sgemm_n, sgemm_n), dtype=np.float32)
    y = rng.standard_normal((sgemm_n, sgemm_n), dtype=np.float32)
    x @ y                                                   # warm-up (threads started)
    t_mm = best_of(lambda: x @ y, sgemm_repeats)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)   # dgemm: the limit of the float64 / mirror prefill
    x64 @ y64
    t_dmm = best_of(lambda: x64 @ y64, sgemm_repeats)
    threads = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    threads["blas"] = blas_threads()
    try:
        import numba
        threads["numba"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        threads["numba"] = None
    return {"read_GBps": read_bytes / t_read / GB, "read_bytes": read_bytes, "read_threads": 1,
            "sgemm_GFLOPs": 2 * sgemm_n ** 3 / t_mm / 1e9, "dgemm_GFLOPs": 2 * sgemm_n ** 3 / t_dmm / 1e9,
            "sgemm_n": sgemm_n, "threads": threads}


def blas_threads() -> int | None:
    """Threads of the OpenBLAS NumPy loaded (asked through its C API), or None when it cannot tell."""
    import ctypes
    with open("/proc/self/maps") as f:
        libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    for path in sorted(libs):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, name):
                return int(getattr(lib, name)())
    return None


def _demo_prompt(path) -> list[int]:
    from refimpl.cli.demo import DEMO_MESSAGES
    from refimpl.formats.encoding import encode_messages
    from refimpl.formats.tokenizer import Tokenizer
    return Tokenizer.from_checkpoint(path).encode(encode_messages(DEMO_MESSAGES, thinking_mode="chat"))


def job_tiny(ckpt: str, kernels: str, precision: str, new_tokens: int, repeats: int) -> dict:
    """The tiny model as the demo runs it: spec vs kernels end to end, and each kernel vs its spec."""
    from refimpl.formats.weights import load
    from refimpl.generate import generate
    ids = _demo_prompt(ckpt)
    out = {"prompt_tokens": len(ids), "new_tokens": new_tokens, "precision": precision}
    models = {name: load(ckpt, precision=precision, layout="canonical", kernels=sel)
              for name, sel in (("spec", "numpy"), ("kernels", kernels))}
    for name, model in models.items():
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=2, stop_on_eos=False)             # warm-up (kernels: compile or load)
        out[name] = {"first_call_s": time.perf_counter() - t0, "runs": []}
    for _ in range(repeats):                        # interleaved, so that a busy spell hits both sides
        for name, model in models.items():
            out[name]["runs"].append(generate(model, ids, max_new_tokens=new_tokens, stop_on_eos=False))
    for name in models:
        runs = out[name].pop("runs")
        out[name].update(prefill_ms=1000 * min(g.prefill_s for g in runs),
                         decode_ms_per_token=min(g.ms_per_token for g in runs), tokens=runs[0].tokens)
    out["same_tokens"] = out["spec"]["tokens"] == out["kernels"]["tokens"]
    out["decode_speedup"] = out["spec"]["decode_ms_per_token"] / out["kernels"]["decode_ms_per_token"]
    out["prefill_speedup"] = out["spec"]["prefill_ms"] / out["kernels"]["prefill_ms"]
    out["peak_rss_bytes"] = peak_rss_bytes()
    model = models["kernels"]
    cap = OpCapture(model)
    with cap.recording():
        _, state = model.prefill(np.asarray(ids))
        model.decode(ids[-1], state)
    out["ops"] = cap.time_ops(repeats=repeats)
    return out


def reach_position(model, position: int, budget_s: float, on_trace=None):
    """A state at `position` (the benchmark's tokens), by a prefill in chunks of 1, 2, 4, ... 64 tokens
    while budget_s holds (so it may stop short); on_trace(trace) sees each chunk's expert ids."""
    from refimpl.oracle.trace import Trace
    toks = fixed_tokens(position, model.cfg.vocab_size)
    state, size, pace, t0 = model.new_state(), 1, 0.0, time.perf_counter()
    while state.pos < position and time.perf_counter() - t0 + pace * size < budget_s:
        trace = Trace(("layers.*.ffn.expert_ids",))
        n = min(size, position - state.pos)
        t1 = time.perf_counter()
        _, state = model.prefill(toks[state.pos:state.pos + n], state, trace=trace)
        pace = (time.perf_counter() - t1) / n
        if on_trace is not None:
            on_trace(trace)
        size = min(2 * size, 64)
    return state


def warm_page_cache(ckpt: str) -> float | None:
    """Read the checkpoint's weight files once (into the OS page cache) if they fit in 0.8 of the available
    memory; returns the seconds it took, or None if skipped. Decode reads a step's experts through a memory
    map: with a cold cache the first touch of each new expert is a disk read, and the step measures the
    disk (measured: layers at 1.5 GB/s cold against 5.5 GB/s warm on the same code), not the memory
    bandwidth the figure is a fraction of."""
    files = sorted(Path(ckpt).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    try:
        avail = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                         if ln.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None
    if not files or size > 0.8 * avail:
        return None
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def job_flash_decode(ckpt: str, kernels: str, precision: str, warmup: int, steps: int, ops: bool,
                     ops_spec_repeats: int, position: int = 0, position_budget_s: float = 60.0,
                     state_in: str | None = None, state_out: str | None = None) -> dict:
    """Decode steps at Flash dimensions: ms/token (per layer, head), weight bytes read, peak RSS.

    The steps start at `position`: reached by a chunked prefill (chunks of 1, 2, 4, ... 64 tokens,
    as far as position_budget_s allows), or from the state pickled in state_in (written by another run's
    state_out), so that the spec and the kernels decode the same tokens from the same state.
    """
    import pickle
    from refimpl.formats.weights import load
    from refimpl.oracle.trace import Trace
    cache_s = warm_page_cache(ckpt)
    model = load(ckpt, precision=precision, kernels=kernels)
    cfg = model.cfg
    all_ids: dict[int, list] = {}                   # expert ids of every call (prefill, warm-up, steps)

    def note_ids(trace):
        ids = {int(name.split(".")[1]): v.reshape(-1) for name, v in trace.tensors.items()}
        for i, v in ids.items():
            all_ids.setdefault(i, []).append(v)
        return ids

    t0 = time.perf_counter()
    if state_in:
        with open(state_in, "rb") as f:
            state = pickle.load(f)
    else:
        state = reach_position(model, position, position_budget_s, note_ids)
    prefill_s = time.perf_counter() - t0
    start = state.pos
    if state_out:
        with open(state_out, "wb") as f:
            pickle.dump(state, f)
    toks = fixed_tokens(start + warmup + steps + 1, cfg.vocab_size, seed=3)[start:]
    step_ids = []

    def step(tok):
        trace = Trace(("layers.*.ffn.expert_ids",))    # records the choice only (a few ints)
        t0 = time.perf_counter()
        _, new_state = model.decode(int(tok), state, trace=trace)
        took = time.perf_counter() - t0
        step_ids.append(note_ids(trace))
        return took, new_state

    t0 = time.perf_counter()
    for tok in toks[:warmup]:
        _, state = step(tok)
    warm_s = time.perf_counter() - t0
    times, step_layers = [], []
    with LayerTimer() as lt:
        for tok in toks[warmup:warmup + steps]:
            lt.reset()
            took, state = step(tok)
            times.append(took)
            step_layers.append((dict(lt.layer_s), lt.head_s))
    best = int(np.argmin(times))                    # the figures: the fastest step (the limits are best-of too)
    layer_s, head_s = step_layers[best]
    sizes = tensor_bytes(cfg)
    layers = range(cfg.n_layers)
    per_token_experts = [touched_expert_bytes(sizes, ids) for ids in step_ids[warmup:]]
    kinds = non_expert_bytes(cfg, sizes, layers, distinct_tokens=1)
    read = sum(kinds.values()) + per_token_experts[best][0]
    head_bytes = kinds.get("head", 0) + sum(sizes[n] for n in ("norm.weight", "hc_head_fn", "hc_head_base",
                                                                  "hc_head_scale"))
    touched_experts, n_touched = touched_expert_bytes(sizes, {i: np.concatenate(v) for i, v in all_ids.items()})
    # embedding rows: every token this process ran (an upper bound when the state came from a file)
    n_distinct = len(set(fixed_tokens(start, cfg.vocab_size).tolist()) | set(toks.tolist()))
    touched_kinds = non_expert_bytes(cfg, sizes, layers, distinct_tokens=n_distinct)
    sec = times[best]
    out = {"precision": precision, "kernels": kernels, "layers": cfg.n_layers, "experts": cfg.n_routed_experts,
           "target_position": position, "position": start + warmup, "prefill_s": prefill_s,
           "page_cache_warm_s": cache_s,
           "state_from_file": bool(state_in),
           "warmup_steps": warmup, "warmup_s": warm_s, "steps": steps,
           "ms_per_token": 1000 * sec, "ms_per_token_mean": 1000 * float(np.mean(times)),
           "ms_per_token_steps": [1000 * t for t in times],
           "ms_per_layer": {str(i): 1000 * s for i, s in sorted(layer_s.items())},
           "ms_head": 1000 * head_s,
           "bytes_per_token": read, "non_expert_bytes_by_kind": kinds,
           "experts_per_token": per_token_experts[best][1],
           "effective_GBps": read / sec / GB,
           # the split: the blocks' weights (with the experts) over the blocks' time, the head's over its own
           "layers_effective_GBps": (read - head_bytes) / sum(layer_s.values()) / GB,
           "head_effective_GBps": head_bytes / head_s / GB if head_s else None,
           "peak_rss_bytes": peak_rss_bytes(),
           "touched_bytes": sum(touched_kinds.values()) + touched_experts,
           "touched_experts": n_touched}
    if ops:
        cap = OpCapture(model)
        with cap.recording():
            model.decode(int(toks[-1]), state)
        out["ops"] = cap.time_ops(repeats=3, spec_repeats=ops_spec_repeats)
    return out


def job_flash_prefill(ckpt: str, kernels: str, precision: str, n_tokens: int, budget_s: float,
                      calibrate: int, known: dict | None = None) -> dict:
    """A prefill of n_tokens from position 0: time, FLOP/s of the products, peak RSS, touched weights.

    The time is estimated before the run, from a short calibration prefill, or, given `known`
    ({"tokens", "GFLOPs"} of a longer prefill measured in this run), from that one's rate: a short
    prefill touches every expert for a few tokens and overstates a long one's time (measured: 3898 s
    estimated from 16 tokens for a 4096-token prefill, while 1024 tokens had run at 19.5 GFLOP/s).
    """
    from refimpl.formats.weights import load
    from refimpl.oracle.trace import Trace
    model = load(ckpt, precision=precision, kernels=kernels, max_seq_len=max(4096, n_tokens))
    cfg = model.cfg
    toks = fixed_tokens(n_tokens, cfg.vocab_size, seed=1)
    layers = range(cfg.n_layers)
    t0 = time.perf_counter()
    model.prefill(toks[:calibrate])                      # warm-up and calibration
    t_cal = time.perf_counter() - t0
    flops_cal = prefill_flops(cfg, layers, 0, calibrate)["total"]
    flops = prefill_flops(cfg, layers, 0, n_tokens)
    estimate = t_cal * flops["total"] / flops_cal
    basis = f"the {calibrate}-token prefill"
    if known:
        estimate = flops["total"] / (known["GFLOPs"] * 1e9)
        basis = f"the {known['tokens']}-token prefill's {known['GFLOPs']:.1f} GFLOP/s"
    out = {"tokens": n_tokens, "precision": precision, "kernels": kernels, "flops": flops,
           "calibration": {"tokens": calibrate, "s": t_cal}, "estimate_s": estimate}
    if estimate > budget_s:
        out.update(skipped=f"estimated {estimate:.0f} s from {basis}, over the "
                           f"budget of {budget_s:.0f} s", peak_rss_bytes=peak_rss_bytes())
        return out
    trace = Trace(("layers.*.ffn.expert_ids",))
    with LayerTimer() as lt:
        t0 = time.perf_counter()
        model.prefill(toks, trace=trace)
        sec = time.perf_counter() - t0
    sizes = tensor_bytes(cfg)
    ids = {int(k.split(".")[1]): v for k, v in trace.tensors.items()}
    touched_experts, n_touched = touched_expert_bytes(sizes, ids)
    kinds = non_expert_bytes(cfg, sizes, layers, distinct_tokens=len(set(toks.tolist())))
    out.update(s=sec, tokens_per_s=n_tokens / sec, GFLOPs=flops["total"] / sec / 1e9,
               s_per_layer={str(i): s for i, s in sorted(lt.layer_s.items())}, s_head=lt.head_s,
               peak_rss_bytes=peak_rss_bytes(), touched_bytes=sum(kinds.values()) + touched_experts,
               touched_experts=n_touched,
               logits_bytes=n_tokens * cfg.vocab_size * np.dtype(np.float32).itemsize)
    return out


def make_long_ckpt(path: Path) -> None:
    """4 Flash-dimension layers (SWA, SWA, CSA, HCA), 8 experts, vocabulary 1280: the long-context checkpoint."""
    from refimpl.config import Config
    from refimpl.synthetic.writer import make_checkpoint
    make_checkpoint(Config.flash().replace(vocab_size=1280), path, seed=0, layers=4, experts=8)


def job_long(ckpt: str, kernels: str, precision: str, n_tokens: int, chunk: int, budget_s: float,
             ops: bool, ops_tokens: int, first_chunk: int = 64, min_chunk: int = 16,
             growth: float = LONG_GROWTH) -> dict:
    """Chunked prefill through layers 2 (CSA) and 3 (HCA) only: time, state bytes per token.

    Chunks of at most `chunk` tokens (the first one `first_chunk`), each sized to fit the rest of
    budget_s; it stops early (complete: false) when fewer than min_chunk tokens would fit. After each
    chunk a progress line with the projected total (long_time_left, with `growth`).
    """
    from refimpl.formats.weights import load
    from refimpl.model.attention import AttentionState
    from refimpl.model.block import block
    from refimpl.numerics import work_dtype
    from refimpl.ops import use_kernels
    model = load(ckpt, precision=precision, kernels=kernels, max_seq_len=n_tokens + ops_tokens)
    cfg, w, prec = model.cfg, model.weights, precision
    kinds = long_layers(cfg, ckpt)
    layers = sorted(kinds)
    toks = fixed_tokens(n_tokens + ops_tokens, cfg.vocab_size, seed=2)
    states = {i: AttentionState.empty(cfg, i, 1, prec) for i in layers}
    empty = {i: states[i].nbytes() for i in layers}

    def run(lo: int, hi: int):
        ids = toks[None, lo:hi]
        x = np.asarray(w.embed[ids]).astype(work_dtype(prec))
        h = np.repeat(x[:, :, None, :], cfg.hc_mult, axis=2)            # [1, s, n, c]
        with use_kernels(model.kernels):
            for i in layers:
                h, states[i] = block(h, ids, lo, states[i], w.layers[i], cfg.layer(i), model.ctx)   # read per call: OpCapture swaps it
    chunks, done = [], 0
    t_start = time.perf_counter()
    size = min(first_chunk, chunk, n_tokens)                           # a short first chunk measures the pace
    while done < n_tokens and size > 0:
        hi = min(done + size, n_tokens)
        t0 = time.perf_counter()
        run(done, hi)
        took = time.perf_counter() - t0
        chunks.append({"from": done, "tokens": hi - done, "s": took})
        done = hi
        elapsed = time.perf_counter() - t_start
        projected = elapsed + long_time_left(chunks, done, n_tokens, growth)
        chunks[-1]["projected_total_s"] = projected
        progress(f"long        {done:>6,} / {n_tokens:,} tokens in {elapsed:7.0f} s: this chunk {hi - chunks[-1]['from']} "
                 f"tokens at {(hi - chunks[-1]['from']) / took:5.1f} tokens/s, so far {done / elapsed:5.1f} tokens/s; "
                 f"projected total {projected:,.0f} s "
                 + ("(complete)" if done == n_tokens else "(within the budget)" if projected <= budget_s else
                    f"(OVER the budget of {budget_s:,.0f} s: it will stop early)"))
        # the next chunk: as long as --long-chunk allows and the rest of the budget holds (the
        # per-token cost grows with the position: the last chunk's pace with a margin of 1.5)
        left = budget_s - elapsed
        size = min(chunk, n_tokens - done, int(left / (1.5 * took / (hi - chunks[-1]["from"]))))
        if size < min_chunk and done + size < n_tokens:
            break
    sec = time.perf_counter() - t_start
    flops = prefill_flops(cfg, layers, 0, done, head=False)
    out = {"precision": precision, "kernels": kernels, "target_tokens": n_tokens, "tokens": done,
           "complete": done == n_tokens, "chunk": chunk, "s": sec, "tokens_per_s": done / sec,
           "GFLOPs": flops["total"] / sec / 1e9, "flops": flops, "chunks": chunks,
           "layers": {str(i): kinds[i] for i in layers},
           "state_bytes": {str(i): states[i].nbytes() for i in layers},
           "state_bytes_per_token": {kinds[i]: states[i].nbytes() / done for i in layers},
           # growth: the compressed entries and index keys (the window ring and compressor rows are fixed)
           "state_growth_bytes_per_token": {kinds[i]: (states[i].nbytes() - empty[i]) / done for i in layers},
           "peak_rss_bytes": peak_rss_bytes()}
    if ops:
        cap = OpCapture(model)
        with cap.recording():
            run(done, done + ops_tokens)
        out["ops"] = cap.time_ops(repeats=2, spec_repeats=1)
        out["ops_at"] = {"from": done, "tokens": ops_tokens}
    return out


def long_layers(cfg, ckpt: str) -> dict[int, str]:
    """{layer: "CSA" / "HCA"}: the first CSA layer and the first HCA layer of the checkpoint."""
    csa = [i for i in range(cfg.n_layers) if cfg.compress_ratio(i) and cfg.uses_indexer(i)]
    hca = [i for i in range(cfg.n_layers) if cfg.compress_ratio(i) and not cfg.uses_indexer(i)]
    if not csa or not hca:
        raise ValueError(f"{ckpt}: the long-context run needs a CSA and an HCA layer (compress_ratios "
                         f"{cfg.compress_ratios[:cfg.n_layers]})")
    return {csa[0]: "CSA", hca[0]: "HCA"}


def synthetic_long_state(cfg, layer: int, n: int, prec: str, rng):
    """A layer's attention state at position n (a multiple of every compress ratio) as the long prefill
    would leave it, with random bf16 values: n // m compressed entries (and index keys), a full window,
    the compressors' pending rows empty. For timing a chunk at context n without the prefill before it."""
    from refimpl.model.attention import AttentionState
    from refimpl.model.indexer import IndexerState
    from refimpl.numerics import round_bf16, storage_dtype
    st = AttentionState.empty(cfg, layer, 1, prec)
    m, dt = cfg.compress_ratio(layer), storage_dtype(prec)

    def values(shape):
        return round_bf16(rng.standard_normal(shape) * 0.5).astype(dt)
    idx = st.indexer
    if idx is not None:
        idx = IndexerState(keys=values((1, n // m, cfg.index_head_dim)), compressor=idx.compressor)
    return AttentionState(window=values(st.window.shape), compressed=values((1, n // m, cfg.head_dim)),
                          compressor=st.compressor, indexer=idx)


def job_long_rate(ckpt: str, kernels: str, precision: str, contexts: list[int], chunk: int,
                  n_tokens: int = 65536) -> dict:
    """Seconds of one chunk of `chunk` tokens through the long-context layers at each context position in
    `contexts`, from a synthetic state (synthetic_long_state), after a warm-up chunk; per operation the
    wall time inside each swappable operation (inclusive of any operation it calls); the cost's growth
    per token of context (a line through the chunks' CPU seconds per token: b/a); and the total time of
    an n_tokens prefill projected from the last chunk's pace with that growth (long_time_left)."""
    from refimpl import ops
    from refimpl.formats.weights import load
    from refimpl.model.block import block
    from refimpl.numerics import work_dtype
    model = load(ckpt, precision=precision, kernels=kernels, max_seq_len=max(contexts) + chunk)
    cfg, w = model.cfg, model.weights
    kinds = long_layers(cfg, ckpt)
    m = max(cfg.compress_ratio(i) for i in kinds)
    rng = np.random.default_rng(4)
    toks = fixed_tokens(max(contexts) + chunk, cfg.vocab_size, seed=2)
    spent: dict[str, float] = {}
    sel = model.kernels
    timed_sel = ops.Kernels(sel.default, sel.overrides + ((sorted(ops.SPEC)[0], sel.backend(sorted(ops.SPEC)[0])),))
    orig_impl = ops.Kernels.impl

    def impl(kernels_self, op):                            # every operation of timed_sel, timed
        fn = orig_impl(kernels_self, op) or ops.SPEC[op]
        if kernels_self != timed_sel:
            return fn

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[op] = spent.get(op, 0.0) + time.perf_counter() - t0
        return timed

    def one_chunk(n: int, s: int) -> dict:
        if n % m:
            raise ValueError(f"context {n}: must be a multiple of the compress ratios (of {m})")
        states = {i: synthetic_long_state(cfg, i, n, precision, rng) for i in kinds}
        ids = toks[None, n:n + s]
        x = np.asarray(w.embed[ids]).astype(work_dtype(precision))
        h = np.repeat(x[:, :, None, :], cfg.hc_mult, axis=2)
        spent.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        with ops.use_kernels(timed_sel):
            for i in sorted(kinds):
                h, _ = block(h, ids, n, states[i], w.layers[i], cfg.layer(i), model.ctx)
        sec = time.perf_counter() - t0
        return {"from": n, "tokens": s, "s": sec, "cpu_s": time.process_time() - c0, "tokens_per_s": s / sec,
                "ops_s": dict(sorted(spent.items(), key=lambda kv: -kv[1]))}

    ops.Kernels.impl = impl
    try:
        one_chunk(0, min(chunk, 64))                        # warm-up: compiled kernels loaded, pools started
        points = []
        for n in contexts:
            points.append(one_chunk(n, chunk))
            progress(f"long rate   {chunk} tokens at context {n:>6,}: {points[-1]['s']:6.1f} s "
                     f"({points[-1]['tokens_per_s']:.1f} tokens/s; CPU {points[-1]['cpu_s']:.1f} s)")
    finally:
        ops.Kernels.impl = orig_impl
    # growth per token of context: from CPU seconds (less swayed by other jobs than wall time), two points at least
    a, b = growth_fit([dict(p, s=p["cpu_s"]) for p in points])
    growth = b / a if len(points) >= 2 and a > 0 and b > 0 else LONG_GROWTH   # no growth seen: the noise is larger
    return {"precision": precision, "kernels": kernels, "chunk": chunk, "layers": {str(i): k for i, k in kinds.items()},
            "points": points, "target_tokens": n_tokens, "growth": growth,
            "projected_s": long_time_left(points, 0, n_tokens, growth)}




def long_time_left(fit: list[dict], done: int, n_tokens: int, growth: float = LONG_GROWTH) -> float:
    """Seconds a long-context prefill should take from `done` tokens to n_tokens, from the chunks measured
    ({"from", "tokens", "s"}, in position order).

    A token at context position p costs c·(1 + growth·p) seconds: c from the last chunk (the machine's
    pace now), growth per token of context as measured (LONG_GROWTH, or the long_rate fit). A fit of
    both from the run's own chunks is not used: on a shared machine the chunks' paces swing with the
    load by more than the growth, and a steep line through two chunks projected 40,000 s for a run
    of about 2,000. The rest: the integral of c·(1 + growth·p) from done to n_tokens.
    """
    last = fit[-1]
    c = last["s"] / last["tokens"] / (1 + growth * (last["from"] + last["tokens"] / 2))
    return float(c * ((n_tokens - done) + growth * (n_tokens ** 2 - done ** 2) / 2))


def growth_fit(points: list[dict]) -> tuple[float, float]:
    """(a, b) of a least-squares line a + b·p through the chunks' seconds per token against their middle
    position p (weighted by their tokens); b >= 0."""
    p = np.array([c["from"] + c["tokens"] / 2 for c in points], float)
    y = np.array([c["s"] / c["tokens"] for c in points], float)
    if len(points) < 2:
        return float(y[-1]), 0.0
    wts = np.sqrt(np.array([c["tokens"] for c in points], float))
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(p), p], axis=1) * wts[:, None], y * wts, rcond=None)
    return (float(a), float(b)) if b >= 0 else (float(y.mean()), 0.0)


def progress(text: str) -> None:
    """A progress line of a worker: the parent prints it while the worker runs (run_child)."""
    print(PROGRESS_TAG + text, flush=True)


def job_profile(ckpt: str, kernels: str, precision: str, position: int, warmup: int, top: int) -> dict:
    """cProfile of one decode step (from `position`, after warm-up steps): the functions that take the time."""
    import cProfile
    import pstats
    from refimpl.formats.weights import load
    model = load(ckpt, precision=precision, kernels=kernels)
    state = reach_position(model, position, 300.0)
    toks = fixed_tokens(state.pos + warmup + 1, model.cfg.vocab_size, seed=3)[state.pos:]
    for tok in toks[:warmup]:
        _, state = model.decode(int(tok), state)
    warmup = state.pos
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    model.decode(int(toks[-1]), state)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats                      # (file, line, name) -> (cc, ncalls, tottime, cumtime, callers)
    rows = [{"function": f"{Path(fn).name}:{line}({name})", "calls": nc, "tottime_s": tt, "cumtime_s": ct}
            for (fn, line, name), (cc, nc, tt, ct, _) in stats.items()]
    return {"kernels": kernels, "precision": precision, "position": warmup, "step_s": total,
            "by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
            "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_s"])[:top]}


JOBS = {"profile": job_profile, "limits": job_limits, "tiny": job_tiny, "flash_decode": job_flash_decode,
        "flash_prefill": job_flash_prefill, "long": job_long, "long_rate": job_long_rate}


def worker(name: str, args: str) -> None:
    result = JOBS[name](**json.loads(args))
    print(RESULT_TAG + json.dumps(result, default=_json_default), flush=True)


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)


# ============================================================== the parent: subprocesses and the report

def run_child(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run cmd; -> {"rc", "s" (wall), "peak_rss_bytes" (ru_maxrss of that child), "stdout", "stderr"}.

    Lines of the child's stdout that start with PROGRESS_TAG are printed (without the tag) as they arrive."""
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=so, stderr=se, env=dict(env or os.environ, **CHILD_ENV))
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        seen = 0                                          # bytes of the child's stdout already scanned
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            seen = _echo_progress(so, seen)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        return {"rc": p.returncode, "s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "timed_out": timed_out,
                "stdout": so.read().decode(errors="replace"), "stderr": se.read().decode(errors="replace")}


def _echo_progress(f, seen: int) -> int:
    """Print the complete PROGRESS_TAG lines written to the file f after byte `seen`; -> the new `seen`.
    os.pread: the child shares the file's offset, which must not move."""
    data = os.pread(f.fileno(), 1 << 20, seen)
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        if line.startswith(PROGRESS_TAG):
            say(line[len(PROGRESS_TAG):])
    return seen + end


JOB_TIMEOUT_S = 3600.0                   # --job-timeout-s: a job still running then is killed and reported
CHILD_ENV: dict[str, str] = {}           # set for every subprocess (--numba-threads: NUMBA_NUM_THREADS)


def run_job(name: str, *, job_timeout_s: float | None = None, **kwargs) -> dict:
    """One worker job in a subprocess; its result dict, with the child's wall time and peak RSS.
    job_timeout_s: this job's limit, if longer than --job-timeout-s (the long context's budget)."""
    timeout = max(JOB_TIMEOUT_S, job_timeout_s or 0)
    r = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", name, json.dumps(kwargs)],
                  timeout=timeout)
    lines = [ln for ln in r["stdout"].splitlines() if ln.startswith(RESULT_TAG)]
    if r["timed_out"]:
        return {"error": f"killed after {timeout:.0f} s (--job-timeout-s)", "process_s": r["s"]}
    if r["rc"] != 0 or not lines:
        tail = (r["stderr"].strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {r['rc']}: {tail[:300]}", "process_s": r["s"]}
    out = json.loads(lines[-1][len(RESULT_TAG):])
    out["process_s"] = r["s"]
    out["process_peak_rss_bytes"] = r["peak_rss_bytes"]
    return out


def refimpl_command() -> list[str]:
    """The `refimpl` console command of this interpreter's environment."""
    script = Path(sys.executable).with_name("refimpl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from refimpl.cli.main import main; sys.exit(main())"]


def demo_runs(kernels: str, tiny_dir: Path, timeout: float) -> dict:
    """`refimpl demo --kernels K` with an empty NUMBA_CACHE_DIR (cold), then with that cache (cached)."""
    out = {"kernels": kernels}
    cache = Path(tempfile.mkdtemp(prefix="refimpl-bench-numba-"))
    try:
        for name in ("cold", "cached"):
            env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
            r = run_child(refimpl_command() + ["demo", "--kernels", kernels, "--dir", str(tiny_dir)], env=env,
                          timeout=timeout)
            m = re.search(r"decode\s+([\d.]+) ms/token", r["stdout"])
            total = re.search(r"total\s+([\d.]+) s", r["stdout"])
            out[name] = {"rc": r["rc"], "s": r["s"], "peak_rss_bytes": r["peak_rss_bytes"],
                         "decode_ms_per_token": float(m.group(1)) if m else None,
                         "demo_total_s": float(total.group(1)) if total else None}
            if r["rc"] != 0:
                out[name]["error"] = (r["stderr"].strip().splitlines() or ["?"])[-1][:300]
        out["compile_s"] = out["cold"]["s"] - out["cached"]["s"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def ensure_tiny(path: Path) -> Path:
    from refimpl.cli.demo import ensure_tiny_checkpoint
    return ensure_tiny_checkpoint(path)[0]


def kernel_ops(kernels: str) -> list[str]:
    """The operations that run a kernel under this selection (import only: nothing is compiled)."""
    import refimpl.model  # noqa: F401  (fills ops.SPEC)
    from refimpl import ops
    sel = ops.parse_kernels(kernels)
    return sorted(op for op in ops.SPEC if any(ops.KERNELS.get(b, {}).get(op) for b in _chain(sel.backend(op))))


def _chain(backend: str) -> list[str]:
    from refimpl import ops
    out = []
    while backend != "numpy":
        out.append(backend)
        backend = ops.FALLBACK[backend]
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ratio(a, b):
    return a / b if a is not None and b else None


def say(text: str) -> None:
    print(text, flush=True)


def _positions(text: str) -> str:
    """--long-rate's value: comma-separated context positions (integers >= 0), or '' for none."""
    if not all(x.strip().isdigit() for x in text.split(",") if x.strip()):
        raise argparse.ArgumentTypeError(f"must be context positions such as 16384,32768 (or '' for none), got {text!r}")
    return text


def main(argv=None) -> int:
    global JOB_TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a subset in a few minutes")
    mode.add_argument("--smallest", action="store_true", help="the tiny model only, in seconds (the test's mode)")
    ap.add_argument("--ckpt", default="/tmp/flash2", help="Flash-dimension checkpoint (make-checkpoint flash --layers 2)")
    ap.add_argument("--long-ckpt", default=str(DEFAULT_LONG_DIR),
                    help="4-layer Flash checkpoint for the long context (written there if missing)")
    ap.add_argument("--tiny-ckpt", default=None, help="tiny checkpoint with tokenizer (default: made under the "
                                                        f"temporary folder, {DEFAULT_TINY_DIR})")
    ap.add_argument("--kernels", default="numba", help="the selection measured against the spec (numpy)")
    ap.add_argument("--precision", default="mirror")
    ap.add_argument("--prefill", default=None, help="prefill lengths, e.g. 1024,4096")
    ap.add_argument("--decode-position", type=int, default=128,
                    help="Flash decode steps start here (default: the window, 128; reached by a prefill with the "
                         "kernels as far as its time budget allows)")
    ap.add_argument("--long-tokens", type=int, default=None)
    ap.add_argument("--long-chunk", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=None, help="time budget of one prefill measurement")
    ap.add_argument("--long-budget-s", type=float, default=None,
                    help=f"time budget of the long context (default {LONG_BUDGET_S:.0f} s: about 1.9x the 1,870 s "
                         "projected for 65,536 tokens on an idle 2-core machine, benchmarks/README.md; "
                         f"{LONG_BUDGET_QUICK_S:.0f} s with --quick); the run stops early, marked incomplete, where the "
                         "next chunk would not fit")
    ap.add_argument("--long-rate", default=None, metavar="N,N,..", type=_positions,
                    help="context positions (multiples of 128) at which one chunk (--long-chunk, at most 2048 tokens) is "
                         "timed from a synthetic state before the long run, to project its total (default: a quarter "
                         "and half of --long-tokens and its last chunk, 16384,32768,63488; none with --quick; '' for none)")
    ap.add_argument("--no-flash", action="store_true", help="skip every Flash-dimension measurement")
    ap.add_argument("--long-only", action="store_true",
                    help="only the limits and the long context (with --quick: its quick sizes)")
    ap.add_argument("--profile", action="store_true",
                    help="only: cProfile one Flash-dimension decode step (--ckpt, --kernels) and print what dominates")
    ap.add_argument("--job-timeout-s", type=float, default=JOB_TIMEOUT_S,
                    help="kill a measurement still running after this many seconds (reported as an error)")
    ap.add_argument("--numba-threads", type=int, default=None,
                    help="NUMBA_NUM_THREADS for every measurement (default: as the environment has it)")
    ap.add_argument("--markdown", action="store_true", help="also print the figures as a Markdown table "
                                                                 "(before the JSON line)")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "ARGS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return 0
    JOB_TIMEOUT_S = a.job_timeout_s
    if a.numba_threads is not None:
        CHILD_ENV["NUMBA_NUM_THREADS"] = str(a.numba_threads)

    if a.profile:
        r = run_job("profile", ckpt=a.ckpt, kernels=a.kernels, precision=a.precision, position=a.decode_position,
                    warmup=2, top=25)
        if "error" in r:
            say(f"profile FAILED {r['error']}")
            return 1
        say(f"one decode step at Flash dimensions ({a.ckpt}, kernels {a.kernels!r}, {a.precision}): "
            f"{r['step_s']:.2f} s under cProfile at position {r['position']}")
        for key in ("by_tottime", "by_cumtime"):
            say(f"  {key}:")
            for row in r[key]:
                say(f"    {row['tottime_s']:8.3f} s own {row['cumtime_s']:8.3f} s cum {row['calls']:>8}  {row['function']}")
        print(json.dumps(r, default=_json_default))
        return 0
    quick, smallest = a.quick, a.smallest
    mode = "smallest" if smallest else "quick" if quick else "full"
    prefill = [int(x) for x in (a.prefill or ("256" if quick else "1024,4096")).split(",") if x]
    long_tokens = a.long_tokens or (2048 if quick else 65536)
    budget = a.budget_s or (120 if quick else 900)
    long_budget = a.long_budget_s or (LONG_BUDGET_QUICK_S if quick else LONG_BUDGET_S)
    report: dict = {"benchmark": "refimpl kernels", "mode": mode,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                                "cpus": os.cpu_count(), "python": platform.python_version(),
                                "numpy": np.__version__, "load_average_start": load_average()},
                    "kernels": a.kernels, "precision": a.precision, "kernel_ops": kernel_ops(a.kernels),
                    "numba_num_threads_env": CHILD_ENV.get("NUMBA_NUM_THREADS", os.environ.get("NUMBA_NUM_THREADS"))}
    try:
        import refimpl
        report["refimpl"] = refimpl.__version__
    except AttributeError:
        pass
    say(f"refimpl kernel benchmark ({mode}), kernels {a.kernels!r} vs the spec, precision {a.precision}; "
        f"operations with a kernel: {', '.join(report['kernel_ops']) or 'none yet'}")

    # ---- limits
    lim = run_job("limits", read_bytes=(64 if smallest else 256 if quick else 1024) * MiB,
                  read_repeats=2 if smallest else 5, sgemm_n=512 if smallest else 2048 if quick else 4096,
                  sgemm_repeats=2 if smallest else 3)
    report["limits"] = lim
    if "error" in lim:
        say(f"limits: FAILED {lim['error']}")
        print(json.dumps(report, default=_json_default))
        return 1
    bw, mm = lim["read_GBps"], lim["sgemm_GFLOPs"]
    say(f"limits      read {bw:.2f} GB/s (NumPy sum of {lim['read_bytes'] / MiB:.0f} MiB, one thread), "
        f"sgemm {mm:.1f} GFLOP/s, dgemm {lim['dgemm_GFLOPs']:.1f} GFLOP/s (n={lim['sgemm_n']}), threads {lim['threads']}")
    ratios: dict = {}
    if a.long_only:                                 # the long context alone, against this run's limits
        long_section(a, report, ratios, quick, mm, long_tokens, long_budget)
        report["ratios"] = ratios
        report["machine"]["load_average_end"] = load_average()
        print(json.dumps(report, default=_json_default, sort_keys=True))
        return 0

    # ---- tiny
    tiny_dir = Path(a.tiny_ckpt) if a.tiny_ckpt else ensure_tiny(DEFAULT_TINY_DIR)
    tiny = run_job("tiny", ckpt=str(tiny_dir), kernels=a.kernels, precision=a.precision,
                   new_tokens=2 if smallest else 8, repeats=1 if smallest else 3)
    report["tiny"] = tiny
    if "error" in tiny:
        say(f"tiny        FAILED {tiny['error']}")
    else:
        ratios["tiny_decode_speedup"] = tiny["decode_speedup"]
        ratios["tiny_prefill_speedup"] = tiny["prefill_speedup"]
        ratios["tiny_decode_vs_65ms"] = 65.0 / tiny["kernels"]["decode_ms_per_token"]
        for op, r in tiny["ops"].items():
            ratios[f"tiny_op_{op}"] = r["speedup"]
        say(f"tiny        decode {tiny['spec']['decode_ms_per_token']:.1f} ms/token spec, "
            f"{tiny['kernels']['decode_ms_per_token']:.1f} with kernels: x{tiny['decode_speedup']:.2f} "
            f"(x{ratios['tiny_decode_vs_65ms']:.2f} against the issue's 65 ms/token; target x10); prefill "
            f"x{tiny['prefill_speedup']:.2f}; same tokens: {tiny['same_tokens']}")
        _print_ops("tiny", tiny["ops"])
    if not smallest:
        demo = demo_runs(a.kernels, tiny_dir, timeout=1800)
        report["tiny_demo"] = demo
        say(f"demo        `refimpl demo --kernels {a.kernels}`: cold cache {demo['cold']['s']:.1f} s, cached "
            f"{demo['cached']['s']:.1f} s (compile ~{demo['compile_s']:.1f} s); demo decode "
            f"{demo['cold']['decode_ms_per_token']} / {demo['cached']['decode_ms_per_token']} ms/token")

    # ---- Flash dimensions
    if not smallest and not a.no_flash:
        if not (Path(a.ckpt) / "config.json").is_file():
            report["flash_decode"] = {"error": f"{a.ckpt}: no checkpoint (refimpl make-checkpoint flash {a.ckpt} --layers 2)"}
            say(f"flash       SKIPPED: {report['flash_decode']['error']}")
        else:
            flash_section(a, report, ratios, quick, bw, mm, prefill, budget)
        long_section(a, report, ratios, quick, mm, long_tokens, long_budget)

    report["ratios"] = ratios
    report["machine"]["load_average_end"] = load_average()
    if a.markdown:
        say(markdown(report))
    print(json.dumps(report, default=_json_default, sort_keys=True))
    return 0


def markdown(report: dict) -> str:
    """The README's table of a report: each figure with the limit or target it is a ratio to."""
    rows = []
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)         # noqa: E731
    lim = report.get("limits", {})
    rows.append(("limits: read bandwidth / sgemm / threads",
                 f"{f(lim.get('read_GBps'))} GB/s ({lim.get('read_bytes', 0) / MiB:.0f} MiB, one thread) / "
                 f"{f(lim.get('sgemm_GFLOPs'), '.1f')} GFLOP/s (n={lim.get('sgemm_n')}) / {lim.get('threads')}", ""))
    tiny = report.get("tiny", {})
    if "spec" in tiny:
        rows.append(("tiny decode (demo prompt), spec / kernels",
                     f"{f(tiny['spec']['decode_ms_per_token'], '.1f')} / {f(tiny['kernels']['decode_ms_per_token'], '.1f')} "
                     f"ms/token: x{f(tiny['decode_speedup'])}; against 65 ms/token: "
                     f"**x{65 / tiny['kernels']['decode_ms_per_token']:.2f}**", "x10 against ~65 ms/token"))
        rows.append((f"tiny prefill ({tiny['prompt_tokens']} tokens), spec / kernels",
                     f"{f(tiny['spec']['prefill_ms'], '.0f')} / {f(tiny['kernels']['prefill_ms'], '.0f')} ms: "
                     f"x{f(tiny['prefill_speedup'])}", ""))
    demo = report.get("tiny_demo")
    if demo:
        rows.append((f"`refimpl demo --kernels {demo['kernels']}`: cold compile / cached",
                     f"{demo['cold']['s']:.1f} s / {demo['cached']['s']:.1f} s wall (demo decode "
                     f"{demo['cold']['decode_ms_per_token']} / {demo['cached']['decode_ms_per_token']} ms/token)", ""))
    fd = report.get("flash_decode", {})
    k, sp = fd.get("kernels", {}), fd.get("spec", {})
    if "ms_per_token" in k:
        rows.append((f"Flash decode ({k['layers']} layers, {k['experts']} experts, {k['precision']}, position "
                     f"{k['position']}), kernels",
                     f"{k['ms_per_token']:.0f} ms/token (layers " + ", ".join(f"{v:.0f}" for v in k["ms_per_layer"].values())
                     + f" ms, head {k['ms_head']:.0f} ms); {k['bytes_per_token'] / GB:.3f} GB read per token: "
                     f"{k['effective_GBps']:.2f} GB/s = **{k['effective_GBps'] / lim['read_GBps']:.3f}** of the read "
                     f"bandwidth (blocks {k['layers_effective_GBps']:.2f} GB/s, head {k['head_effective_GBps']:.2f} GB/s)",
                     ">= 0.5"))
        rows.append(("Flash decode peak RSS, kernels",
                     f"{k['peak_rss_bytes'] / GB:.2f} GB against {k['touched_bytes'] / GB:.2f} GB touched "
                     f"(excess {(k['peak_rss_bytes'] - k['touched_bytes']) / GiB:.2f} GiB)", "<= touched + 1 GiB"))
    if "ms_per_token" in sp and "ms_per_token" in k:
        rows.append(("Flash decode, spec (end to end)",
                     f"{sp['ms_per_token']:.0f} ms/token: kernels x{sp['ms_per_token'] / k['ms_per_token']:.1f}; "
                     f"peak RSS {sp['peak_rss_bytes'] / GB:.2f} GB", ""))
    for r in report.get("flash_prefill", []):
        limit, target = prefill_limit(r.get("precision", report.get("precision", "mirror")))
        if "GFLOPs" in r and f"{limit}_GFLOPs" in lim:
            rows.append((f"Flash prefill {r['tokens']} tokens, {r['precision']}",
                         f"{r['s']:.0f} s, {r['GFLOPs']:.1f} GFLOP/s = **{r['GFLOPs'] / lim[f'{limit}_GFLOPs']:.3f}** of "
                         f"{limit}; peak RSS {r['peak_rss_bytes'] / GB:.2f} GB against {r['touched_bytes'] / GB:.2f} GB "
                         f"touched + {r['logits_bytes'] / GB:.2f} GB of logits", target))
        elif "tokens" in r:
            rows.append((f"Flash prefill {r['tokens']} tokens, {r.get('precision', '?')}",
                         "not run: " + r.get("skipped", r.get("error", "?")), target))
    lc = report.get("long_context", {})
    if "tokens" in lc:
        growth = ", ".join(f"{kind} {v:.0f} B" for kind, v in lc["state_growth_bytes_per_token"].items())
        rows.append(("long context: one CSA + one HCA layer",
                     f"{lc['tokens']:,} of {lc['target_tokens']:,} tokens in {lc['s']:.0f} s "
                     f"({lc['tokens_per_s']:.1f} tokens/s){'' if lc['complete'] else ', stopped by the budget'}; "
                     f"state growth per token: {growth}", "65,536 tokens"))
    for where, ops in (("tiny", tiny.get("ops", {})), ("Flash decode", k.get("ops", {})),
                       ("long context", lc.get("ops", {}))):
        if ops:
            rows.append((f"kernel / spec speed-up, {where}",
                         ", ".join(f"{op} x{v['speedup']:.1f}" for op, v in ops.items()),
                         "sparse attention, expert dispatch >= 10x at Flash dims"))
    out = ["| figure | measured | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def _print_ops(where: str, ops: dict) -> None:
    for op, r in ops.items():
        say(f"  {where:6s} {op:18s} x{r['speedup']:.2f}  ({r['spec_ms']:.1f} ms spec, {r['kernel_ms']:.1f} ms "
            f"kernel over {r['calls']} calls; bit-identical {r['identical_calls']}/{r['calls']}, "
            f"max rel diff {r['max_rel_diff']:.2g})")


def flash_section(a, report, ratios, quick, bw, mm, prefill, budget) -> None:
    state_file = Path(tempfile.mkdtemp(prefix="refimpl-bench-")) / "state.pickle"
    try:
        kern = run_job("flash_decode", ckpt=a.ckpt, kernels=a.kernels, precision=a.precision,
                       warmup=1 if quick else 2, steps=3 if quick else 8, ops=True, ops_spec_repeats=1,
                       position=a.decode_position, position_budget_s=30 if quick else 120,
                       state_out=str(state_file))
        spec = run_job("flash_decode", ckpt=a.ckpt, kernels="numpy", precision=a.precision,
                       warmup=1, steps=1 if quick else 2, ops=False, ops_spec_repeats=1,
                       state_in=str(state_file) if state_file.is_file() else None)
    finally:
        shutil.rmtree(state_file.parent, ignore_errors=True)
    report["flash_decode"] = {"kernels": kern, "spec": spec}
    if "error" in kern:
        say(f"flash       decode FAILED {kern['error']}")
    else:
        frac = kern["effective_GBps"] / bw
        ratios["flash_decode_bw_fraction"] = frac
        ratios["flash_decode_rss_vs_touched"] = kern["peak_rss_bytes"] / kern["touched_bytes"]
        say(f"flash       decode at position {kern['position']}: {kern['ms_per_token']:.0f} ms/token ({kern['layers']} layers: "
            + ", ".join(f"{v:.0f}" for v in kern["ms_per_layer"].values())
            + f" ms/layer; head {kern['ms_head']:.0f} ms); {kern['bytes_per_token'] / GB:.3f} GB read per "
            f"token -> {kern['effective_GBps']:.2f} GB/s = {frac:.2f} of the read bandwidth (target 0.6; blocks "
            f"{kern['layers_effective_GBps']:.2f} GB/s, head {kern['head_effective_GBps']:.2f} GB/s); peak RSS "
            f"{kern['peak_rss_bytes'] / GB:.2f} GB vs {kern['touched_bytes'] / GB:.2f} GB touched (excess "
            f"{(kern['peak_rss_bytes'] - kern['touched_bytes']) / GiB:.2f} GiB; target <= 1 GiB)")
        _print_ops("flash", kern.get("ops", {}))
        for op, r in kern.get("ops", {}).items():
            ratios[f"flash_op_{op}"] = r["speedup"]
    if "error" in spec:
        say(f"flash       spec decode FAILED {spec['error']}")
    elif "error" not in kern:
        ratios["flash_decode_speedup"] = spec["ms_per_token"] / kern["ms_per_token"]
        say(f"flash       spec decode {spec['ms_per_token']:.0f} ms/token: kernels x{ratios['flash_decode_speedup']:.2f}; "
            f"spec peak RSS {spec['peak_rss_bytes'] / GB:.2f} GB")
    report["flash_prefill"] = []
    for prec in prefill_precisions(a.precision):
        known = None                                # the longest prefill measured so far: its rate estimates the next
        for n in prefill:
            r = run_job("flash_prefill", ckpt=a.ckpt, kernels=a.kernels, precision=prec, n_tokens=n,
                        budget_s=budget, calibrate=8 if quick else 16, known=known)
            report["flash_prefill"].append(r)
            if "GFLOPs" in r and (known is None or n > known["tokens"]):
                known = {"tokens": n, "GFLOPs": r["GFLOPs"]}
            if "error" in r:
                say(f"flash       prefill {n} {prec}: FAILED {r['error']}")
            elif "skipped" in r:
                say(f"flash       prefill {n} {prec}: SKIPPED ({r['skipped']})")
            else:
                limit, target = prefill_limit(prec)
                frac = r["GFLOPs"] / report["limits"][f"{limit}_GFLOPs"]
                ratios[f"flash_prefill_{n}_{prec}_vs_{limit}"] = frac
                base = r["touched_bytes"] + r["logits_bytes"]
                ratios[f"flash_prefill_{n}_{prec}_rss_vs_touched_logits"] = r["peak_rss_bytes"] / base
                say(f"flash       prefill {n} tokens {prec}: {r['s']:.1f} s, {r['GFLOPs']:.2f} GFLOP/s = "
                    f"{frac:.3f} of {limit} (target {target}); peak RSS {r['peak_rss_bytes'] / GB:.2f} GB vs "
                    f"{r['touched_bytes'] / GB:.2f} GB touched + logits {r['logits_bytes'] / GB:.2f} GB (excess "
                    f"{(r['peak_rss_bytes'] - base) / GiB:.2f} GiB; target <= 1 GiB)")


def prefill_precisions(precision: str) -> list[str]:
    """The Flash prefill is measured in --precision and in float32 (the issue 23 targets name both)."""
    return [precision] + ([] if precision == "float32" else ["float32"])


def prefill_limit(precision: str) -> tuple[str, str]:
    """(the same run's BLAS rate a prefill is measured against, the target fraction): mirror's and float64's
    products are exact float64 sums, so dgemm is their ceiling; float32's are sgemm calls."""
    return ("sgemm", ">= 0.5") if precision == "float32" else ("dgemm", ">= 0.6")


def long_section(a, report, ratios, quick, mm, long_tokens, long_budget) -> None:
    path = Path(a.long_ckpt)
    if not (path / "config.json").is_file():
        say(f"long        writing the 4-layer Flash checkpoint to {path} ...")
        make_long_ckpt(path)
    have = set(report["kernel_ops"])
    missing = ([] if "sparse_attention" in have else ["sparse_attention"]) + \
        ([] if have & {"indexer", "index_topk", "index_scores"} else ["indexer"])
    note = None
    if missing:
        note = (f"no {' / '.join(missing)} kernel under {a.kernels!r}: the prefill runs as far as the "
                f"budget of {long_budget:.0f} s allows (--long-budget-s)")
    rate_chunk = min(a.long_chunk, 2048)
    if a.long_rate is not None:
        contexts = [int(x) for x in a.long_rate.split(",") if x.strip()]
    else:                                          # a quarter, half, and the last chunk of the run (multiples of 128)
        contexts = [] if quick else sorted({p // 128 * 128 for p in (long_tokens // 4, long_tokens // 2,
                                                                      long_tokens - rate_chunk)} - {0})
    growth = LONG_GROWTH
    if contexts:                                   # the pace at long contexts first: the projection before the run
        say(f"long rate   one {rate_chunk}-token chunk at each of {', '.join(map(str, contexts))} tokens "
            f"of (synthetic) context ...")
        rate = run_job("long_rate", ckpt=str(path), kernels=a.kernels, precision=a.precision, contexts=contexts,
                       chunk=rate_chunk, n_tokens=long_tokens)
        report["long_rate"] = rate
        if "error" in rate:
            say(f"long rate   FAILED {rate['error']}")
        else:
            growth = rate["growth"]
            say(f"long rate   a {long_tokens:,}-token prefill projected at {rate['projected_s']:,.0f} s "
                f"(cost per token x{1 + growth * long_tokens:.2f} at {long_tokens:,} tokens of context; budget "
                f"{long_budget:,.0f} s, --long-budget-s)")
    say(f"long        {long_tokens:,} tokens through one CSA + one HCA layer in chunks of up to {a.long_chunk} "
        f"(budget {long_budget:,.0f} s); progress after each chunk:")
    r = run_job("long", ckpt=str(path), kernels=a.kernels, precision=a.precision, n_tokens=long_tokens,
                chunk=min(a.long_chunk, long_tokens), budget_s=long_budget, ops=True, ops_tokens=16 if quick else 32,
                first_chunk=32 if quick else 64, growth=growth, job_timeout_s=long_budget * 1.5 + 600)
    if note:
        r["note"] = note
    report["long_context"] = r
    if "error" in r:
        say(f"long        FAILED {r['error']}")
        return
    ratios["long_flops_fraction"] = r["GFLOPs"] / mm
    for op, v in r.get("ops", {}).items():
        ratios[f"long_op_{op}"] = v["speedup"]
    per = ", ".join(f"{k} {v:.0f} B ({r['state_growth_bytes_per_token'][k]:.0f} B growth)"
                    for k, v in r["state_bytes_per_token"].items())
    say(f"long        {r['tokens']} of {r['target_tokens']} tokens through one CSA + one HCA layer in {r['s']:.1f} s "
        f"({r['tokens_per_s']:.1f} tokens/s, {r['GFLOPs'] / mm:.3f} of sgemm){'' if r['complete'] else ' INCOMPLETE'}"
        f"; state per token: {per}" + (f"; {note}" if note else ""))
    _print_ops("long", r.get("ops", {}))


if __name__ == "__main__":
    sys.exit(main())
