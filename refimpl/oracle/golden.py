"""Golden sets: fixed, versioned traces of the tiny model that other implementations test against.

A golden set (the repository's `golden/`) holds, for the tiny model written by
`make-checkpoint tiny --seed 0` (identified by the SHA-256 of every file it writes):

    manifest.json                        format version, generating commit, config, versions,
                                         the inputs, sha256 of every file, the profile per precision
    traces/{precision}/{input}.safetensors   one trace per input: every site, sampled rows

The inputs cross every length threshold of docs/architecture.md §20 (lengths 1, m-1, m, m+1 for
both ratios, W-1, W, W+1, W+2m, past index_topk entries), in one prefill, in decode after a
prefill and in an irregular chunking. To keep the set small, each trace keeps only the rows of
the positions listed for its input (`rows` in the manifest: the threshold positions it reaches
and its last position); sites with one row per position keep those rows, the MTP block's sites
(one row per position but the last) keep the listed rows below s - 1, and `compressed_kv` (one
row per entry) keeps all its rows. float64 traces are stored rounded to float32 (documented in
the manifest); mirror traces are stored as computed (fp32 holding the official roundings).

One more checkpoint (`checkpoints` in the manifest, made from a preset and the same seed) holds what
the tiny one cannot: `tiny-partial` (head_dim 192), an FP8 weight with a partial 128-row block; an
input whose `checkpoint` names it runs on it.

`tools/make_golden.py` is the only writer; `verify()` (and `refimpl golden verify`) re-makes the
checkpoints, checks their hashes, re-runs every input and compares every site.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refimpl.config import Config
from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.formats.config_file import read_config
from refimpl.formats.files import parse_json
from refimpl.formats.weights import expected_tensors, load
from refimpl.model.transformer import Model
from refimpl.oracle import noise
from refimpl.oracle.gradients import GradTrace, GradTraceError, compare_gradients, run_grad_trace
from refimpl.oracle.trace import run_trace, site_names
from refimpl.synthetic.writer import make_checkpoint

FORMAT_VERSION = 4                             # 2: the manifest says why the set was (re)made (`reason`);
                                               # 3: float32 traces (the noise model's companion), float64 at every length
                                               # and an input may run on a second checkpoint (`checkpoints`);
                                               # 4: golden gradient traces (`gradients`: docs/gradients.md)
MANIFEST = "manifest.json"
SEED = 0                                       # make-checkpoint tiny --seed 0
TOKEN_SEED = 2026                              # the token ids of every input: prefixes of one sequence
PRECISIONS = ("float64", "float32", "mirror")
# how each precision's recomputation must agree with the stored values (refimpl/oracle/profiles):
# mirror is exact by design (every op exact inside, rounded once); float64 is stored rounded to
# float32, and a float64 sum whose last bits differ between BLAS builds may round to the
# neighbouring float32: one unit in the last place is allowed there. float32 takes its products
# from the machine's BLAS, whose summation order (and so last bits) differs between builds, and the
# model carries such differences forward: the recomputation is held by the noise model
# (oracle/noise.py) against the stored float64 trace with the stored float32 trace as its companion
# (each position's error at most noise.JUMP x the stored one's); without a float64 trace of the
# input, every element within FLOAT32_REL of the site's largest magnitude (the float32-vs-float64
# profile's max_rel bound). The same machine recomputes it exactly.
PROFILES = {"float64": "float64-stored-as-float32", "float32": "float32-within-noise", "mirror": "mirror-vs-mirror"}
FLOAT32_REL = 1e-4


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")        # an input's name: the file name of its traces
SHA256 = re.compile(r"[0-9a-f]{64}")
LAYOUTS = ("official", "canonical")


class GoldenError(ValueError):
    """A golden set that is missing, damaged, or does not match what refimpl computes."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GoldenInput:
    """One input of the golden set: a length, how it is run, and the positions whose rows are kept."""
    name: str
    length: int
    chunks: tuple[int, ...] | None = None     # prefill in these chunks
    decode_from: int | None = None            # prefill K, then decode step by step
    rows: tuple[int, ...] = ()
    precisions: tuple[str, ...] = PRECISIONS  # the precisions this input is stored in
    config: tuple[tuple[str, float], ...] = ()   # config.json keys changed for this input (same weights)
    checkpoint: str | None = None             # the manifest's `checkpoints` entry it runs on (None: the main one)

    def stored(self, held) -> tuple[str, ...]:
        """The precisions this input has a trace in, in a set that holds `held` (a set made for fewer
        precisions than an input lists, e.g. tools/make_golden.py --ckpt, stores it in those only)."""
        return tuple(p for p in self.precisions if p in held)

    def run_kwargs(self) -> dict:
        return {"chunks": list(self.chunks) if self.chunks else None, "decode_from": self.decode_from}

    def as_dict(self) -> dict:
        d = {"name": self.name, "length": self.length, "chunks": list(self.chunks) if self.chunks else None,
             "decode_from": self.decode_from, "rows": list(self.rows), "precisions": list(self.precisions)}
        if self.config:
            d["config"] = dict(self.config)
        if self.checkpoint:
            d["checkpoint"] = self.checkpoint
        return d

    @classmethod
    def from_dict(cls, d, n_tokens: int | None = None) -> "GoldenInput":
        """An input of a manifest, every field checked against its range (n_tokens: the manifest's token count)."""
        if not isinstance(d, dict):
            raise GoldenError(f"an input must be a JSON object, got {type(d).__name__}")
        name = d.get("name")
        if not (isinstance(name, str) and NAME.fullmatch(name)):
            raise GoldenError(f"an input's 'name' must be a file name of letters, digits, '.', '_' and '-', "
                              f"got {name!r:.80}")
        length = d.get("length")
        most = n_tokens if n_tokens is not None else length
        if not (_is_int(length) and _is_int(most) and 1 <= length <= most):
            raise GoldenError(f"input {name}: 'length' must be an integer in [1, {most}] (the manifest's tokens), "
                              f"got {length!r:.80}")
        chunks, k, rows = d.get("chunks"), d.get("decode_from"), d.get("rows")
        if chunks is not None and not (isinstance(chunks, list) and chunks and all(_is_int(n) and n > 0 for n in chunks)
                                       and sum(chunks) == length):
            raise GoldenError(f"input {name}: 'chunks' must be null or positive integers adding up to its length "
                              f"{length}, got {chunks!r:.80}")
        if k is not None and not (_is_int(k) and 1 <= k < length and chunks is None):
            raise GoldenError(f"input {name}: 'decode_from' must be null or an integer in [1, {length - 1}] "
                              f"(the prefill length), without 'chunks'; got {k!r:.80}")
        if not (isinstance(rows, list) and rows and all(_is_int(r) for r in rows)
                and all(0 <= a < b for a, b in zip(rows, rows[1:])) and 0 <= rows[0] and rows[-1] < length):
            raise GoldenError(f"input {name}: 'rows' must list increasing positions in [0, {length}), "
                              f"got {rows!r:.80}")
        precisions = d.get("precisions")
        if not (isinstance(precisions, list) and precisions and all(p in PRECISIONS for p in precisions)
                and len(set(precisions)) == len(precisions)):
            raise GoldenError(f"input {name}: 'precisions' must list one or more of {', '.join(PRECISIONS)}, "
                              f"got {precisions!r:.80}")
        config = d.get("config") or {}
        if not isinstance(config, dict) or not all(k in CONFIG_OVERRIDES for k in config):
            raise GoldenError(f"input {name!r}: config changes {config!r:.80} are not among the keys a "
                              f"golden input may change ({', '.join(CONFIG_OVERRIDES)})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in config.values()):
            raise GoldenError(f"input {name}: config changes must be finite numbers, got {config!r:.80}")
        checkpoint = d.get("checkpoint")
        if checkpoint is not None and not (isinstance(checkpoint, str) and NAME.fullmatch(checkpoint)):
            raise GoldenError(f"input {name}: 'checkpoint' must be null or the name of an entry of the manifest's "
                              f"'checkpoints', got {checkpoint!r:.80}")
        return cls(name, length, tuple(chunks) if chunks else None, k, tuple(rows), tuple(precisions),
                   tuple(sorted(config.items())), checkpoint)

    def model(self, model):
        """The model this input runs on: `model`, or the same weights under its changed config keys."""
        if not self.config:
            return model
        cfg = model.cfg.replace(**{CONFIG_OVERRIDES[k]: v for k, v in self.config})
        return Model(cfg, model.weights, precision=model.precision, revision=model.revision, layout=model.layout,
                     kernels=model.kernels)


# config.json keys an input may change (key -> Config field): the clamp input lowers swiglu_limit so
# that the clamp binds on the tiny model (its activations stay below the released limit of 10)
CONFIG_OVERRIDES = {"swiglu_limit": "swiglu_limit"}
CLAMP_LIMIT = 2.0


def thresholds(cfg) -> list[int]:
    """Positions t where some implementation's behaviour changes (docs/architecture.md §20), for cfg."""
    W = cfg.window_size
    ratios = sorted({m for m in cfg.compress_ratios if m})
    ts = {0, W - 2, W - 1, W, W + 1}
    for m in ratios:
        ts |= {m - 2, m - 1, m, 2 * m - 1, W + 2 * m - 1}
    if any(cfg.uses_indexer(i) for i in range(cfg.n_layers)):
        m = min(r for r in ratios)
        ts |= {m * cfg.index_topk - 1, m * (cfg.index_topk + 1) - 1}      # top-k starts dropping entries
    return sorted(t for t in ts if t >= 0)


def golden_inputs(cfg) -> list[GoldenInput]:
    """The inputs of a golden set for cfg: every threshold length, one long prefill, decode, chunks.

    Every input is stored in every precision. In float64 a position's result does not depend on
    the length, the chunking or the call type (the rows of the long prefill are those of every
    shorter one), but a float implementation is checked on each input as it is, with the float32
    trace of the same input as its noise companion (oracle/noise.py); in mirror the official index
    layout depends on the prefill length and the call type, so each length is its own case.
    """
    W = cfg.window_size
    ratios = sorted({m for m in cfg.compress_ratios if m})
    ts = thresholds(cfg)
    long = ts[-1] + 13                                                   # past every threshold
    lengths = {1, W - 1, W, W + 1} | {n for m in ratios for n in (m - 1, m, m + 1, W + 2 * m)}
    inputs = [GoldenInput(f"prefill-{n}", n, rows=(n - 1,)) for n in sorted(lengths)]
    m, M = min(ratios), max(ratios)
    key = {0, m - 1, 2 * m - 1, M - 1, W - 1, W, W + 1, W + 2 * m - 1, ts[-1], long - 1}   # first entries, the
    inputs.append(GoldenInput(f"prefill-{long}", long, rows=tuple(sorted(key))))         # ring's wrap, top-k drop
    k = max(W - 3, 1)                                                    # decode across the ring's wrap, W+2m, top-k
    inputs.append(GoldenInput(f"decode-{k}-to-{long}", long, decode_from=k,
                              rows=tuple(sorted({k, W, W + 2 * m - 1, ts[-1], long - 1}))))
    chunks, left = [], long
    for n in (3, 5, 1, 9, 2, 13, 1, 16, 7):                              # irregular, crossing boundaries
        n = min(n, left)
        chunks.append(n)
        left -= n
    chunks += [left] if left else []
    ends = np.cumsum(chunks) - 1                                         # the last position of each chunk
    inputs.append(GoldenInput(f"chunked-{long}", long, chunks=tuple(chunks),
                              rows=tuple(int(e) for e in ends[[1, 3, 5, 6]]) + (long - 1,)))
    # the SwiGLU clamp (routed and shared experts) binding: the same weights with swiglu_limit 2
    inputs.append(GoldenInput(f"prefill-{m}-swiglu-limit-2", m, rows=tuple(range(m)),
                              config=(("swiglu_limit", CLAMP_LIMIT),)))
    # a partial FP8 block (wkv [192, c]: rows 128-191 one half-full block), on the second checkpoint
    # (its first position, and the last, which sees the first CSA entry: 0.27 MB per precision)
    inputs.append(GoldenInput(f"{PARTIAL}-prefill-{m + 1}", m + 1, rows=(0, m), checkpoint=PARTIAL))
    return inputs


# ---------------------------------------------------------------- golden gradients

# Gradient traces (refimpl/oracle/gradients.py) of threshold inputs of the tiny model, float64, stored
# as computed (float64: the comparison's tolerance is far below float32's resolution). To stay small each
# keeps the rows of its `rows` of every activation gradient (`grad.<site>`; compressed_kv: every entry)
# and the whole gradient of every parameter of at most GRAD_PARAM_MAX elements (norms, sinks, the
# compressors' ape, the mHC scales and biases: the parameters new in V4's backward; grad.<name>).
# A position whose own loss is left out and that no later loss sees (the last, or the last two for
# MTP) has gradient 0: the rows are earlier ones.
GRAD_PARAM_MAX = 1024
# verify recomputes them with ordinary BLAS, whose summation order differs between builds: a float64
# gradient summed in another order differs in its last bits, amplified by the model's conditioning, so
# the check is max |computed - stored| <= GRAD_RTOL * max |stored| per tensor, not bit for bit (the
# same machine recomputes them exactly; a real backward bug is wrong by 1e-3 or more of the scale).
GRAD_RTOL = 1e-9


@dataclass(frozen=True)
class GoldenGradient:
    """One golden gradient trace: the gradients of a head's loss on a prefix of the golden tokens."""
    name: str
    length: int
    head: str                                  # "main" or "mtp" (refimpl/oracle/gradients.py: run_grad_trace)
    rows: tuple[int, ...]
    params: tuple[str, ...] = ()               # the parameter gradients kept whole (grad.<name>); filled by the writer

    def as_dict(self) -> dict:
        return {"name": self.name, "length": self.length, "head": self.head, "rows": list(self.rows),
                "params": list(self.params), "file": gradient_file(self.name)}

    @classmethod
    def from_dict(cls, d, n_tokens: int) -> "GoldenGradient":
        if not isinstance(d, dict):
            raise GoldenError(f"a gradient entry must be a JSON object, got {type(d).__name__}")
        name, length, head, rows, params = (d.get(k) for k in ("name", "length", "head", "rows", "params"))
        if not (isinstance(name, str) and NAME.fullmatch(name)):
            raise GoldenError(f"a gradient entry's 'name' must be a file name, got {name!r:.80}")
        if not (_is_int(length) and 2 <= length <= n_tokens):
            raise GoldenError(f"gradient {name}: 'length' must be an integer in [2, {n_tokens}], got {length!r:.80}")
        if head not in ("main", "mtp"):
            raise GoldenError(f"gradient {name}: 'head' must be 'main' or 'mtp', got {head!r:.80}")
        if not (isinstance(rows, list) and rows and all(_is_int(r) for r in rows)
                and all(0 <= a < b for a, b in zip(rows, rows[1:])) and rows[0] >= 0 and rows[-1] < length):
            raise GoldenError(f"gradient {name}: 'rows' must list increasing positions in [0, {length}), got {rows!r:.80}")
        if not (isinstance(params, list) and all(isinstance(p, str) and p.startswith("grad.") for p in params)):
            raise GoldenError(f"gradient {name}: 'params' must list gradient names (grad.<parameter>), got {params!r:.80}")
        if d.get("file") != gradient_file(name):
            raise GoldenError(f"gradient {name}: 'file' must be {gradient_file(name)}, got {d.get('file')!r:.80}")
        return cls(name, length, head, tuple(rows), tuple(params))


def gradient_file(name: str) -> str:
    """The path of a golden gradient trace in a golden folder (as the manifest's `files` lists it)."""
    return f"gradients/{name}.safetensors"


def golden_gradients(cfg) -> list[GoldenGradient]:
    """The golden gradient traces for cfg: the main loss across the window's edge, the MTP loss across a
    compression boundary (the params are chosen by the writer: `cut_gradients`)."""
    W, m, M = cfg.window_size, min(r for r in cfg.compress_ratios if r), max(cfg.compress_ratios)
    # main, W+1 tokens: position 0 leaves position W's window (attended by 1..W-1 only); position M-1
    # closes the first block of both ratios (every compressed entry's gradient flows back into it)
    # mtp, M+1 tokens: position m-1 closes the first ratio-m block; M-2 is the last position with an MTP loss
    return [GoldenGradient(f"grad-main-prefill-{W + 1}", W + 1, "main", (0, M - 1)),
            GoldenGradient(f"grad-mtp-prefill-{M + 1}", M + 1, "mtp", (m - 1, M - 2))]


def parameter_gradients(cfg) -> set[str]:
    """The names of cfg's parameter gradients (grad.<checkpoint name>); the other gradients are of sites."""
    return {f"grad.{n}" for n in expected_tensors(cfg)}


def cut_gradients(tensors: dict, rows, length: int, param_names, *, params=None) -> dict:
    """The stored part of a gradient trace: the listed rows of every activation gradient (compressed_kv:
    every entry) and the parameter gradients in `params` (None: those of at most GRAD_PARAM_MAX elements).
    param_names: the model's parameter gradients (parameter_gradients)."""
    out = {}
    for name, x in tensors.items():
        x = np.asarray(x, np.float64)
        if name in param_names:
            if (x.size <= GRAD_PARAM_MAX) if params is None else (name in params):
                out[name] = x
        elif name.endswith(".compressed_kv"):
            out[name] = x                                                 # one row per entry: all of them
        else:
            if x.shape[0] not in (length, length - 1):
                raise GoldenError(f"gradient {name} has {x.shape[0]} rows for an input of {length} tokens")
            out[name] = x[[r for r in rows if r < x.shape[0]]]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# the second checkpoint of the set: the tiny-partial preset (head_dim 192), an FP8 weight with a partial block
PARTIAL = "tiny-partial"


def extra_checkpoints(cfg) -> dict[str, Config]:
    """The other checkpoints a golden set for cfg holds inputs of: {name: its config} (made with seed SEED)."""
    return {PARTIAL: Config.tiny_partial()} if cfg == Config.tiny() else {}


def golden_tokens(cfg, n: int) -> list[int]:
    """The first n token ids of the golden sequence (every input uses a prefix of it)."""
    rng = np.random.default_rng(TOKEN_SEED)
    return [int(t) for t in rng.integers(0, cfg.vocab_size, max(n, 1))][:n]


def sample_rows(trace_tensors: dict[str, np.ndarray], rows: tuple[int, ...], length: int,
                store_float64_as_float32: bool = True) -> dict[str, np.ndarray]:
    """The stored part of a trace: the listed rows of every per-position site (see the module docstring)."""
    out = {}
    for name, x in trace_tensors.items():
        x = np.asarray(x)
        if name.endswith(".compressed_kv"):
            kept = x                                                      # one row per entry: all of them
        else:
            n = x.shape[0]                                                # length, or length-1 (MTP block)
            if n not in (length, length - 1):
                raise GoldenError(f"site {name} has {n} rows for an input of {length} tokens")
            kept = x[[r for r in rows if r < n]]
        if kept.dtype == np.float64 and store_float64_as_float32:
            kept = kept.astype(np.float32)
        out[name] = np.ascontiguousarray(kept)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_hashes(ckpt: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint folder (by name)."""
    return {p.name: sha256_file(p) for p in sorted(Path(ckpt).iterdir()) if p.is_file()}


# ---------------------------------------------------------------- reading and verifying

def default_dir() -> Path:
    """The golden set this refimpl comes with: refimpl/golden of an installed package (pyproject.toml
    installs the repository's golden/ there), else golden/ next to the package (a clone, an editable
    install). Never the current folder: the answer does not depend on where the command runs."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "golden", package.parent / "golden"):
        if (folder / MANIFEST).is_file():
            return folder
    raise GoldenError(f"no golden set installed with refimpl ({package / 'golden'}) nor next to it "
                      f"({package.parent / 'golden'}); it is the golden/ folder of the refimpl repository: "
                      f"pass its path (refimpl golden verify PATH)")


def read_manifest(golden_dir) -> dict:
    """The manifest of a golden folder, every key checked (check_manifest); GoldenError names what is wrong."""
    golden_dir = Path(golden_dir)
    path = golden_dir / MANIFEST
    if not path.is_file():
        raise GoldenError(f"{golden_dir}: no {MANIFEST} (a golden set is the repository's golden/ folder)")
    try:
        manifest = parse_json(path.read_text(encoding="utf-8"))          # strict: no key twice, no NaN
    except (UnicodeDecodeError, ValueError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise GoldenError(f"{path}: not a manifest: JSON nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{path}: format_version {manifest.get('format_version') if isinstance(manifest, dict) else '?'} "
                          f"is not {FORMAT_VERSION}, the one this refimpl reads")
    check_manifest(manifest, path)
    return manifest


# the keys verify reads, and their JSON types (the others describe the set to people)
REQUIRED = {"checkpoint": dict, "config": dict, "tokens": list, "inputs": list, "precisions": list, "files": dict,
            "reason": str, "profiles": dict, "checkpoints": dict, "gradients": list}


KINDS = {dict: "object", list: "list", str: "string"}


def trace_file(precision: str, name: str) -> str:
    """The path of an input's trace in a golden folder (as the manifest's `files` lists it)."""
    return f"traces/{precision}/{name}.safetensors"


def check_manifest(manifest: dict, path) -> None:
    """Every key verify reads, against its type and range, before anything runs; GoldenError names the first bad one."""
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            what = "missing" if key not in manifest else f"a {type(manifest[key]).__name__}"
            raise GoldenError(f"{path}: '{key}' must be a JSON {KINDS[kind]}; it is {what}")
    tokens, held, files = manifest["tokens"], manifest["precisions"], manifest["files"]
    if not tokens or not all(_is_int(t) and t >= 0 for t in tokens):
        raise GoldenError(f"{path}: 'tokens' must be a non-empty list of token ids (integers >= 0)")
    if not held or not all(p in PRECISIONS for p in held) or len(set(held)) != len(held):
        raise GoldenError(f"{path}: 'precisions' must list one or more of {', '.join(PRECISIONS)}, once each; "
                          f"got {held!r:.80}")
    if any(manifest["profiles"].get(p) != PROFILES[p] for p in held):   # the rule verify applies, per precision
        raise GoldenError(f"{path}: 'profiles' must name the profile of each precision held "
                          f"({', '.join(f'{p}: {PROFILES[p]}' for p in held)}); got {manifest['profiles']!r:.80}")
    if manifest.get("layout", "official") not in LAYOUTS:
        raise GoldenError(f"{path}: 'layout' must be one of {', '.join(LAYOUTS)}, got {manifest['layout']!r:.80}")
    for name, digest in files.items():
        parts = name.split("/")                                 # relative, inside the folder
        if ".." in parts or "" in parts or not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            raise GoldenError(f"{path}: 'files' must map paths inside the folder to SHA-256 hex digests; "
                              f"got {name!r:.80}: {digest!r:.80}")
    _check_recipe(manifest["checkpoint"], path)
    for name, extra in manifest["checkpoints"].items():      # the other checkpoints: re-made from a preset
        if not (NAME.fullmatch(name) and isinstance(extra, dict) and "preset" in extra
                and isinstance(extra.get("config"), dict)):
            raise GoldenError(f"{path}: 'checkpoints' must map names to a preset, a seed, the SHA-256 of each "
                              f"file and the config; got {name!r:.40}: {extra!r:.80}")
        _check_recipe(extra, path)
    if not manifest["inputs"]:
        raise GoldenError(f"{path}: 'inputs' lists no input")
    names = set()
    for d in manifest["gradients"]:                           # the golden gradient traces
        try:
            g = GoldenGradient.from_dict(d, len(tokens))
        except GoldenError as e:
            raise GoldenError(f"{path}: {e}") from None
        if g.name in names:
            raise GoldenError(f"{path}: two gradient traces are named {g.name}")
        names.add(g.name)
        if gradient_file(g.name) not in files:
            raise GoldenError(f"{path}: 'files' does not list {gradient_file(g.name)}, the gradient trace {g.name}")
    if manifest["gradients"] and "preset" not in manifest["checkpoint"]:
        raise GoldenError(f"{path}: gradient traces are made on a checkpoint re-made from its preset only")
    for d in manifest["inputs"]:
        try:
            spec = GoldenInput.from_dict(d, len(tokens))
        except GoldenError as e:
            raise GoldenError(f"{path}: {e}") from None
        if spec.name in names:
            raise GoldenError(f"{path}: two inputs are named {spec.name}")
        if spec.checkpoint is not None and spec.checkpoint not in manifest["checkpoints"]:
            raise GoldenError(f"{path}: input {spec.name} runs on checkpoint {spec.checkpoint!r:.40}, which "
                              f"'checkpoints' does not describe")
        names.add(spec.name)
        for p in spec.stored(held):
            if trace_file(p, spec.name) not in files:         # else its bytes would go unchecked
                raise GoldenError(f"{path}: 'files' does not list {trace_file(p, spec.name)}, the {p} trace of "
                                  f"input {spec.name}")


def _check_recipe(recipe: dict, path) -> None:
    """The manifest's 'checkpoint': a preset and a seed (re-made) or a folder's path; the SHA-256 of its files."""
    sha = recipe.get("sha256")
    if not (isinstance(sha, dict) and all(isinstance(n, str) and NAME.fullmatch(n) and isinstance(h, str)
                                          and SHA256.fullmatch(h) for n, h in sha.items())):
        raise GoldenError(f"{path}: 'checkpoint.sha256' must map the checkpoint's file names to SHA-256 hex digests")
    if "preset" in recipe:
        if not (isinstance(recipe["preset"], str) and _is_int(recipe.get("seed")) and recipe["seed"] >= 0):
            raise GoldenError(f"{path}: 'checkpoint' must give a preset name and a 'seed' (an integer >= 0), got "
                              f"{recipe.get('preset')!r:.40} and {recipe.get('seed')!r:.40}")
    elif not isinstance(recipe.get("path"), str):
        raise GoldenError(f"{path}: 'checkpoint' must give a 'preset' and 'seed' (made by make-checkpoint) or the "
                          f"'path' of the checkpoint folder the set was made from")


def check_files(golden_dir, manifest: dict) -> None:
    """Every file the manifest lists exists with its SHA-256."""
    for name, digest in manifest["files"].items():
        path = Path(golden_dir) / name
        if not path.is_file():
            raise GoldenError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise GoldenError(f"{path}: SHA-256 differs from the manifest's (the file was changed)")


def select(manifest: dict, precisions=None, inputs=None) -> list[tuple[str, GoldenInput]]:
    """The (precision, input) pairs verify checks: every input in every precision it is stored in, or
    those of the given precisions and input names. A selection that matches nothing is refused
    (GoldenError naming it): zero checks must not read as a pass."""
    specs = [GoldenInput.from_dict(d) for d in manifest["inputs"]]
    held = manifest["precisions"]
    for given, what in ((precisions, "precisions"), (inputs, "inputs")):
        if given is not None and (isinstance(given, str) or not given):
            raise GoldenError(f"{what} must be a non-empty list of names (or None: all), got {given!r:.80}")
    if precisions is not None:
        precisions = list(dict.fromkeys(precisions))
        for p in precisions:
            if p not in held:
                raise GoldenError(f"precision {p!r:.40}: this golden set holds {', '.join(held)} only")
    if inputs is not None:
        inputs = list(dict.fromkeys(inputs))
        names = [s.name for s in specs]
        for n in inputs:
            if n not in names:
                raise GoldenError(f"no input named {n!r:.80} in the golden set; its inputs: {', '.join(names)}")
        specs = [s for s in specs if s.name in inputs]
    checks = [(p, s) for p in (precisions or held) for s in specs if p in s.stored(held)]
    for s in specs if inputs is not None else ():
        if not any(c is s for _, c in checks):
            raise GoldenError(f"input {s.name} has no trace in {' or '.join(precisions or held)}; it is stored in "
                              f"{', '.join(s.stored(held)) or 'no precision of this set'}")
    for p in precisions or ():
        if not any(q == p for q, _ in checks):
            raise GoldenError(f"no {'selected ' if inputs else ''}input is stored in {p}"
                              f"{' (' + ', '.join(inputs) + ')' if inputs else ''}")
    if not checks:
        raise GoldenError("the selection holds nothing to verify")
    return checks


def ulp32(x: np.ndarray) -> np.ndarray:
    """One unit in the last place of float32 at |x|."""
    return np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)


def compare_site(name: str, want: np.ndarray, got: np.ndarray, precision: str, exact=None) -> str | None:
    """None if got matches the stored want under the precision's rule, else a one-line description.
    exact: for float32, the input's stored float64 site: then the noise model judges (see PROFILES)."""
    if want.shape != got.shape:
        return f"shape {got.shape}, stored {want.shape}"
    if want.dtype.kind in "iu":
        bad = np.argwhere(want != got)
        return None if not len(bad) else f"{len(bad)} entries differ, the first at {tuple(bad[0])}"
    a, b = want.astype(np.float64), got.astype(np.float64)
    same = (a == b) | (np.isneginf(a) & np.isneginf(b))
    if precision == "float32" and exact is not None and exact.shape == want.shape and a.size:
        p = a.shape[0]
        c = noise.check(b.reshape(p, -1), exact.astype(np.float64).reshape(p, -1), a.reshape(p, -1), "float32")
        if c.ok:
            return None
        t = c.first_row
        return (f"the computed float32 errs {c.ratio[t]:.3g}x as much against float64 as the stored float32 trace "
                f"(at most {c.jump:g}x), the first at ({t},): RMS error {c.observed[t]:.3g}, stored {c.expected[t]:.3g}")
    if precision == "mirror":
        bad = ~same
    elif precision == "float32":                     # another BLAS's last bits, carried forward: FLOAT32_REL
        scale = float(np.abs(a[np.isfinite(a)]).max(initial=0.0))
        with np.errstate(invalid="ignore"):
            bad = ~same & ~(np.abs(a - b) <= FLOAT32_REL * scale)
    else:                                            # float64 stored as float32: one float32 ulp allowed
        with np.errstate(invalid="ignore"):
            bad = ~same & ~(np.abs(a - b) <= np.maximum(ulp32(a), ulp32(b)))
    if not bad.any():
        return None
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} of {a.size} elements differ, the first at {first}: stored {a[first]!r}, "
            f"computed {b[first]!r}")


def verify(golden_dir=None, *, precisions=None, inputs: list[str] | None = None, ckpt=None,
           progress=print, kernels=None) -> list[str]:
    """Re-make (or find) the checkpoint, check its bytes, re-run every input; -> the failures (empty: passes).

    precisions, inputs: only these (None: every precision and input of the set); a name that
    matches nothing is a GoldenError (`select`). A set made from the tiny preset re-makes its
    checkpoints from the seed (giving `ckpt` is then an error; the inputs of `checkpoints` run on theirs); a set made from a given checkpoint
    (`tools/make_golden.py --ckpt`) runs on `ckpt` (default: the path in the manifest), after
    checking its config and the SHA-256 of its config and index files. Each failure names the
    input, the precision, the first site (in data-flow order) that differs and the stored row's position.
    kernels: the kernel selection to run (refimpl/ops.py): verify the kernels against the golden set.
    """
    import tempfile

    golden_dir = Path(golden_dir) if golden_dir is not None else default_dir()
    manifest = read_manifest(golden_dir)
    grads = [GoldenGradient.from_dict(d, len(manifest["tokens"])) for d in manifest["gradients"]]
    gnames = [g.name for g in grads]
    if inputs is not None and not isinstance(inputs, str) and inputs:     # gradient traces are named like inputs
        grads = [g for g in grads if g.name in inputs]
        inputs = [n for n in inputs if n not in gnames] or None
        if grads and precisions is not None and "float64" not in precisions:
            raise GoldenError(f"gradient trace(s) {', '.join(g.name for g in grads)} are float64 only")
        checks = select(manifest, precisions, inputs) if inputs is not None else []
    else:
        checks = select(manifest, precisions, inputs)
        if precisions is not None and "float64" not in precisions:
            grads = []
    recipe = manifest["checkpoint"]
    if "preset" in recipe and ckpt is not None:
        raise GoldenError(f"{golden_dir}: a checkpoint was given (--ckpt {ckpt}), but this set's checkpoint is "
                          f"re-made by make-checkpoint {recipe['preset']} --seed {recipe['seed']}; --ckpt is for "
                          f"a set made with tools/make_golden.py --ckpt")
    check_files(golden_dir, manifest)
    failures = []
    with tempfile.TemporaryDirectory(prefix="refimpl-golden-") as tmp:
        if "preset" in recipe:                                   # re-made from its seed, byte for byte
            cfg = Config.preset(recipe["preset"])
            if cfg.to_hf_dict() != manifest["config"]:
                raise GoldenError(f"{golden_dir}: the golden set's config is not this refimpl's "
                                  f"{recipe['preset']} preset (made by another version?)")
            ckpt = Path(tmp) / recipe["preset"]
            make_checkpoint(cfg, ckpt, seed=recipe["seed"], progress=False)
            got = checkpoint_hashes(ckpt)
            what = f"make-checkpoint {recipe['preset']} --seed {recipe['seed']} wrote"
        else:                                                    # a checkpoint the user has
            ckpt = Path(ckpt if ckpt is not None else recipe["path"])
            if not ckpt.is_dir():
                raise GoldenError(f"{golden_dir}: made from the checkpoint {recipe['path']}, which is not here; "
                                  f"pass its folder (refimpl golden verify DIR --ckpt PATH)")
            cfg = read_config(ckpt)
            if cfg.to_hf_dict() != manifest["config"]:
                raise GoldenError(f"{ckpt}: its config is not the one the golden set was made from")
            got = {name: sha256_file(ckpt / name) for name in recipe["sha256"] if (ckpt / name).is_file()}
            what = f"{ckpt} holds"
        for name, digest in recipe["sha256"].items():
            if got.get(name) != digest:
                failures.append(f"checkpoint: {what} {name} with another SHA-256 than the golden set's "
                                f"({'the writer changed' if 'preset' in recipe else 'another checkpoint'})")
        ckpts = {None: (ckpt, cfg)}                              # the other checkpoints the checks run on
        for name in dict.fromkeys(s.checkpoint for _, s in checks if s.checkpoint is not None):
            extra = manifest["checkpoints"][name]
            ckpts[name] = _remake(extra, Path(tmp) / name, f"{golden_dir}: checkpoint {name!r}", failures)
        if failures:
            return failures
        for (precision, where), group in _groups(checks).items():
            ckpt, cfg = ckpts[where]
            order = {n: i for i, n in enumerate(site_names(cfg))}
            model = load(ckpt, precision=precision, kernels=kernels, layout=manifest.get("layout", "official"))
            for spec in group:
                tokens = manifest["tokens"][:spec.length]
                trace = run_trace(spec.model(model), tokens, **spec.run_kwargs())
                computed = sample_rows(trace.tensors, spec.rows, spec.length)
                stored = SafetensorsFile(golden_dir / trace_file(precision, spec.name))
                exact = None                     # float32: its float64 trace, for the noise model
                if precision == "float32" and "float64" in spec.stored(manifest["precisions"]):
                    exact = SafetensorsFile(golden_dir / trace_file("float64", spec.name))
                missing = sorted(set(stored.tensors) ^ set(computed))
                if missing:
                    failures.append(f"{precision} {spec.name}: sites in only one of stored / computed: {missing[:5]}")
                    continue
                why = None
                for name in sorted(stored.tensors, key=lambda n: order.get(n, len(order))):
                    ref = np.asarray(exact.get(name)) if exact is not None and name in exact.tensors else None
                    why = compare_site(name, np.asarray(stored.get(name)), computed[name], precision, ref)
                    if why:
                        row = re.match(r".*at \((\d+)", why)
                        where = ""
                        if row and not name.endswith(".compressed_kv"):
                            where = f" (position {spec.rows[int(row.group(1))]})"
                        failures.append(f"{precision} {spec.name}: first differing site {name}{where}: {why}")
                        break
                progress(f"{precision:8s} {spec.name:24s} {'DIFFERS' if why else 'ok'}")
        if grads:
            ckpt, cfg = ckpts[None]
            model = load(ckpt, precision="float64", kernels="numpy", layout=manifest.get("layout", "official"))
            for g in grads:
                why = verify_gradient(golden_dir, g, model, manifest["tokens"][:g.length])
                if why:
                    failures.append(f"gradients {g.name}: {why}")
                progress(f"{'gradient':8s} {g.name:24s} {'DIFFERS' if why else 'ok'}")
    return failures


def compute_gradient(g: GoldenGradient, model, tokens, *, params=None) -> tuple[dict, dict]:
    """A golden gradient trace's stored part and metadata, computed (params: None = the writer's choice)."""
    tensors, meta = run_grad_trace(model, tokens, head=g.head)
    kept = cut_gradients(tensors, g.rows, g.length, parameter_gradients(model.cfg), params=params)
    return kept, dict(meta, golden_rows=list(g.rows))


def verify_gradient(golden_dir, g: GoldenGradient, model, tokens) -> str | None:
    """None if the recomputed gradients match the stored ones within GRAD_RTOL, else the first that does not
    (in the backward's order, from the loss to the embedding)."""
    f = SafetensorsFile(Path(golden_dir) / gradient_file(g.name))
    stored = {n: np.asarray(f.get(n)) for n in f.tensors}
    if not set(g.params) <= set(stored):
        return f"parameter gradients the manifest lists are not in the file: {sorted(set(g.params) - set(stored))[:5]}"
    computed, meta = compute_gradient(g, model, tokens, params=g.params)
    if set(computed) != set(stored):
        return f"gradients in only one of stored / computed: {sorted(set(computed) ^ set(stored))[:5]}"
    try:
        report = compare_gradients(GradTrace("computed", meta, computed), GradTrace(str(f), meta, stored),
                                   rtol=GRAD_RTOL)
    except GradTraceError as e:
        return str(e)
    bad = report.first_failure
    if bad is None:
        return None
    detail = bad.get("problem") or (f"max|computed - stored| = {bad['max_abs']:.3g}, {bad['rel']:.3g} of the stored "
                                    f"max {bad['scale']:.3g} (at most {GRAD_RTOL:g}), at index {tuple(bad['where'])}")
    return f"first differing gradient {bad['name']}: {detail}"


def _groups(checks) -> dict:
    """The checks by (precision, checkpoint name), in their order: one model is loaded per group."""
    groups: dict = {}
    for p, spec in checks:
        groups.setdefault((p, spec.checkpoint), []).append(spec)
    return groups


def _remake(recipe: dict, out: Path, what: str, failures: list) -> tuple[Path, Config]:
    """Re-make a checkpoint from its preset and seed into out; a config or file hash that differs from the
    recipe's is a failure (appended). -> (out, its config)."""
    try:
        cfg = Config.preset(recipe["preset"])
    except ValueError as e:
        raise GoldenError(f"{what}: {e}") from None
    if cfg.to_hf_dict() != recipe["config"]:
        raise GoldenError(f"{what}: the golden set's config is not this refimpl's {recipe['preset']} preset "
                          f"(made by another version?)")
    make_checkpoint(cfg, out, seed=recipe["seed"], progress=False)
    got = checkpoint_hashes(out)
    for name, digest in recipe["sha256"].items():
        if got.get(name) != digest:
            failures.append(f"checkpoint: make-checkpoint {recipe['preset']} --seed {recipe['seed']} wrote {name} "
                            f"with another SHA-256 than the golden set's (the writer changed)")
    return out, cfg
