"""Named intermediate tensors ("sites") of a forward pass, recorded on request and checked always.

Every site goes through `record(trace, name, x)`. Recording costs nothing when `trace` is None,
but the check does not depend on it: a site holding NaN or Inf raises `NonFiniteError` naming
the site (and so the layer), so a forward pass never returns NaN logits or samples from them.
Site names follow the official code (README table). A trace file is a safetensors file, one
tensor per site, plus JSON metadata (`trace_metadata`); `run_trace` makes one, in one prefill or
in chunks.
"""
from __future__ import annotations

import fnmatch
import json

import numpy as np

from refimpl._version import __version__

# The version of the trace file format (docs/trace-format.md); `refimpl compare` refuses other versions.
TRACE_FORMAT_VERSION = 1

# The stable sites, in data-flow order ({i} = layer index; the MTP block is layer n_layers).
SITES = (
    "embed",                                   # [s, c]
    "layers.{i}.hc_attn.pre", "layers.{i}.hc_attn.post", "layers.{i}.hc_attn.comb",   # mHC mixes, attention
    "layers.{i}.attn.q",                       # [s, h, d] after norm + RoPE
    "layers.{i}.attn.kv",                      # [s, d] after norm + RoPE (+ QDQ in mirror)
    "layers.{i}.attn.compressed_kv",           # [s//m, d] entries completed in this call
    "layers.{i}.attn.indexer.scores",          # [s, s//4] (-inf where not visible)
    "layers.{i}.attn.indexer.topk",            # [s, k] int32, -1 padding
    "layers.{i}.attn.out",                     # [s, c] after wo_b
    "layers.{i}.hc_ffn.pre", "layers.{i}.hc_ffn.post", "layers.{i}.hc_ffn.comb",
    "layers.{i}.ffn.gate_scores",              # [s, e] biased router scores (score-routed layers only)
    "layers.{i}.ffn.expert_ids",               # [s, a] int32
    "layers.{i}.ffn.expert_weights",           # [s, a]
    "layers.{i}.ffn.out",                      # [s, c]
    "layers.{i}.out",                          # [s, n, c] residual streams after block i
    "final.x",                                 # [s, c] after hc_head + norm
    "logits",                                  # [s, v] every position
    "mtp.final.x",                             # [s-1, c] MTP block after its hc_head + norm
    "mtp.logits",                              # [s-1, v] MTP predictions of token t+2
)


class NonFiniteError(ValueError):
    """A forward pass produced NaN or Inf; the message names the site (and layer) where it appeared."""


class Trace:
    """Collects site tensors of one forward pass (batch element 0), filtered by glob patterns."""

    def __init__(self, patterns: tuple[str, ...] = ("*",), *, replay=None):
        if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or \
                not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"trace patterns must be a tuple of glob strings, got {patterns!r}")
        self.patterns = tuple(patterns)
        self.tensors: dict[str, np.ndarray] = {}
        self.metadata: dict | None = None          # set by run_trace (see trace_metadata)
        self.replay = replay                       # forced routing / top-k (oracle/replay.py), or None

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            x = np.asarray(x)
            self.tensors[name] = np.ascontiguousarray(x[0])   # every site has a batch axis; keep element 0

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the trace as safetensors, one tensor at a time (a temporary name, renamed when complete)."""
        from refimpl.formats.checkpoint import dtype_name, write_safetensors
        metadata = self.metadata if metadata is None else metadata
        if metadata is None:
            raise ValueError("a trace file needs its metadata (run_trace sets it; see trace_metadata)")
        arrays = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        write_safetensors(path, {k: (dtype_name(v.dtype), v.shape) for k, v in arrays.items()}, arrays.__getitem__,
                          metadata={"refimpl": json.dumps(metadata, sort_keys=True)})


def check_finite(name: str, x, *, hidden=None) -> None:
    """Raise NonFiniteError if site x holds NaN or Inf. hidden: entries that hold -inf by construction.

    Integer sites (top-k, expert ids) are not checked. Where `hidden` (broadcast to x) is True the
    value must be exactly -inf (the indexer scores of entries a query cannot see); elsewhere finite.
    """
    x = np.asarray(x)
    if x.dtype.kind in "iub":
        return
    ok = np.isfinite(x)
    if hidden is not None:
        ok = np.where(hidden, x == -np.inf, ok)
    if ok.all():
        return
    bad = ~ok
    values = x[bad].astype(np.float64)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    layer = f" (layer {name.split('.')[1]})" if name.startswith("layers.") else ""
    raise NonFiniteError(
        f"the forward pass produced non-finite values at site {name!r}{layer}: {int(np.isnan(values).sum())} NaN, "
        f"{int(np.isinf(values).sum())} Inf{' where finite values belong' if hidden is not None else ''} "
        f"of {x.size}, the first at index {first} (batch, position, ...); "
        "the checkpoint's weights may hold NaN/Inf (`refimpl inspect` scans them)")


def record(trace: Trace | None, name: str, x, *, hidden=None) -> None:
    """Check a site tensor for NaN/Inf (always), then record it (a no-op when trace is None)."""
    check_finite(name, x, hidden=hidden)
    if trace is not None:
        trace.record(name, x)


def wants_mtp(trace: Trace, mtp_layer: int) -> bool:
    """Whether the trace asks for any site of the MTP block (layer mtp_layer, mtp.*)."""
    return any(trace.wants(site.format(i=mtp_layer)) for site in SITES if "{i}" in site or site.startswith("mtp."))


def site_names(cfg) -> list[str]:
    """Every site a forward pass of cfg records, in the order it records them (the MTP block last)."""
    def layer_sites(layer):
        return [site.format(i=layer) for site in SITES if "{i}" in site
                and (".compressed_kv" not in site or cfg.uses_compressor(layer))
                and (".indexer." not in site or cfg.uses_indexer(layer))
                and (".gate_scores" not in site or not cfg.is_hash_layer(layer))]
    names = ["embed"] + [n for i in range(cfg.n_layers) for n in layer_sites(i)] + ["final.x", "logits"]
    if cfg.n_mtp_layers:
        names += layer_sites(cfg.mtp_layer) + ["mtp.final.x", "mtp.logits"]
    return names


# ---------------------------------------------------------------- making a trace

def trace_metadata(model, tokens, chunks, decode_from: int | None = None, replay=None) -> dict:
    """The JSON metadata of a trace file: what ran, on which model, in which precision, in which calls.

    chunks: the tokens of each call in order; decode_from: K when the first call was a K-token
    prefill and every later one a one-token decode step (else None); replay: what was forced.
    docs/trace-format.md is the contract (every key, and which ones another implementation must write).
    """
    tokens = [int(t) for t in tokens]
    meta = {"format_version": TRACE_FORMAT_VERSION, "implementation": f"refimpl {__version__}",
            "refimpl": __version__, "config_id": model.config_id, "n_layers": model.cfg.n_layers,
            "precision": model.precision, "revision": model.revision, "layout": model.layout, "tokens": tokens,
            "chunks": list(chunks) if chunks else [len(tokens)], "decode_from": decode_from}
    if replay is not None:
        meta["replay"] = {"source": replay.source, "expert_ids": sorted(replay.expert_ids),
                          "expert_weights": sorted(replay.expert_weights), "topk": sorted(replay.topk)}
    return meta


def run_trace(model, tokens, *, patterns: tuple[str, ...] = ("*",), chunks: list[int] | None = None,
              decode_from: int | None = None, replay=None) -> Trace:
    """Run one sequence through model and record its sites; -> its Trace.

    One forward pass by default; `chunks`: prefills of these sizes; `decode_from=K`: a K-token
    prefill, then one decode step (Model.decode) per remaining token, so the trace shows the decode
    path (caches, compressor state, the ratio-4 overlap). `replay` (oracle/replay.py): expert ids
    (and weights) and indexer top-k sets forced from another run.

    A chunked or decode trace holds the same sites as an unchunked one. Per-call tensors are joined
    along the position axis. The indexer's scores and top-k are as wide as the entries existing at
    the end of a call, so a call's rows are padded to the full width with what one forward pass
    holds there (-inf: not visible; -1: no entry). The MTP block keeps no state and no chunked
    prefill runs it (the official generate never does): it runs once over the whole sequence, on
    the final streams the calls produced, as forward() runs it. In float64, and in mirror with the
    canonical layout, where the model is chunking-invariant, every site equals the unchunked one
    bit for bit; in mirror with the official layout, chunks change the index layout where the
    official calls would (docs/architecture.md §15), and the sites with it.
    """
    ids = model.check_tokens(tokens)                          # int64 ids in the vocabulary, or InputError
    if ids.ndim != 1:
        raise ValueError(f"a trace records one sequence: tokens must be [s], got shape {ids.shape}")
    if replay is not None:
        if not all(callable(getattr(replay, f, None)) for f in ("check", "route", "entries")):   # an oracle.replay.Replay
            raise ValueError(f"replay must be a refimpl.oracle.replay.Replay (e.g. Replay.load(path)), got "
                             f"{type(replay).__name__}")
        replay.check(model.cfg, ids)
    if chunks is not None and not isinstance(chunks, (list, tuple)):
        raise ValueError(f"chunks must be a list of chunk sizes, got {type(chunks).__name__} {chunks!r:.40}")
    trace = Trace(patterns, replay=replay)
    known = site_names(model.cfg)
    unmatched = [p for p in trace.patterns if not any(fnmatch.fnmatchcase(n, p) for n in known)]
    if unmatched:                                             # a typo would silently trace nothing
        raise ValueError(f"trace pattern(s) {unmatched} match no site of this model (e.g. 'layers.0.attn.q', "
                         f"'layers.*.out', 'logits'; the README lists them)")
    if decode_from is not None:
        if chunks is not None:
            raise ValueError("a trace is either chunked or a decode trace: give chunks or decode_from, not both")
        if not (isinstance(decode_from, (int, np.integer)) and not isinstance(decode_from, (bool, np.bool_))
                and 1 <= decode_from < len(ids)):
            raise ValueError(f"decode_from must be an integer in [1, {len(ids) - 1}] (the prefill length; "
                             f"at least one token is left to decode), got {decode_from!r}")
        decode_from = int(decode_from)
        chunks = [decode_from] + [1] * (len(ids) - decode_from)
    if chunks is None:
        model.forward(ids, trace=trace)
    else:
        sizes = list(chunks)
        if not sizes or not all(isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n > 0
                                for n in sizes):
            raise ValueError(f"chunk sizes must be positive integers, got {sizes}")
        sizes = [int(n) for n in sizes]
        if sum(sizes) != len(ids):
            raise ValueError(f"chunk sizes add up to {sum(sizes)}, but there are {len(ids)} tokens")
        cfg = model.cfg
        final = f"layers.{cfg.n_layers - 1}.out"                 # the final streams h, input of the MTP block
        mtp = model.weights.mtp is not None and wants_mtp(trace, cfg.mtp_layer)
        parts: dict[str, list[np.ndarray]] = {}
        state, pos = None, 0
        for call, n in enumerate(sizes):
            t = Trace(trace.patterns + ((final,) if mtp else ()), replay=replay)
            if decode_from is not None and call > 0:            # a decode step: Model.decode, as generate runs it
                _, state = model.decode(int(ids[pos]), state, trace=t)
            else:
                _, state = model.prefill(ids[pos:pos + n], state, trace=t)
            for k, v in t.tensors.items():
                parts.setdefault(k, []).append(v)
            pos += n
        for k, v in parts.items():
            if k.endswith((".indexer.scores", ".indexer.topk")):
                width = max(x.shape[1] for x in v)
                fill = -np.inf if k.endswith(".scores") else -1
                v = [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill) for x in v]
            joined = np.concatenate(v, axis=0)                  # [s, ...]
            if trace.wants(k):
                trace.tensors[k] = joined
        if mtp:                                                 # records layers.{n_layers}.*, mtp.*
            model.mtp_forward(np.concatenate(parts[final], axis=0)[None], ids[None], trace)
    trace.metadata = trace_metadata(model, ids, sizes if chunks is not None else None, decode_from, replay)
    return trace
