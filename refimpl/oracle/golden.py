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

`tools/make_golden.py` is the only writer; `verify()` (and `refimpl golden verify`) re-makes the
checkpoint, checks its hashes, re-runs every input and compares every site.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEED = 0                                       # make-checkpoint tiny --seed 0
TOKEN_SEED = 2026                              # the token ids of every input: prefixes of one sequence
PRECISIONS = ("float64", "mirror")
# how each precision's recomputation must agree with the stored values (refimpl/oracle/profiles):
# mirror is exact by design (every op exact inside, rounded once); float64 is stored rounded to
# float32, and a float64 sum whose last bits differ between BLAS builds may round to the
# neighbouring float32: one unit in the last place is allowed there.
PROFILES = {"float64": "float64-stored-as-float32", "mirror": "mirror-vs-mirror"}


class GoldenError(ValueError):
    """A golden set that is missing, damaged, or does not match what refimpl computes."""


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

    def run_kwargs(self) -> dict:
        return {"chunks": list(self.chunks) if self.chunks else None, "decode_from": self.decode_from}

    def as_dict(self) -> dict:
        d = {"name": self.name, "length": self.length, "chunks": list(self.chunks) if self.chunks else None,
             "decode_from": self.decode_from, "rows": list(self.rows), "precisions": list(self.precisions)}
        if self.config:
            d["config"] = dict(self.config)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GoldenInput":
        config = d.get("config") or {}
        if not isinstance(config, dict) or not all(k in CONFIG_OVERRIDES for k in config):
            raise GoldenError(f"input {d.get('name')!r}: config changes {config!r:.80} are not among the keys a "
                              f"golden input may change ({', '.join(CONFIG_OVERRIDES)})")
        return cls(d["name"], int(d["length"]), tuple(d["chunks"]) if d.get("chunks") else None,
                   d.get("decode_from"), tuple(d["rows"]), tuple(d.get("precisions", PRECISIONS)),
                   tuple(sorted(config.items())))

    def model(self, model):
        """The model this input runs on: `model`, or the same weights under its changed config keys."""
        if not self.config:
            return model
        from refimpl.model.transformer import Model
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

    The short prefills (one per threshold length, their last row kept) are stored in mirror only:
    in float64 a position's result does not depend on the length, the chunking or the call type,
    so the rows of the long prefill are those of every shorter one. In mirror the official index
    layout depends on the prefill length and the call type, so each length is its own case.
    """
    W = cfg.window_size
    ratios = sorted({m for m in cfg.compress_ratios if m})
    ts = thresholds(cfg)
    long = ts[-1] + 13                                                   # past every threshold
    lengths = {1, W - 1, W, W + 1} | {n for m in ratios for n in (m - 1, m, m + 1, W + 2 * m)}
    inputs = [GoldenInput(f"prefill-{n}", n, rows=(n - 1,), precisions=("mirror",)) for n in sorted(lengths)]
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
    return inputs


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
    """golden/ of the source tree this package runs from (a clone, an editable install), else ./golden."""
    here = Path(__file__).resolve().parents[2] / "golden"
    return here if (here / MANIFEST).is_file() else Path.cwd() / "golden"


def read_manifest(golden_dir) -> dict:
    golden_dir = Path(golden_dir)
    path = golden_dir / MANIFEST
    if not path.is_file():
        raise GoldenError(f"{golden_dir}: no {MANIFEST} (a golden set is the repository's golden/ folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{path}: format_version {manifest.get('format_version') if isinstance(manifest, dict) else '?'} "
                          f"is not {FORMAT_VERSION}, the one this refimpl reads")
    return manifest


def check_files(golden_dir, manifest: dict) -> None:
    """Every file the manifest lists exists with its SHA-256."""
    for name, digest in manifest["files"].items():
        path = Path(golden_dir) / name
        if not path.is_file():
            raise GoldenError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise GoldenError(f"{path}: SHA-256 differs from the manifest's (the file was changed)")


def ulp32(x: np.ndarray) -> np.ndarray:
    """One unit in the last place of float32 at |x|."""
    return np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)


def compare_site(name: str, want: np.ndarray, got: np.ndarray, precision: str) -> str | None:
    """None if got matches the stored want under the precision's rule, else a one-line description."""
    if want.shape != got.shape:
        return f"shape {got.shape}, stored {want.shape}"
    if want.dtype.kind in "iu":
        bad = np.argwhere(want != got)
        return None if not len(bad) else f"{len(bad)} entries differ, the first at {tuple(bad[0])}"
    a, b = want.astype(np.float64), got.astype(np.float64)
    same = (a == b) | (np.isneginf(a) & np.isneginf(b))
    if precision == "mirror":
        bad = ~same
    else:                                            # float64 stored as float32: one float32 ulp allowed
        with np.errstate(invalid="ignore"):
            bad = ~same & ~(np.abs(a - b) <= np.maximum(ulp32(a), ulp32(b)))
    if not bad.any():
        return None
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{int(bad.sum())} of {a.size} elements differ, the first at {first}: stored {a[first]!r}, "
            f"computed {b[first]!r}")


def verify(golden_dir=None, *, precisions=PRECISIONS, inputs: list[str] | None = None, ckpt=None,
           progress=print, kernels=None) -> list[str]:
    """Re-make (or find) the checkpoint, check its bytes, re-run every input; -> the failures (empty: passes).

    A set made from the tiny preset re-makes its checkpoint from the seed; a set made from a given
    checkpoint (`tools/make_golden.py --ckpt`) runs on `ckpt` (default: the path in the manifest),
    after checking its config and the SHA-256 of its config and index files. Each failure names the
    input, the precision, the first site (in data-flow order) that differs and the stored row's position.
    kernels: the kernel selection to run (refimpl/ops.py): verify the kernels against the golden set.
    """
    import tempfile
    from refimpl.config import Config
    from refimpl.formats.config_file import read_config
    from refimpl.formats.checkpoint import SafetensorsFile
    from refimpl.formats.weights import load
    from refimpl.oracle.trace import run_trace, site_names
    from refimpl.synthetic.writer import make_checkpoint

    golden_dir = Path(golden_dir) if golden_dir is not None else default_dir()
    manifest = read_manifest(golden_dir)
    check_files(golden_dir, manifest)
    recipe = manifest["checkpoint"]
    precisions = [p for p in precisions if p in manifest.get("precisions", PRECISIONS)]
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
        if failures:
            return failures
        order = {n: i for i, n in enumerate(site_names(cfg))}
        for precision in precisions:
            model = load(ckpt, precision=precision, kernels=kernels)
            for spec in map(GoldenInput.from_dict, manifest["inputs"]):
                if precision not in spec.precisions or (inputs is not None and spec.name not in inputs):
                    continue
                tokens = manifest["tokens"][:spec.length]
                trace = run_trace(spec.model(model), tokens, **spec.run_kwargs())
                computed = sample_rows(trace.tensors, spec.rows, spec.length)
                stored = SafetensorsFile(golden_dir / "traces" / precision / f"{spec.name}.safetensors")
                missing = sorted(set(stored.tensors) ^ set(computed))
                if missing:
                    failures.append(f"{precision} {spec.name}: sites in only one of stored / computed: {missing[:5]}")
                    continue
                why = None
                for name in sorted(stored.tensors, key=lambda n: order.get(n, len(order))):
                    why = compare_site(name, np.asarray(stored.get(name)), computed[name], precision)
                    if why:
                        row = re.match(r".*at \((\d+)", why)
                        where = ""
                        if row and not name.endswith(".compressed_kv"):
                            where = f" (position {spec.rows[int(row.group(1))]})"
                        failures.append(f"{precision} {spec.name}: first differing site {name}{where}: {why}")
                        break
                progress(f"{precision:8s} {spec.name:24s} {'DIFFERS' if why else 'ok'}")
    return failures
