"""Measure the noise model on correct implementations: every golden input, every candidate, both references.

    python tools/measure_noise.py [--inputs prefill-1,prefill-80] [--candidates float32,bf16]

For each input of the golden set (golden/) and each candidate below, it runs the input as the
golden set does (its chunks or decode steps; `-full`: one prefill of the input's tokens, cut to the
golden rows by compare), keeps the golden rows, and compares the trace with the stored float64 and
mirror traces with `refimpl.oracle.compare.compare` (noise "auto": the golden set's companion at the
candidate's precision where the precisions differ, else the profile). It prints each verdict, the
largest noise ratio and where. A correct implementation must pass every comparison: this is the
false-alarm measurement of docs/compare.md ("The noise model").

Candidates (all correct implementations, none of them the companion's own run):
  float32        refimpl float32 with the default kernels (Numba; the golden companion ran the spec functions)
  float32-split  an independent float32 implementation's arithmetic: every float32 product summed in two
                 halves of its inner dimension (another accumulation order than one BLAS call)
  float64        refimpl float64, default kernels
  mirror         refimpl mirror, default kernels
  bf16           the SIMULATED bf16 engine of tools/measure_profiles.py (mirror's rounding points, every
                 product one float32 BLAS call)
  float32-full, float64-full, mirror-full   one prefill of the input's tokens (for chunked and decode inputs)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from measure_profiles import simulated_engine  # noqa: E402
from refimpl.formats.weights import load  # noqa: E402
from refimpl.oracle import golden  # noqa: E402
from refimpl.oracle.compare import CompareError, TraceFile, compare, load_trace  # noqa: E402
from refimpl.oracle.trace import run_trace  # noqa: E402
from refimpl.synthetic.writer import make_checkpoint  # noqa: E402
from refimpl.config import Config  # noqa: E402

CANDIDATES = ("float32", "float32-split", "float64", "mirror", "bf16", "float32-full", "float64-full", "mirror-full")


@contextlib.contextmanager
def split_float32_products():
    """Within: every float32 product (linear.product) summed as two half-length products (another order)."""
    from refimpl.model import attention, indexer, linear
    orig = linear.product

    def product(a, b, prec):
        if prec != "float32" or a.shape[-1] < 4:
            return orig(a, b, prec)
        a, b = a.astype(np.float32), b.astype(np.float32)
        h = a.shape[-1] // 2
        return (a[..., :h] @ b[..., :h, :]) + (a[..., h:] @ b[..., h:, :])
    saved = [(m, m.product) for m in (linear, attention, indexer) if hasattr(m, "product")]
    for m, _ in saved:
        m.product = product
    try:
        yield
    finally:
        for m, v in saved:
            m.product = v


def candidate_trace(models, name: str, spec, tokens) -> TraceFile:
    """The candidate's trace of the input, its golden rows kept (a -full run: every row, compare cuts it)."""
    full = name.endswith("-full")
    base = name.removesuffix("-full")
    kw = {} if full else spec.run_kwargs()
    if base == "float32-split":
        with split_float32_products():
            t = run_trace(spec.model(models["float32-numpy"]), tokens, **kw)
        meta = dict(t.metadata, implementation="float32, products in two halves")
    elif base == "bf16":
        with simulated_engine():
            t = run_trace(spec.model(models["mirror-numpy"]), tokens, **kw)
        meta = dict(t.metadata, precision="bf16", implementation="simulated bf16 engine")
    else:
        t = run_trace(spec.model(models[base]), tokens, **kw)
        meta = dict(t.metadata)
    if full:
        return TraceFile(name, meta, dict(t.tensors))
    meta["golden_rows"] = list(spec.rows)
    return TraceFile(name, meta, golden.sample_rows(t.tensors, spec.rows, spec.length, store_float64_as_float32=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", default=None, help="comma-separated golden input names (default: all)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    a = ap.parse_args(argv)
    gdir = golden.default_dir()
    manifest = golden.read_manifest(gdir)
    specs = [golden.GoldenInput.from_dict(d) for d in manifest["inputs"]]
    if a.inputs:
        specs = [s for s in specs if s.name in a.inputs.split(",")]
    t0 = time.perf_counter()
    failures = worst = 0
    worst_at = ""
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny"
        make_checkpoint(Config.tiny(), ckpt, seed=golden.SEED, progress=False)
        models = {p: load(ckpt, precision=p) for p in ("float32", "float64", "mirror")}
        models |= {f"{p}-numpy": load(ckpt, precision=p, kernels="numpy") for p in ("float32", "mirror")}
        for spec in specs:
            tokens = manifest["tokens"][:spec.length]
            for name in a.candidates.split(","):
                if name.endswith("-full") and spec.chunks is None and spec.decode_from is None:
                    continue                                  # the same as the plain candidate
                cand = candidate_trace(models, name, spec, tokens)
                for ref in ("float64", "mirror"):
                    path = gdir / golden.trace_file(ref, spec.name)
                    try:
                        r = compare(cand, load_trace(path))
                    except CompareError as e:
                        print(f"{spec.name:26} {name:14} vs {ref:8} not comparable: {str(e)[:90]}")
                        continue
                    ratios = [(m["noise_ratio"], m["site"]) for m in r.sites if "noise_ratio" in m]
                    top = max(ratios, default=(0.0, "-"))
                    rule = "noise" if r.noise else r.profile
                    verdict = "ok" if r.ok else f"FAIL at {r.first['site'] if r.first else r.missing}"
                    counts[(rule, r.ok)] = counts.get((rule, r.ok), 0) + 1
                    failures += not r.ok
                    if r.noise and top[0] > worst:
                        worst, worst_at = top[0], f"{top[1]}, {spec.name}, {name} vs {ref}"
                    print(f"{spec.name:26} {name:14} vs {ref:8} {rule:22} {verdict:40} worst ratio "
                          f"{top[0]:7.3g} at {top[1]}", flush=True)
    tally = ", ".join(f"{rule} {'ok' if ok else 'FAIL'}: {n}" for (rule, ok), n in sorted(counts.items()))
    print(f"\n{failures} comparisons failed; by rule and verdict: {tally}")
    print(f"largest noise ratio of a correct implementation: {worst:.3g} ({worst_at}); "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
