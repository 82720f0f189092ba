"""Comparing two corpora (candidate A, reference B) prompt by prompt: KL, top-1, the first greedy split.

    refimpl compare CANDIDATE_DIR REFERENCE_DIR [--profile NAME] [--top-n N] [--json] [--plot PNG]

A corpus folder is what `refimpl golden make` writes (corpus.py), or a candidate's folder written
without refimpl in this layout (docs/corpora.md):

    prompts/{id}.safetensors    per prompt: `logits` [s, v] (F64, F32, F16 or BF16), or the compact form
                                `logits.top_k.values` [s, k], `logits.top_k.ids` [s, k] (I32/I64) and
                                `logits.logsumexp` [s]; and the prompt's token ids, as a `tokens` [s]
                                integer tensor or as "tokens" in a "refimpl" JSON metadata entry
    manifest.json               optional (refimpl's names the precision, used to choose the profile)

Per position t of a prompt: KL(P_B || P_A) = Σ_i p_B(i) (log p_B(i) - log p_A(i)) in float64 over
the whole vocabulary where both sides keep whole rows. Where one side keeps its top k only, the
sum runs over the ids whose log-probability both sides know, plus one term for all the other ids
together (p_rest = 1 - Σ p over the known ids): the KL of the coarser distribution, never larger
than the full one (the data-processing inequality), and equal to it when both rows are whole. A
rest below 4e-16 per known id is rounding: it counts as 0 in the reference and as 4e-16 per
known id in the candidate (a candidate that leaves no mass where the reference has some gets a
large, finite KL).
Top-1 agreement counts positions whose largest logits have the same id (ties: the lower id). At the
first position where the greedy choices differ, both sides' margins (largest minus second largest
log-probability) and whether each side's choice is in the other's top N are reported: a split at a
near-tie is expected of a correct implementation, a split at a wide margin is not.

The verdict applies a profile (CORPUS_PROFILES) to the whole corpus: bounds on the mean and the
largest KL and on the top-1 agreement; a reference prompt the candidate lacks fails it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.formats.files import parse_json, write_bytes
from refimpl.oracle.corpus import MANIFEST, PROMPTS, read_manifest

# Corpus profiles: the bounds a candidate corpus must meet against a reference corpus, from corpora
# of the tiny model (docs/corpora.md, "Profiles and calibration"): float32's stand about 1000 times
# above refimpl's own float32-vs-float64 KL and orders of magnitude below a planted one-layer bug.
CORPUS_PROFILES = {
    # refimpl against refimpl in the same precision: the same numbers
    "mirror-vs-mirror": {"kl_mean": 0.0, "kl_max": 0.0, "top1_min": 1.0},
    "float64-vs-float64": {"kl_mean": 0.0, "kl_max": 0.0, "top1_min": 1.0},
    # a float32 implementation against the float64 reference
    "float32-vs-float64": {"kl_mean": 1e-9, "kl_max": 1e-8, "top1_min": 0.99},
    # the official roundings against exact arithmetic; loose: on the tiny model's nearly flat distributions
    # bf16 rounding alone moves a quarter of the greedy choices (docs/corpora.md, "Calibration")
    "mirror-vs-float64": {"kl_mean": 0.1, "kl_max": 1.0, "top1_min": 0.5},
    # a bf16 inference engine against refimpl's mirror corpus: as loose, until measured on the real checkpoint
    "bf16-engine-vs-mirror": {"kl_mean": 0.1, "kl_max": 1.0, "top1_min": 0.5},
}


class CorpusCompareError(ValueError):
    """Two corpus folders that cannot be compared (a missing file, other tokens, a malformed prompt file)."""


@dataclass
class Rows:
    """One side's log-probabilities of one prompt: whole rows [s, v], or the top k of each row."""
    lp: np.ndarray                      # [s, v] or [s, k] float64 log-probabilities
    ids: np.ndarray | None              # None (whole rows) or [s, k] int64 ids of the kept entries
    vocab: int | None                   # v, where known

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """-> ([s, n] ids, [s, n] log-probabilities) of the n largest of each row (ties: lower id first)."""
        if self.ids is None:
            order = np.argsort(-self.lp, axis=-1, kind="stable")[:, :n]
            return order, np.take_along_axis(self.lp, order, axis=-1)
        return self.ids[:, :n], self.lp[:, :n]


def _read_rows(path: Path) -> tuple[Rows, list[int]]:
    """The log-probabilities and token ids of one prompt file (either form); CorpusCompareError if malformed."""
    try:
        f = SafetensorsFile(path)
        meta = parse_json(f.metadata.get("refimpl", "{}"))
    except (ValueError, RecursionError) as e:
        raise CorpusCompareError(f"{path}: not a prompt file ({str(e)[:200]})") from None
    if "tokens" in f.tensors:
        tokens = [int(t) for t in np.asarray(f.get("tokens")).reshape(-1)]
    elif isinstance(meta, dict) and isinstance(meta.get("tokens"), list):
        tokens = meta["tokens"]
    else:
        raise CorpusCompareError(f"{path}: no token ids (a `tokens` tensor or 'tokens' in the refimpl metadata)")
    s = len(tokens)
    if "logits" in f.tensors:
        x = np.asarray(f.get("logits")).astype(np.float64)                 # exact upcast of any float format
        if x.ndim != 2 or x.shape[0] != s:
            raise CorpusCompareError(f"{path}: logits of shape {list(x.shape)}, expected [{s}, vocab]")
        top = x.max(axis=-1, keepdims=True)
        lp = x - (top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True)))
        rows = Rows(lp, None, x.shape[1])
    elif all(k in f.tensors for k in ("logits.top_k.values", "logits.top_k.ids", "logits.logsumexp")):
        v = np.asarray(f.get("logits.top_k.values")).astype(np.float64)
        ids = np.asarray(f.get("logits.top_k.ids")).astype(np.int64)
        lse = np.asarray(f.get("logits.logsumexp")).astype(np.float64)
        if v.ndim != 2 or v.shape != ids.shape or v.shape[0] != s or lse.shape != (s,):
            raise CorpusCompareError(f"{path}: top-k tensors of shapes {list(v.shape)}, {list(ids.shape)}, "
                                     f"{list(lse.shape)}; expected [{s}, k], [{s}, k], [{s}]")
        rows = Rows(v - lse[:, None], ids, None)
    else:
        raise CorpusCompareError(f"{path}: holds neither `logits` nor the top-k form (docs/corpora.md)")
    if not np.all(np.isfinite(rows.lp) | (rows.lp == -np.inf)) or np.isnan(rows.lp).any():
        raise CorpusCompareError(f"{path}: NaN or +Inf among the logits")
    return rows, tokens


def kl_rows(b: Rows, a: Rows) -> np.ndarray:
    """KL(P_B || P_A) per position [s] (float64); on the ids both sides know, plus the rest (module docstring)."""
    if b.ids is None and a.ids is None:
        if b.lp.shape != a.lp.shape:
            raise CorpusCompareError(f"vocabularies differ: {b.lp.shape[1]} and {a.lp.shape[1]} logits per row")
        p = np.exp(b.lp)
        with np.errstate(invalid="ignore"):                  # p = 0 where log p = -inf: the term is 0
            terms = np.where(p > 0, p * (b.lp - a.lp), 0.0)
        return np.sum(terms, axis=-1)
    out = np.empty(b.lp.shape[0])
    for t in range(b.lp.shape[0]):
        lb, la = _known(b, t), _known(a, t)
        common = sorted(set(lb) & set(la))
        xb = np.array([lb[i] for i in common])                 # [n] log p_B of the ids both sides know
        xa = np.array([la[i] for i in common])                 # [n] log p_A
        kl = float(np.sum(np.exp(xb) * (xb - xa))) if common else 0.0
        # the rest's mass, 1 - Σ p = -expm1(log Σ p); below `floor` it is rounding, not mass
        floor = 4e-16 * max(len(common), 1)
        rest_b, rest_a = (-np.expm1(_logsumexp(x)) if x.size else 1.0 for x in (xb, xa))
        if rest_b > floor:
            kl += rest_b * (np.log(rest_b) - np.log(max(rest_a, floor)))
        out[t] = kl
    return out


def _logsumexp(x: np.ndarray) -> float:
    top = float(np.max(x))
    return top + float(np.log(np.sum(np.exp(x - top)))) if np.isfinite(top) else top


def _known(r: Rows, t: int) -> dict[int, float]:
    """id -> log-probability of every entry row t keeps."""
    if r.ids is None:
        return dict(enumerate(r.lp[t].tolist()))
    return dict(zip(r.ids[t].tolist(), r.lp[t].tolist()))


@dataclass
class PromptResult:
    id: str
    tokens: int
    kl: np.ndarray                              # [s] per position
    top1: float                                 # fraction of positions with the same greedy choice
    first_split: dict | None                    # the first position where the greedy choices differ

    def to_json(self) -> dict:
        return {"id": self.id, "tokens": self.tokens, **_stats(self.kl), "top1": self.top1,
                "first_split": self.first_split}


def _stats(kl: np.ndarray) -> dict:
    return {"kl_mean": float(np.mean(kl)), "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(np.max(kl))}


def compare_prompt(pid: str, a: Rows, b: Rows, tokens: list[int], top_n: int) -> PromptResult:
    """Candidate a against reference b on one prompt."""
    kl = kl_rows(b, a)
    ia, la = a.top(max(top_n, 2))
    ib, lb = b.top(max(top_n, 2))
    same = ia[:, 0] == ib[:, 0]
    split = None
    if not same.all():
        t = int(np.argmin(same))
        split = {"position": t, "candidate_token": int(ia[t, 0]), "reference_token": int(ib[t, 0]),
                 "candidate_margin": float(la[t, 0] - la[t, 1]) if la.shape[1] > 1 else None,
                 "reference_margin": float(lb[t, 0] - lb[t, 1]) if lb.shape[1] > 1 else None,
                 "candidate_token_in_reference_top_n": bool(ia[t, 0] in ib[t, :top_n]),
                 "reference_token_in_candidate_top_n": bool(ib[t, 0] in ia[t, :top_n]),
                 "next_token": int(tokens[t + 1]) if t + 1 < len(tokens) else None}
    return PromptResult(pid, len(tokens), kl, float(np.mean(same)), split)


@dataclass
class CorpusReport:
    a: str
    b: str
    profile: str
    bounds: dict
    top_n: int
    prompts: list[PromptResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)     # reference prompts the candidate lacks
    extra: list[str] = field(default_factory=list)       # candidate prompts the reference lacks (not compared)

    @property
    def kl(self) -> np.ndarray:
        return np.concatenate([p.kl for p in self.prompts]) if self.prompts else np.zeros(0)

    @property
    def top1(self) -> float:
        n = sum(p.tokens for p in self.prompts)
        return sum(p.top1 * p.tokens for p in self.prompts) / n if n else 0.0

    def failures(self) -> list[str]:
        """Why the verdict fails (empty: it passes)."""
        why = []
        if self.missing:
            why.append(f"{len(self.missing)} reference prompt(s) missing from the candidate ({', '.join(self.missing[:3])})")
        if not self.prompts:
            return why + ["no prompt compared"]
        s = _stats(self.kl)
        for key in ("kl_mean", "kl_max"):
            if not s[key] <= self.bounds[key]:
                why.append(f"{key.replace('_', ' ')} {s[key]:.3g} > {self.bounds[key]:.3g}")
        if self.top1 < self.bounds["top1_min"]:
            why.append(f"top-1 agreement {self.top1:.4f} < {self.bounds['top1_min']}")
        return why

    @property
    def ok(self) -> bool:
        return not self.failures()

    def worst(self) -> tuple[str, int] | None:
        """(prompt, position) of the largest KL."""
        if not self.prompts:
            return None
        p = max(self.prompts, key=lambda r: float(np.max(r.kl)))
        return p.id, int(np.argmax(p.kl))

    def to_json(self) -> dict:
        worst = self.worst()
        return {"kind": "corpus", "candidate": self.a, "reference": self.b, "profile": self.profile,
                "bounds": self.bounds, "top_n": self.top_n, "ok": self.ok, "failures": self.failures(),
                "overall": {"prompts": len(self.prompts), "tokens": int(self.kl.size),
                            **(_stats(self.kl) if self.prompts else {}), "top1": self.top1,
                            "worst": {"prompt": worst[0], "position": worst[1]} if worst else None,
                            "prompts_with_a_split": sum(p.first_split is not None for p in self.prompts)},
                "missing": self.missing, "extra": self.extra, "prompts": [p.to_json() for p in self.prompts]}


def _precision_of(folder: Path) -> str | None:
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return read_manifest(folder)["run"]["precision"]
    except (ValueError, KeyError, TypeError):
        return None


def auto_profile(pa: str | None, pb: str | None) -> str:
    """The profile for a candidate of precision pa against a reference of precision pb (None: not recorded)."""
    if pa is None:                                  # a corpus written without refimpl: an engine
        return "float32-vs-float64" if pb == "float64" else "bf16-engine-vs-mirror"
    name = f"{pa}-vs-{pb}"
    if name in CORPUS_PROFILES:
        return name
    if pb == "float64":
        return "mirror-vs-float64"
    raise CorpusCompareError(f"no corpus profile for a {pa} candidate against a {pb} reference; the reference "
                             f"should be float64 or mirror, or name one with --profile ({', '.join(CORPUS_PROFILES)})")


def prompt_ids(folder: Path) -> list[str]:
    """The prompt ids of a corpus folder: its manifest's order, else its prompt files' names, sorted."""
    if (folder / MANIFEST).is_file():
        try:
            return [p["id"] for p in read_manifest(folder)["prompts"]]
        except ValueError as e:
            raise CorpusCompareError(str(e)) from None
    return sorted(p.name[:-len(".safetensors")] for p in (folder / PROMPTS).glob("*.safetensors"))


def compare_corpora(a, b, *, profile: str = "auto", top_n: int = 5) -> CorpusReport:
    """Corpus A (candidate) against corpus B (reference) -> CorpusReport (docstring above)."""
    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not (folder / PROMPTS).is_dir():
            raise CorpusCompareError(f"{folder}: not a corpus folder (no {PROMPTS}/ folder of prompt files; "
                                     "docs/corpora.md)")
    if not (isinstance(top_n, int) and top_n >= 1):
        raise CorpusCompareError(f"top_n must be an integer >= 1, got {top_n!r:.40}")
    if profile == "auto":
        profile = auto_profile(_precision_of(a), _precision_of(b))
    if profile not in CORPUS_PROFILES:
        raise CorpusCompareError(f"unknown corpus profile {profile!r:.60}; profiles: auto, {', '.join(CORPUS_PROFILES)}")
    ids_b = prompt_ids(b)
    if not ids_b:
        raise CorpusCompareError(f"{b}: the reference holds no prompt")
    have_a = {p.name[:-len(".safetensors")] for p in (a / PROMPTS).glob("*.safetensors")}
    report = CorpusReport(str(a), str(b), profile, CORPUS_PROFILES[profile], top_n,
                          missing=[i for i in ids_b if i not in have_a], extra=sorted(have_a - set(ids_b)))
    for pid in ids_b:
        if pid not in have_a:
            continue
        rb, tb = _read_rows(b / PROMPTS / f"{pid}.safetensors")
        ra, ta = _read_rows(a / PROMPTS / f"{pid}.safetensors")
        if ta != tb:
            raise CorpusCompareError(f"prompt {pid}: the two corpora ran other tokens ({len(ta)} and {len(tb)} tokens"
                                     f"{'' if len(ta) != len(tb) else ', first difference at position ' + str(next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y))})")
        report.prompts.append(compare_prompt(pid, ra, rb, tb, top_n))
    return report


def _g(x) -> str:
    return "0" if x == 0 else f"{x:.3g}"


def format_report(r: CorpusReport) -> str:
    """The report as text: one line per prompt, the overall figures, the first greedy split, the verdict."""
    lines = [f"corpus compare: candidate {r.a}, reference {r.b}, profile {r.profile}", "",
             f"{'prompt':24s} {'tokens':>6s} {'KL mean':>9s} {'median':>9s} {'p99':>9s} {'max':>9s} {'top-1':>6s}  "
             "first greedy split"]
    for p in r.prompts:
        s = _stats(p.kl)
        split = "-"
        if p.first_split:
            f = p.first_split
            split = (f"pos {f['position']}: {f['candidate_token']} (margin {_g(f['candidate_margin'])}) vs "
                     f"{f['reference_token']} (margin {_g(f['reference_margin'])})")
        lines.append(f"{p.id[:24]:24s} {p.tokens:6d} {_g(s['kl_mean']):>9s} {_g(s['kl_median']):>9s} "
                     f"{_g(s['kl_p99']):>9s} {_g(s['kl_max']):>9s} {p.top1:6.3f}  {split}")
    if r.prompts:
        s, worst = _stats(r.kl), r.worst()
        lines += ["", f"overall: {len(r.prompts)} prompts, {r.kl.size} positions; KL mean {_g(s['kl_mean'])}, median "
                      f"{_g(s['kl_median'])}, p99 {_g(s['kl_p99'])}, max {_g(s['kl_max'])} (prompt {worst[0]}, "
                      f"position {worst[1]}); top-1 agreement {r.top1:.4f}"]
        first = next((p for p in r.prompts if p.first_split), None)
        if first:
            f = first.first_split
            lines.append(f"first greedy split: prompt {first.id}, position {f['position']}: candidate "
                         f"{f['candidate_token']} ({'in' if f['candidate_token_in_reference_top_n'] else 'not in'} the "
                         f"reference's top {r.top_n}), reference {f['reference_token']} "
                         f"({'in' if f['reference_token_in_candidate_top_n'] else 'not in'} the candidate's top {r.top_n})")
    if r.missing:
        lines.append(f"missing from the candidate: {', '.join(r.missing[:10])}{' ...' if len(r.missing) > 10 else ''}")
    if r.extra:
        lines.append(f"not in the reference (not compared): {', '.join(r.extra[:10])}")
    why = r.failures()
    lines += ["", f"within the corpus profile {r.profile}" if not why else
              f"OUT OF the corpus profile {r.profile}: " + "; ".join(why)]
    return "\n".join(lines)


def plot_report(r: CorpusReport, path) -> None:
    """A PNG of the KL by position: the mean over prompts and the largest (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max((p.kl.size for p in r.prompts), default=0)
    mean = np.array([np.mean([p.kl[t] for p in r.prompts if t < p.kl.size]) for t in range(n)])
    worst = np.array([np.max([p.kl[t] for p in r.prompts if t < p.kl.size]) for t in range(n)])
    fig, ax = plt.subplots(figsize=(8, 4))
    floor = 1e-300
    ax.semilogy(np.arange(n), np.maximum(mean, floor), label="mean over prompts")
    ax.semilogy(np.arange(n), np.maximum(worst, floor), label="max over prompts", alpha=0.7)
    ax.axhline(max(r.bounds["kl_max"], floor), color="red", ls="--", lw=0.8, label=f"{r.profile}: KL max bound")
    ax.set_xlabel("position")
    ax.set_ylabel("KL(reference || candidate)")
    ax.set_title(f"{Path(r.a).name} vs {Path(r.b).name}: {'ok' if r.ok else 'OUT of tolerance'}")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(path, png.getvalue())                      # atomically


def report_json(r: CorpusReport) -> str:
    return json.dumps(r.to_json(), indent=1)
