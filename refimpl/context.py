"""The run context: every option of a run, checked once, passed as one argument (`ctx`) to the spec.

    ctx.cfg       the model's Config
    ctx.prec      precision mode: "float64", "float32" or "mirror" (refimpl/numerics.py)
    ctx.revision  official revision: "current" (the numerical target) or "initial" (docs/architecture.md §18)
    ctx.layout    index layout: "official" or "canonical" (docs/architecture.md §15)
    ctx.kernels   which implementation runs each swappable operation (refimpl/ops.py)
    ctx.trace     a sites.Recording that keeps the sites it asks for, or None
    ctx.replay    forced choices (refimpl/oracle/replay.py), or None
    ctx.layers    per-layer facts computed once from the config (config.Layer), the MTP block last

Every spec function that depends on the run takes `ctx` as its last positional argument; the
swappable operations (the kernel interface, on plain arrays) take only the precision, `prec`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from refimpl.config import Config, ConfigError, Layer
from refimpl.numerics import check_precision, work_dtype
from refimpl.ops import Kernels, parse_kernels

REVISIONS = ("current", "initial")
LAYOUTS = ("official", "canonical")


def check_layout(layout: str) -> None:
    """Raise ValueError unless layout is one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown index layout {layout!r}; expected one of {LAYOUTS}")


def check_revision(revision: str) -> None:
    """Raise ValueError unless revision is one of REVISIONS."""
    if revision not in REVISIONS:
        raise ValueError(f"revision {revision!r}: choose one of {REVISIONS}")


@dataclass(frozen=True)
class RunContext:
    """The frozen options of a run (see the module docstring). Checked once, here."""
    cfg: Config
    prec: str
    revision: str = "current"
    layout: str = "official"
    kernels: Kernels = Kernels()
    trace: object = None
    replay: object = None
    layers: tuple[Layer, ...] = ()
    dtype: type = field(init=False, default=None)   # the activation dtype: float64 in "float64", float32 otherwise

    def __post_init__(self):
        if not isinstance(self.cfg, Config):
            raise ConfigError(f"RunContext needs a refimpl Config, got {type(self.cfg).__name__}")
        check_precision(self.prec)
        check_revision(self.revision)
        check_layout(self.layout)
        object.__setattr__(self, "kernels", parse_kernels(self.kernels))
        object.__setattr__(self, "dtype", work_dtype(self.prec))
        if not self.layers:
            n = self.cfg.n_layers + (1 if self.cfg.n_mtp_layers else 0)
            object.__setattr__(self, "layers", tuple(self.cfg.layer(i) for i in range(n)))

    def running(self, trace=None) -> "RunContext":
        """This context for one call: recording into `trace` (a sites.Recording), with the replay it carries
        (as it applies to this config: oracle/replay.py Replay.applied_to)."""
        replay = getattr(trace, "replay", None)
        call = copy.copy(self)                     # the options were checked when self was made: not again
        object.__setattr__(call, "trace", trace)
        object.__setattr__(call, "replay", None if replay is None else replay.applied_to(self.cfg))
        return call


__all__ = ["LAYOUTS", "REVISIONS", "Layer", "RunContext", "check_layout", "check_revision"]
