"""Peer benchmark: refimpl's forward pass against transformers' fp32 eager model on the same checkpoint.

    pip install '.[peers]'                       # torch, transformers, accelerate (never needed by refimpl itself)
    python benchmarks/peers.py                   # the tiny checkpoint (made under /tmp on first use), 300 tokens
    python benchmarks/peers.py --ckpt DIR --tokens 300 --threads 1 --repeats 3

Both run in this process, with the same thread count (--threads, default: the CPUs this process
may use) for torch, Numba and OpenBLAS, interleaved (transformers, refimpl float32, refimpl mirror,
again), best of --repeats after a warm-up forward of each (Numba's compilation is not timed). The
figures are ratios in the same run: refimpl's time over transformers' time for one forward pass of
--tokens random token ids (logits at every position; transformers with use_cache=False, its eager
attention, float32 on the CPU); the same in process CPU seconds ("cpu_ratios", steadier than wall
time on a loaded machine, and the same measure as wall time at --threads 1 on an idle one). The last line printed is one JSON object. Without torch or
transformers the script says so and exits with status 0 (tests/test_benchmarks.py skips then).
On a shared machine: compare ratios of one run only, and give the load average (recorded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TINY = Path(tempfile.gettempdir()) / "refimpl-bench" / "peers-tiny"


def _threads(n: int) -> None:
    """The same thread count everywhere, set before NumPy, Numba or torch start their pools."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def _tool():
    """tools/trace_transformers.py as a module (how the project loads transformers' model)."""
    spec = importlib.util.spec_from_file_location("trace_transformers", ROOT / "tools" / "trace_transformers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="official-format checkpoint (default: the tiny preset, made once)")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.threads < 1 or a.repeats < 1:
        ap.error("--tokens, --threads and --repeats must be at least 1")
    _threads(a.threads)
    try:
        import torch
        import transformers                                                      # noqa: F401
        import accelerate                                                        # noqa: F401  (FP8 loading)
    except ImportError as e:
        print(f"skipped: transformers' side needs torch, transformers and accelerate ({e}); "
              "pip install '.[peers]'")
        print(json.dumps({"skipped": str(e)}))
        return 0
    import numpy as np
    import refimpl

    ckpt = Path(a.ckpt) if a.ckpt else DEFAULT_TINY
    if not (ckpt / "config.json").exists():
        if a.ckpt:
            print(f"error: no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        cli = [sys.executable, "-c", "import sys; from refimpl.cli.main import main; sys.exit(main())"]
        ckpt.parent.mkdir(parents=True, exist_ok=True)                           # a fresh machine has no such folder
        subprocess.run(cli + ["make-checkpoint", "tiny", str(ckpt)], check=True, stdout=subprocess.DEVNULL)
    torch.set_num_threads(a.threads)
    tool = _tool()
    cfg = tool.load_config(ckpt)
    hf = tool.load_transformers(ckpt, cfg)
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, a.tokens)
    tids = torch.from_numpy(ids)[None]
    models = {prec: refimpl.load(str(ckpt), precision=prec) for prec in ("float32", "mirror")}

    def run_hf():
        with torch.no_grad():
            hf(tids)

    runs = {"transformers": run_hf}
    runs.update({f"refimpl_{p}": (lambda m=m: m.forward(ids)) for p, m in models.items()})
    for fn in runs.values():                                                     # warm-up: compile, caches
        fn()
    load_start = os.getloadavg()
    times = {name: float("inf") for name in runs}
    cpu = {name: float("inf") for name in runs}                                  # process CPU seconds: steadier
    for _ in range(a.repeats):                                                   # interleaved                  under load
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    ratios = {f"{name}_over_transformers": times[name] / times["transformers"] for name in runs
              if name != "transformers"}
    cpu_ratios = {f"{name}_over_transformers": cpu[name] / cpu["transformers"] for name in runs
                  if name != "transformers"}
    report = {"ckpt": str(ckpt), "tokens": a.tokens, "threads": a.threads, "seconds": times, "ratios": ratios,
              "cpu_seconds": cpu, "cpu_ratios": cpu_ratios,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "refimpl": refimpl.__version__ if hasattr(refimpl, "__version__") else None},
              "machine": {"load_start": load_start, "load_end": os.getloadavg()}}
    for name, r in ratios.items():
        print(f"{name:40s} x{r:.2f}  (CPU time: x{cpu_ratios[name]:.2f})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
