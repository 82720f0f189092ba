"""Peer benchmark: refimpl's forward pass against transformers' fp32 eager model on the same checkpoint.

    pip install '.[peers]'                       # torch, transformers, accelerate (never needed by refimpl itself)
    python benchmarks/peers.py                   # the tiny checkpoint (made under /tmp on first use), 300 tokens
    python benchmarks/peers.py --ckpt DIR --tokens 300 --threads 1 --repeats 3

Both run with the same thread count (--threads, default: the CPUs this process may use) for torch,
Numba and OpenBLAS, interleaved (transformers, refimpl float32, refimpl mirror, again), best of
--repeats after a warm-up forward of each (Numba's compilation is not timed). refimpl runs in a
process of its own, driven by this one (each times its own forwards), as a user's program would run
it: in torch's process Numba's parallel regions would run on torch's OpenMP runtime (torch loads its
libgomp with global symbols first), which spins between regions as it was configured at torch's import,
not as refimpl starts Numba's threads (refimpl/kernels/threads.py). --one-process runs both in this
process (how it was measured before 2026-12-08). The
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


def _thread_setup() -> dict:
    """How refimpl's threads were set up (after its first forwards): Numba's threading layer and thread count, the
    OpenMP wait variables as the environment has them now (refimpl sets its own only while Numba's threads
    start: refimpl/kernels/threads.py)."""
    import numba
    return {"numba_threading_layer": numba.threading_layer(), "numba_threads": numba.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER")}}


def _refimpl_worker(ckpt: str, ids_file: str) -> int:
    """The refimpl side (--refimpl-worker): loads both precisions, warms them up, then for each line NAME read from
    stdin runs that forward and prints [NAME, wall seconds, process CPU seconds] (no torch in this process)."""
    import numpy as np
    import refimpl
    ids = np.load(ids_file)
    runs = {f"refimpl_{p}": (lambda m=refimpl.load(ckpt, precision=p): m.forward(ids)) for p in ("float32", "mirror")}
    for fn in runs.values():                                                     # warm-up: compile, caches
        fn()
    print(json.dumps({"ready": list(runs), "thread_setup": _thread_setup()}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        t0, c0 = time.perf_counter(), time.process_time()
        runs[name]()
        print(json.dumps([name, time.perf_counter() - t0, time.process_time() - c0]), flush=True)
    return 0


class _Worker:
    """The refimpl worker process: .names, and .run(name) -> (wall, CPU seconds) of one forward."""

    def __init__(self, ckpt: Path, ids_file: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--refimpl-worker", ids_file, "--ckpt", str(ckpt)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self._line())
        self.names, self.thread_setup = ready["ready"], ready["thread_setup"]

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the refimpl worker ended (status {self.proc.wait()})")
        return line

    def run(self, name: str) -> tuple[float, float]:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        got, wall, cpu = json.loads(self._line())
        if got != name:
            raise RuntimeError(f"the refimpl worker answered {got!r} for {name!r}")
        return wall, cpu

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


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
    ap.add_argument("--one-process", action="store_true",
                    help="refimpl in this process, after torch (Numba then runs on torch's OpenMP runtime)")
    ap.add_argument("--refimpl-worker", metavar="IDS_NPY", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.refimpl_worker:
        return _refimpl_worker(a.ckpt, a.refimpl_worker)
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

    def run_hf():
        with torch.no_grad():
            hf(tids)

    timed = {"transformers": run_hf}                                            # name -> () run in this process
    worker = None
    if a.one_process:
        models = {prec: refimpl.load(str(ckpt), precision=prec) for prec in ("float32", "mirror")}
        timed.update({f"refimpl_{p}": (lambda m=m: m.forward(ids)) for p, m in models.items()})
    else:
        with tempfile.NamedTemporaryFile(suffix=".npy", delete=False) as f:
            np.save(f, ids)
        try:
            worker = _Worker(ckpt, f.name)                                       # loads and warms up its models
        finally:
            os.unlink(f.name)
    for fn in timed.values():                                                    # warm-up: compile, caches
        fn()

    def measure(name):
        if name in timed:
            t0, c0 = time.perf_counter(), time.process_time()
            timed[name]()
            return time.perf_counter() - t0, time.process_time() - c0
        return worker.run(name)

    names = list(timed) + (worker.names if worker else [])
    load_start = os.getloadavg()
    times = {name: float("inf") for name in names}
    cpu = {name: float("inf") for name in names}                                 # process CPU seconds: steadier
    for _ in range(a.repeats):                                                   # interleaved                  under load
        for name in names:
            wall, c = measure(name)
            times[name] = min(times[name], wall)
            cpu[name] = min(cpu[name], c)
    if worker:
        worker.close()
    ratios = {f"{name}_over_transformers": times[name] / times["transformers"] for name in names
              if name != "transformers"}
    cpu_ratios = {f"{name}_over_transformers": cpu[name] / cpu["transformers"] for name in names
                  if name != "transformers"}
    report = {"ckpt": str(ckpt), "tokens": a.tokens, "threads": a.threads, "seconds": times, "ratios": ratios,
              "cpu_seconds": cpu, "cpu_ratios": cpu_ratios,
              "refimpl_process": "this one" if a.one_process else "its own",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "refimpl": refimpl.__version__ if hasattr(refimpl, "__version__") else None},
              "machine": {"load_start": load_start, "load_end": os.getloadavg()}, "thread_setup": worker.thread_setup if worker else _thread_setup()}
    for name, r in ratios.items():
        print(f"{name:40s} x{r:.2f}  (CPU time: x{cpu_ratios[name]:.2f})")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
