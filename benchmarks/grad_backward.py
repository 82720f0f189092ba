"""The reference backward's time against the forward's, on the tiny model, in the same run (refimpl/grad/).

For each sequence length: refimpl's float64 forward (`Model.forward`, kernels "numpy", with the MTP
block), the gradient forward that keeps its intermediates (`refimpl.grad.forward`), and the
backward of the main + MTP cross-entropy (`backward_from`), best of --repeat, interleaved; the
float64 parameter copy (`params_of`, once per model) is reported apart. The ratio
backward / forward is the figure (the issue's target: within a few times). The last line printed is
one JSON object. Timings of a shared machine vary; the ratio is measured within one run. BLAS runs
one thread unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise (set before NumPy loads):
on a busy machine a multi-threaded BLAS waits for cores on the backward's many small products.

    python benchmarks/grad_backward.py [--ckpt DIR] [--lengths 32,128] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from refimpl.config import Config  # noqa: E402
from refimpl.formats.weights import load  # noqa: E402
from refimpl.grad import backward_from, cross_entropy, forward, params_of, run_context  # noqa: E402
from refimpl.synthetic.writer import make_checkpoint  # noqa: E402


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="a tiny checkpoint (default: made in a temporary folder)")
    ap.add_argument("--lengths", default="32,128")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt or str(Path(tmp) / "tiny")
        if a.ckpt is None:
            make_checkpoint(Config.tiny(), ckpt, seed=0)
        model = load(ckpt, precision="float64", kernels="numpy")
        t0 = time.perf_counter()
        P = params_of(model.weights, model.cfg)
        params_s = time.perf_counter() - t0
        ctx = run_context(model.cfg)
        rng = np.random.default_rng(0)
        out = {"machine": platform.machine(), "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "params_of_s": params_s,
               "lengths": {}, "ratios": {}}
        for s in (int(x) for x in a.lengths.split(",")):
            ids = rng.integers(0, model.cfg.vocab_size, (1, s))
            t1, t2 = rng.integers(0, model.cfg.vocab_size, (1, s)), rng.integers(0, model.cfg.vocab_size, (1, s - 1))
            tape = forward(P, ids, ctx)
            d1, d2 = cross_entropy(tape.logits, t1)[1], cross_entropy(tape.mtp_logits, t2)[1]
            fwd = best(lambda: model.forward(ids[0], mtp=True), a.repeat)
            tape_fwd = best(lambda: forward(P, ids, ctx), a.repeat)
            bwd = best(lambda: backward_from(tape, P, ctx, d1, d2), a.repeat)
            out["lengths"][s] = {"forward_s": fwd, "grad_forward_s": tape_fwd, "backward_s": bwd}
            out["ratios"][f"backward_over_forward_{s}"] = bwd / fwd
            out["ratios"][f"forward_and_backward_over_forward_{s}"] = (tape_fwd + bwd) / fwd
            print(f"{s} tokens: forward {fwd * 1e3:.0f} ms, gradient forward {tape_fwd * 1e3:.0f} ms, "
                  f"backward {bwd * 1e3:.0f} ms: backward / forward x{bwd / fwd:.2f}", flush=True)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
