"""The tolerance of the kit: how far a correct implementation at a given precision may be from the exact value.

The principle is the one `refimpl compare` follows (docs/compare.md): the expected error of an
implementation is the error a CORRECT implementation at the candidate's precision makes on the
same input. The kit measures it on every drawn input: it runs refimpl's reference at the
candidate's precision and in float64 (the exact math), and bounds the candidate's distance from
the float64 result, per row (the last axis of the output), by

    bound[row] = FACTOR · noise[row] + FLOOR_ULPS · EPS[precision] · scale[row]

    noise[row] = max( max|ref_p − ref_64| over the row,  rel_noise · scale[row] )
    rel_noise  = max|ref_p − ref_64| / max|ref_64| over the whole output
    scale[row] = max|ref_64| over the row

FACTOR = 8 leaves room for another summation order or elementary-function library (each adds an
error of the same size as refimpl's own, not eight times it); the floor covers outputs that
refimpl computes exactly at that precision (measured noise 0), at a few units of the precision's
last place. Taking the larger of the row's own noise and the output's relative noise at the row's
scale keeps a row whose noise happens to be 0 from getting a bound of 0. Positions where the
float64 result is ±inf must hold the same ±inf; NaN never matches.

`noise_bound` is the whole rule, in one function: a later shared noise model replaces its body.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACTOR = 8.0                       # a correct implementation's error: at most 8x refimpl's own at that precision
FLOOR_ULPS = 4.0                   # where refimpl's measured error is 0: 4 units of the precision's last place
EPS = {"float64": 2.0 ** -40, "float32": 2.0 ** -23, "mirror": 2.0 ** -7}   # a unit in the last place at 1.0
# mirror's unit is bf16's (8 significant bits): mirror stores activations in bf16. float64 has no noise
# to measure (the reference IS float64): 2^-40 relative admits any summation order of a few thousand terms


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
                f"row) + {FLOOR_ULPS:g} x {EPS[self.precision]:.3g} x row scale {s:.3g}")


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
    rel = err.max() / mag.max() if mag.max() > 0 else 0.0
    noise = np.maximum(err.max(axis=-1, keepdims=True), rel * scale)
    bound = FACTOR * noise + FLOOR_ULPS * EPS[precision] * scale
    return Bound(bound, noise, scale, precision)
