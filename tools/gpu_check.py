"""Check the CUDA path on a GPU against the CPU reference: every trace site, and the kernels' times.

    PYTHONPATH=. python tools/gpu_check.py                 # on a machine with an NVIDIA GPU (a few minutes)
    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python tools/gpu_check.py    # the same, in Numba's CUDA simulator

What it runs (random-weight checkpoints made with refimpl.synthetic's make_checkpoint in a temporary
folder, deleted at the end):

  1. the tiny model (Config.tiny(), every structural feature: window, CSA + indexer, HCA, hash routing,
     MTP), a random prompt, in mirror and in float64: once with kernels="cuda", once on the CPU
     (--cpu-kernels, default "numpy"), and compares every trace site with refimpl.oracle.compare and
     the documented tolerance profile (profiles.toml; mirror against mirror is exact);
  2. one Flash-dimension layer (Config.flash() with 1 CSA layer, no MTP block, vocabulary 1280 and
     --flash-experts routed experts so the checkpoint stays small; every width, head count and head
     dim is Flash's), mirror, the same comparison.

For each run it prints the compare verdict and, per swappable operation, the calls and the wall time
on the CPU path and on the GPU path (transfers included), and the device time of each kernel measured
with CUDA events. Exit status: 0 if every comparison is within its profile, 1 on a mismatch or an error
in a run (its traceback is printed and the other runs still go ahead), 2 if the CUDA path cannot run
here (the reason is printed).

Simulator mode (NUMBA_ENABLE_CUDASIM=1, set before Python starts): the tiny model only, mirror only,
a short prompt (--tokens, default 4); it says so in its output. The simulator runs each CUDA thread as
a Python thread, so a run takes minutes and its timings mean nothing; it checks that the script and the
kernels work end to end. docs/cuda.md describes the whole CUDA path.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import refimpl  # noqa: E402
from refimpl import ops  # noqa: E402
from refimpl.config import Config  # noqa: E402
from refimpl.oracle.compare import TraceFile, check_trace, compare, format_report  # noqa: E402
from refimpl.oracle.trace import run_trace  # noqa: E402
from refimpl.synthetic.writer import make_checkpoint  # noqa: E402


def flash_layer_config(experts: int) -> Config:
    """Flash dimensions, one CSA layer (compressor + indexer, ratio 4), no MTP block, a small vocabulary."""
    return Config.flash().replace(n_layers=1, n_hash_layers=0, n_mtp_layers=0, compress_ratios=(4,),
                                  vocab_size=1280, n_routed_experts=experts,
                                  n_activated_experts=min(6, experts))


@contextlib.contextmanager
def op_timer(times: dict):
    """Time every swappable operation's calls (wall, ms) by wrapping the names the model modules call.

    Inclusive: an operation's time includes the swappable operations it calls (moe -> quantized_linear)."""
    import refimpl.model.transformer  # noqa: F401  (imports every model module, so ops.SPEC is complete)
    dispatchers = {id(sys.modules[f.__module__].__dict__[name]): name for name, f in ops.SPEC.items()}
    patched = []

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name][0] += 1
                times[name][1] += (time.perf_counter() - t0) * 1e3
        wrapper.__wrapped__ = fn
        return wrapper

    for mod in [m for k, m in sys.modules.items() if k.startswith("refimpl.") and m is not None]:
        for attr, val in list(vars(mod).items()):
            name = dispatchers.get(id(val))
            if name is not None and callable(val):
                patched.append((mod, attr, val))
                setattr(mod, attr, timed(name, val))
    try:
        yield times
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


def run(ckpt, precision: str, kernels: str, tokens: np.ndarray, kernel_times: bool):
    """One traced forward pass -> (TraceFile, seconds, {op: [calls, ms]}, {kernel: [launches, ms]})."""
    from refimpl.cuda import host
    model = refimpl.load(ckpt, precision=precision, kernels=kernels)
    op_ms = collections.defaultdict(lambda: [0, 0.0])
    ctx = host.timing() if kernel_times else contextlib.nullcontext({})
    with op_timer(op_ms), ctx as ktimes:
        t0 = time.perf_counter()
        trace = run_trace(model, tokens)
        seconds = time.perf_counter() - t0
    kt = {k: [len(v), sum(v)] for k, v in dict(ktimes).items()}
    tf = check_trace(TraceFile(f"{precision} kernels={kernels}", trace.metadata, trace.tensors))
    return tf, seconds, dict(op_ms), kt


def one_check(title: str, ckpt, precision: str, tokens, cpu_kernels: str, cuda_kernels: str, out) -> bool:
    out(f"\n== {title}: {precision}, {len(tokens)} tokens: kernels={cuda_kernels} against kernels={cpu_kernels}")
    cpu, cpu_s, cpu_ops, _ = run(ckpt, precision, cpu_kernels, tokens, False)
    from refimpl.cuda import simulator
    if not simulator():                   # compile this precision's kernels first: the timed run excludes the JIT
        t0 = time.perf_counter()
        run(ckpt, precision, cuda_kernels, tokens[:2], False)
        out(f"(warm-up: JIT compilation and a 2-token run, {time.perf_counter() - t0:.1f} s)")
    gpu, gpu_s, gpu_ops, gpu_k = run(ckpt, precision, cuda_kernels, tokens, True)
    report = compare(gpu, cpu)
    text = format_report(report).splitlines()
    bad = [m for m in report.sites if not m["ok"]]
    flips = sum(m.get("flips", 0) for m in report.sites)
    real = sum(m.get("real", 0) for m in report.sites)
    out(f"compare ({report.profile}): {len(report.sites)} sites, {len(bad)} out of tolerance; "
        f"elements one ulp apart {flips}, further apart {real}")
    if not report.ok:
        out("\n".join(text[-12:]))
    out(f"wall: CPU {cpu_s:.2f} s, GPU path {gpu_s:.2f} s")
    out(f"{'operation':18} {'calls':>6} {'CPU ms':>10} {'GPU ms':>10}   (wall, inclusive; GPU: transfers included)")
    for name in sorted(set(cpu_ops) | set(gpu_ops)):
        c, g = cpu_ops.get(name, [0, 0.0]), gpu_ops.get(name, [0, 0.0])
        out(f"{name:18} {max(c[0], g[0]):>6} {c[1]:>10.1f} {g[1]:>10.1f}")
    if gpu_k:
        out(f"{'kernel (CUDA events)':28} {'launches':>8} {'device ms':>10}")
        for name, (n, ms) in sorted(gpu_k.items(), key=lambda kv: -kv[1][1]):
            out(f"{name:28} {n:>8} {ms:>10.2f}")
    return report.ok


def guarded(out, title: str, fn, *args) -> bool:
    """fn(*args), or False with the traceback printed: one failing run must not hide the others' results."""
    try:
        return fn(*args)
    except Exception:
        import traceback
        out(f"ERROR in {title}:\n{traceback.format_exc()}")
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="prompt length of the tiny model (default 80; simulator 4)")
    ap.add_argument("--flash-tokens", type=int, default=100, help="prompt length of the Flash-dimension layer")
    ap.add_argument("--flash-experts", type=int, default=16, help="routed experts of the Flash-dimension layer")
    ap.add_argument("--no-flash", action="store_true", help="skip the Flash-dimension layer")
    ap.add_argument("--cpu-kernels", default="numpy", help="the CPU path's kernel selection (numpy or numba)")
    ap.add_argument("--cuda-kernels", default="cuda",
                    help="the GPU path's selection (default cuda; e.g. 'numpy,split_sinkhorn=cuda' to check one kernel)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = lambda s="": print(s, flush=True)   # noqa: E731
    # the reference kernels launch small grids on small inputs; Numba's occupancy warnings would drown the report
    warnings.filterwarnings("ignore", message=".*under-utilization.*")

    import refimpl.cuda
    reason = refimpl.cuda.unavailable_reason()
    if reason is not None:
        out(f"gpu_check: cannot run the CUDA path here: {reason}")
        return 2
    sim = refimpl.cuda.simulator()
    from numba import cuda
    if sim:
        out("SIMULATOR MODE (NUMBA_ENABLE_CUDASIM=1): the kernels run in Numba's CUDA simulator on the CPU; "
            "tiny model, mirror only, short prompt; timings are not GPU timings. This is not a GPU result.")
    else:
        dev = cuda.get_current_device()
        out(f"device: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, compute capability "
            f"{dev.compute_capability}")
    import numba
    out(f"numpy {np.__version__}, numba {numba.__version__}, refimpl {refimpl.__version__}, python "
        f"{sys.version.split()[0]}")
    rng = np.random.default_rng(args.seed)
    n_tiny = args.tokens or (4 if sim else 80)
    ok = True
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refimpl-gpu-check-") as tmp:
        tiny = Path(tmp) / "tiny"
        make_checkpoint(Config.tiny(), tiny, seed=args.seed, progress=False)
        tokens = rng.integers(2, Config.tiny().vocab_size, n_tiny)
        for prec in (("mirror",) if sim else ("mirror", "float64")):
            ok &= guarded(out, f"tiny model {prec}", one_check, "tiny model", tiny, prec, tokens, args.cpu_kernels,
                          args.cuda_kernels, out)
        if not sim and not args.no_flash:
            flash = Path(tmp) / "flash-layer"
            cfg = flash_layer_config(args.flash_experts)
            t0 = time.perf_counter()
            make_checkpoint(cfg, flash, seed=args.seed, progress=False)
            out(f"\n(Flash-dimension layer checkpoint written in {time.perf_counter() - t0:.1f} s)")
            tokens = rng.integers(2, cfg.vocab_size, args.flash_tokens)
            ok &= guarded(out, "Flash-dimension layer", one_check, "one Flash-dimension layer", flash, "mirror", tokens,
                          args.cpu_kernels, args.cuda_kernels, out)
    out(f"\n{'OK' if ok else 'MISMATCH'}: {'every comparison within its profile' if ok else 'see above'} "
        f"({time.perf_counter() - t_start:.0f} s{', simulator' if sim else ''})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
