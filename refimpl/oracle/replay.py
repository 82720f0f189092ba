"""Replay: run the model with the routing and the sparse-attention selections of another run.

A comparison of two implementations is only tight while both make the same discrete choices.
One flipped expert or one different indexer entry changes everything downstream, and from then
on every site differs for a reason that says nothing about the arithmetic. Replay removes those
differences: it forces, from another run's trace,

    layers.{i}.ffn.expert_ids          [s, a] int   which experts each position uses (routing)
    layers.{i}.ffn.expert_weights      [s, a] float their weights (only with weights=True)
    layers.{i}.attn.indexer.topk       [s, k] int   which compressed entries each CSA query attends

and computes everything else itself. With forced ids and weights=False, the weights are the
model's own scores at the forced ids, normalised as usual (the router's "choose" step is
replaced, its "weigh" step is not). The indexer still computes and records its own scores.

A replay file is any safetensors file holding some of these tensors for one sequence, rows
indexed by position (row t = position t; the MTP block's layer rows = its positions 0..s-2), so
a refimpl trace is one. docs/replay.md describes the format for writers outside refimpl.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.oracle.compare import parse_meta_json

MAX_WEIGHT_FACTOR = 1e4     # forced expert weights: at most this x route_scale (the model's sum to route_scale)
SITE = re.compile(r"^layers\.(\d+)\.(ffn\.expert_ids|ffn\.expert_weights|attn\.indexer\.topk)$")


class ReplayError(ValueError):
    """A replay file that cannot be applied to this model and input."""


class Replay:
    """Forced expert ids / weights and indexer top-k sets, per layer, rows indexed by position."""

    def __init__(self, expert_ids: dict[int, np.ndarray] | None = None,
                 expert_weights: dict[int, np.ndarray] | None = None,
                 topk: dict[int, np.ndarray] | None = None, *, tokens: list[int] | None = None,
                 source: str = "replay", hash_layers: bool = False):
        self.expert_ids = dict(expert_ids or {})
        self.expert_weights = dict(expert_weights or {})
        self.topk = dict(topk or {})
        self.tokens = tokens                    # the token ids the source ran on, when it says
        self.source = source                    # named in error messages
        self.hash_layers = hash_layers          # also force the hash layers' ids (their tid2eid table is then untested)
        if not (self.expert_ids or self.topk):
            raise ReplayError(f"{source}: holds no layers.*.ffn.expert_ids and no layers.*.attn.indexer.topk "
                              "to replay")
        extra = sorted(set(self.expert_weights) - set(self.expert_ids))
        if extra:
            raise ReplayError(f"{source}: expert weights of layer(s) {extra} without their expert ids")

    # ---- making one ----
    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], *, weights: bool = False, tokens=None,
                     source: str = "replay", hash_layers: bool = False) -> "Replay":
        """From site tensors (e.g. `Trace.tensors`); weights: also force the expert weights; hash_layers: also the
        expert ids of hash layers (by default they are not forced: their tid2eid table is part of what is tested)."""
        ids, wts, topk = {}, {}, {}
        for name, x in tensors.items():
            m = SITE.match(name)
            if m is None:
                continue
            layer, kind = int(m.group(1)), m.group(2)
            x = np.asarray(x)
            if x.ndim != 2:
                raise ReplayError(f"{source}: {name} has shape {x.shape}, expected [positions, k]")
            if kind == "ffn.expert_weights":
                if weights:
                    if x.dtype.kind != "f":
                        raise ReplayError(f"{source}: {name} has dtype {x.dtype}, expected a float type")
                    wts[layer] = x.astype(np.float64)
                continue
            if x.dtype.kind not in "iu":
                raise ReplayError(f"{source}: {name} has dtype {x.dtype}, expected an integer type")
            (ids if kind == "ffn.expert_ids" else topk)[layer] = x.astype(np.int64)
        if weights and set(wts) != set(ids):
            missing = sorted(set(ids) - set(wts))
            raise ReplayError(f"{source}: replaying expert weights needs layers.{{i}}.ffn.expert_weights for "
                              f"every layer with expert ids; missing for layer(s) {missing}")
        return cls(ids, wts, topk, tokens=tokens, source=source, hash_layers=hash_layers)

    @classmethod
    def load(cls, path, *, weights: bool = False, hash_layers: bool = False) -> "Replay":
        """From a safetensors file (a refimpl trace, or one written as docs/replay.md says)."""
        path = Path(path)
        if path.is_dir():
            raise ReplayError(f"{path}: is a folder; a replay input is one safetensors file (e.g. a trace)")
        f = SafetensorsFile(path)                       # validates the header; CheckpointError names the file
        tokens = None
        if "refimpl" in f.metadata:
            meta = parse_meta_json(f.metadata["refimpl"], path, ReplayError)
            if not isinstance(meta, dict):
                raise ReplayError(f"{path}: metadata 'refimpl' is not a JSON object")
            tokens = meta.get("tokens")
            if tokens is not None and not (isinstance(tokens, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
                raise ReplayError(f"{path}: metadata 'tokens' must be a list of integer token ids, "
                                  f"got {type(tokens).__name__}")
        tensors = {name: np.array(f.get(name)) for name in f.tensors if SITE.match(name)}
        return cls.from_tensors(tensors, weights=weights, tokens=tokens, source=str(path), hash_layers=hash_layers)

    # ---- checking it against a model and a sequence ----
    def check(self, cfg, tokens) -> None:
        """Refuse a replay that does not fit cfg and this token sequence (ReplayError naming the site)."""
        tokens = [int(t) for t in tokens]
        if self.tokens is not None and list(self.tokens) != tokens:
            raise ReplayError(f"{self.source}: was made on other tokens ({len(self.tokens)} tokens, "
                              f"this run has {len(tokens)}{'' if len(self.tokens) != len(tokens) else ', different ids'})")
        s = len(tokens)
        layers = range(cfg.n_layers + (1 if cfg.n_mtp_layers else 0))
        for layer, ids in self.expert_ids.items():
            name = f"layers.{layer}.ffn.expert_ids"
            if layer not in layers:
                raise ReplayError(f"{self.source}: {name}: the model has no layer {layer}")
            rows = s - 1 if layer == cfg.n_layers else s
            if ids.shape[0] < rows or ids.shape[1] != cfg.n_activated_experts:
                raise ReplayError(f"{self.source}: {name} has shape {ids.shape}, this run needs "
                                  f"[{rows}, {cfg.n_activated_experts}] (n_activated_experts)")
            bad = (ids < 0) | (ids >= cfg.n_routed_experts)
            if bad.any():
                t = int(np.argwhere(bad)[0][0])
                raise ReplayError(f"{self.source}: {name} row {t} holds {ids[t].tolist()}: expert ids must lie in "
                                  f"[0, {cfg.n_routed_experts})")
            dup = [t for t in range(ids.shape[0]) if len(set(ids[t].tolist())) != ids.shape[1]]
            if dup:
                raise ReplayError(f"{self.source}: {name} row {dup[0]} names an expert twice: {ids[dup[0]].tolist()}")
            if layer in self.expert_weights:
                w = self.expert_weights[layer]
                if w.shape != ids.shape:
                    raise ReplayError(f"{self.source}: layers.{layer}.ffn.expert_weights must have the shape of "
                                      f"the expert ids {ids.shape}; got {w.shape}")
                # the model's weights are >= 0 and sum to route_scale per row; allow any peer's rounding and
                # rescaling up to MAX_WEIGHT_FACTOR x route_scale, refuse what would overflow downstream
                hi = MAX_WEIGHT_FACTOR * cfg.route_scale
                bad = ~(np.isfinite(w) & (w >= 0) & (w <= hi))
                if bad.any():
                    t, j = (int(v) for v in np.argwhere(bad)[0])
                    raise ReplayError(f"{self.source}: layers.{layer}.ffn.expert_weights row {t} holds {w[t, j]!r}: "
                                      f"expert weights must be finite, >= 0 and at most {MAX_WEIGHT_FACTOR:g} x "
                                      f"route_scale = {hi:g} (the model's own sum to route_scale per row)")
        for layer, idx in self.topk.items():
            name = f"layers.{layer}.attn.indexer.topk"
            if layer not in layers or not cfg.uses_indexer(layer):
                raise ReplayError(f"{self.source}: {name}: layer {layer} of this model has no indexer")
            rows = s - 1 if layer == cfg.n_layers else s
            if idx.shape[0] < rows:
                raise ReplayError(f"{self.source}: {name} has {idx.shape[0]} rows, this run needs {rows}")
            m = cfg.compress_ratio(layer)
            for t in range(rows):
                row = idx[t][idx[t] >= 0]
                visible = (t + 1) // m
                if (idx[t] < -1).any() or (row >= visible).any() or len(set(row.tolist())) != len(row) \
                        or len(row) > cfg.index_topk:
                    raise ReplayError(f"{self.source}: {name} row {t} ({row.tolist()[:8]}...) must hold at most "
                                      f"index_topk={cfg.index_topk} distinct entries in [0, {visible}) (the entries "
                                      f"position {t} can see), padded with -1")

    def applied_to(self, cfg) -> "Replay":
        """What this replay forces on a model of cfg: without the hash layers' expert ids (and weights) unless
        hash_layers. ReplayError if nothing is left to force."""
        keep = {layer for layer in self.expert_ids if layer >= cfg.n_layers or not cfg.is_hash_layer(layer)}
        if self.hash_layers or keep == set(self.expert_ids):
            return self                                # nothing to leave out (also: already applied)
        applied = Replay.__new__(Replay)
        applied.__dict__.update(self.__dict__)
        applied.expert_ids = {i: v for i, v in self.expert_ids.items() if i in keep}
        applied.expert_weights = {i: v for i, v in self.expert_weights.items() if i in keep}
        if not (applied.expert_ids or applied.topk):
            raise ReplayError(f"{self.source}: holds only the expert ids of hash layers (layers < n_hash_layers = "
                              f"{cfg.n_hash_layers}), which are not forced unless asked (--replay-hash-ids); "
                              "nothing to replay")
        return applied

    def summary(self) -> dict:
        """What is forced: the layers of each kind of site, and whether the hash layers' ids are among them."""
        return {"source": self.source, "expert_ids": sorted(self.expert_ids),
                "expert_weights": sorted(self.expert_weights), "topk": sorted(self.topk),
                "hash_layers": self.hash_layers}

    # ---- used by the model (sites.replayed) ----
    def force(self, name: str, chosen: np.ndarray, start_pos: int) -> np.ndarray | None:
        """The forced rows of site `name` for positions start_pos.. (shape and dtype of `chosen` [s, k]), or None.

        Expert ids and weights are taken as they are; an indexer row lists the source's entries in
        the source's order, -1 padded to the call's width (a position that sees no entry keeps its row).
        """
        m = SITE.match(name)
        if m is None:
            return None
        layer, kind = int(m.group(1)), m.group(2)
        table = {"ffn.expert_ids": self.expert_ids, "ffn.expert_weights": self.expert_weights,
                 "attn.indexer.topk": self.topk}[kind].get(layer)
        if table is None:
            return None
        rows = table[start_pos:start_pos + chosen.shape[0]]
        if kind != "attn.indexer.topk":
            return rows.astype(chosen.dtype)
        out = np.full(chosen.shape, -1, dtype=chosen.dtype)
        for si, row in enumerate(rows):
            row = row[row >= 0]
            out[si, :len(row)] = row
        return out
