"""Gradient traces: the gradients of one loss written as a trace file, and two of them compared.

A gradient trace is a safetensors file in the layout of a forward trace (docs/trace-format.md):
one float64 tensor per name, batch axis dropped, plus JSON metadata under "refimpl" with
"kind": "gradients". Names:

    grad.<site>              the loss's gradient with respect to a forward site (grad.layers.0.attn.q)
    grad.<checkpoint name>   with respect to a parameter (grad.layers.0.attn.wq_a.weight: its dequantized matrix)

`compare_gradients` walks the names in the backward's data-flow order, from the loss towards the
embedding (`backward_order`), and names the first one out of tolerance: a gradient bug shows
first where it is made, and everything after it inherits it. The tolerance is relative to the
reference tensor's largest magnitude (RTOL), as both sides are float64 (docs/gradients.md).
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field

import numpy as np

from refimpl._version import __version__
from refimpl.formats.checkpoint import CheckpointError, SafetensorsFile, write_safetensors
from refimpl.formats.weights import expected_tensors
from refimpl.grad import backward
from refimpl.oracle.trace import TRACE_FORMAT_VERSION
from refimpl.sites import site_names

KIND = "gradients"
RTOL = 1e-9          # max |a - b| <= RTOL · max |b| per tensor: float64 gradients summed in another order agree far closer


class GradTraceError(ValueError):
    """A gradient trace that cannot be written, read or compared, with the reason."""


# ---------------------------------------------------------------- writing

def run_grad_trace(model, tokens, *, head: str = "main", targets=None, patterns: tuple[str, ...] = ("*",)):
    """The gradients of one head's next-token loss as (tensors {name: [s, ...] float64}, metadata).

    head "main": position t predicts token t+1 (targets default: tokens[1:], the last position left out);
    head "mtp": position t predicts token t+2 (targets default: tokens[2:], s-1 of them, the last left out).
    patterns: globs over the names (grad.<site>, grad.<parameter>); at least one must match.
    """
    if head not in ("main", "mtp"):
        raise GradTraceError(f"head must be 'main' or 'mtp', got {head!r}")
    ids = [int(t) for t in model.check_tokens(tokens)]
    known = gradient_names(model.cfg)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in known)]
    if unmatched:                                             # checked before the run: a typo would keep nothing
        raise GradTraceError(f"pattern(s) {unmatched} match no gradient of this model (e.g. 'grad.layers.0.attn.q', "
                             f"'grad.layers.*.attn.wq_a.weight', 'grad.embed')")
    if targets is None:
        shift = 1 if head == "main" else 2
        targets = ids[shift:] + [-1]
    g = backward(model, ids, targets) if head == "main" else backward(model, ids, mtp_targets=targets)
    tensors = {**g.sites, **{f"grad.{k}": v for k, v in g.params.items()}}
    kept = {k: v for k, v in tensors.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    meta = {"format_version": TRACE_FORMAT_VERSION, "kind": KIND, "implementation": f"refimpl {__version__}",
            "refimpl": __version__, "config_id": model.config_id, "n_layers": model.cfg.n_layers,
            "precision": "float64", "revision": model.revision, "layout": model.layout, "tokens": ids,
            "head": head, "targets": [int(t) for t in targets],
            "loss": g.loss if head == "main" else g.mtp_loss}
    return kept, meta


def gradient_names(cfg) -> list[str]:
    """Every name a gradient trace of cfg can hold: grad.<differentiable site>, grad.<float parameter>."""
    choosing = (".indexer.scores", ".indexer.topk", ".gate_scores", ".expert_ids")
    sites = [f"grad.{n}" for n in site_names(cfg) if not n.endswith(choosing)]
    params = [f"grad.{n}" for n, spec in expected_tensors(cfg).items()
              if not n.endswith(".scale") or spec.dtype != "F8_E8M0"]
    return sites + [n for n in params if not n.endswith(".tid2eid")]


def save_grad_trace(path, tensors: dict, meta: dict) -> None:
    """Write a gradient trace (a temporary name, renamed when complete)."""
    arrays = {k: np.ascontiguousarray(v, np.float64) for k, v in tensors.items()}
    write_safetensors(path, {k: ("F64", v.shape) for k, v in arrays.items()}, arrays.__getitem__,
                      metadata={"refimpl": json.dumps(meta, sort_keys=True)})


# ---------------------------------------------------------------- reading

@dataclass
class GradTrace:
    path: str
    meta: dict
    tensors: dict


def read_meta(path) -> dict | None:
    """The trace metadata of a safetensors file (None if it has none); GradTraceError if unreadable."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        raise GradTraceError(str(e)) from None
    raw = f.metadata.get("refimpl")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GradTraceError(f"{path}: its 'refimpl' metadata is not JSON") from None
    return meta if isinstance(meta, dict) else None


def is_gradient_trace(path) -> bool:
    """Whether path is a trace file of kind "gradients" (False for a forward trace or an unreadable file)."""
    try:
        meta = read_meta(path)
    except GradTraceError:
        return False
    return bool(meta) and meta.get("kind") == KIND


def load_grad_trace(path) -> GradTrace:
    meta = read_meta(path)
    if not meta or meta.get("kind") != KIND:
        raise GradTraceError(f"{path}: not a gradient trace (its metadata has no \"kind\": \"gradients\"; "
                             "`refimpl trace --grad` writes one)")
    if meta.get("format_version") != TRACE_FORMAT_VERSION:
        raise GradTraceError(f"{path}: trace format version {meta.get('format_version')!r}, this refimpl reads "
                             f"{TRACE_FORMAT_VERSION}")
    if not isinstance(meta.get("n_layers"), int) or isinstance(meta.get("n_layers"), bool):
        raise GradTraceError(f"{path}: metadata needs n_layers (an integer)")
    f = SafetensorsFile(path)
    tensors = {}
    for name in f.tensors:
        if not name.startswith("grad."):
            raise GradTraceError(f"{path}: tensor {name!r} is not a gradient (names start with 'grad.')")
        a = f.get(name)
        if a.dtype.kind != "f":
            raise GradTraceError(f"{path}: gradient {name!r} has dtype {a.dtype}, expected a float type")
        tensors[name] = a
    return GradTrace(str(path), meta, tensors)


# ---------------------------------------------------------------- the backward's order

# Within a block, the gradients in the order the backward makes them (refimpl/grad/block.py):
# the MoE half from its output back to hc_pre, then the attention half.
BLOCK_STEPS = (
    "out", "ffn.out", "ffn.expert_weights", "ffn.experts.*", "ffn.shared_experts.*", "ffn.gate.*",
    "ffn_norm.weight", "hc_ffn.comb", "hc_ffn.post", "hc_ffn.pre", "hc_ffn_*",
    "hc_attn.out", "attn.out", "attn.wo_b.weight", "attn.wo_a.weight", "attn.attn_sink",
    "attn.compressed_kv", "attn.compressor.*", "attn.kv", "attn.kv_norm.weight", "attn.wkv.weight",
    "attn.q", "attn.wq_b.weight", "attn.q_norm.weight", "attn.wq_a.weight", "attn.indexer.*",
    "attn_norm.weight", "hc_attn.comb", "hc_attn.post", "hc_attn.pre", "hc_attn_*",
)
HEAD_STEPS = ("logits", "head.weight", "final.x", "norm.weight", "hc_head_*")
MTP_INPUT_STEPS = ("e_proj.weight", "enorm.weight", "h_proj.weight", "hnorm.weight")


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _step(rest: str, steps: tuple) -> int:
    for k, pattern in enumerate(steps):
        if fnmatch.fnmatchcase(rest, pattern):
            return k
    return len(steps)


def backward_position(name: str, n_layers: int) -> tuple:
    """Sort key of a gradient name in the backward's order: the MTP head, the MTP block, its inputs, the main
    head, layers n_layers-1 .. 0, the embedding."""
    base = name[len("grad."):] if name.startswith("grad.") else name
    if base.startswith("mtp.0."):                                  # MTP parameters: head, block or input
        rest = base[len("mtp.0."):]
        if _step(rest, HEAD_STEPS) < len(HEAD_STEPS):
            return (0, _step(rest, HEAD_STEPS), _natural(rest))
        if rest in MTP_INPUT_STEPS:
            return (2, MTP_INPUT_STEPS.index(rest), [])
        return (1, _step(rest, BLOCK_STEPS), _natural(rest))
    if base.startswith("mtp."):                                    # the MTP head's sites: mtp.logits, mtp.final.x
        return (0, _step(base[4:], HEAD_STEPS), [])
    m = re.match(r"layers\.(\d+)\.(.*)", base)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        group = 1 if layer == n_layers else 4 + (n_layers - 1 - layer)
        return (group, _step(rest, BLOCK_STEPS), _natural(rest))
    if base in ("embed", "embed.weight"):
        return (4 + n_layers, 0 if base == "embed" else 1, [])
    return (3, _step(base, HEAD_STEPS), _natural(base))


def backward_order(names, n_layers: int) -> list[str]:
    return sorted(names, key=lambda n: backward_position(n, n_layers))


# ---------------------------------------------------------------- comparing

@dataclass
class GradReport:
    a: str
    b: str
    rtol: float
    rows: list = field(default_factory=list)       # per name in backward order: name, max_abs, scale, rel, ok, where
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)

    @property
    def first_failure(self) -> dict | None:
        return next((r for r in self.rows if not r["ok"]), None)

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "rtol": self.rtol, "ok": self.ok, "first_failure": self.first_failure,
                "gradients": self.rows, "only_in_a": self.only_a, "only_in_b": self.only_b}


def compare_gradients(a, b, *, rtol: float = RTOL) -> GradReport:
    """Gradient trace A (under test) against B (the reference), name by name in the backward's order."""
    ta, tb = (t if isinstance(t, GradTrace) else load_grad_trace(t) for t in (a, b))
    for key in ("tokens", "head", "targets", "config_id"):
        if ta.meta.get(key) != tb.meta.get(key) and key in tb.meta and key in ta.meta:
            raise GradTraceError(f"the two gradient traces differ in {key!r}: not the same loss of the same run")
    common = set(ta.tensors) & set(tb.tensors)
    if not common:
        raise GradTraceError("the two gradient traces have no gradient name in common")
    report = GradReport(ta.path, tb.path, rtol, only_a=sorted(set(ta.tensors) - common),
                        only_b=sorted(set(tb.tensors) - common))
    rows = golden_rows(tb.meta) if "golden_rows" not in ta.meta else None
    for name in backward_order(common, tb.meta["n_layers"]):
        x, y = np.asarray(ta.tensors[name], np.float64), np.asarray(tb.tensors[name], np.float64)
        if rows is not None and x.shape != y.shape and not name.endswith(".compressed_kv") and x.ndim \
                and x.shape[0] in (len(tb.meta["tokens"]), len(tb.meta["tokens"]) - 1):
            x = x[[r for r in rows if r < x.shape[0]]]          # B is a golden gradient trace: its stored rows
        if x.shape != y.shape:
            report.rows.append({"name": name, "ok": False, "problem": f"shape {x.shape} vs {y.shape}"})
            continue
        if not np.isfinite(x).all():
            report.rows.append({"name": name, "ok": False, "problem": "non-finite values in A"})
            continue
        diff = np.abs(x - y)
        err, scale = float(diff.max(initial=0.0)), float(np.abs(y).max(initial=0.0))
        where = [int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape)] if diff.size else []
        report.rows.append({"name": name, "max_abs": err, "scale": scale, "rel": err / scale if scale else
                            (0.0 if err == 0 else float("inf")), "ok": err <= rtol * scale, "where": where})
    return report


def golden_rows(meta: dict) -> list[int] | None:
    """The positions a golden gradient trace keeps of each activation gradient (its metadata's golden_rows), or
    None for a whole trace. compare_gradients cuts a whole trace A to them when B is a golden one."""
    rows = meta.get("golden_rows")
    if rows is None:
        return None
    if not (isinstance(rows, list) and rows and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                    for r in rows) and isinstance(meta.get("tokens"), list)):
        raise GradTraceError("the reference's golden_rows must be a list of positions (and its tokens a list)")
    return rows


def format_grad_report(r: GradReport) -> str:
    lines = [f"A: {r.a}", f"B: {r.b} (reference)",
             f"{len(r.rows)} gradients compared in the backward's order, from the loss to the embedding; "
             f"tolerance max|A-B| <= {r.rtol:g} * max|B| per tensor"]
    bad = r.first_failure
    if bad is None:
        worst = max(r.rows, key=lambda x: x.get("rel", 0.0))
        lines.append(f"OK: every gradient within tolerance (largest relative error {worst['rel']:.2g} at {worst['name']})")
    else:
        n_bad = sum(not x["ok"] for x in r.rows)
        detail = bad.get("problem") or (f"max|A-B| = {bad['max_abs']:.3g}, {bad['rel']:.3g} of max|B| = "
                                        f"{bad['scale']:.3g}, at index {tuple(bad['where'])}")
        lines.append(f"FIRST GRADIENT OUT OF TOLERANCE: {bad['name']} ({detail}); {n_bad} of {len(r.rows)} out "
                     "of tolerance")
    if r.only_a or r.only_b:
        lines.append(f"not compared: {len(r.only_a)} only in A, {len(r.only_b)} only in B")
    return "\n".join(lines)
