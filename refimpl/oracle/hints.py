"""Structural hints: what the numbers of a failing site say about the kind of bug.

    hints = site_hints("attn.q", a, b, layer=0, positions=[0, 1, 2], facts={"window_size": 32, ...})

kind is the site's name without its layer (`attn.q`, `logits`), a the candidate's site, b the
reference's ([rows, ...]: row r holds token position positions[r], position r when positions is
None, or compressed entry r in `attn.compressed_kv`). Each hint is given only when its
premise holds in the numbers, tested against the site's own difference: an explanation X (a
transform of B) counts when it leaves at most EXPLAINED of the difference, rms(A - X) <=
EXPLAINED · rms(A - B). Random noise has no such explanation, so it gets no hint.

    constant factor      A = c·B over the whole site (c != 1), or one factor per position, per index of
                         another axis, or per position and head (a norm, a per-head or per-channel scale)
    sign flip            |A| = |B| with every sign flipped, or some (which ones, when they form a set
                         of indices of one axis)
    transpose            A = B with two axes of equal length swapped (the mHC mix `comb`: [t, j, k])
    permutation          A = B with the indices of one axis permuted (which axis, and the permutation)
    shift by one         A's position (or entry, or index of the last axis) t holds B's t - 1 or t + 1
    starts at a boundary positions before t0 agree, t0 is the window size or a compression boundary
    confined             the difference lives in some indices of an axis (heads, channels, streams)
                         and the others agree

`facts` (from the traces' metadata, when they hold them): `window_size`, `compress_ratios` (per
layer, the MTP block last) and `rope_head_dim`; `layer`: the site's layer (None: a global site).
A fact that is absent is not used (the boundary hint then names no window).
"""
from __future__ import annotations

import math

import numpy as np

HINT_FACTS = ("window_size", "compress_ratios", "rope_head_dim")   # trace metadata keys the hints read
EXPLAINED = 0.05            # an explanation must leave at most 5% of the difference (rms)
CLEAN = 0.01                # a position agrees when its error is below 1% of the worst one; the indices
                            # of an axis split when those below are 100x under the median of those above
MIN_SLICE = 8               # a per-index factor needs this many elements per index to mean anything

# the axes of each known site after the position axis (docs/trace-format.md, "Sites")
AXES = {"attn.q": ("head", "dim"), "hc_attn.comb": ("stream j (from)", "stream k (to)"),
        "hc_ffn.comb": ("stream j (from)", "stream k (to)"), "hc_attn.pre": ("stream",),
        "hc_attn.post": ("stream",), "hc_ffn.pre": ("stream",), "hc_ffn.post": ("stream",),
        "out": ("stream", "channel"), "hc_attn.out": ("stream", "channel"), "logits": ("vocabulary entry",),
        "mtp.logits": ("vocabulary entry",), "attn.indexer.scores": ("compressed entry",),
        "ffn.gate_scores": ("expert",), "ffn.expert_weights": ("slot",)}


def axis_names(kind: str, ndim: int) -> tuple[str, ...]:
    """The names of a site's axes: position (entry for compressed_kv) first, then its own."""
    first = "entry" if kind == "attn.compressed_kv" else "position"
    rest = AXES.get(kind, ("channel",) if ndim == 2 else tuple(f"axis {i}" for i in range(1, ndim)))
    return (first, *rest) if len(rest) == ndim - 1 else (first, *(f"axis {i}" for i in range(1, ndim)))


def _rms(x) -> float:
    return math.sqrt(float(np.mean(np.square(x)))) if np.size(x) else 0.0


def _g(x: float) -> str:
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.3e}"


def _ranges(idx) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (the first 8 runs; the count of the rest)."""
    idx = sorted(int(i) for i in idx)
    runs, start = [], idx[0]
    for p, q in zip(idx, idx[1:] + [None]):
        if q != p + 1:
            runs.append(f"{start}" if start == p else f"{start}-{p}")
            start = q
    more = f" and {len(runs) - 8} more runs" if len(runs) > 8 else ""
    return ", ".join(runs[:8]) + more


def _power_of_two(c: float) -> str:
    k = round(math.log2(abs(c))) if c != 0 else 0
    return f" (2^{k}: a power-of-two scale, e.g. a block-scale exponent, off by {k})" \
        if c != 0 and abs(abs(c) - 2.0 ** k) <= 1e-3 * abs(c) and k != 0 else ""


def site_hints(kind: str, a, b, *, layer: int | None = None, positions=None, facts: dict | None = None) -> list[str]:
    """The structural hints whose premise holds for candidate a against reference b (module docstring)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size < MIN_SLICE or a.ndim < 1:       # too few numbers to show a structure
        return []
    both_same = (a == b) | (np.isnan(a) & np.isnan(b))
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.all(finite | both_same):                   # a non-finite value facing a finite one
        return []                                        # (the report's worst element says so)
    a, b = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
    diff = _rms(a - b)
    if diff == 0.0:
        return []
    facts = dict(facts or {}, layer=layer)
    names = axis_names(kind, a.ndim)
    rows = list(range(a.shape[0])) if positions is None else [int(p) for p in positions]
    if len(rows) != a.shape[0]:                          # rows that are not positions (a site refimpl does not
        rows = None                                      # know, kept whole): no hint about positions
    hints = []
    explained = _sign_hint(a, b, diff, names, hints) or _factor_hints(a, b, diff, names, hints)
    if not explained:
        explained = _transpose_hint(a, b, diff, names, hints)
    if not explained:
        explained = _shift_hint(a, b, diff, names, rows, kind, hints)
    if not explained:
        _permutation_hint(a, b, diff, names, hints)
    if kind != "attn.compressed_kv" and rows is not None:
        _boundary_hint(a, b, names, rows, kind, facts, hints)
    _confined_hint(np.abs(a - b), names, kind, facts, hints)
    return hints


def _explains(a, x, diff) -> bool:
    return _rms(a - x) <= EXPLAINED * diff


def _factor_hints(a, b, diff, names, hints) -> bool:
    """A = c·B for one c (the whole site), else one c per index of one axis."""
    bb = float(np.sum(b * b))
    if bb == 0.0 or np.count_nonzero(b) < MIN_SLICE:          # a factor between a few numbers is no evidence
        return False
    c = float(np.sum(a * b)) / bb
    if _explains(a, c * b, diff) and abs(c - 1.0) > 1e-3:
        cos = float(np.sum(a * b)) / math.sqrt(bb * float(np.sum(a * a)))
        hints.append(f"A = c·B over the whole site with c = {_g(c)} (cosine {cos:.6f}){_power_of_two(c)}: "
                     f"a scale applied twice, missing or wrong (softmax scale, route_scale, a norm)")
        return True
    for axis in range(a.ndim):
        n = a.shape[axis]
        if n < 2 or a.size // n < MIN_SLICE:
            continue
        am, bm = np.moveaxis(a, axis, 0).reshape(n, -1), np.moveaxis(b, axis, 0).reshape(n, -1)
        bn = np.sum(bm * bm, axis=1)
        cs = np.where(bn > 0, np.sum(am * bm, axis=1) / np.where(bn > 0, bn, 1.0), 1.0)
        if np.all(np.abs(cs - 1.0) <= 1e-3) or not _explains(am, cs[:, None] * bm, diff):
            continue
        off = np.nonzero(np.abs(cs - 1.0) > 1e-3)[0]
        hints.append(f"A = c·B with one factor per {names[axis]} (axis {axis}): c from {_g(cs.min())} to "
                     f"{_g(cs.max())}, != 1 at {names[axis]} {_ranges(off)} ({len(off)} of {n}): a per-"
                     f"{names[axis]} scale differs (a norm's rsqrt or epsilon, a norm weight, a block scale)")
        return True
    for axis in range(1, a.ndim - 1):                    # per position and head (a per-head norm): [s, h, d]
        n = a.shape[0] * a.shape[axis]
        if a.shape[axis] < 2 or a.size // n < MIN_SLICE:
            continue
        am, bm = np.moveaxis(a, axis, 1).reshape(n, -1), np.moveaxis(b, axis, 1).reshape(n, -1)
        bn = np.sum(bm * bm, axis=1)
        cs = np.where(bn > 0, np.sum(am * bm, axis=1) / np.where(bn > 0, bn, 1.0), 1.0)
        if np.all(np.abs(cs - 1.0) <= 1e-3) or not _explains(am, cs[:, None] * bm, diff):
            continue
        hints.append(f"A = c·B with one factor per position and {names[axis]} (axes 0 and {axis}): c from "
                     f"{_g(cs.min())} to {_g(cs.max())}: a normalisation of each {names[axis]} differs (a "
                     f"per-{names[axis]} RMS norm missing, or its epsilon)")
        return True
    return False


def _sign_hint(a, b, diff, names, hints) -> bool:
    """|A| = |B| with all signs flipped, or some: which elements, and the axis indices they fill."""
    flipped = (np.sign(a) * np.sign(b)) < 0
    if np.count_nonzero(b) < MIN_SLICE or not flipped.any() or not _explains(a, np.where(flipped, -b, b), diff):
        return False
    if flipped.sum() == np.count_nonzero(b):
        hints.append("A = -B over the whole site (every sign flipped): a sign convention or a subtraction "
                     "the wrong way round")
        return True
    where = _confined_indices(flipped.astype(np.float64), names)
    hints.append(f"|A| = |B| with the sign flipped in {int(flipped.sum())} of {a.size} elements"
                 f"{'; ' + where if where else ''}: a sign convention (e.g. RoPE's rotation direction)")
    return True


def _transpose_hint(a, b, diff, names, hints) -> bool:
    """A = B with two axes of equal length swapped."""
    for i in range(1, a.ndim):
        for j in range(i + 1, a.ndim):
            if a.shape[i] == a.shape[j] > 1 and _explains(a, np.swapaxes(b, i, j), diff):
                hints.append(f"A is B transposed: axes {i} and {j} ({names[i]}, {names[j]}) swapped: a matrix "
                             f"read in the other orientation (row- vs column-major, [j, k] vs [k, j])")
                return True
    return False


def _shift_hint(a, b, diff, names, rows, kind, hints) -> bool:
    """A's index t holds B's t - 1 (or t + 1) along the position axis (consecutive positions only) or the last axis."""
    axes = [a.ndim - 1] if a.ndim > 1 else []
    consecutive = rows is not None and all(q == p + 1 for p, q in zip(rows, rows[1:]))
    if consecutive or kind == "attn.compressed_kv":
        axes = [0] + axes
    for axis in axes:
        n = a.shape[axis]
        if n < 3:
            continue
        for d, how in ((1, "t - 1 (A lags B by one)"), (-1, "t + 1 (A leads B by one)")):
            sa = np.take(a, range(d, n) if d > 0 else range(0, n - 1), axis=axis)
            sb = np.take(b, range(0, n - 1) if d > 0 else range(1, n), axis=axis)
            same = np.take(b, range(d, n) if d > 0 else range(0, n - 1), axis=axis)
            part = _rms(sa - same)
            if part > 0 and _explains(sa, sb, part):
                hints.append(f"A shifted by one along axis {axis} ({names[axis]}): A's {names[axis]} t holds B's "
                             f"{how}: an off-by-one index (a position, a start offset, an entry number)")
                return True
    return False


def _permutation_hint(a, b, diff, names, hints) -> bool:
    """A = B with the indices of one axis permuted. The candidate permutation pairs the slices of A and
    B along the axis in the order of their projections on one fixed direction (a permutation keeps the
    projections, and continuous values do not tie), then it must explain the difference."""
    if not _explains(np.sort(a, axis=None), np.sort(b, axis=None), diff):   # a permutation keeps the values
        return False
    for axis in range(a.ndim):
        n = a.shape[axis]
        if n < 2:
            continue
        am, bm = np.moveaxis(a, axis, 0).reshape(n, -1), np.moveaxis(b, axis, 0).reshape(n, -1)
        direction = np.random.default_rng(0).standard_normal(am.shape[1])     # fixed: the same hint every run
        p = np.empty(n, np.int64)
        p[np.argsort(am @ direction, kind="stable")] = np.argsort(bm @ direction, kind="stable")
        if np.array_equal(p, np.arange(n)) or not _explains(am, bm[p], diff):
            continue
        hints.append(f"A = B with the {names[axis]} indices (axis {axis}) permuted: A's index i holds B's "
                     f"p[i], {_describe_permutation(p)}: a layout read in another order")
        return True
    return False


def _describe_permutation(p) -> str:
    n, i = len(p), np.arange(len(p))
    if n % 2 == 0 and np.array_equal(p, i ^ 1):
        return "adjacent pairs swapped (p = 1, 0, 3, 2, ...)"
    if n % 2 == 0 and np.array_equal(p, (i + n // 2) % n):
        return f"the two halves swapped (p = {n // 2}, ..., {n - 1}, 0, ..., {n // 2 - 1})"
    h = n // 2
    if n % 2 == 0 and np.array_equal(p, np.where(i < h, 2 * i, 2 * (i - h) + 1)):
        return "interleaved pairs read as halves (p = 0, 2, 4, ..., 1, 3, 5, ...)"
    if n % 2 == 0 and np.array_equal(p, np.where(i % 2 == 0, i // 2, h + i // 2)):
        return "halves read as interleaved pairs (p = 0, h, 1, h + 1, ...)"
    moved = np.nonzero(p != i)[0]
    shown = ", ".join(f"{int(j)} <- {int(p[j])}" for j in moved[:8])
    return f"{len(moved)} of {n} indices moved ({shown}{', ...' if len(moved) > 8 else ''})"


def _boundary_hint(a, b, names, rows, kind, facts, hints) -> None:
    """Positions before t0 agree and t0 (with t0 - 1 present) is the window size or a compression boundary."""
    err = np.sqrt(np.mean(np.square(a - b).reshape(a.shape[0], -1), axis=1))
    top = float(err.max())
    dirty = np.nonzero(err > CLEAN * top)[0]
    r0 = int(dirty[0])
    if r0 == 0 or rows[r0 - 1] != rows[r0] - 1:          # the position before t0 is not in the trace
        return
    if not np.any(b[r0 - 1]):                            # it holds nothing (indexer scores before any entry):
        return                                           # its agreeing says nothing
    t0 = rows[r0]
    why = []
    w = facts.get("window_size")
    if isinstance(w, int) and not isinstance(w, bool) and w > 0:
        if t0 == w:
            why.append(f"t0 = {w} = the window size W: the first position whose window no longer holds position 0")
        elif abs(t0 - w) == 1:
            why.append(f"t0 = W {'+' if t0 > w else '-'} 1 with the window size W = {w}: one off the window boundary")
    ratios = facts.get("compress_ratios")
    if isinstance(ratios, list):
        ratios = [m if isinstance(m, int) and not isinstance(m, bool) and m > 0 else 0 for m in ratios]
        layer = facts.get("layer")
        own = ratios[layer] if layer is not None and 0 <= layer < len(ratios) else None
        ms = [own] if own else (sorted({m for m in ratios if m}) if layer is None else [])
        for m in ms:
            if (t0 + 1) % m == 0:
                why.append(f"t0 + 1 = {(t0 + 1) // m}·{m}: position {t0} completes compressed entry "
                           f"{(t0 + 1) // m - 1} of a ratio-{m} layer (the first position that sees it)")
            elif t0 % m == 0:
                why.append(f"t0 = {t0 // m}·{m}: one position after compressed entry {t0 // m - 1} of a "
                           f"ratio-{m} layer completes (a visibility off by one?)")
    if why:
        hints.append(f"the difference starts at position t0 = {t0} (positions up to {t0 - 1} agree): "
                     + "; ".join(why))


def _confined(e, names) -> list[tuple[int, np.ndarray, str]]:
    """Where an error map e [rows, ...] lives: (axis, the indices that differ, 'head 2, 5 (2 of 8; ...)') for
    each axis after the first whose indices split in two: sorted by error, the highest cut that leaves at
    least a quarter of them below it (so at most 3/4 above it) and whose largest error below is at most
    CLEAN times the median error above it (two orders of magnitude). Each index needs at least three elements
    (a value or two agree by chance, as bf16 ones often do)."""
    found = []
    for axis in range(1, e.ndim):
        n = e.shape[axis]
        if n < 2 or e.size // n < 3:
            continue
        per = np.sqrt(np.mean(np.square(np.moveaxis(e, axis, 0).reshape(n, -1)), axis=1))
        srt = np.sort(per)
        above = lambda k: 0.5 * float(srt[(k + n) // 2] + srt[(k + n + 1) // 2])   # noqa: E731 median of srt[k+1:]
        cut = next((k for k in range(n - 2, -(-n // 4) - 2, -1) if srt[k] <= CLEAN * above(k) and srt[k + 1] > 0),
                   None)
        if cut is None:
            continue
        dirty = np.nonzero(per > srt[cut])[0]                # at most 3/4 of them: the cut leaves a quarter below
        rest = "agree" if srt[cut] == 0 else f"differ at least {_g(above(cut) / srt[cut])}x less than the median of these"
        found.append((axis, dirty, f"{names[axis]} {_ranges(dirty)} ({len(dirty)} of {n}; the other "
                                   f"{n - len(dirty)} {rest})"))
    return found


def _confined_indices(e, names) -> str:
    return "; ".join(text for _, _, text in _confined(e, names))


def _confined_hint(e, names, kind, facts, hints) -> None:
    found = _confined(e, names)
    if not found:
        return
    rope, d = facts.get("rope_head_dim"), e.shape[-1]
    extra = ""
    if kind in ("attn.q", "attn.kv", "attn.compressed_kv") and isinstance(rope, int) and 0 < rope < d:
        last = [dirty for axis, dirty, _ in found if axis == e.ndim - 1]
        if last and last[0].min() >= d - rope:
            extra = f" (within the rotary dims {d - rope}-{d - 1}: a RoPE fault)"
    hints.append(f"the difference is confined to {'; '.join(t for _, _, t in found)}{extra}")
