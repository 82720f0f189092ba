"""Comparing two traces: per-site errors, the first site that leaves tolerance, and why.

    report = compare("mine.safetensors", "ref.safetensors", profile="auto")
    print(format_report(report)); report.ok

Trace A is the candidate, trace B the reference (relative errors divide by B's magnitudes). Sites
are compared in data-flow order (`trace.SITES`, layers expanded, the MTP block last), and the
report names the FIRST site that leaves the profile's tolerance, its layer, the first position
(token index) where it does and its worst element: with random tiny weights a single last-bit
flip grows to percent-level differences within a few layers, so the first divergence, not the
end-to-end logits, says where an implementation differs.

Metrics of a float site (shape [positions, ...]; the rest of each row flattened):

    max_abs   max |a - b|
    max_rel   max |a - b| / max |b|                  (relative to the site's largest magnitude)
    rms_rel   max over positions t of rms(a_t - b_t) / rms(b)   (the worst position, site scale)
    cos       min over positions t of cos(a_t, b_t)  (1 for two identical rows)
    site_cos  cos(a, b) of the whole site, flattened
    beyond    fraction of elements with |a - b| > beyond_rel x rms(b)   (when the profile sets beyond_rel)
    flips     elements that differ by one unit in the last place of the storage format
    real      elements that differ by more

Tight profiles bound max_rel, rms_rel and cos position by position, so the first failing position
is the first row over a bound; statistical profiles bound site_cos, the beyond fraction or the
fraction of real differences, and name the first row that breaks the bound on its own (else the
worst row). The report also names the first site with a real difference, in or out of tolerance.

Element classes: both values are rounded to the site's storage format (`storage_format`: bf16
for the activations of `mirror` and `bf16` traces, fp32 for their fp32 sites and for `float32`
traces, float64 for `float64`; the coarser of the two traces') and their distance counted in
units in the last place: 0 or 1 is a rounding-boundary flip (for two traces stored in the same
format: exactly one ulp apart), more is a real difference. Entries that are -inf in both traces
(indexer scores of invisible entries) are equal; a non-finite value facing anything else is a
real difference of infinite size.

Logits (`logits`, `mtp.logits`) also get top-1 agreement (fraction of positions), top-5 overlap
(mean of |top5(a) ∩ top5(b)| / 5) and the largest per-position KL(softmax(b) || softmax(a)).

Integer sites (`ffn.expert_ids`, `attn.indexer.topk`) are compared per row as sets (order does
not matter, -1 padding is ignored). A row whose sets differ is a NEAR-TIE when the scores of the
disputed entries (the symmetric difference) lie within `near_tie_rel` of each other, relative
to the row's largest |score|, in every trace that holds the scores (`ffn.gate_scores`,
`attn.indexer.scores`); otherwise (or without scores: hash layers) a REAL disagreement. The
boundary margin of a row is (k-th best - (k+1)-th best score) / the row's largest |score|.

Tolerance profiles live in `profiles.toml` next to this module, each bound with the measurement
behind it (`tools/measure_profiles.py` remakes the measurements).

The noise model (oracle/noise.py; docs/compare.md, "The noise model"): with a companion, refimpl's own
trace of the same input at the candidate's precision (`noise=`; found in the golden set when b is a
golden trace), every float site is judged by its noise ratio, the candidate's RMS error per position
over the companion's, failing above noise.JUMP (10), instead of by the profile's float bounds; the
first site that jumps is named however small its absolute error. Integer sites keep the profile's
rules, a disagreement the companion shares being expected; after a selection the candidate flipped on
a near-tie, later rows from that position are not judged by the ratio.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from refimpl.formats.files import write_bytes
from refimpl.context import LAYOUTS, REVISIONS
from refimpl.oracle import noise as noise_model
from refimpl.oracle.hints import HINT_FACTS, site_hints
from refimpl.oracle.trace import TRACE_FORMAT_VERSION
from refimpl.sites import SITES
from refimpl.formats.files import MAX_JSON_DEPTH, StrictJSONError, check_output_path, json_depth, parse_json

PROFILES_PATH = Path(__file__).with_name("profiles.toml")
PRECISIONS = ("float64", "float32", "mirror", "bf16")   # the precisions a trace may declare
LOGIT_SITES = ("logits", "mtp.logits")
SCORES_OF = {"attn.indexer.topk": "attn.indexer.scores", "ffn.expert_ids": "ffn.gate_scores"}
# sites that hold fp32 values in the official code (and so in `mirror`); every other float site
# of a mirror / bf16 trace holds bf16 values (docs/architecture.md §3, the precision map)
FP32_KINDS = frozenset({"hc_attn.pre", "hc_attn.post", "hc_attn.comb", "hc_ffn.pre", "hc_ffn.post",
                        "hc_ffn.comb", "ffn.gate_scores", "ffn.expert_weights", "logits", "mtp.logits"})
Q_NORM_HINT = (
    "known cause when the first divergent site is attn.q: the weightless per-head q norm runs in "
    "bf16, and PyTorch's CPU bf16 rsqrt is not correctly rounded (rsqrt(1.59375) gives 0.7890625, "
    "the nearest bf16 is 0.79296875: 0.5% per element, about 1.5% relative in layer-0 attention); "
    "refimpl's mirror rounds rsqrt correctly. The official code run on a CPU differs here, and its "
    "result depends on the tensor size; run the norm in fp32 and round once to compare arithmetic.")


MAX_HINT_SITES = 6                # failing sites after the first whose structural hints the text report shows


class CompareError(ValueError):
    """Two traces that cannot be compared (unreadable, not the same run, a bad profile), with the reason."""


# ---------------------------------------------------------------- reading traces

@dataclass
class TraceFile:
    """A trace read from disk: its metadata (the JSON under key "refimpl") and its site tensors."""
    path: str
    meta: dict
    tensors: dict[str, np.ndarray]

    @property
    def precision(self) -> str:
        return self.meta["precision"]


def load_trace(path) -> TraceFile:
    """Read and check a trace file against docs/trace-format.md; CompareError names what is wrong."""
    from safetensors import SafetensorError, safe_open
    path = str(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise CompareError(f"{path}: no such file") from None
    if not stat.S_ISREG(mode):
        raise CompareError(f"{path}: is {_file_kind(mode)}, not a trace file")
    try:
        with safe_open(path, "np") as f:
            raw = (f.metadata() or {}).get("refimpl")
            if raw is None:
                raise CompareError(f"{path}: no 'refimpl' metadata entry, so not a trace file (docs/trace-format.md)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as e:
        if isinstance(e, CompareError):
            raise
        # AttributeError: a dtype NumPy lacks (F8_E8M0 of a checkpoint shard): not a trace either
        raise CompareError(f"{path}: not a trace file: not a readable safetensors file of float/integer "
                           f"sites ({type(e).__name__}: {e})") from None
    return check_trace(TraceFile(path, parse_meta_json(raw, path, CompareError), tensors))


def parse_meta_json(raw, path, error=ValueError):
    """The 'refimpl' metadata string parsed as JSON, nested at most MAX_JSON_DEPTH levels; error names path."""
    try:
        meta = parse_json(raw) if isinstance(raw, str) else json.loads(raw)   # strict: no key twice, no NaN
    except RecursionError:
        raise error(f"{path}: the 'refimpl' metadata entry is nested too deeply "
                    f"(more than {MAX_JSON_DEPTH} levels)") from None
    except (json.JSONDecodeError, TypeError, StrictJSONError) as e:
        raise error(f"{path}: the 'refimpl' metadata entry is not JSON ({e})") from None
    if json_depth(meta) > MAX_JSON_DEPTH:
        raise error(f"{path}: the 'refimpl' metadata entry is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return meta


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def check_trace(t: TraceFile) -> TraceFile:
    """t itself, after checking its metadata and tensors against docs/trace-format.md (CompareError)."""
    path, meta, tensors = t.path, t.meta, t.tensors
    if not isinstance(meta, dict):
        raise CompareError(f"{path}: the 'refimpl' metadata entry must be a JSON object")
    version = meta.get("format_version")
    if isinstance(version, bool):
        raise CompareError(f"{path}: format_version must be an integer, got {version!r}")
    if version is None:
        raise CompareError(f"{path}: no format_version in the metadata (a trace written before the format was "
                           f"versioned; write it again, docs/trace-format.md)")
    if version != TRACE_FORMAT_VERSION:
        raise CompareError(f"{path}: trace format version {version!r}; this refimpl reads version "
                           f"{TRACE_FORMAT_VERSION}")
    if meta.get("precision") not in PRECISIONS:
        raise CompareError(f"{path}: precision {meta.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    tokens = meta.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(_is_int(t) for t in tokens):
        raise CompareError(f"{path}: metadata 'tokens' must be a non-empty list of integer token ids")
    chunks = meta.setdefault("chunks", [len(tokens)])
    if (not isinstance(chunks, list) or not all(_is_int(n) and n > 0 for n in chunks)
            or sum(chunks) != len(tokens)):
        raise CompareError(f"{path}: metadata 'chunks' must be positive integers adding up to the "
                           f"{len(tokens)} tokens, got {chunks!r}")
    k = meta.setdefault("decode_from", None)
    if k is not None and not (_is_int(k) and 1 <= k < len(tokens) and chunks[0] == k
                              and len(chunks) == len(tokens) - k + 1 and all(n == 1 for n in chunks[1:])):
        raise CompareError(f"{path}: metadata 'decode_from' must be null or K with chunks [K, 1, 1, ...] "
                           f"(a K-token prefill, then decode steps), got {k!r} with chunks {chunks!r}")
    if not tensors:
        raise CompareError(f"{path}: holds no site tensors")
    for name, x in tensors.items():
        if x.dtype.kind not in "fi" and x.dtype != ml_dtypes.bfloat16:
            raise CompareError(f"{path}: site {name!r} has dtype {x.dtype}; sites are float or integer tensors")
        if x.ndim < 1:
            raise CompareError(f"{path}: site {name!r} is a scalar; every site has a position axis first")
        if x.shape[0] > max(len(tokens), x.size):   # a site of no values may claim any number of rows,
            raise CompareError(                      # and compare walks them: rows need tokens or values
                f"{path}: site {name!r} has {x.shape[0]} rows of {x.size} values in all; a trace of "
                f"{len(tokens)} tokens has at most {len(tokens)} rows per site unless its values fill them")
    n_layers = meta.get("n_layers")
    if n_layers is not None and not (_is_int(n_layers) and n_layers >= 0):
        raise CompareError(f"{path}: metadata 'n_layers' must be a non-negative integer, got {n_layers!r}")
    for key, allowed in (("revision", REVISIONS), ("layout", LAYOUTS)):     # optional; when given, a known one
        if key in meta and meta[key] not in allowed:
            raise CompareError(f"{path}: metadata {key!r} is {meta[key]!r:.40}, not one of {', '.join(allowed)}")
    rows = meta.get("golden_rows")          # a golden-set trace keeps these positions' rows only (oracle/golden.py)
    if rows is not None and not (isinstance(rows, list) and all(_is_int(r) and 0 <= r < len(tokens) for r in rows)
                                 and all(x < y for x, y in zip(rows, rows[1:]))):
        raise CompareError(f"{path}: metadata 'golden_rows' must be increasing positions in [0, {len(tokens)})")
    _check_site_contract(path, tensors, len(tokens), mtp_layer_of(tensors, meta, {}), rows)
    return t


# the number of axes of each known site (docs/trace-format.md, "Sites"); names not listed are free
_NDIM = {"embed": 2, "final.x": 2, "logits": 2, "mtp.final.x": 2, "mtp.logits": 2,
         "hc_attn.pre": 2, "hc_attn.post": 2, "hc_attn.comb": 3, "hc_ffn.pre": 2, "hc_ffn.post": 2,
         "hc_ffn.comb": 3, "attn.q": 3, "attn.kv": 2, "attn.compressed_kv": 2, "attn.indexer.scores": 2,
         "attn.indexer.topk": 2, "attn.out": 2, "ffn.gate_scores": 2, "ffn.expert_ids": 2,
         "ffn.expert_weights": 2, "ffn.out": 2, "out": 3, "hc_attn.out": 3}
assert set(_NDIM) == {s.replace("layers.{i}.", "") for s in SITES}, "every site needs its number of axes"


def _check_site_contract(path, tensors: dict, s: int, mtp: int | None, golden_rows=None) -> None:
    """Each known site against docs/trace-format.md: its number of axes, its rows (s per position;
    s - 1 for the MTP block; any for compressed_kv; s or s - 1 for a layer when the MTP layer cannot be
    told: no n_layers, no mtp.* site; a golden-set trace: its kept rows, those below s - 1 for the MTP
    block), and integer sites in range (expert ids in [0, n) with n the
    width of the layer's gate_scores when present, else >= 0; top-k entries >= -1), each entry once per row."""
    for name, x in tensors.items():
        layer, kind = split_site(name)
        if (layer is None and kind not in _NDIM) or (layer is not None and kind not in _TEMPLATES):
            continue                                   # a name refimpl does not know: compared as it is
        if x.ndim != _NDIM[kind]:
            raise CompareError(f"{path}: site {name!r} has {x.ndim} axes {list(x.shape)}; docs/trace-format.md "
                               f"gives it {_NDIM[kind]}")
        if kind not in SCORES_OF and x.dtype.kind in "iu":      # else compared as sets of ids, silently
            raise CompareError(f"{path}: site {name!r} has dtype {x.dtype}; it is a float site")
        if kind != "attn.compressed_kv":
            is_mtp = name.startswith("mtp.") or (layer is not None and layer == mtp)
            if golden_rows is None:
                rows = {s - 1} if is_mtp else ({s, s - 1} if layer is not None and mtp is None else {s})
            else:
                short = sum(1 for r in golden_rows if r < s - 1)
                rows = {short} if is_mtp else ({len(golden_rows), short} if layer is not None and mtp is None
                                               else {len(golden_rows)})
            if x.shape[0] not in rows:
                want = " or ".join(str(r) for r in sorted(rows))
                given = f"the {s} tokens" if golden_rows is None else f"golden_rows {golden_rows}"
                raise CompareError(f"{path}: site {name!r} has {x.shape[0]} rows; {given} give it {want}"
                                   f"{' (the MTP block has s - 1)' if is_mtp else ''}")
        if kind == "ffn.expert_ids" or kind == "attn.indexer.topk":
            if x.dtype.kind not in "iu":
                raise CompareError(f"{path}: site {name!r} has dtype {x.dtype}; it is an integer site")
            if x.size == 0:
                continue
            if kind == "attn.indexer.topk":
                lo, hi, what = -1, None, "entry numbers >= 0, -1 padding"
            else:
                scores = tensors.get(f"layers.{layer}.ffn.gate_scores")
                n = scores.shape[-1] if scores is not None and scores.ndim == 2 else None
                lo, hi = 0, n
                what = f"expert ids in [0, {n}) (the width of ffn.gate_scores)" if n else "expert ids >= 0"
            bad = (x < lo) | ((x >= hi) if hi is not None else False)
            if np.any(bad):
                t = int(np.argwhere(bad)[0][0])
                raise CompareError(f"{path}: site {name!r} row {t} holds {x[t].tolist()[:8]}; it must hold {what}")
            rows = np.sort(x.reshape(x.shape[0], -1), axis=1)          # a selection names each entry once
            twice = (rows[:, 1:] == rows[:, :-1]) & (rows[:, 1:] >= 0)
            if np.any(twice):
                t = int(np.argwhere(twice)[0][0])
                raise CompareError(f"{path}: site {name!r} row {t} holds {x[t].tolist()[:8]}: a selection names "
                                   "each entry once (its sets are compared, so a repeat would go unseen)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same_rows(a: TraceFile, b: TraceFile):
    """Both traces on the same rows: a full-length trace compared with a golden-set trace (which keeps only the
    positions `golden_rows`) is cut to those rows here; two different row selections are refused.
    -> (a, b, golden_rows or None)."""
    ra, rb = a.meta.get("golden_rows"), b.meta.get("golden_rows")
    if ra == rb:
        return a, b, ra
    if ra is not None and rb is not None:
        raise CompareError(f"the traces keep different rows (golden_rows {ra} vs {rb}); compare traces of the same "
                           f"rows, or a full-length trace with a golden one")
    rows = ra if ra is not None else rb
    full = b if ra is not None else a
    s, mtp = len(full.meta["tokens"]), mtp_layer_of(set(full.tensors), full.meta, full.meta)
    cut = {}
    for name, x in full.tensors.items():
        layer, kind = split_site(name)
        is_mtp = name.startswith("mtp.") or (layer is not None and layer == mtp)
        if kind == "attn.compressed_kv" or x.shape[0] != (s - 1 if is_mtp else s):
            cut[name] = x                                   # one row per entry, or a site refimpl does not know
        else:
            cut[name] = x[[r for r in rows if r < x.shape[0]]]
    cut_full = TraceFile(full.path, dict(full.meta, golden_rows=list(rows)), cut)
    return (cut_full, b, rows) if full is a else (a, cut_full, rows)


def _rows_to_positions(report, rows: list[int], s: int, mtp: int | None) -> None:
    """Rewrite the row numbers of a golden-rows comparison as token positions (compressed entries stay entries)."""
    short = [r for r in rows if r < s - 1]
    if report.noise is not None and report.noise["unjudged_from"] is not None:
        report.noise["unjudged_from"] = rows[report.noise["unjudged_from"]]

    def position_of(site):
        layer, kind = split_site(site)
        if kind == "attn.compressed_kv":
            return None
        return short.__getitem__ if site.startswith("mtp.") or (layer is not None and layer == mtp) else rows.__getitem__
    for m in report.sites:
        pos = position_of(m["site"])
        if pos is None:
            continue
        for f in m["failures"]:
            f["row"] = pos(f["row"])
        for r in m.get("near_tie_rows", []) + m.get("real_rows", []):
            r["row"] = pos(r["row"])
        for r in m.get("expected_rows", []):
            r["row"] = pos(r["row"])
        for key in ("first_diff_row", "first_real_row", "noise_row"):
            if m.get(key) is not None:
                m[key] = pos(m[key])
        if report.first is not None and report.first["site"] == m["site"]:
            f = report.first
            if "position" in f:
                f["position"] = pos(f["position"])
            if "worst" in f:
                f["worst"]["index"][0] = pos(f["worst"]["index"][0])   # (f["rows"] shares m's real_rows: done)


def check_same_run(a: TraceFile, b: TraceFile) -> list[str]:
    """Raise CompareError unless a and b record the same input (tokens, config, chunking); -> notes."""
    ta, tb = a.meta["tokens"], b.meta["tokens"]
    if ta != tb:
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        raise CompareError(f"the traces record different token ids: {len(ta)} vs {len(tb)} tokens, first "
                           f"difference at position {first}; compare traces of the same input")
    ca, cb = a.meta.get("config_id"), b.meta.get("config_id")
    if ca is not None and cb is not None and ca != cb:
        raise CompareError(f"the traces come from different model configs (config_id {ca} vs {cb})")
    na, nb = a.meta.get("n_layers"), b.meta.get("n_layers")
    if na is not None and nb is not None and na != nb:
        raise CompareError(f"the traces come from models with {na} and {nb} layers")
    notes = []
    # float64 rows do not depend on the chunking or the call type (docs/architecture.md §15): a float64
    # reference takes a candidate run any way; elsewhere they may change last bits, so both must match
    exact_rows = b.meta.get("precision") == "float64"
    da, db = a.meta["decode_from"], b.meta["decode_from"]
    how = f"--decode-from {db}" if db else f"--chunks {','.join(map(str, b.meta['chunks']))}"
    if a.meta["chunks"] != b.meta["chunks"] or da != db:
        what = lambda t: (f"a {t.meta['decode_from']}-token prefill then decode steps" if t.meta["decode_from"]
                          else f"chunks {t.meta['chunks']}")
        if not exact_rows:
            raise CompareError(f"the traces ran different calls ({what(a)} vs {what(b)}), which may change last "
                               f"bits in {b.meta.get('precision')}; trace yours the same way ({how})")
        notes.append(f"the traces ran different calls ({what(a)} vs {what(b)}); a float64 reference's rows do "
                     f"not depend on them")
    la, lb = a.meta.get("layout"), b.meta.get("layout")
    if la is not None and lb is not None and la != lb:
        raise CompareError(f"the traces used different attention index layouts ({la} vs {lb}); in mirror the "
                           f"layout decides the softmax blocks, so trace both with the same --layout")
    if ca is None or cb is None:
        notes.append("a trace has no config_id: the model config could not be checked")
    ra, rb = a.meta.get("revision"), b.meta.get("revision")
    if ra is not None and rb is not None and ra != rb:
        notes.append(f"the traces follow different official revisions ({ra} vs {rb})")
    return notes


# ---------------------------------------------------------------- site names and order

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_TEMPLATES = {s.replace("layers.{i}.", ""): i for i, s in enumerate(SITES) if s.startswith("layers.{i}.")}


def split_site(name: str) -> tuple[int | None, str]:
    """'layers.3.attn.q' -> (3, 'attn.q'); 'logits' -> (None, 'logits')."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def mtp_layer_of(names, meta_a: dict, meta_b: dict) -> int | None:
    """The MTP block's layer number: metadata n_layers, else the largest layer when mtp.* sites exist."""
    n = meta_a.get("n_layers", meta_b.get("n_layers"))
    if _is_int(n):
        return n
    layers = [split_site(s)[0] for s in names if split_site(s)[0] is not None]
    return max(layers) if layers and any(s.startswith("mtp.") for s in names) else None


def site_order(names, mtp_layer: int | None) -> list[str]:
    """names in data-flow order: embed, layers 0.. (SITES order within a layer), final.x, logits,
    the MTP layer, mtp.*; names refimpl does not know come last, sorted."""
    top = {"embed": (0, 0), "final.x": (2, 0), "logits": (2, 1), "mtp.final.x": (4, 0), "mtp.logits": (4, 1)}

    def key(name):
        if name in top:
            g, i = top[name]
            return (g, 0, i, "")
        layer, kind = split_site(name)
        if layer is None or kind not in _TEMPLATES:
            return (5, 0, 0, name)
        return (3 if layer == mtp_layer else 1, layer, _TEMPLATES[kind], "")
    return sorted(names, key=key)


def site_label(name: str, mtp_layer: int | None) -> str:
    """'layer 3', 'MTP layer 6' or '' for the name's layer."""
    layer, _ = split_site(name)
    if layer is None:
        return "MTP" if name.startswith("mtp.") else ""
    return f"MTP layer {layer}" if layer == mtp_layer else f"layer {layer}"


def position_word(name: str) -> str:
    """What row t of a site is: a position (token index), or a compressed entry."""
    return "entry" if name.endswith(".compressed_kv") else "position"


# ---------------------------------------------------------------- storage formats and ulps

_FORMATS = {"bfloat16": (ml_dtypes.bfloat16, np.uint16), "float32": (np.float32, np.uint32),
            "float64": (np.float64, np.uint64)}
_COARSE = ("float64", "float32", "bfloat16")          # finer to coarser


def storage_format(precision: str, kind: str, dtype) -> str:
    """The number format a trace's site is stored in: decided by the metadata precision and the site.

    A bf16 tensor is bf16. In `mirror` and `bf16` traces every activation is bf16 except the fp32
    sites of the official code (FP32_KINDS: the mHC mixes, router scores and weights, logits);
    `float32` traces are fp32; `float64` traces float64 (fp32 when the file holds float32).
    """
    dtype = np.dtype(dtype)
    if dtype == ml_dtypes.bfloat16:
        return "bfloat16"
    if precision in ("mirror", "bf16") and kind not in FP32_KINDS:
        return "bfloat16"
    if precision == "float64" and dtype == np.float64:
        return "float64"
    return "float32"


def coarser(f1: str, f2: str) -> str:
    return max(f1, f2, key=_COARSE.index)


def ulp_distance(a, b, fmt: str) -> np.ndarray:
    """Distance in units in the last place of fmt between a and b, both first rounded (RNE) to fmt;
    capped at 2 (the classes are 0, 1 and more). Finite input only."""
    ftype, utype = _FORMATS[fmt]

    def ordinal(x):          # sign-magnitude bits -> (sign, magnitude); +0 and -0 are the same point
        x = np.asarray(x, np.float64)
        if fmt == "bfloat16":
            x = x.astype(np.float32)                  # round to fp32 first, as numerics.round_bf16 does
        u = np.ascontiguousarray(x.astype(ftype)).view(utype)
        bits = np.dtype(utype).itemsize * 8
        sign = (u >> utype(bits - 1)).astype(bool)
        mag = (u & utype((1 << (bits - 1)) - 1)).astype(np.int64)
        return sign, mag
    sa, ma = ordinal(a)
    sb, mb = ordinal(b)
    same = np.abs(ma - mb)                            # no overflow: magnitudes < 2^63
    across = np.minimum(ma, 2) + np.minimum(mb, 2)    # opposite signs: the distance passes through 0
    return np.minimum(np.where(sa == sb, same, across), 2)


# ---------------------------------------------------------------- profiles

# the bounds each section of a profile may set; [P.sites."<kind>"] may set any of them
BOUND_KEYS = {"float": ("max_rel", "rms_rel", "min_cos", "min_site_cos", "beyond_rel", "max_beyond_frac",
                        "max_real_frac"),
              "logits": ("min_top1", "min_top5", "max_kl"),
              "integer": ("near_tie_rel", "max_real_frac")}
PROFILE_KEYS = ("description", "measurement", "auto", "sites", *BOUND_KEYS)


def load_profiles(path=PROFILES_PATH) -> dict:
    """All tolerance profiles: {name: profile table} from profiles.toml, each checked (check_profile)."""
    with open(path, "rb") as f:
        profiles = tomllib.load(f).get("profiles")
    if not isinstance(profiles, dict):
        raise CompareError(f"{path}: holds no [profiles.NAME] tables")
    for name, profile in profiles.items():
        check_profile(name, profile)
    return profiles


def check_profile(name: str, profile) -> None:
    """A profile's keys and bounds: known names only (a misspelt bound would never be checked), each
    bound a finite number (min_cos, min_site_cos in [-1, 1]; the others >= 0) written as x or
    {bound = x, ...}, `auto` a list of precision pairs. CompareError names the first that is not."""
    if not isinstance(profile, dict):
        raise CompareError(f"profile {name!r}: must be a table, got {type(profile).__name__}")
    unknown = [k for k in profile if k not in PROFILE_KEYS]
    if unknown:
        raise CompareError(f"profile {name!r}: unknown key {unknown[0]!r} (keys: {', '.join(PROFILE_KEYS)})")
    auto = profile.get("auto", [])
    if not (isinstance(auto, list) and all(isinstance(pair, list) and len(pair) == 2 and
                                           all(p in PRECISIONS for p in pair) for pair in auto)):
        raise CompareError(f"profile {name!r}: 'auto' must be a list of precision pairs, e.g. "
                           f"[[\"float32\", \"float64\"]], got {auto!r:.80}")
    sites = profile.get("sites", {})
    if not (isinstance(sites, dict) and all(isinstance(t, dict) for t in sites.values())):
        raise CompareError(f"profile {name!r}: 'sites' must hold one table per site kind")
    every = tuple(dict.fromkeys(k for keys in BOUND_KEYS.values() for k in keys))
    tables = [(section, profile.get(section, {}), keys) for section, keys in BOUND_KEYS.items()]
    for where, table, keys in tables + [(f'sites."{kind}"', t, every) for kind, t in sites.items()]:
        if not isinstance(table, dict):
            raise CompareError(f"profile {name!r}: [{where}] must be a table of bounds")
        for key, v in table.items():
            if key not in keys:
                raise CompareError(f"profile {name!r}: [{where}] has no bound {key!r} (bounds: {', '.join(keys)})")
            b = v.get("bound") if isinstance(v, dict) else v
            lo = -1.0 if key in ("min_cos", "min_site_cos") else 0.0
            if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and lo <= b
                    and (lo == 0 or b <= 1)):
                raise CompareError(f"profile {name!r}: [{where}] {key} = {b!r:.40}: a bound must be a finite number "
                                   f"{'in [-1, 1]' if lo else '>= 0'} (as x or {{bound = x, ...}})")


def auto_profile(pa: str, pb: str, profiles: dict | None = None) -> str:
    """The profile whose `auto` list holds the precision pair (pa, pb), in either order."""
    profiles = load_profiles() if profiles is None else profiles
    for name, p in profiles.items():
        if any(sorted(pair) == sorted((pa, pb)) for pair in p.get("auto", [])):
            return name
    raise CompareError(f"no profile is chosen automatically for precisions {pa} vs {pb}; pass --profile "
                       f"(one of {', '.join(profiles)})")


def bound(profile: dict, section: str, key: str, kind: str):
    """A bound of the profile: the per-kind override `sites.<kind>` first, then the section's value.
    Each bound is {bound = x, measured = y, at = "..."}; None when the profile sets none."""
    for table in (profile.get("sites", {}).get(kind, {}), profile.get(section, {})):
        if key in table:
            v = table[key]
            return v["bound"] if isinstance(v, dict) else v
    return None


# ---------------------------------------------------------------- metrics

def _num(x) -> float:
    return float(x)


def _rel(x, scale: float):
    """x / scale, with 0/0 = 0 and x/0 = inf."""
    return np.where(x == 0, 0.0, x / scale) if scale > 0 else np.where(x == 0, 0.0, np.inf)


def _cosines(av, bv, identical):
    """Row cosines of av, bv [positions, width]: 1 for identical rows, 0 where one row is zero."""
    dot, na, nb = (av * bv).sum(1), np.sqrt((av ** 2).sum(1)), np.sqrt((bv ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), np.clip(dot / (na * nb), -1.0, 1.0), 0.0)
    return np.where(identical, 1.0, cos)


def _first_row(bad_rows, worst_rows) -> int:
    """The first row that breaks a bound on its own, else the worst row."""
    return int(np.argmax(bad_rows)) if bad_rows.any() else int(np.argmax(worst_rows))


def _float_site(kind, a, b, fmt, profile) -> dict:
    """Metrics and tolerance checks of one float site; a, b [positions, ...] -> the site's report entry."""
    p, width = a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64))
    m = {"kind": "float", "format": fmt, "elements": 0, "max_abs": 0.0, "max_rel": 0.0, "rms_rel": 0.0, "cos": 1.0,
         "site_cos": 1.0, "differ": 0, "flips": 0, "real": 0, "real_frac": 0.0, "first_diff_row": None,
         "first_real_row": None, "worst": None, "failures": []}
    if a.size == 0:                                       # e.g. no compressed entry completed yet
        return m
    a = a.astype(np.float64).reshape(p, width)
    b = b.astype(np.float64).reshape(p, width)

    # elements: equal, a rounding-boundary flip, or a real difference
    valid = np.isfinite(a) & np.isfinite(b)
    broken = ~valid & ~((a == b) & ~np.isfinite(b))       # non-finite facing anything but the same -inf
    av, bv = np.where(valid, a, 0.0), np.where(valid, b, 0.0)
    err = av - bv
    abs_err = np.where(broken, np.inf, np.abs(err))
    ulps = np.where(valid, ulp_distance(av, bv, fmt), 0)
    differs = (valid & (a != b)) | broken
    real = (differs & (ulps > 1)) | broken
    n = int((valid | broken).sum())

    # per position (row), against the site's scale: max |b| and rms(b)
    scale_max = float(np.abs(bv).max())
    scale_rms = math.sqrt(float((bv ** 2).sum()) / max(int(valid.sum()), 1))
    row_max_rel = _rel(abs_err.max(axis=1), scale_max)
    row_rms_rel = np.where(broken.any(axis=1), np.inf,
                           _rel(np.sqrt((err ** 2).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)), scale_rms))
    row_cos = np.where(broken.any(axis=1), -1.0, _cosines(av, bv, ~differs.any(axis=1)))
    site_cos = -1.0 if broken.any() else float(_cosines(av.reshape(1, -1), bv.reshape(1, -1),
                                                        np.array([not differs.any()]))[0])
    wr, wc = divmod(int(np.argmax(abs_err)), width)
    m.update(elements=n, max_abs=_num(abs_err.max()), max_rel=_num(row_max_rel.max()),
             rms_rel=_num(row_rms_rel.max()), cos=_num(row_cos.min()), site_cos=site_cos,
             differ=int(differs.sum()), flips=int((differs & ~real).sum()), real=int(real.sum()),
             real_frac=_num(real.sum() / max(n, 1)),
             first_diff_row=int(np.argmax(differs.any(axis=1))) if differs.any() else None,
             first_real_row=int(np.argmax(real.any(axis=1))) if real.any() else None,
             worst={"row": wr, "col": wc, "a": _num(a[wr, wc]), "b": _num(b[wr, wc]),
                    "ulps": "non-finite" if broken[wr, wc] else int(ulps[wr, wc])})

    fails = []
    # tight bounds, position by position: the first row over the bound
    for key, rows, worse in (("max_rel", row_max_rel, np.greater), ("rms_rel", row_rms_rel, np.greater),
                             ("min_cos", row_cos, np.less)):
        lim = bound(profile, "float", key, kind)
        if lim is not None and worse(rows, lim).any():
            t = int(np.argmax(worse(rows, lim)))
            fails.append({"metric": key, "value": _num(rows[t]), "bound": lim, "row": t})
    # statistical bounds on the whole site
    lim = bound(profile, "float", "min_site_cos", kind)
    if lim is not None and site_cos < lim:
        fails.append({"metric": "min_site_cos", "value": site_cos, "bound": lim,
                      "row": _first_row(row_cos < lim, -row_cos)})
    beyond_rel = bound(profile, "float", "beyond_rel", kind)
    if beyond_rel is not None:                # elements whose error exceeds beyond_rel x the site's rms
        beyond = abs_err > beyond_rel * scale_rms
        row_frac = beyond.sum(axis=1) / width
        m.update(beyond_rel=beyond_rel, beyond_frac=_num(beyond.sum() / max(n, 1)))
        lim = bound(profile, "float", "max_beyond_frac", kind)
        if lim is not None and m["beyond_frac"] > lim:
            fails.append({"metric": "max_beyond_frac", "value": m["beyond_frac"], "bound": lim,
                          "row": _first_row(row_frac > lim, row_frac)})
    lim = bound(profile, "float", "max_real_frac", kind)
    if lim is not None and m["real_frac"] > lim:
        row_real = real.sum(axis=1) / width
        fails.append({"metric": "max_real_frac", "value": m["real_frac"], "bound": lim,
                      "row": _first_row(row_real > lim, row_real)})
    if kind in LOGIT_SITES:
        _logit_metrics(a, b, valid, kind, profile, m, fails)
    m["failures"] = sorted(fails, key=lambda f: f["row"])
    return m


def _logit_metrics(a, b, valid, kind, profile, m, fails) -> None:
    """top-1 agreement, top-5 overlap, max KL(softmax(b) || softmax(a)) of logits [positions, v]."""
    if not valid.all():
        return                                            # non-finite logits: already a real difference
    top1 = a.argmax(1) == b.argmax(1)
    k = min(5, a.shape[1])
    ta, tb = np.argsort(-a, 1, kind="stable")[:, :k], np.argsort(-b, 1, kind="stable")[:, :k]
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])

    def log_softmax(x):
        z = x - x.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    la, lb = log_softmax(a), log_softmax(b)
    kl = np.maximum((np.exp(lb) * (lb - la)).sum(1), 0.0)
    kl = np.where((a == b).all(1), 0.0, kl)
    m.update(top1=_num(top1.mean()), top5=_num(overlap.mean()), kl=_num(kl.max()))
    for key, value, rows in (("min_top1", m["top1"], ~top1), ("min_top5", m["top5"], overlap < 1)):
        lim = bound(profile, "logits", key, kind)
        if lim is not None and value < lim:
            fails.append({"metric": key, "value": value, "bound": lim, "row": int(np.argmax(rows))})
    lim = bound(profile, "logits", "max_kl", kind)
    if lim is not None and (kl > lim).any():
        t = int(np.argmax(kl > lim))
        fails.append({"metric": "max_kl", "value": _num(kl[t]), "bound": lim, "row": t})


def _row_scale(s: np.ndarray) -> float:
    """The largest |finite score| of a row (1 when there is none): near-tie spreads and margins are relative to it."""
    f = s[np.isfinite(s)]
    top = float(np.abs(f).max()) if f.size else 0.0
    return top if top > 0 else 1.0


def _integer_site(name, kind, a, b, scores, profile, companion=None) -> dict:
    """Per-row set agreement of an integer site; near-ties from the scores. scores: [S_a or None, S_b or None].
    companion (noise model): refimpl's own selection at the candidate's precision; a row where it makes
    the candidate's choice is an expected disagreement (`expected_rows`), not a real one."""
    near_rel = bound(profile, "integer", "near_tie_rel", kind)
    near_rel = 0.0 if near_rel is None else near_rel
    have = [s for s in scores if s is not None]
    rows = a.shape[0]
    width = int(np.prod(a.shape[1:], dtype=np.int64))                # (a site may have no rows: -1 cannot reshape that)
    a, b = a.reshape(rows, width), b.reshape(rows, width)            # a row per position
    agree = near = real = close = expected = 0
    overlap_sum, margins, near_rows, real_rows, expected_rows = 0.0, [], [], [], []
    if companion is not None:
        companion = companion.reshape(rows, width)
    for t in range(rows):
        sa = {int(x) for x in a[t] if x >= 0}
        sb = {int(x) for x in b[t] if x >= 0}
        overlap_sum += 1.0 if sa == sb else len(sa & sb) / max(len(sa), len(sb))
        margin = math.inf
        ref = have[-1][t] if have else None                          # B's scores when B has them
        if ref is not None and sb:
            fin = np.sort(ref[np.isfinite(ref)])[::-1]
            if fin.size > len(sb):
                margin = float(fin[len(sb) - 1] - fin[len(sb)]) / _row_scale(ref)
        margins.append(margin)
        if sa == sb:
            agree += 1
            close += margin <= near_rel
            continue
        disputed = sorted(sa ^ sb)
        spread = math.inf
        if have and len(sa) == len(sb):
            spreads = []
            for s in have:
                if max(disputed) >= s.shape[1]:
                    raise CompareError(f"site {name!r}: index {max(disputed)} lies outside its scores "
                                       f"({s.shape[1]} entries)")
                v = s[t, disputed].astype(np.float64)
                spreads.append(float(v.max() - v.min()) / _row_scale(s[t]) if np.isfinite(v).all() else math.inf)
            spread = max(spreads)
        if companion is not None and {int(x) for x in companion[t] if x >= 0} == sa:
            expected += 1                                            # refimpl at this precision chose so too
            expected_rows.append({"row": t, "spread": spread, "a_only": sorted(sa - sb), "b_only": sorted(sb - sa)})
        elif spread <= near_rel:
            near += 1
            near_rows.append({"row": t, "spread": spread, "a_only": sorted(sa - sb), "b_only": sorted(sb - sa)})
        else:
            real += 1
            real_rows.append({"row": t, "spread": spread, "a_only": sorted(sa - sb), "b_only": sorted(sb - sa)})
    m = {"kind": "integer", "rows": rows, "agree": agree, "near_ties": near, "real": real, "close_calls": close,
         "set_agreement": _num(overlap_sum / max(rows, 1)), "min_margin": _num(min(margins, default=math.inf)),
         "scores": bool(have), "near_tie_rows": near_rows[:20], "real_rows": real_rows[:20],
         "first_real_row": real_rows[0]["row"] if real_rows else None,
         "first_diff_row": min([r["row"] for r in real_rows[:1] + near_rows[:1] + expected_rows[:1]], default=None)}
    if companion is not None:
        m.update(expected=expected, expected_rows=expected_rows[:20])
    fails = []
    lim = bound(profile, "integer", "max_real_frac", kind)
    if lim is not None and real / max(rows, 1) > lim:
        fails.append({"metric": "max_real_frac", "value": real / max(rows, 1), "bound": lim,
                      "row": real_rows[0]["row"]})
    m["failures"] = fails
    return m


# ---------------------------------------------------------------- the comparison

@dataclass
class Report:
    """What compare found. `ok`: every common site within the profile; `first`: the first site that is not."""
    a: dict
    b: dict
    profile: str
    sites: list[dict]
    only_in_a: list[str]
    only_in_b: list[str]
    notes: list[str] = field(default_factory=list)
    first: dict | None = None
    first_diff: dict | None = None          # the first site with any difference (flips included)
    first_real: dict | None = None          # the first site with a real difference (beyond one ulp)
    missing: str | None = None              # why the candidate fails by what it lacks (the reference's logits)
    noise: dict | None = None               # the noise model's companion, when it judged the float sites

    @property
    def ok(self) -> bool:
        return self.first is None and self.missing is None

    @property
    def empty_sites(self) -> list[str]:
        """Common sites that hold no rows in these traces (e.g. the MTP block's, whose rows stop one position
        before the main model's, in a golden trace that keeps only the last position): nothing was compared
        there, and the report says so rather than counting them."""
        return [m["site"] for m in self.sites if m["shape"] and m["shape"][0] == 0]

    def to_json(self) -> dict:
        """A JSON-ready dict (non-finite numbers as the strings "inf", "-inf", "nan")."""
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x
        return clean({"ok": self.ok, "profile": self.profile, "a": self.a, "b": self.b, "first": self.first,
                      "missing": self.missing, "noise": self.noise, "first_diff": self.first_diff,
                      "first_real": self.first_real,
                      "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "notes": self.notes,
                      "empty_sites": self.empty_sites, "sites": self.sites})


def compare(a, b, profile: str = "auto", *, profiles: dict | None = None, partial: bool = False,
            noise="auto") -> Report:
    """Compare trace a (candidate) with trace b (reference): paths or TraceFiles -> Report.

    partial: the candidate records only some sites (one layer, no logits) and is checked on those;
    without it a candidate that lacks the reference's logits fails. Either way the report lists the
    sites that were not compared.

    noise: the noise model's companion (refimpl's own trace of the same input at the candidate's
    precision: a path or TraceFile), "auto" (the golden set's trace at that precision when b is a
    golden trace and the precisions differ: `find_companion`) or None (the profile only). With a
    companion every float site it holds is judged by its noise ratio (oracle/noise.py) instead of the
    profile's float bounds; integer sites keep the profile's rules, a disagreement refimpl's companion
    makes too being expected.

    Raises CompareError for traces that do not record the same run (tokens, config, chunking),
    a site whose shape or kind differs, or an unknown profile.
    """
    ta = check_trace(a) if isinstance(a, TraceFile) else load_trace(a)
    tb = check_trace(b) if isinstance(b, TraceFile) else load_trace(b)
    ta, tb, golden_rows = _same_rows(ta, tb)
    notes = check_same_run(ta, tb)
    if profiles is None:
        profiles = load_profiles()
    elif not isinstance(profiles, dict):
        raise CompareError(f"profiles must be a dict of profile tables, got {type(profiles).__name__}")
    else:
        for n, p in profiles.items():
            check_profile(n, p)
    name = auto_profile(ta.precision, tb.precision, profiles) if profile == "auto" else profile
    if name not in profiles:
        raise CompareError(f"unknown profile {name!r}; profiles: {', '.join(profiles)}")
    prof = profiles[name]
    common = set(ta.tensors) & set(tb.tensors)
    if not common:
        raise CompareError(f"the traces have no site in common ({ta.path}: {len(ta.tensors)} sites, "
                           f"{tb.path}: {len(tb.tensors)} sites)")
    if not any(ta.tensors[s].size or tb.tensors[s].size for s in common):   # else "within tolerance", unchecked
        raise CompareError(f"the traces' {len(common)} common site(s) hold no values (e.g. {sorted(common)[0]!r} "
                           f"{list(ta.tensors[sorted(common)[0]].shape)}): nothing to compare")
    mtp = mtp_layer_of(set(ta.tensors) | set(tb.tensors), ta.meta, tb.meta)
    tc = _companion(noise, ta, tb)
    excused_from = None                 # the first row whose selection flipped on a near-tie (companion aside)
    facts = {k: tb.meta.get(k, ta.meta.get(k)) for k in HINT_FACTS}        # the model facts hints may name
    sites = []
    for site in site_order(common, mtp):
        x, y = ta.tensors[site], tb.tensors[site]
        if x.shape != y.shape:
            raise CompareError(f"site {site!r} has shape {list(x.shape)} in {ta.path} but {list(y.shape)} in {tb.path}")
        ints = (x.dtype.kind == "i", y.dtype.kind == "i")
        if ints[0] != ints[1]:
            raise CompareError(f"site {site!r} is {x.dtype} in {ta.path} but {y.dtype} in {tb.path}: "
                               f"integer sites must be integers in both")
        layer, kind = split_site(site)
        if ints[0]:
            sname = f"layers.{layer}.{SCORES_OF[kind]}" if kind in SCORES_OF and layer is not None else None
            scores = [t.tensors.get(sname) if sname else None for t in (ta, tb)]
            for s, t in zip(scores, (ta, tb)):
                if s is not None and s.shape[0] != x.shape[0]:
                    raise CompareError(f"site {sname!r} in {t.path} has {s.shape[0]} rows, {site!r} {x.shape[0]}")
            c = tc.tensors.get(site) if tc is not None else None
            m = _integer_site(site, kind, x, y, [None if s is None else s.astype(np.float64) for s in scores], prof,
                              companion=c if c is not None and c.shape == x.shape else None)
            if tc is not None:
                flipped = [r["row"] for r in m["near_tie_rows"]]   # the candidate chose otherwise than refimpl did
                if flipped:
                    excused_from = min([excused_from, *flipped] if excused_from is not None else flipped)
        else:
            fmt = coarser(storage_format(ta.precision, kind, x.dtype), storage_format(tb.precision, kind, y.dtype))
            ids = f"layers.{layer}.ffn.expert_ids"
            if kind == "ffn.expert_weights" and ids in ta.tensors and ids in tb.tensors:
                x, y = _by_expert_id(x, ta.tensors[ids]), _by_expert_id(y, tb.tensors[ids])   # column order free
            c = tc.tensors.get(site) if tc is not None else None
            if c is not None and c.shape == y.shape and c.dtype.kind == "f":
                if kind == "ffn.expert_weights" and ids in tc.tensors:
                    c = _by_expert_id(c, tc.tensors[ids])
                m = _float_site(kind, x, y, fmt, {})                  # the noise ratio replaces the float bounds
                _noise_site(m, x, y, c, fmt, excused_from)
            else:
                m = _float_site(kind, x, y, fmt, prof)
        m.update(site=site, layer=layer, label=site_label(site, mtp), site_kind=kind, shape=list(x.shape),
                 ok=not m["failures"])
        if m["kind"] == "float" and not m["ok"]:              # what the numbers show (oracle/hints.py)
            m["hints"] = site_hints(kind, x, y, layer=layer, facts=facts,
                                    positions=_row_positions(site, golden_rows, len(ta.meta["tokens"]), mtp))
        sites.append(m)
    report = Report(a=_describe(ta), b=_describe(tb), profile=name, sites=sites, notes=notes,
                    only_in_a=site_order(set(ta.tensors) - common, mtp),
                    only_in_b=site_order(set(tb.tensors) - common, mtp))
    if tc is not None:
        judged = sum(1 for m in sites if "noise_ratio" in m)
        report.noise = {"companion": tc.path, "precision": tc.precision, "jump": noise_model.JUMP,
                        "floor_units": noise_model.FLOOR_UNITS, "sites": judged,
                        "unjudged_from": excused_from}
    report.first = _first_failure(sites, bf16_norms=_bf16_norms(report))
    if golden_rows is not None:                   # every row a report names is a token position
        _rows_to_positions(report, golden_rows, len(ta.meta["tokens"]), mtp)
    if "logits" in tb.tensors and "logits" not in ta.tensors and not partial:
        report.missing = (f"the candidate {ta.path} has no 'logits' site and the reference has: the end result "
                          f"of the run is not compared")
    elif report.only_in_b:
        report.notes.insert(0, f"NOT COMPARED{' (partial trace)' if partial else ''}: {len(report.only_in_b)} of the "
                               f"reference's {len(tb.tensors)} sites are missing from the candidate (listed below); "
                               f"only {len(sites)} sites were compared")
    for attr, key in (("first_diff", "first_diff_row"), ("first_real", "first_real_row")):
        m = next((m for m in sites if m[key] is not None), None)
        if m is not None:
            setattr(report, attr, {"site": m["site"], "layer": m["layer"], "label": m["label"],
                                   position_word(m["site"]): m[key]})
    return report


def find_companion(reference_path, precision: str) -> str | None:
    """The noise companion of a golden-set trace: `traces/{precision}/{input}.safetensors` beside the
    reference `traces/{p}/{input}.safetensors` of a golden folder (one holding manifest.json), else None."""
    ref = Path(reference_path).resolve()
    if len(ref.parents) < 3 or ref.parents[1].name != "traces" or not (ref.parents[2] / "manifest.json").is_file():
        return None
    path = ref.parents[1] / precision / ref.name
    return str(path) if path.is_file() else None


def companion_precision(candidate: str, reference: str) -> str | None:
    """The precision of refimpl's run that is the noise companion of a candidate against a reference, or None
    (the same precision: the profile says how close). A float32, float64 or mirror candidate: refimpl's run at
    its own precision. A bf16 engine (bf16 activations, fp32 accumulation in its own order): mirror's, which
    rounds at the same points; against a mirror reference, float64's (how far other roundings land from
    mirror; an engine that rounds where mirror does lands nearer, so this bound is the looser one)."""
    if candidate == "bf16":
        want = "float64" if reference in ("mirror", "bf16") else "mirror"
    else:
        want = candidate if candidate in ("float64", "float32", "mirror") else None
    return None if want == reference or candidate == reference else want


def _companion(noise, ta: TraceFile, tb: TraceFile) -> TraceFile | None:
    """The companion trace for compare's `noise` argument, on the reference's rows (CompareError if it does
    not record the same input or is not at the candidate's precision); None: no noise model."""
    if noise is None or noise is False:
        return None
    if isinstance(noise, str) and noise == "auto":
        want = companion_precision(ta.precision, tb.precision)
        if want is None:                                      # the same precision: the profile says how close
            return None
        noise = find_companion(tb.path, want)
        if noise is None:
            return None
    try:
        tc = check_trace(noise) if isinstance(noise, TraceFile) else load_trace(noise)
    except CompareError as e:
        raise CompareError(f"the noise companion: {e}") from None
    want = companion_precision(ta.precision, tb.precision)
    if tc.precision != want:
        raise CompareError(f"the noise companion {tc.path} is a {tc.precision} trace; a {ta.precision} candidate against "
                           f"a {tb.precision} reference takes refimpl's own {want or ta.precision} trace"
                           + ("" if want else " (the same precision as the reference: the profile applies; --noise off)"))
    if tc.meta["tokens"] != tb.meta["tokens"]:
        raise CompareError(f"the noise companion {tc.path} records other token ids than the reference {tb.path}")
    cc, cb = tc.meta.get("config_id"), tb.meta.get("config_id")
    if cc is not None and cb is not None and cc != cb:
        raise CompareError(f"the noise companion {tc.path} comes from another model config (config_id {cc} vs {cb})")
    tc, _, _ = _same_rows(tc, tb)
    if tc.meta.get("golden_rows") != tb.meta.get("golden_rows"):    # a golden companion, a full-length reference
        raise CompareError(f"the noise companion {tc.path} keeps the rows {tc.meta.get('golden_rows')} only; the "
                           f"reference {tb.path} has every row: give a full-length companion")
    return tc


def _noise_site(m: dict, a, b, c, fmt: str, excused_from: int | None) -> None:
    """Judge a float site by the noise model: per position, the candidate's RMS error over the companion's
    (oracle/noise.py); rows from excused_from on (after a selection upstream where the candidate chose
    otherwise than both the reference and the companion, on a near-tie) are shown but not judged. Fills m's
    noise fields and its failure."""
    if a.size == 0:
        m.update(noise_ratio=0.0, noise_row=None, noise_expected=0.0, noise_observed=0.0)
        return
    p = a.shape[0]
    chk = noise_model.check(a.reshape(p, -1), b.reshape(p, -1), c.reshape(p, -1), fmt)
    judged = chk.ratio if excused_from is None else chk.ratio[:excused_from]
    worst = int(np.argmax(chk.ratio))
    scale = noise_model.site_rms(b) or 1.0
    m.update(noise_ratio=_num(chk.worst), noise_row=worst, noise_expected=_num(chk.expected[worst] / scale),
             noise_observed=_num(chk.observed[worst] / scale),
             noise_judged_rows=int(judged.size))
    over = judged > chk.jump
    if over.any():
        t = int(np.argmax(over))
        m["failures"] = [{"metric": "noise_ratio", "value": _num(chk.ratio[t]), "bound": chk.jump, "row": t}]
def _row_positions(site: str, golden_rows, s: int, mtp: int | None):
    """The token position of each row of a site (None: row r is position r, or entry r in compressed_kv)."""
    layer, kind = split_site(site)
    if golden_rows is None or kind == "attn.compressed_kv":
        return None
    is_mtp = site.startswith("mtp.") or (layer is not None and layer == mtp)
    return [r for r in golden_rows if r < s - 1] if is_mtp else list(golden_rows)


def _few(names: list[str], n: int = 3) -> str:
    """The first n names, and how many more."""
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


def _by_expert_id(weights: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row of the routing weights ordered by its expert id (ids and weights share a column order)."""
    if ids.shape != weights.shape:
        return weights
    return np.take_along_axis(weights, np.argsort(ids, axis=1, kind="stable"), axis=1)


def _describe(t: TraceFile) -> dict:
    keys = ("precision", "implementation", "revision", "config_id", "chunks", "replay")
    return {"path": t.path, **{k: t.meta[k] for k in keys if k in t.meta}, "tokens": len(t.meta["tokens"])}


def _bf16_norms(r) -> bool:
    """Whether a trace of the pair ran the q norm in bf16 ops (mirror, bf16), the premise of Q_NORM_HINT."""
    return not all(d.get("precision") in ("float64", "float32") for d in (r.a, r.b))


def _first_failure(sites: list[dict], *, bf16_norms: bool) -> dict | None:
    """The first site out of tolerance, its first failing row, its worst element, and the hints that apply."""
    for i, m in enumerate(sites):
        if m["ok"]:
            continue
        f = m["failures"][0]
        first = {"site": m["site"], "layer": m["layer"], "label": m["label"], "metric": f["metric"],
                 "value": f["value"], "bound": f["bound"], position_word(m["site"]): f["row"]}
        if m["kind"] == "float":
            w = m["worst"]
            idx = np.unravel_index(w["row"] * int(np.prod(m["shape"][1:], dtype=np.int64)) + w["col"], m["shape"])
            first["worst"] = {"index": [int(j) for j in idx], "a": w["a"], "b": w["b"], "ulps": w["ulps"]}
        else:
            first["rows"] = m["real_rows"][:3]
        hints = []
        if m["site_kind"] == "attn.q" and bf16_norms:             # the hint's premise: bf16 q norms
            hints.append(Q_NORM_HINT)
        if m["kind"] == "float" and m["real"] == 0:
            hints.append(f"every differing element is a rounding-boundary flip (one ulp of {m['format']}): the "
                         "arithmetic agrees up to the last bit; an engine with another accumulation order "
                         "differs this way, and a statistical profile (bf16-engine-vs-mirror) fits it")
        upstream = [s for s in sites[:i + 1] if s["kind"] == "integer" and s["near_ties"]]
        if upstream:
            where = "; ".join(f"{s['site']} rows {[r['row'] for r in s['near_tie_rows'][:5]]}" for s in upstream[:3])
            hints.append(f"near-tie selections upstream ({where}): a choice that flipped on a near-tie changes "
                         f"everything computed from it; compare with the choices forced to agree")
        first["hints"] = hints + m.get("hints", [])
        return first
    return None


# ---------------------------------------------------------------- output

def _g(x, digits=2) -> str:
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return f"{x:.{digits}e}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits + 2}g}"


def describe_replay(replay: dict) -> str:
    """One line of what a trace's run forced (its metadata `replay`, oracle/replay.py Replay.summary)."""
    parts = [f"{what} of layers {replay[key]}" for key, what in (("expert_ids", "expert ids"),
             ("expert_weights", "expert weights"), ("topk", "indexer top-k")) if replay.get(key)]
    hash_ids = "; hash layers' ids included" if replay.get("hash_layers") else ""
    return f"{', '.join(parts) or 'nothing'} from {replay.get('source', '?')}{hash_ids}"


def _rule(r: Report) -> str:
    """What judged the sites: the profile, and the noise model when it judged the float sites."""
    return f"noise model x{r.noise['jump']:g}, {r.profile} for the rest" if r.noise else r.profile


def format_report(r: Report) -> str:
    """The readable report: header, one row per site, the first site out of tolerance and its hints."""
    lines = [f"FAILED: {r.missing}"] if r.missing else []
    lines += [f"A: {r.a['path']}  ({r.a['precision']}{', ' + r.a['implementation'] if 'implementation' in r.a else ''})",
             f"B: {r.b['path']}  ({r.b['precision']}{', ' + r.b['implementation'] if 'implementation' in r.b else ''})"
             f"  reference",
             f"{r.a['tokens']} tokens, chunks {r.a.get('chunks')}; profile {r.profile}"]
    lines += [f"{which} replayed {describe_replay(t['replay'])}" for which, t in (("A", r.a), ("B", r.b))
              if isinstance(t.get("replay"), dict)]
    lines += [f"note: {n}" for n in r.notes]
    if r.noise:
        lines.append(f"noise model: companion {r.noise['companion']} ({r.noise['precision']}); a float site fails where "
                     f"its error exceeds {r.noise['jump']:g}x the companion's (column 'x noise')"
                     + (f"; positions from {r.noise['unjudged_from']} on follow a flipped selection and are not judged"
                        if r.noise["unjudged_from"] is not None else ""))
    nx = f" {'x noise':>8}" if r.noise else ""
    head = f"{'site':34} {'max abs':>9} {'max rel':>9} {'rms rel':>9} {'1 - cos':>9} {'1-ulp':>7} {'real':>7}{nx}  {'':6} extra"
    lines += ["", head, "-" * len(head)]
    for m in r.sites:
        status = "ok" if m["ok"] else "FAIL"
        if m["kind"] == "float":
            cos = _g(1.0 - m["cos"])
            extra = ""
            if "top1" in m:
                extra = f"top1 {m['top1']:.3f} top5 {m['top5']:.3f} KL {_g(m['kl'])}"
            ratio = (f" {_g(m['noise_ratio'], 1):>8}" if "noise_ratio" in m else f" {'-':>8}") if r.noise else ""
            lines.append(f"{m['site']:34} {_g(m['max_abs']):>9} {_g(m['max_rel']):>9} {_g(m['rms_rel']):>9} "
                         f"{cos:>9} {m['flips']:>7} {m['real']:>7}{ratio}  {status:6} {extra}".rstrip())
        else:                       # integer sites: rows whose sets agree; real = rows that really disagree
            margin = f", min margin {_g(m['min_margin'])}" if m["scores"] else ", no scores"
            agree = f"sets agree in {m['agree']}/{m['rows']} rows"
            expected = f", expected {m['expected']}" if "expected" in m else ""
            lines.append(f"{m['site']:34} {agree:>39} {'':>7} {m['real']:>7}{' ' * len(nx)}  {status:6} near-ties "
                         f"{m['near_ties']}{expected}, close calls {m['close_calls']}{margin}")
    if r.only_in_a:
        lines.append(f"\nonly in A (not compared): {', '.join(r.only_in_a)}")
    if r.only_in_b:
        lines.append(f"{'' if r.only_in_a else chr(10)}only in B (not compared): {', '.join(r.only_in_b)}")
    lines.append("")
    # a float32 trace differs from any other implementation by rounding at its first site: the lines would
    # always name it, which tells nothing
    informative = "float32" not in (r.a.get("precision"), r.b.get("precision"))
    for f, what in ((r.first_diff, "first difference"), (r.first_real, "first real difference (beyond one ulp)")):
        if f is not None and informative:
            pw = "entry" if "entry" in f else "position"
            lines.append(f"{what}: {f['site']}" + (f" ({f['label']})" if f["label"] else "") + f", {pw} {f[pw]}")
    q_first = any(f is not None and split_site(f["site"])[1] == "attn.q" for f in (r.first_diff, r.first_real))
    if q_first and _bf16_norms(r) and (r.first is None or split_site(r.first["site"])[1] != "attn.q"):
        lines.append(f"  hint: {Q_NORM_HINT}")
    if r.first is None:
        empty = r.empty_sites
        counted = f"{len(r.sites) - len(empty)} sites compared" + (
            f"; {len(empty)} held no rows here and were not compared ({_few(empty)})" if empty else "")
        if r.missing:
            lines.append(f"FAILED: {r.missing} ({counted}, within tolerance ({_rule(r)}))")
        else:
            lines.append(f"within tolerance ({_rule(r)}): {counted}")
        return "\n".join(lines)
    f = r.first
    pw = "entry" if "entry" in f else "position"
    lines.append(f"FIRST OUT OF TOLERANCE: {f['site']}" + (f" ({f['label']})" if f["label"] else "") +
                 f", {pw} {f[pw]}: {f['metric']} = {_g(f['value'], 3)} (bound {_g(f['bound'], 3)})")
    if f["metric"] == "noise_ratio":
        m = next(m for m in r.sites if m["site"] == f["site"])
        lines.append(f"  A's error jumps here: at worst {_g(m['noise_observed'], 3)} of the site's RMS at {pw} "
                     f"{m['noise_row']}, where refimpl's own {r.noise['precision']} run errs by {_g(m['noise_expected'], 3)}")
    if "worst" in f:
        w = f["worst"]
        m = next(m for m in r.sites if m["site"] == f["site"])
        apart = {0: "equal", 1: "one unit in the last place", 2: "more than one unit in the last place"}
        lines.append(f"  worst element {tuple(w['index'])}: A = {w['a']!r}, B = {w['b']!r} "
                     f"({apart.get(w['ulps'], 'non-finite')} of {m['format']})")
    for row in f.get("rows", []):
        lines.append(f"  row {row['row']}: only in A {row['a_only']}, only in B {row['b_only']}, "
                     f"score spread {_g(row['spread'])}")
    failing = [m["site"] for m in r.sites if not m["ok"]]
    lines.append(f"  {len(failing)} of {len(r.sites)} sites out of tolerance")
    for h in f["hints"]:
        lines.append(f"  hint: {h}")
    later: dict[str, list[str]] = {}                        # structural hints of the other failing sites,
    for m in r.sites:                                       # each once, at the first site that has it
        for h in m.get("hints", []) if m["site"] != f["site"] else []:
            later.setdefault(h, []).append(m["site"])
    for h, where in list(later.items())[:MAX_HINT_SITES]:
        also = f" (and {len(where) - 1} later sites)" if len(where) > 1 else ""
        lines.append(f"  hint at {where[0]}{also}: {h}")
    if len(later) > MAX_HINT_SITES:
        lines.append(f"  ({len(later) - MAX_HINT_SITES} more hints at later sites: --json lists each site's)")
    return "\n".join(lines)


class PlotUsageError(CompareError):
    """A malformed --plot value ('' or a name not ending in .png): a usage error (exit 2)."""


def check_plot_path(path, inputs=()) -> Path:
    """Check a plot output path before any comparing: it must end in .png (the one format written),
    be a new name or a regular file (not a symlink, FIFO, device or folder: `files.check_output_path`)
    and not be one of the input traces. PlotUsageError for a malformed value, FileError/CompareError
    for a refused path; nothing is touched."""
    text = str(path)
    if text == "":
        raise PlotUsageError("--plot: the file name is empty; give a name ending in .png")
    if not text.lower().endswith(".png"):
        raise PlotUsageError(f"--plot: {text!r} does not end in .png; the plot is written as PNG only")
    out, exists = check_output_path(text)
    if exists:
        for i in inputs:
            try:
                same = Path(i).exists() and out.samefile(i)
            except OSError:
                same = False
            if same:
                raise CompareError(f"--plot: {text} is the input trace {i}; give a new file name for the plot")
    return out


def plot_report(r: Report, path) -> None:
    """Write a PNG (check_plot_path first) of each float site's error (rms rel, worst position) along the data flow: embed, the layers,
    final.x / logits, the MTP block, mtp.*; one line per site kind. Exact sites (error 0) are not drawn
    (log scale); the first site out of tolerance is marked."""
    try:
        import matplotlib
    except ImportError:
        raise CompareError("--plot needs matplotlib: pip install 'refimpl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    floats = [m for m in r.sites if m["kind"] == "float"]
    mtp = next((m["layer"] for m in r.sites if m["label"].startswith("MTP layer")), None)
    main_layers = sorted({m["layer"] for m in floats if m["layer"] is not None and m["layer"] != mtp})
    last = main_layers[-1] if main_layers else -1
    top = {"embed": -1, "final.x": last + 1, "logits": last + 1, "mtp.final.x": last + 3, "mtp.logits": last + 3}

    def x_of(m):
        if m["layer"] is None:
            return top.get(m["site"], last + 4)
        return last + 2 if m["layer"] == mtp else m["layer"]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    kinds = list(dict.fromkeys(m["site_kind"] for m in floats if m["layer"] is not None))
    colors = plt.get_cmap("tab20")
    for j, kind in enumerate(kinds):
        pts = [(x_of(m), m["rms_rel"]) for m in floats if m["site_kind"] == kind and m["layer"] is not None
               and m["rms_rel"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="os^vD"[j % 5], ms=4, lw=1, color=colors(j % 20), label=kind)
    shown: dict[int, int] = {}
    for m in floats:
        if m["layer"] is None and m["rms_rel"] > 0:
            k = shown[x_of(m)] = shown.get(x_of(m), -1) + 1              # labels at one x: stacked
            ax.plot(x_of(m), m["rms_rel"], "k*", ms=8)
            ax.annotate(m["site"], (x_of(m), m["rms_rel"]), fontsize=7, xytext=(5, 3 + 10 * k),
                        textcoords="offset points")
    if r.first is not None:
        m = next(m for m in r.sites if m["site"] == r.first["site"])
        y = m.get("rms_rel") or 1.0
        ax.plot(x_of(m), y if y > 0 else 1.0, "rx", ms=14, mew=2, label=f"first out of tolerance: {m['site']}")
    ticks = [-1] + main_layers + [last + 1] + ([last + 2, last + 3] if mtp is not None else [])
    labels = ["embed"] + [str(i) for i in main_layers] + ["final"] + ([f"MTP {mtp}", "mtp"] if mtp is not None else [])
    ax.set_xticks(ticks, labels)
    ax.set_yscale("log")
    ax.set_xlabel("data flow: layer")
    ax.set_ylabel("rms rel error (worst position)")
    ax.set_title(f"{Path(r.a['path']).name} vs {Path(r.b['path']).name}, profile {r.profile}"
                 f" ({'within tolerance' if r.ok else 'OUT OF TOLERANCE'}; exact sites not drawn)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:          # no legend without labelled lines (no UserWarning)
        ax.legend(fontsize=7, ncol=4, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()                                 # render in memory, then one atomic write:
    try:                                               # nothing half-written on Ctrl-C or failure
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_bytes(path, buf.getvalue())
