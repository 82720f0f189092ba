"""The calibrated noise model: how far a CORRECT implementation of a precision lands from a reference.

A candidate computed in float32 (or with the official bf16 rounding points) cannot match a float64
reference exactly; how far it may be, at one site, input and position, is measured rather than
guessed: refimpl itself computes the same input at the candidate's precision (the COMPANION), and
the companion's distance from the reference is the noise a correct implementation of that precision
makes there. The candidate's distance, divided by that noise, is its NOISE RATIO: about 1 for a
correct implementation (another accumulation order moves the last bits, not the size of the error),
and a jump by 10x or more where a bug enters the data flow, however small the absolute error.

    expected = expected_noise(companion, reference, fmt="float32")   # [rows]: per position
    ratio = noise_ratio(candidate, reference, expected)              # [rows]
    ok = not (ratio > JUMP).any()

Every function takes arrays [rows, ...] (rows: positions; the rest of each row is flattened) and
measures a row by its RMS error. The expected noise of a row is floored at FLOOR_UNITS units of
roundoff of the format (2^-8 bf16, 2^-24 float32, 2^-53 float64) times the reference site's RMS, so
a site that the companion happens to compute exactly (the embedding; a float64 candidate) still
allows the rounding of its storage format. Non-finite entries equal in both arrays (-inf scores of
invisible indexer entries) are equal; a non-finite value facing anything else makes the row's
error infinite.

The same principle serves one operation as well as a whole trace: call the operation with
prec="float64" (the reference) and with the candidate's precision (the companion), then
`check(candidate, reference, companion, fmt)` on its output; `check_operation` does both:

    from refimpl.model.norm import rms_norm
    c = check_operation(my_rms_norm(x, w), rms_norm, x, w, eps=1e-6, precision="float32")
    assert c.ok, (c.worst, c.first_row)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JUMP = 10.0             # a row whose error exceeds JUMP x its expected noise is out of tolerance
FLOOR_UNITS = 2.0       # the expected noise is at least FLOOR_UNITS units of roundoff x the site's RMS
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


def _rows(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float64).reshape(x.shape[0], -1)                   # [rows, width]


def _rms(x: np.ndarray, count, axis=None):
    """sqrt(Σx² / count) over axis, scaled by the largest magnitude first so that no square under- or
    overflows (errors of 1e-165 or 1e+200 keep their size, and a power-of-two scale of x scales it exactly)."""
    m = np.max(np.abs(x), axis=axis, initial=0.0)
    s = np.where(m > 0, m, 1.0)
    y = x / (s if axis is None else np.expand_dims(s, axis))
    return s * np.sqrt((y * y).sum(axis=axis) / count)


def row_error(a, b) -> np.ndarray:
    """RMS over each row of a - b -> [rows]; entries non-finite in both and equal count as 0, a
    non-finite entry facing another value makes the row inf."""
    a, b = _rows(a), _rows(b)
    valid = np.isfinite(a) & np.isfinite(b)
    broken = (~valid & ~((a == b) & ~np.isfinite(b))).any(axis=1)
    err = np.subtract(a, b, out=np.zeros_like(a), where=valid)
    rms = _rms(err, np.maximum(valid.sum(axis=1), 1), axis=1)
    return np.where(broken, np.inf, rms)


def site_error(a, b) -> float:
    """RMS of a - b over every finite entry of the site (inf if a non-finite value faces another value)."""
    a, b = _rows(a), _rows(b)
    valid = np.isfinite(a) & np.isfinite(b)
    if (~valid & ~((a == b) & ~np.isfinite(b))).any():
        return float("inf")
    err = np.subtract(a, b, out=np.zeros_like(a), where=valid)
    return float(_rms(err, max(int(valid.sum()), 1)))


def site_rms(b) -> float:
    """The RMS of the finite entries of a site (its scale)."""
    b = _rows(b)
    f = b[np.isfinite(b)]
    return float(_rms(f, f.size)) if f.size else 0.0


def noise_floor(reference, fmt: str) -> float:
    """The least expected noise of a site: FLOOR_UNITS units of roundoff of fmt x the reference's RMS."""
    if fmt not in UNIT_ROUNDOFF:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(UNIT_ROUNDOFF)}")
    return FLOOR_UNITS * UNIT_ROUNDOFF[fmt] * site_rms(reference)


def expected_noise(companion, reference, fmt: str) -> np.ndarray:
    """Per row, the error a correct implementation of the companion's precision makes: the companion's
    RMS error against the reference in that row, at least its RMS error over the whole site (a row of a
    few entries, e.g. the indexer scores of the first compressed entries, is one draw of the rounding,
    too few to stand alone) and at least noise_floor(reference, fmt) -> [rows]."""
    if np.shape(companion) != np.shape(reference):
        raise ValueError(f"companion shape {list(np.shape(companion))} is not the reference's "
                         f"{list(np.shape(reference))}")
    return np.maximum(np.maximum(row_error(companion, reference), site_error(companion, reference)),
                      noise_floor(reference, fmt))


def noise_ratio(candidate, reference, expected) -> np.ndarray:
    """Per row, the candidate's RMS error against the reference over the expected noise -> [rows]
    (0 where the candidate equals the reference, inf where the expected noise is 0 and it does not)."""
    obs = row_error(candidate, reference)
    exp = np.asarray(expected, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(obs == 0, 0.0, obs / exp)


@dataclass(frozen=True)
class NoiseCheck:
    """The outcome of `check`: per-row ratios, the worst, the first row over JUMP (None: within the noise)."""
    ratio: np.ndarray           # [rows]
    expected: np.ndarray        # [rows]: the expected RMS error
    observed: np.ndarray        # [rows]: the candidate's RMS error
    jump: float

    @property
    def worst(self) -> float:
        return float(self.ratio.max()) if self.ratio.size else 0.0

    @property
    def first_row(self) -> int | None:
        over = self.ratio > self.jump
        return int(np.argmax(over)) if over.any() else None

    @property
    def ok(self) -> bool:
        return self.first_row is None


def check(candidate, reference, companion, fmt: str, *, jump: float = JUMP) -> NoiseCheck:
    """The candidate against the reference, with the companion's error as the expected noise.

    candidate, reference, companion: arrays of one shape [rows, ...]: the implementation under test,
    the reference (e.g. refimpl in float64) and refimpl at the candidate's precision on the same input.
    fmt: the format whose roundoff floors the noise (the candidate's storage format).
    """
    if np.shape(candidate) != np.shape(reference):
        raise ValueError(f"candidate shape {list(np.shape(candidate))} is not the reference's "
                         f"{list(np.shape(reference))}")
    if np.ndim(reference) < 1:
        raise ValueError("arrays need a first (row) axis")
    expected = expected_noise(companion, reference, fmt)
    return NoiseCheck(noise_ratio(candidate, reference, expected), expected, row_error(candidate, reference), jump)


FORMAT_OF = {"float64": "float64", "float32": "float32", "mirror": "bfloat16"}   # a precision's roundoff format


def check_operation(candidate, fn, *args, precision: str = "float32", jump: float = JUMP, **kwargs) -> NoiseCheck:
    """A candidate's output of one refimpl operation, checked against fn(*args, prec="float64", **kwargs) with
    fn(*args, prec=precision, **kwargs) as the companion: their output [rows, ...] (of an operation that returns
    (output, state), the output)."""
    if precision not in FORMAT_OF:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(FORMAT_OF)}")
    first = lambda out: out[0] if isinstance(out, tuple) else out        # (output, state) operations
    reference = np.asarray(first(fn(*args, prec="float64", **kwargs)))
    companion = np.asarray(first(fn(*args, prec=precision, **kwargs)))
    candidate = np.asarray(candidate)
    if reference.ndim == 0:
        reference, companion, candidate = reference[None], companion[None], candidate[None]
    return check(candidate, reference, companion, FORMAT_OF[precision], jump=jump)
