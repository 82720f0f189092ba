"""Making a trace: run a model on one sequence, keep its sites, write them as a trace file.

The sites themselves, and the hooks the model records them with, are refimpl/sites.py. A trace
file is a safetensors file, one tensor per site, plus JSON metadata (`trace_metadata`,
docs/trace-format.md); `run_trace` makes one, in one prefill, in chunks, or as decode steps.
"""
from __future__ import annotations

import fnmatch
import json

import numpy as np

from refimpl._version import __version__
from refimpl.formats.checkpoint import dtype_name, write_safetensors
from refimpl.sites import NonFiniteError, Recording, site_names, wants_mtp  # noqa: F401 (NonFiniteError: public here too)

# The version of the trace file format (docs/trace-format.md); `refimpl compare` refuses other versions.
TRACE_FORMAT_VERSION = 1


class Trace(Recording):
    """The sites of one run (a sites.Recording), what ran (`metadata`), and what a replay forced (`replay`).

    `run_trace` makes one; `save` writes it as a trace file (docs/trace-format.md).
    """

    def __init__(self, patterns: tuple[str, ...] = ("*",), *, replay=None):
        super().__init__(patterns)
        self.metadata: dict | None = None          # set by run_trace (see trace_metadata)
        self.replay = replay                       # forced routing / top-k (oracle/replay.py), or None

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the trace as safetensors, one tensor at a time (a temporary name, renamed when complete)."""
        metadata = self.metadata if metadata is None else metadata
        if metadata is None:
            raise ValueError("a trace file needs its metadata (run_trace sets it; see trace_metadata)")
        arrays = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        write_safetensors(path, {k: (dtype_name(v.dtype), v.shape) for k, v in arrays.items()}, arrays.__getitem__,
                          metadata={"refimpl": json.dumps(metadata, sort_keys=True)})


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
            "chunks": list(chunks) if chunks else [len(tokens)], "decode_from": decode_from,
            "window_size": model.cfg.window_size, "compress_ratios": list(model.cfg.compress_ratios),
            "rope_head_dim": model.cfg.rope_head_dim}         # facts compare's hints name (oracle/hints.py)
    if replay is not None:
        meta["replay"] = replay.summary()
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
        if not all(callable(getattr(replay, f, None)) for f in ("check", "applied_to", "force")):   # an oracle.replay.Replay
            raise ValueError(f"replay must be a refimpl.oracle.replay.Replay (e.g. Replay.load(path)), got "
                             f"{type(replay).__name__}")
        replay.check(model.cfg, ids)
        replay = replay.applied_to(model.cfg)                 # hash layers' ids only when asked
    if chunks is not None and not isinstance(chunks, (list, tuple)):
        raise ValueError(f"chunks must be a list of chunk sizes, got {type(chunks).__name__} {chunks!r:.40}")
    trace = Trace(patterns, replay=replay)
    if not trace.patterns:                                    # would run the model and record nothing
        raise ValueError("no trace pattern given: nothing would be recorded (('*',) records every site)")
    known = site_names(model.cfg)
    unmatched = [p for p in trace.patterns if not any(fnmatch.fnmatchcase(n, p) for n in known)]
    if unmatched:                                             # a typo would silently trace nothing
        raise ValueError(f"trace pattern(s) {unmatched} match no site of this model (e.g. 'layers.0.attn.q', "
                         f"'layers.*.out', 'logits'; docs/trace-format.md lists them)")
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
