"""Measure the numbers behind refimpl/oracle/profiles.toml: the worst differences between precision modes.

    python tools/measure_profiles.py [--quick] [--json OUT.json]

For each checkpoint and prompt length below, it traces the same random prompt in every mode,
compares the pairs each profile is for with `refimpl.oracle.compare` (with no bounds, so every
metric is computed), and prints, per profile, the worst value of every metric over all runs
with the site, checkpoint and length where it occurred (and per site kind, for the float
metrics). profiles.toml records these worst values next to its bounds.

Checkpoints (random weights, `synthetic.writer.make_checkpoint`): `tiny` with seeds 0, 1, 2, and
`tiny-b`, a differently shaped shrunk preset (dim 384, 2 streams, 16 experts with 4 active, window
64, 4 layers with CSA / HCA / window / CSA, index top-24). Lengths 5, 64, 130, 300 tokens
(--quick: 64 and 130 on tiny seed 0 only).

The modes: `float64`, `float32`, `mirror`, and a SIMULATED bf16 engine (precision "bf16"):
mirror's rounding points (bf16 storage, FP8/FP4 quantization) with every matrix product taken as
one float32 BLAS product (the machine's accumulation order, no exact accumulation and no
row-by-row products). That is what distinguishes a production engine from mirror at the
arithmetic level; a real GPU engine also has its own exp / rsqrt, which this does not simulate.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl.config import Config  # noqa: E402
from refimpl.formats.weights import load  # noqa: E402
from refimpl.oracle.compare import TraceFile, compare  # noqa: E402
from refimpl.oracle.trace import run_trace  # noqa: E402
from refimpl.synthetic.writer import make_checkpoint  # noqa: E402

TINY_B = dict(dim=384, n_heads=4, n_routed_experts=16, n_activated_experts=4, moe_inter_dim=256, window_size=64,
              n_layers=4, n_hash_layers=1, compress_ratios=(4, 16, 0, 4, 0), index_topk=24, q_lora_rank=256,
              index_n_heads=8, hc_mult=2)
CASES = [("tiny", 0, (5, 64, 130, 300)), ("tiny", 1, (64, 200)), ("tiny", 2, (64, 200)),
         ("tiny-b", 0, (5, 64, 130, 300))]
QUICK = [("tiny", 0, (64, 130))]
PAIRS = {                       # profile: (candidate mode, reference mode)
    "float32-vs-float64": ("float32", "float64"),
    "mirror-vs-float64": ("mirror", "float64"),
    "bf16-engine-vs-mirror": ("bf16", "mirror"),
    "mirror-vs-mirror": ("mirror", "mirror"),      # two independent runs of the same trace
}
BEYOND_REL = 0.25               # the statistical profiles' element threshold (x the site's rms)
UNBOUNDED = {name: {"float": {"beyond_rel": BEYOND_REL}} for name in PAIRS}   # no bounds: compute and report only


@contextlib.contextmanager
def simulated_engine():
    """Within: precision "mirror" takes every product as one float32 BLAS call (see the module docstring)."""
    from refimpl.model import attention, indexer, linear
    orig_product, orig_matmul = linear.product, linear.matmul

    def product(a, b, prec):
        return a.astype(np.float32) @ b.astype(np.float32) if prec == "mirror" else orig_product(a, b, prec)

    def matmul(x, w, prec):
        return x.astype(np.float32) @ w.astype(np.float32).T if prec == "mirror" else orig_matmul(x, w, prec)
    mods = (linear, attention, indexer)
    saved = [(m, k, getattr(m, k)) for m in mods for k in ("product", "matmul") if hasattr(m, k)]
    for m, k, _ in saved:
        setattr(m, k, product if k == "product" else matmul)
    try:
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def traces(ckpt: Path, tokens: list[int]) -> dict[str, TraceFile]:
    out = {}
    for mode in ("float64", "float32", "mirror"):
        t = run_trace(load(ckpt, precision=mode, kernels="numpy"), tokens)        # the spec functions
        out[mode] = TraceFile(f"{mode}", t.metadata, t.tensors)
    with simulated_engine():                     # patches spec functions: run them, not the kernels
        t = run_trace(load(ckpt, precision="mirror", kernels="numpy"), tokens)
    out["bf16"] = TraceFile("bf16", {**t.metadata, "precision": "bf16", "implementation": "simulated engine"},
                            t.tensors)
    t = run_trace(load(ckpt, precision="mirror", kernels="numpy"), tokens)
    out["mirror-again"] = TraceFile("mirror", t.metadata, t.tensors)
    return out


class Worst:
    """The worst value of each (profile, metric, site kind) and where it occurred."""

    def __init__(self):
        self.table: dict = {}

    def see(self, profile, metric, kind, value, where, larger_is_worse=True):
        key = (profile, metric, kind)
        old = self.table.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if old is None or (value > old[0] if larger_is_worse else value < old[0]):
            self.table[key] = (value, where)


def record(worst: Worst, profile: str, report, where: str) -> None:
    for m in report.sites:
        at = f"{m['site']} · {where}"
        for kind in (m["site_kind"], "*"):
            if m["kind"] == "float":
                for metric in ("max_rel", "rms_rel", "real_frac"):
                    worst.see(profile, metric, kind, m[metric], at)
                worst.see(profile, "min_cos", kind, m["cos"], at, larger_is_worse=False)
                worst.see(profile, "min_site_cos", kind, m["site_cos"], at, larger_is_worse=False)
                worst.see(profile, "max_beyond_frac", kind, m.get("beyond_frac"), at)
                if "top1" in m:
                    worst.see(profile, "min_top1", kind, m["top1"], at, larger_is_worse=False)
                    worst.see(profile, "min_top5", kind, m["top5"], at, larger_is_worse=False)
                    worst.see(profile, "max_kl", kind, m["kl"], at)
            else:
                worst.see(profile, "real_rows_frac", kind, m["real"] / max(m["rows"], 1), at)
                worst.see(profile, "near_tie_rows_frac", kind, m["near_ties"] / max(m["rows"], 1), at)
                spreads = [r["spread"] for r in m["near_tie_rows"] + m["real_rows"]]
                if spreads:
                    worst.see(profile, "max_disagreement_spread", kind, max(spreads), at)
                    worst.see(profile, "min_disagreement_spread", kind, min(spreads), at, larger_is_worse=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the worst values here")
    a = ap.parse_args(argv)
    worst = Worst()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for preset, seed, lengths in (QUICK if a.quick else CASES):
            cfg = Config.tiny() if preset == "tiny" else Config.tiny().replace(**TINY_B)
            ckpt = Path(tmp) / f"{preset}-{seed}"
            make_checkpoint(cfg, ckpt, seed=seed, progress=False)
            for n in lengths:
                rng = np.random.default_rng(1000 * seed + n)
                tokens = [int(t) for t in rng.integers(2, cfg.vocab_size, n)]
                tr = traces(ckpt, tokens)
                where = f"{preset} seed {seed}, {n} tokens"
                for profile, (x, y) in PAIRS.items():
                    r = compare(tr[x], tr["mirror-again" if profile == "mirror-vs-mirror" else y], profile,
                                profiles=UNBOUNDED)
                    record(worst, profile, r, where)
                print(f"{where}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = sorted(worst.table.items())
    for (profile, metric, kind), (value, at) in rows:
        if kind == "*":
            print(f"{profile:24} {metric:26} {value:<12.4g} {at}")
    print()
    for (profile, metric, kind), (value, at) in rows:
        if kind != "*":
            print(f"{profile:24} {metric:26} {kind:24} {value:<12.4g} {at}")
    if a.json:
        Path(a.json).write_text(json.dumps([{"profile": p, "metric": m, "kind": k, "value": v, "at": at}
                                            for (p, m, k), (v, at) in rows], indent=1))
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
