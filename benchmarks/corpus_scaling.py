"""Corpus throughput: one process, 1 and 2 Ray workers (prompt-parallel), 2 pipeline stages, on the same corpus.

    python benchmarks/corpus_scaling.py [--ckpt DIR] [--prompts 16] [--tokens 32] [--precision mirror]

Default checkpoint: Flash dimensions, 2 layers, 8 routed experts (written to
/tmp/refimpl-flash-corpus on first use, ~30 s, 4.4 GB). Each run writes the corpus into a new
folder; the Ray runs' prompt files must hold the same bytes as the one-process run's, and their
manifests the same values but `generated_by` (checked before the JSON line is printed). Figures: wall seconds (worker start-up, model loading and Numba's cache
load included, as a user sees them), prompts/hour, tokens/s, and the speed-up of 2 workers over
1 as a fraction of the ideal min(2, CPUs), and of 2 pipeline stages over 1 worker. The worker's model memory-maps the whole checkpoint:
`checkpoint_bytes` is what each worker may read; `hop_bytes_per_token` is what a layer-pipelined
run would send between stages per token (the residual streams, n·c values in the run's dtype),
the input of docs/corpora.md's model of N machines. The last line printed is one JSON object.
Needs the extra: pip install 'refimpl[ray]'.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from refimpl.config import Config
from refimpl.formats.config_file import read_config
from refimpl.oracle.corpus import Job, make_corpus
from refimpl.synthetic.writer import make_checkpoint


def files_of(folder: Path) -> dict:
    """The prompt files' bytes, and the manifest but its `generated_by` (the git commit may move during a run)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "prompts").iterdir())}
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("generated_by")
    return dict(files, manifest=manifest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="/tmp/refimpl-flash-corpus")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--precision", default="mirror")
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--numba-threads", type=int, default=None,
                    help="NUMBA_NUM_THREADS of every process (the Ray workers inherit it): 1 keeps 2 workers on 2 "
                         "threads in all, as 1 worker with the default 2 threads")
    a = ap.parse_args()
    if a.numba_threads is not None:
        os.environ["NUMBA_NUM_THREADS"] = str(a.numba_threads)      # before Numba is first used here or in a worker
    from refimpl.oracle.corpus_ray import ensure_ray, pipeline_runner, ray_runner   # the extra: fails here without it
    ckpt = Path(a.ckpt)
    if not (ckpt / "config.json").exists():
        make_checkpoint(Config.flash(), ckpt, seed=0, layers=2, experts=8, progress=False)
    cfg = read_config(ckpt)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="refimpl-corpus-bench-"))
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "tokens": [int(t) for t in rng.integers(0, cfg.vocab_size,
                                                                                                 a.tokens)]}) + "\n"
                              for i in range(a.prompts)))
    job = Job(str(ckpt), precision=a.precision, kernels=a.kernels)
    # Ray starts its workers at nice 15 (RAY_worker_niceness); on a machine shared with other work they would
    # then get less CPU than the one-process run: the same priority for every run measured here
    os.environ.setdefault("RAY_worker_niceness", "0")
    ensure_ray(None)
    runs, folders = {}, {}
    for name, runner in (("one_process", None), ("ray_1_worker", ray_runner(1)), ("ray_2_workers", ray_runner(2)),
                         ("ray_2_stages", pipeline_runner(2))):
        out = work / name
        t0 = time.perf_counter()
        make_corpus(ckpt, corpus, out, job=job, runner=runner)
        s = time.perf_counter() - t0
        folders[name] = out
        runs[name] = {"wall_s": round(s, 2), "prompts_per_hour": round(a.prompts * 3600 / s, 1),
                      "tokens_per_s": round(a.prompts * a.tokens / s, 2)}
        print(f"{name:14s} {s:8.1f} s  {runs[name]['prompts_per_hour']:8.1f} prompts/hour  "
              f"{runs[name]['tokens_per_s']:7.2f} tokens/s", flush=True)
    same = all(files_of(folders[n]) == files_of(folders["one_process"]) for n in runs)
    if not same:
        raise SystemExit("error: the Ray runs wrote other bytes than the one-process run")
    cpus = os.cpu_count() or 1
    speedup = runs["ray_1_worker"]["wall_s"] / runs["ray_2_workers"]["wall_s"]
    dtype_bytes = 8 if a.precision == "float64" else 4
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
              "cpu_count": cpus, "load_average": os.getloadavg(), "numba_threads": os.environ.get("NUMBA_NUM_THREADS"), "ckpt": str(ckpt), "n_layers": cfg.n_layers, "precision": a.precision,
              "prompts": a.prompts, "tokens_per_prompt": a.tokens, "same_bytes": same, "runs": runs,
              "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.glob("*.safetensors")),
              "hop_bytes_per_token": cfg.hc_mult * cfg.dim * dtype_bytes,
              "ratios": {"speedup_2_over_1_worker": round(speedup, 3),
                         "of_ideal": round(speedup / min(2, cpus), 3),
                         "speedup_2_stages_over_1_worker": round(runs["ray_1_worker"]["wall_s"] /
                                                                 runs["ray_2_stages"]["wall_s"], 3),
                         "ray_1_worker_over_one_process": round(runs["one_process"]["wall_s"] /
                                                                runs["ray_1_worker"]["wall_s"], 3)}}
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
