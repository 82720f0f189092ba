"""The spec's two hooks: named sites it records (and always checks), and the choices a replay forces.

A *site* is a named intermediate tensor of a forward pass (`SITES`, names after the official
code). The model calls `record(ctx, name, x)` at each one: the tensor is checked for NaN/Inf
always (a forward pass never returns NaN logits), and kept when the run context carries a
`Recording` that asks for it. The model calls `replayed(ctx, name, chosen, start_pos)` at each
discrete choice (expert ids, their weights, the indexer's top-k): it returns the choice itself,
or the one a replay in the run context forces (refimpl/oracle/replay.py reads such files).

Everything that drives the model from above (making a trace file, comparing traces, the golden
set) lives in refimpl/oracle/; this module only holds what the spec itself calls.
"""
from __future__ import annotations

import fnmatch

import numpy as np

# The stable sites, in data-flow order ({i} = layer index; the MTP block is layer n_layers).
# docs/trace-format.md gives each one's shape, dtype and layout.
SITES = (
    "embed",
    "layers.{i}.hc_attn.pre", "layers.{i}.hc_attn.post", "layers.{i}.hc_attn.comb",
    "layers.{i}.attn.q",
    "layers.{i}.attn.kv",
    "layers.{i}.attn.compressed_kv",
    "layers.{i}.attn.indexer.scores",
    "layers.{i}.attn.indexer.topk",
    "layers.{i}.attn.out",
    "layers.{i}.hc_attn.out",
    "layers.{i}.hc_ffn.pre", "layers.{i}.hc_ffn.post", "layers.{i}.hc_ffn.comb",
    "layers.{i}.ffn.gate_scores",
    "layers.{i}.ffn.expert_ids",
    "layers.{i}.ffn.expert_weights",
    "layers.{i}.ffn.out",
    "layers.{i}.out",
    "final.x",
    "logits",
    "mtp.final.x",
    "mtp.logits",
)

# The sites a replay can force (refimpl/oracle/replay.py): the discrete choices, and the expert weights.
REPLAYABLE = ("ffn.expert_ids", "ffn.expert_weights", "attn.indexer.topk")


class NonFiniteError(ValueError):
    """A forward pass produced NaN or Inf; the message names the site (and layer) where it appeared."""


class Recording:
    """The site tensors of one forward pass (batch element 0) whose names match the glob patterns."""

    def __init__(self, patterns: tuple[str, ...] = ("*",)):
        if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or \
                not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"trace patterns must be a tuple of glob strings, got {patterns!r}")
        self.patterns = tuple(patterns)
        self.tensors: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            x = np.asarray(x)
            self.tensors[name] = np.ascontiguousarray(x[0])   # every site has a batch axis; keep element 0


CHECK_ELEMENTS = 1 << 22      # check_finite looks at a contiguous site this many elements at a time


def _all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in x, without a mask of x's size (a prefill's logits: 0.5 GiB of bools at 4096 tokens, the
    prefill's peak memory): a contiguous x is checked in slices of CHECK_ELEMENTS."""
    if not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    flat = x.reshape(-1)
    return all(np.isfinite(flat[i:i + CHECK_ELEMENTS]).all() for i in range(0, flat.size, CHECK_ELEMENTS))


def check_finite(name: str, x, *, hidden=None) -> None:
    """Raise NonFiniteError if site x holds NaN or Inf. hidden: entries that hold -inf by construction.

    Integer sites (top-k, expert ids) are not checked. Where `hidden` (broadcast to x) is True the
    value must be exactly -inf (the indexer scores of entries a query cannot see); elsewhere finite.
    """
    x = np.asarray(x)
    if x.dtype.kind in "iub":
        return
    if hidden is None and _all_finite(x):
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


def record(ctx, name: str, x, *, hidden=None) -> None:
    """Check a site tensor for NaN/Inf (always), then keep it if the run context's trace asks for it."""
    check_finite(name, x, hidden=hidden)
    if ctx.trace is not None:
        ctx.trace.record(name, x)


def replayed(ctx, name: str, chosen: np.ndarray, start_pos: int) -> np.ndarray:
    """The choice at site `name` for rows start_pos..: `chosen`, or what the run context's replay forces.

    `chosen` is [b, s, k] (batch, rows of this call). A replay forces the choices of one sequence.
    """
    if ctx.replay is None:
        return chosen
    forced = ctx.replay.force(name, chosen[0], start_pos)        # [s, k] or None
    if forced is None:
        return chosen
    if chosen.shape[0] != 1:
        raise ValueError("replay forces the choices of one sequence; run a batch of 1")
    return forced[None]


def wants_mtp(trace: Recording, mtp_layer: int) -> bool:
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
