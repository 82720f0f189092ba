"""Decode state: everything a sequence carries from one call to the next (docs/architecture.md §15).

Per layer: the window ring (W rows, row = position mod W), the main compressed entries, the
compressor's pending fp32 rows, and on CSA layers the index keys and the indexer compressor's
rows. The state is a value: `Model.prefill` / `Model.decode` take one and return a new one,
and never write into the one they were given; its arrays are read-only views, so that an edit in
place raises instead of changing what the next call computes. It grows by the compressed entries only.
A fresh state is the official fresh-model state (compressor kv 0 / score -inf, docs/architecture.md §19.29), so a
new sequence never sees an earlier one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from refimpl.context import LAYOUTS
from refimpl.model.attention import AttentionState


class StateError(ValueError):
    """A state that does not belong to this model (config, weights), precision or revision, or is out of room."""


def config_id(cfg) -> str:
    """Short hash of a config (identifies the model config a state or trace belongs to)."""
    blob = json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_id(arrays: dict[str, np.ndarray]) -> str:
    """Short hash of a few named weight arrays (their dtype, shape and bytes): the fingerprint of a checkpoint."""
    h = hashlib.sha256()
    for name, a in sorted(arrays.items()):
        a = np.ascontiguousarray(a)
        h.update(f"{name} {a.dtype.name} {a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class State:
    """Decode state of a batch of sequences that all stand at position `pos`."""
    pos: int                                  # tokens consumed so far (next token's position)
    layers: tuple[AttentionState, ...] = field(repr=False)   # one per main layer (read-only arrays)
    batch: int
    precision: str
    revision: str
    config_id: str                            # the model's config (config_id) ...
    weights_id: str                           # ... and weights (Model.weights_id) that made it
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
        object.__setattr__(self, "layers", tuple(_read_only(ls) for ls in self.layers))

    def __setstate__(self, fields: dict) -> None:
        # pickle and copy.deepcopy rebuild a State without __init__: checked and made read-only all the same
        self.__dict__.update(fields)
        self.__post_init__()

    @staticmethod
    def empty(cfg, batch: int, precision: str, revision: str, layout: str = "official", *,
              weights_id: str) -> "State":
        """A fresh state of the model with this config and weights (Model.new_state gives one)."""
        if not _is_count(batch) or batch < 1:
            raise StateError(f"batch = {batch!r}: must be an int >= 1")
        return State(pos=0, batch=batch, precision=precision, revision=revision, config_id=config_id(cfg),
                     weights_id=weights_id, layout=layout,
                     layers=tuple(AttentionState.empty(cfg, i, batch, precision) for i in range(cfg.n_layers)))

    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        return sum(ls.nbytes() for ls in self.layers)


def _read_only(obj):
    """obj with every array in it (through nested dataclasses) replaced by a read-only view; the
    caller's arrays keep their flags."""
    if isinstance(obj, np.ndarray):
        view = obj.view()
        view.flags.writeable = False
        return view
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _read_only(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _is_count(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
