"""The assertion: a candidate's outputs against the reference, with the bound, the place and a hint.

    assert_matches(mine, op, inputs, precision)    raises MismatchError (an AssertionError) naming, per output,
                                                    how many elements are out of bound, the worst one (index,
                                                    value, exact value, distance, bound and where the bound
                                                    came from) and the structural hints (hints.py)
    check_op(impl, op, precision, max_examples)    a Hypothesis property test of impl on the record's strategy

Float outputs: within tolerance.noise_bound of the float64 reference. Integer outputs that choose
by a score (top-k ids, expert ids: `OpRecord.selections`): equal to the reference at the
candidate's precision, slot by slot, except that two entries whose exact scores are within the
score output's bound may trade places — unless their scores tie exactly (in float64 and at the
candidate's precision): exact ties follow refimpl's rule, the lower index first. Records marked
`exact` (number formats) are compared bit for bit.
"""
from __future__ import annotations

import numpy as np
from hypothesis import event, given, settings

from refimpl.testing.hints import structural_hints
from refimpl.testing.record import OpRecord, op as get_op
from refimpl.testing.tolerance import noise_bound


class MismatchError(AssertionError):
    """A candidate's output is out of the kit's bound (the message says where, how far and against what)."""


def as_outputs(mine, rec: OpRecord) -> dict:
    """A candidate's result (one array, a tuple in `rec.outputs` order, or a dict) as {output name: array}."""
    if isinstance(mine, dict):
        missing = [k for k in rec.outputs if k not in mine]
        if missing:
            raise MismatchError(f"{rec.name}: the result has no output {', '.join(missing)} "
                                f"(expected {', '.join(rec.outputs)})")
        return {k: mine[k] for k in rec.outputs}
    if len(rec.outputs) == 1 and not isinstance(mine, (tuple, list)):
        return {rec.outputs[0]: mine}
    if not isinstance(mine, (tuple, list)) or len(mine) != len(rec.outputs):
        raise MismatchError(f"{rec.name}: expected {len(rec.outputs)} outputs ({', '.join(rec.outputs)}), "
                            f"got {type(mine).__name__}" + (f" of {len(mine)}" if isinstance(mine, (tuple, list)) else ""))
    return dict(zip(rec.outputs, mine))


def axis_names(rec: OpRecord, name: str, ndim: int) -> tuple:
    """The names of an output's axes (a record may list one tuple per number of axes the output can have)."""
    names = rec.axes.get(name, ())
    options = names if names and isinstance(names[0], tuple) else (names,)
    return next((n for n in options if len(n) == ndim), ())


def _float64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)                    # bf16 / fp8 ml_dtypes arrays convert exactly


def _check_float(rec, name, got, exact, approx, precision, hint: bool = True) -> str | None:
    axes = axis_names(rec, name, exact.ndim)
    if got.shape != exact.shape:
        msg = f"{rec.name}.{name}: shape {got.shape}, expected {exact.shape}"
        if got.ndim == exact.ndim >= 2 and got.shape[-2:] == exact.shape[-2:][::-1]:
            msg += " (the last two axes swapped: a transposed result?)"
        return msg
    got = _float64(got)
    if rec.exact:
        bound_arr = np.zeros(exact.shape[:-1] + (1,)) if exact.ndim else np.zeros(())
        explain = lambda idx: "bound 0 (an exact format operation: bit for bit)"          # noqa: E731
    else:
        b = noise_bound(exact, approx, precision)
        bound_arr, explain = b.bound.reshape(exact.shape[:-1] + (1,)) if exact.ndim else b.bound.reshape(()), b.explain
    inf = ~np.isfinite(exact)
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - exact)
        bad = ~(diff <= bound_arr) & ~inf                       # NaN in got: bad
    bad |= inf & (got != exact)
    if got.ndim == 0:
        bad, diff, got, exact = bad.reshape(1), diff.reshape(1), got.reshape(1), exact.reshape(1)
        bound_arr = np.asarray(bound_arr).reshape(1)
    if not bad.any():
        return None
    if not hint:
        return "out of bound"
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        score = np.where(bad, np.nan_to_num(diff / np.maximum(np.broadcast_to(bound_arr, got.shape), 1e-300),
                                            nan=np.inf, posinf=np.inf), -1.0)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(score)), got.shape))
    where = ", ".join(f"{axes[a].split()[0] if a < len(axes) else a}={i}" for a, i in enumerate(worst))
    lines = [f"{rec.name}.{name} at {precision}: {int(bad.sum())} of {bad.size} elements out of bound",
             f"  worst at [{where}]: got {got[worst]:.9g}, exact {exact[worst]:.9g}, |diff| {diff[worst]:.3g}; "
             f"{explain(worst)}"]
    fin = np.isfinite(exact)
    hints = structural_hints(np.where(fin, got, 0.0), np.where(fin, exact, 0.0),
                             np.broadcast_to(bound_arr, got.shape), bad, axes)
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)


def suspect_hints(rec: OpRecord, got: dict, inputs: dict, precision: str) -> list[str]:
    """The record's known field bugs (`OpRecord.suspects`) whose reference, run on the inputs as the bug reads
    them, the candidate matches within the bound: "the result is what <bug> computes"."""
    found = []
    for text, transform in rec.suspects:
        try:
            changed = transform(inputs)
            if changed is None:
                continue
            exact = rec.reference(changed, "float64" if "float64" in rec.precisions else precision)
            approx = exact if precision == "float64" or rec.exact else rec.reference(changed, precision)
        except (ValueError, IndexError):
            continue
        if all(_check_float(rec, k, got[k], exact[k].astype(np.float64), approx[k].astype(np.float64), precision,
                            hint=False) is None for k in rec.outputs if k not in rec.selections):
            found.append(f"hint: known bug: the result is what {text} computes")
    return found


def _check_selection(rec, name, got, want, scores_exact, scores_approx, precision) -> str | None:
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"{rec.name}.{name}: shape {got.shape}, expected {want.shape}"
    if got.dtype.kind not in "iu":
        return f"{rec.name}.{name}: expected integer ids, got dtype {got.dtype}"
    got = got.astype(np.int64)
    if np.array_equal(got, want):
        return None
    b = noise_bound(scores_exact, scores_approx, precision)
    n = scores_exact.shape[-1]
    bad_rows, ties_up, worst = 0, 0, None
    for row in zip(*np.nonzero((got != want).any(axis=-1))):
        ok = True
        for j in np.flatnonzero(got[row] != want[row]):
            a, r = int(got[row + (j,)]), int(want[row + (j,)])
            if a < 0 or r < 0 or a >= n:
                ok = False
                break
            sa, sr = scores_exact[row + (a,)], scores_exact[row + (r,)]
            pa, pr = scores_approx[row + (a,)], scores_approx[row + (r,)]
            if sa == sr and pa == pr:                           # an exact tie: the lower index first
                ties_up += a > r
                ok = False
                break
            if not abs(sa - sr) <= float(b.bound[row + (0,)]):
                ok = False
                break
        if not ok:
            bad_rows += 1
            worst = worst or (row, j, a, r)
    if not bad_rows:
        return None
    row, j, a, r = worst
    lines = [f"{rec.name}.{name} at {precision}: {bad_rows} of {int(np.prod(got.shape[:-1]))} rows choose differently",
             f"  first at row {list(row)}, slot {j}: got {a}, expected {r}"
             + (f" (scores {scores_exact[row + (a,)]:.9g} vs {scores_exact[row + (r,)]:.9g})" if 0 <= a < n and r >= 0 else "")]
    if ties_up:
        lines.append(f"  hint: ties: {ties_up} exact tie(s) resolved to the HIGHER index; refimpl's rule (and the "
                     "stable order this kit checks) puts the lower index first")
    return "\n".join(lines)


def _check_bits(rec, name, got, want) -> str | None:
    """mirror, bitwise: refimpl's mirror bits, except rounding-boundary flips (one bf16 unit, one element in 1000)."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"{rec.name}.{name}: shape {got.shape}, expected {want.shape}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    if same.all():
        return None
    with np.errstate(invalid="ignore"):
        flip = ~same & (np.abs(g - w) <= np.abs(w) * 2.0**-7)     # one bf16 unit (8 significant bits)
    if (~same & ~flip).any() or flip.sum() > max(1, w.size // 1000):
        i = tuple(int(v) for v in np.argwhere(~same)[0])
        return (f"{rec.name}.{name} at mirror (bitwise): {int((~same).sum())} of {w.size} elements differ from "
                f"refimpl's mirror result; first at {list(i)}: got {g[i]:.9g}, mirror {w[i]:.9g}")
    return None


def assert_matches(mine, op, inputs: dict, precision: str = "float32", *, bitwise: bool = False) -> None:
    """Raise MismatchError unless `mine` (the candidate's outputs on `inputs`) matches the reference of `op`
    at the candidate's `precision` (module docstring). op: a name of refimpl.testing.OPS or a record. A record
    marked `exact` (act_quant_fp8) is compared bit for bit with its one precision, whatever `precision` says.

    bitwise (mirror only): also require refimpl's mirror bits, up to rare one-unit rounding-boundary flips
    (the default bound admits any implementation as close to the exact value as mirror's own error)."""
    rec = get_op(op)
    got = as_outputs(mine, rec)
    if bitwise and precision != "mirror":
        raise ValueError("bitwise=True compares with refimpl's mirror bits: use it with precision='mirror'")
    if rec.exact:
        precision = rec.precisions[0]
    exact = rec.reference(inputs, "float64" if "float64" in rec.precisions else precision)
    approx = exact if precision == "float64" or rec.exact else rec.reference(inputs, precision)
    problems = []
    for name in rec.outputs:
        if name in rec.selections:
            s = rec.selections[name]
            p = _check_selection(rec, name, got[name], approx[name], exact[s].astype(np.float64),
                                 approx[s].astype(np.float64), precision)
        else:
            p = _check_float(rec, name, got[name], exact[name].astype(np.float64),
                             approx[name].astype(np.float64), precision)
        if p:
            problems.append(p)
        elif bitwise and name not in rec.selections:
            p = _check_bits(rec, name, got[name], approx[name])
            if p:
                problems.append(p)
    if problems:
        problems += [f"  {h}" for h in suspect_hints(rec, got, inputs, precision)]
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in inputs.items() if np.ndim(v))
        problems.append(f"  inputs: {shapes}")
        raise MismatchError("\n".join(problems))


def check_op(impl, op, precision: str = "float32", *, max_examples: int = 50, derandomize: bool = False,
             bitwise: bool = False) -> None:
    """Property-test `impl(inputs) -> outputs` against the record on its strategy (Hypothesis: shrinks a
    failure to a small input). Each example's edge cases are Hypothesis events (--hypothesis-show-statistics)."""
    rec = get_op(op)
    if rec.exact:
        precision = rec.precisions[0]               # a format operation: bit for bit, in its one precision
    if precision not in rec.precisions:
        raise ValueError(f"{rec.name}: precision {precision!r} is not one of {rec.precisions}")
    strategy = rec.strategy(precision)

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None)
    @given(inputs=strategy)
    def run(inputs):
        for label in sorted(rec.edges(inputs)):
            event(f"{rec.name}: {label}")
        assert_matches(impl(inputs), rec, inputs, precision, bitwise=bitwise)
    run()
