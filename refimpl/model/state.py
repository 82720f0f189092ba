"""Decode state: everything a sequence carries from one call to the next (docs/architecture.md §15).

Per layer: the window ring (W rows, row = position mod W), the main compressed entries, the
compressor's pending fp32 rows, and on CSA layers the index keys and the indexer compressor's
rows. The state is a value: `Model.prefill` / `Model.decode` take one and return a new one,
and never write into the one they were given. It grows by the compressed entries only.
A fresh state is the official fresh-model state (compressor kv 0 / score -inf, docs/architecture.md §19.29), so a
new sequence never sees an earlier one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from refimpl.model.attention import AttentionState


class StateError(ValueError):
    """A state that does not belong to this model, precision or revision, or is out of room."""


def config_id(cfg) -> str:
    """Short hash of a config (identifies the model a state or trace belongs to)."""
    blob = json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class State:
    """Decode state of a batch of sequences that all stand at position `pos`."""
    pos: int                                  # tokens consumed so far (next token's position)
    layers: tuple[AttentionState, ...]        # one per main layer
    batch: int
    precision: str
    revision: str
    config_id: str

    @staticmethod
    def empty(cfg, batch: int, precision: str, revision: str) -> "State":
        return State(pos=0, batch=batch, precision=precision, revision=revision, config_id=config_id(cfg),
                     layers=tuple(AttentionState.empty(cfg, i, batch, precision) for i in range(cfg.n_layers)))

    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        return sum(ls.nbytes() for ls in self.layers)
