"""The tolerance of the kit: how far a correct implementation at a given precision may be from the exact value.

The principle is the one `refimpl compare` follows (docs/compare.md): the expected error of an
implementation is the error a CORRECT implementation at the candidate's precision makes on the
same input. The kit measures it on every drawn input: it runs refimpl's reference at the
candidate's precision and in float64 (the exact math), and bounds the candidate's distance from
the float64 result, per row (the last axis of the output), by

    bound[row] = FACTOR · noise[row] + FLOOR[precision] · scale[row]

    noise[row] = max( max|ref_p − ref_64| over the row,  rel_noise · scale[row] )
    rel_noise  = the largest relative noise of any row: max over rows of max|ref_p − ref_64| / scale[row]
    scale[row] = max|ref_64| over the row

FACTOR = 8 leaves room for another summation order or elementary-function library (each adds an
error of the same size as refimpl's own, not eight times it); the floor covers outputs that
refimpl happens to compute (almost) exactly at that precision on the drawn input where another
correct order does not: 64 float32 units in the last place (measured: a hand-written torch float32
sparse attention, correct, was up to 31 units off on rows where refimpl's float32 was within one:
a softmax over 150 entries of one row, and rows dominated by the sink), 2 bf16 units in mirror, and
2^-40 in float64 (no noise to measure there: the reference IS float64; any summation order of a few
thousand terms stays within it). Taking the larger of the row's own noise and the output's worst
relative noise at the row's scale keeps a row whose noise happens to be small on this input
(refimpl's error is one sample of a correct implementation's) from getting a bound below what
another correct order makes (the sink-dominated rows of an attention output lie ~1e-15 below the
others; their relative error is the same). Positions where the
float64 result is ±inf must hold the same ±inf; NaN never matches.

`noise_bound` is the whole rule, in one function: a later shared noise model replaces its body.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACTOR = 8.0                       # a correct implementation's error: at most 8x refimpl's own at that precision
FLOOR = {"float64": 2.0 ** -40,    # relative to the row's scale, where refimpl's measured error is 0
         "float32": 64 * 2.0 ** -23,   # 64 float32 units in the last place
         "mirror": 2 * 2.0 ** -7}      # 2 bf16 units (mirror stores activations in bf16)


@dataclass(frozen=True)
class Bound:
    """The per-row bound of one float output, with the measurements it came from (for the failure message)."""
    bound: np.ndarray       # [..., 1] broadcast over the last axis
    noise: np.ndarray       # [..., 1] the measured noise used per row
    scale: np.ndarray       # [..., 1] max |exact| per row
    precision: str

    def explain(self, index: tuple) -> str:
        row = index[:-1] if len(index) else ()
        b, n, s = (float(a[row + (0,)]) if a.ndim else float(a) for a in (self.bound, self.noise, self.scale))
        return (f"bound {b:.3g} = {FACTOR:g} x measured noise {n:.3g} (refimpl at {self.precision} vs float64 on this "
                f"row) + floor {FLOOR[self.precision]:.3g} x row scale {s:.3g}")


def noise_bound(exact: np.ndarray, at_precision: np.ndarray, precision: str) -> Bound:
    """The per-row bound of a candidate at `precision` against the float64 result `exact` (module docstring).

    exact, at_precision: refimpl's reference output in float64 and at `precision`, same shape (>= 0 dims).
    """
    exact = np.asarray(exact, np.float64)
    approx = np.asarray(at_precision, np.float64)
    if exact.ndim == 0:
        exact, approx = exact.reshape(1), approx.reshape(1)
    finite = np.isfinite(exact)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(approx - exact), 0.0)                 # inf positions are checked apart
    mag = np.where(finite, np.abs(exact), 0.0)
    if exact.size == 0:
        zero = np.zeros(exact.shape[:-1] + (1,))
        return Bound(zero, zero, zero, precision)
    scale = mag.max(axis=-1, keepdims=True)                                 # [..., 1]
    row_err = err.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = float(np.max(np.where(scale > 0, row_err / np.where(scale > 0, scale, 1.0), 0.0), initial=0.0))
    noise = np.maximum(row_err, rel * scale)
    bound = FACTOR * noise + FLOOR[precision] * scale
    return Bound(bound, noise, scale, precision)
