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

from refimpl.context import LAYOUTS
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
    layout: str = "official"                  # index layout of the model that made it (attention.LAYOUTS)

    def __post_init__(self):
        # a State may be built or edited by hand (dataclasses.replace): refuse what no call could make
        if not _is_count(self.pos) or self.pos < 0:
            raise StateError(f"state position pos = {self.pos!r}: must be an int >= 0")
        if not _is_count(self.batch) or self.batch < 1:
            raise StateError(f"state batch = {self.batch!r}: must be an int >= 1")
        if self.layout not in LAYOUTS:
            raise StateError(f"state layout = {self.layout!r}: must be one of {LAYOUTS}")
        if not isinstance(self.layers, tuple) or not all(isinstance(ls, AttentionState) for ls in self.layers):
            raise StateError("state layers must be a tuple of AttentionState, one per layer")

    @staticmethod
    def empty(cfg, batch: int, precision: str, revision: str, layout: str = "official") -> "State":
        if not _is_count(batch) or batch < 1:
            raise StateError(f"batch = {batch!r}: must be an int >= 1")
        return State(pos=0, batch=batch, precision=precision, revision=revision, config_id=config_id(cfg),
                     layout=layout, layers=tuple(AttentionState.empty(cfg, i, batch, precision) for i in range(cfg.n_layers)))

    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        return sum(ls.nbytes() for ls in self.layers)


def _is_count(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
