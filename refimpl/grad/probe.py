"""The forward's hook at its sites: keeps each site's value and adds a perturbation where one is asked for.

The forward of refimpl/grad/ passes every differentiable site (sites.SITES) through a Probe, so
that a finite-difference check can move one activation (a site value plus a small array) and
watch the loss, the same way it moves a parameter.
"""
from __future__ import annotations

import numpy as np


class Probe:
    """values: site name -> its value [b, ...] (as used downstream); perturb: site name -> array added there."""

    def __init__(self, perturb: dict[str, np.ndarray] | None = None):
        self.perturb = dict(perturb or {})
        self.values: dict[str, np.ndarray] = {}

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        if name in self.perturb:
            x = x + self.perturb[name]
        self.values[name] = x
        return x
