"""Structural hints for a failed check: what a wrong result looks like, when the premise holds.

Each hint is tried only on a float output of the candidate whose shape allows it, and given only
when the candidate, transformed, agrees with the exact result within the same bound the check
uses while the exact result, transformed, does not (or, for "confined", when the out-of-bound
elements occupy a strict subset along one axis). A result with NaN or inf where the exact one is
finite gets the "non-finite" hint and no transform.
A hint names the likely mistake; it never turns a failure into a pass.

    factor      the candidate is a constant multiple of the exact result (a power of two: a scale)
    sign        the candidate is the exact result negated
    transpose   the candidate is the exact result with two axes swapped (same shape: a square mix)
    shift       the candidate is the exact result shifted by 1-2 places along one axis
    confined    the errors lie in a few indices of one named axis (heads, channels, streams, rows)

This module is the kit's own, kept apart so that the lead can merge it with compare's hints.
"""
from __future__ import annotations

import numpy as np


def _within(candidate: np.ndarray, exact: np.ndarray, bound: np.ndarray) -> bool:
    if candidate.shape != exact.shape:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(candidate - exact) <= bound + 0.0))


def structural_hints(got: np.ndarray, exact: np.ndarray, bound: np.ndarray, bad: np.ndarray,
                     axes: tuple[str, ...] = ()) -> list[str]:
    """Hints for a float output that failed. got, exact: same shape float64 (finite); bound broadcastable;
    bad: bool mask of out-of-bound elements; axes: a name per axis ("h heads", ...) or ()."""
    hints = []
    lost = np.isfinite(exact) & ~np.isfinite(got)
    if lost.any():                     # NaN / inf where the exact value is finite: no transform can be judged
        return [f"non-finite: the result holds NaN or inf at {int(lost.sum())} of {lost.size} elements where the "
                "exact one is finite"] + _confined(bad, axes)
    both = np.isfinite(exact)          # the exact -inf entries (masked scores) that the candidate matched
    got, exact = np.where(both, got, 0.0), np.where(both, exact, 0.0)
    big = np.abs(exact) > 0.25 * np.abs(exact).max() if exact.size else np.zeros(0, bool)
    if big.any():
        ratio = got[big] / exact[big]
        c = float(np.median(ratio))
        if c != 0 and abs(c - 1) > 1e-3 and _within(got / c, exact, bound):
            m, e = np.frexp(abs(c))
            p2 = f" = {'-' if c < 0 else ''}2^{e - 1}" if m == 0.5 else ""
            hints.append(f"factor: the result is {c:.6g}{p2} times the exact one (a missing or extra scale)"
                         if c > 0 else "sign: the result is the exact one negated" if abs(c + 1) < 1e-3
                         else f"factor: the result is {c:.6g} times the exact one")
    for a in range(got.ndim):
        for b in range(a + 1, got.ndim):
            if (got.shape[a] == got.shape[b] > 1 and _within(np.swapaxes(got, a, b), exact, bound)
                    and not _within(np.swapaxes(exact, a, b), exact, bound)):       # the swap must change the result
                hints.append(f"transpose: the result is the exact one with axes {_name(axes, a)} and {_name(axes, b)} "
                             "swapped (e.g. a mixing matrix read as [k, j] instead of [j, k])")
    for a in range(got.ndim):
        for k in (1, -1, 2, -2):
            if got.shape[a] > abs(k) + 1:
                sl = [slice(None)] * got.ndim
                sl[a] = slice(abs(k), None) if k > 0 else slice(None, k)
                sl2 = list(sl)
                sl2[a] = slice(None, -k) if k > 0 else slice(-k, None)
                g, e = got[tuple(sl)], exact[tuple(sl2)]
                bb = np.broadcast_to(bound, got.shape)[tuple(sl)]
                if _within(g, e, bb) and not _within(exact[tuple(sl)], e, bb):      # the shift must change it
                    hints.append(f"shift: the result is the exact one shifted by {k} along {_name(axes, a)}")
                    break
    hints += _confined(bad, axes)
    if bad.any() and not bad.all():
        nz = bad & (exact != 0)
        if nz.any():                                   # the out-of-bound elements alone a constant multiple?
            c = float(np.median(got[nz] / exact[nz]))
            bb = np.broadcast_to(bound, got.shape)
            if c != 0 and abs(c - 1) > 1e-3 and np.all(np.abs(got[nz] / c - exact[nz]) <= bb[nz]):
                m, e = np.frexp(abs(c))
                p2 = f" = {'-' if c < 0 else ''}2^{e - 1}" if m == 0.5 else ""
                hints.append(f"factor: every out-of-bound element is {c:.6g}{p2} times the exact one (a scale "
                             "applied to the wrong elements)")
    return hints


def _confined(bad: np.ndarray, axes) -> list[str]:
    """'confined' hints: the axes along which the out-of-bound elements occupy a strict subset of the indices."""
    out = []
    if bad.any() and not bad.all():
        for a in range(bad.ndim):
            if bad.shape[a] < 2:
                continue
            hit = np.flatnonzero(bad.any(axis=tuple(i for i in range(bad.ndim) if i != a)))
            if len(hit) < bad.shape[a]:
                out.append(f"confined: the out-of-bound elements lie only at {_name(axes, a)} "
                           f"{_ranges(hit)} of 0..{bad.shape[a] - 1}")
    return out


def _name(axes, a: int) -> str:
    return f"axis {a} ({axes[a]})" if a < len(axes) else f"axis {a}"


def _ranges(idx: np.ndarray) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (at most 6 runs shown)."""
    runs, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(runs[:6]) + (", ..." if len(runs) > 6 else "")
