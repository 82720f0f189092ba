"""Products benchmark: the kernels' FP8/FP4 products against BLAS limits measured in the same run.

    python benchmarks/products.py                  # Flash shapes: 1024 x 4096 @ 4096 x 4096 (FP8), 1024 x 4096 @ 2048 x 4096 (FP4)
    python benchmarks/products.py --rows 256 --quick

What is measured (the last line printed is one JSON object; `ratios` gathers the ratios):
  limits     dgemm and sgemm rates (NumPy matmul of the same shape, float64 / float32, best of
             --repeats, BLAS threads as configured) and the read bandwidth (NumPy sum of a 1 GiB
             float32 array, one thread).
  many rows  refimpl.kernels.linear.quantized_linear on --rows FP8-quantized activation rows, in
             each precision mode: FLOP/s (2 T K N) as a fraction of the same run's dgemm rate
             (mirror, float64) or sgemm rate (float32). The mirror result is checked bit for bit
             against the spec's (model/linear.py quantized_linear) on the first 32 rows.
  one row    the same product on one row (decode): weight bytes read per second as a fraction of
             the read bandwidth.
The load average at the start and end is recorded: on a shared machine only ratios measured in the
same run mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from refimpl.kernels import linear as K                       # noqa: E402
from refimpl.model import linear as spec                      # noqa: E402
from refimpl.model.linear import Fp4Matrix, Fp8Matrix         # noqa: E402
from refimpl.numerics import round_bf16                       # noqa: E402


def best_of(fn, repeats: int) -> float:
    """The least wall time of `repeats` calls of fn() (seconds)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fp8_weight(rng, n: int, k: int) -> Fp8Matrix:
    """Random e4m3 codes (no NaN code) with E8M0 128x128 scales near 2^-5, as a checkpoint's."""
    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 0x01
    scale = rng.integers(118, 124, (-(-n // 128), -(-k // 128)), dtype=np.uint8)
    return Fp8Matrix(codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu))


def fp4_weight(rng, n: int, k: int) -> Fp4Matrix:
    """Random packed e2m1 bytes with E8M0 1x32 scales spanning a few binades, as a checkpoint's."""
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scale = rng.integers(118, 126, (n, k // 32), dtype=np.uint8)
    return Fp4Matrix(codes.view(np.int8), scale.view(ml_dtypes.float8_e8m0fnu))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="mirror only, one repeat")
    a = ap.parse_args(argv)
    if a.rows < 32 or a.k < 128 or a.k % 128 or a.repeats < 1:
        ap.error("--rows must be at least 32, --k a multiple of 128, --repeats at least 1")
    report = {"machine": {"load_start": os.getloadavg()}, "shape": {"rows": a.rows, "k": a.k}}
    rng = np.random.default_rng(0)
    T, k = a.rows, a.k
    repeats = 1 if a.quick else a.repeats

    x64 = rng.standard_normal((T, k))
    w64 = rng.standard_normal((k, k))
    x64 @ w64.T
    t = best_of(lambda: x64 @ w64.T, repeats)
    dgemm = 2 * T * k * k / t / 1e9
    x32, w32 = x64.astype(np.float32), w64.astype(np.float32)
    x32 @ w32.T
    sgemm = 2 * T * k * k / best_of(lambda: x32 @ w32.T, repeats) / 1e9
    del x64, w64, x32, w32
    big = np.ones((1 << 30) // 4, np.float32)
    read = big.nbytes / best_of(lambda: float(big.sum()), 3) / 1e9
    del big
    report["limits"] = {"dgemm_GFLOPs": dgemm, "sgemm_GFLOPs": sgemm, "read_GBps": read}

    x = round_bf16(rng.standard_normal((T, k)) * np.exp2(rng.integers(-4, 5, (T, 1))))   # bf16 values, float32
    ratios, figures = {}, {}
    for name, w in (("fp8", fp8_weight(rng, k, k)), ("fp4", fp4_weight(rng, k // 2, k))):
        n = w.shape[0]
        for prec in (("mirror",) if a.quick else ("mirror", "float64", "float32")):
            K.quantized_linear(x[:32], w, prec)                    # compile, warm
            t = best_of(lambda: K.quantized_linear(x, w, prec), repeats)
            rate = 2 * T * k * n / t / 1e9
            limit = sgemm if prec == "float32" else dgemm
            figures[f"{name}_{prec}_rows"] = {"s": t, "GFLOPs": rate}
            ratios[f"{name}_{prec}_rows_of_{'sgemm' if prec == 'float32' else 'dgemm'}"] = rate / limit
            if prec == "mirror":
                same = np.array_equal(K.quantized_linear(x[:32], w, prec), spec.quantized_linear(x[:32], w, prec))
                figures[f"{name}_{prec}_rows"]["same_as_spec"] = bool(same)
        nbytes = w.values.nbytes + w.scale.nbytes
        t1 = best_of(lambda: K.quantized_linear(x[:1], w, "mirror"), 5 * repeats)
        figures[f"{name}_mirror_row"] = {"ms": 1e3 * t1, "GBps": nbytes / t1 / 1e9}
        ratios[f"{name}_mirror_row_of_read"] = nbytes / t1 / 1e9 / read
    report["figures"], report["ratios"] = figures, ratios
    report["machine"]["load_end"] = os.getloadavg()
    for key, v in ratios.items():
        print(f"{key:40s} {v:.3f}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
