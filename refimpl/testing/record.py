"""One record per operation: its reference on plain arrays, its input strategy, its edge cases, its outputs.

A record is data: the registry `OPS` maps an operation's name to its `OpRecord`, in data-flow order.
The inputs of an operation are one dict of named NumPy arrays and scalars in the official tensor
layouts (each record's `inputs` says which): activations are float32 arrays holding bf16 values
(what the official bf16 tensors hold; cast them to torch.bfloat16 or jnp.bfloat16 losslessly),
weights keep their checkpoint dtypes (FP8 e4m3 as ml_dtypes.float8_e4m3fn, E8M0 scales as
ml_dtypes.float8_e8m0fnu, packed FP4 as int8 with element 2j in bits 0-3, bf16 as ml_dtypes.bfloat16).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from refimpl.numerics import PRECISIONS
from refimpl.ops import use_kernels


@dataclass(frozen=True)
class OpRecord:
    """An operation that implementations write kernels for, as the kit tests it."""
    name: str
    summary: str                               # one line: what it computes
    official: str                              # the official code it mirrors (M: model.py, K: kernel.py lines)
    inputs: dict                               # input name -> "shape dtype: meaning" (official layouts)
    outputs: tuple                             # output names, in the order a candidate returns them
    axes: dict                                 # output name -> axis names ("b batch", "h heads", ...), or a
                                               # tuple of such tuples, one per number of axes the output can have
    run: Callable                              # (inputs, precision) -> {output name: array} (the reference)
    strategy: Callable                         # (precision) -> a Hypothesis strategy of input dicts
    edges: Callable                            # (inputs) -> set of the edge-case labels these inputs reach
    edge_cases: tuple                          # every label the strategy reaches on purpose
    precisions: tuple = PRECISIONS             # the modes the reference runs in
    selections: dict = field(default_factory=dict)   # integer output -> the reference output whose scores choose it
    extra: tuple = ()                          # reference outputs a candidate does not return (selection scores)
    exact: bool = False                        # compared bit for bit (a format operation: no precision choice)
    suspects: tuple = ()                       # (known field bug, inputs -> the inputs as that bug reads them or None)

    def reference(self, inputs: dict, precision: str = "float64", *, kernels: str = "numpy") -> dict:
        """The reference outputs {name: array} on these inputs, at a precision of `precisions`.

        kernels: the kernel selection the operation runs under (refimpl/ops.py); "numpy", the default, is the
        spec. refimpl's own kernel tests pass "numba" to hold a kernel against the kit (dogfood)."""
        if precision not in self.precisions:
            raise ValueError(f"{self.name}: precision {precision!r} is not one of {self.precisions}")
        if not isinstance(inputs, dict):
            raise TypeError(f"{self.name}: inputs must be a dict of named arrays, got {type(inputs).__name__}")
        try:
            with use_kernels(kernels):
                out = self.run(inputs, precision)
        except KeyError as e:
            raise ValueError(f"{self.name}: the inputs have no {e}; the record's inputs are: "
                             f"{'; '.join(self.inputs)}") from None
        return {k: np.asarray(v) for k, v in out.items()}


OPS: dict[str, OpRecord] = {}


def register(rec: OpRecord) -> OpRecord:
    if rec.name in OPS:
        raise RuntimeError(f"two records named {rec.name}")
    OPS[rec.name] = rec
    return rec


def op(name) -> OpRecord:
    """The record of an operation, by name (or the record itself); KeyError naming the known operations."""
    if isinstance(name, OpRecord):
        return name
    if name not in OPS:
        raise KeyError(f"refimpl.testing has no operation {name!r}; the operations are: {', '.join(OPS)}")
    return OPS[name]
