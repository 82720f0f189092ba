"""Which implementation runs each swappable operation: its NumPy spec function or a kernel.

The hot operations of the model are plain NumPy functions in refimpl/model/, marked `@swappable`;
those functions are the spec. A model runs under a kernel selection (`load(..., kernels=...)`,
`--kernels` on the command line):

    "numpy"                           every operation as its spec function (the readable path)
    "numba"                           each operation that has a Numba kernel (refimpl/kernels/) runs it;
                                      the others run their spec function
    "numba,sparse_attention=numpy"    the same, except the operations named (swap one kernel at a time
                                      to find which one a difference comes from)
    "numpy,quantized_linear=numba"    the spec path with only the named kernels
    "cuda"                            the numba.cuda kernels (refimpl/cuda/) on a GPU, the rest as "numba"
                                      would run it

The default selection is "numba", or the environment variable REFIMPL_KERNELS when it is set
(REFIMPL_KERNELS=numpy runs any program on the spec path). A kernel has its spec function's
signature and is tested against it (tests/kernels/). Kernel modules are named here by path and
imported on first use, so `import refimpl` and the NumPy path never import Numba or compile anything.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass

BACKENDS = ("numpy", "numba", "cuda")

# backend -> operation -> "module:function". A backend without an entry for an operation runs the
# operation as the backend it falls back to (FALLBACK), and in the end as its spec function.
KERNELS: dict[str, dict[str, str]] = {
    "numba": {
        "sparse_attention": "refimpl.kernels.attention:sparse_attention",
        "index_topk": "refimpl.kernels.indexer:index_topk",
        "split_sinkhorn": "refimpl.kernels.hyperconn:split_sinkhorn",
        "hc_post": "refimpl.kernels.hyperconn:hc_post",
        "rms_norm": "refimpl.kernels.norm:rms_norm",
        "head_rms_norm": "refimpl.kernels.norm:head_rms_norm",
        "apply_rope": "refimpl.kernels.rope:apply_rope",
        "gated_pool": "refimpl.kernels.compressor:gated_pool",
        # the products and the MoE experts (refimpl/kernels/linear.py, moe.py)
        "quantized_linear": "refimpl.kernels.linear:quantized_linear",
        "fp32_linear": "refimpl.kernels.linear:fp32_linear",
        "bf16_linear": "refimpl.kernels.linear:bf16_linear",
        "grouped_wo_a": "refimpl.kernels.linear:grouped_wo_a",
        "expert_sum": "refimpl.kernels.moe:expert_sum",
    },
    "cuda": {
        "sparse_attention": "refimpl.cuda.attention:sparse_attention",
        "quantized_linear": "refimpl.cuda.linear:quantized_linear",
        "matmul": "refimpl.cuda.linear:matmul",
        "gated_pool": "refimpl.cuda.compressor:gated_pool",
        "index_topk": "refimpl.cuda.indexer:index_topk",
        "index_scores": "refimpl.cuda.indexer:index_scores",
        "split_sinkhorn": "refimpl.cuda.hyperconn:split_sinkhorn",
    },
}
FALLBACK = {"cuda": "numba", "numba": "numpy"}
# backend -> "module:function" called (no arguments) when a selection using it is made: raises a
# ValueError saying why the backend cannot run here (for example, no usable GPU)
AVAILABILITY: dict[str, str] = {"cuda": "refimpl.cuda:check_available"}

SPEC: dict[str, object] = {}                     # operation name -> its spec function (filled by @swappable)
_RESOLVED: dict = {}                             # (operation, Kernels) -> the function that runs it
_active = contextvars.ContextVar("refimpl_kernels", default=None)


class KernelError(ValueError):
    """A kernel selection that cannot be made (unknown backend or operation, backend unavailable)."""


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kernels:
    """A kernel selection: a default backend and per-operation overrides (checked when made)."""
    default: str = "numpy"
    overrides: tuple = ()                        # ((operation, backend), ...) in the order given

    def __post_init__(self):
        if self.default not in BACKENDS:
            raise KernelError(f"kernels {str(self)!r:.80}: the first item must be one of {', '.join(BACKENDS)}")
        seen = set()
        for op, backend in self.overrides:
            if backend not in BACKENDS:
                raise KernelError(f"kernels {str(self)!r:.80}: {op}={backend} names no backend; the backends are "
                                  f"{', '.join(BACKENDS)}")
            if op not in SPEC:
                raise KernelError(f"kernels {str(self)!r:.80}: no swappable operation {op!r:.40}; the operations "
                                  f"are {', '.join(sorted(SPEC))}")
            if op in seen:
                raise KernelError(f"kernels {str(self)!r:.80}: {op} is named twice")
            seen.add(op)
            if backend != "numpy" and op not in KERNELS[backend]:
                have = ", ".join(kernel_ops(backend)) or "none"
                raise KernelError(f"kernels {str(self)!r:.80}: there is no {backend} kernel for {op}; {backend} "
                                  f"kernels exist for: {have}")
        for backend in {self.default, *(b for _, b in self.overrides)}:
            if backend in AVAILABILITY:
                _resolve(AVAILABILITY[backend])()          # raises a ValueError saying why not

    def backend(self, op: str) -> str:
        """The backend chosen for an operation (before falling back)."""
        return dict(self.overrides).get(op, self.default)

    def impl(self, op: str):
        """The function that runs `op` under this selection (a kernel, or None for the spec function)."""
        backend = self.backend(op)
        while backend != "numpy":
            path = KERNELS.get(backend, {}).get(op)
            if path is not None:
                return _resolve(path)
            backend = FALLBACK[backend]
        return None

    def __str__(self) -> str:
        return ",".join([self.default] + [f"{op}={b}" for op, b in self.overrides])


def kernel_ops(backend: str) -> list[str]:
    """The operations that have a kernel of this backend (its own, not through a fallback)."""
    return sorted(KERNELS.get(backend, {}))


DEFAULT = "numba"


def default_kernels() -> str:
    """The selection used when none is given: $REFIMPL_KERNELS, else "numba"."""
    return os.environ.get("REFIMPL_KERNELS") or DEFAULT


def parse_kernels(text) -> Kernels:
    """"numba" or "numba,op=numpy,..." (or a Kernels; None: default_kernels()) -> Kernels; KernelError naming
    what is wrong."""
    if isinstance(text, Kernels):
        return text
    if text is None:
        text = default_kernels()
        if "REFIMPL_KERNELS" in os.environ and os.environ["REFIMPL_KERNELS"]:
            try:
                return parse_kernels(text)
            except KernelError as e:
                raise KernelError(f"the environment variable REFIMPL_KERNELS: {e}") from None
    if not isinstance(text, str):
        raise KernelError(f"kernels must be a string such as 'numba' or 'numpy', got {type(text).__name__}")
    parts = [p.strip() for p in text.split(",")]
    overrides = []
    for part in parts[1:]:
        op, eq, backend = part.partition("=")
        if not eq:
            raise KernelError(f"kernels {text!r:.80}: {part!r:.60} is not OPERATION=BACKEND with BACKEND one of "
                              f"{', '.join(BACKENDS)}")
        overrides.append((op.strip(), backend.strip()))
    return Kernels(parts[0], tuple(overrides))


@contextlib.contextmanager
def use_kernels(sel: Kernels | str):
    """Run the swappable operations called inside the block under this selection."""
    token = _active.set(parse_kernels(sel))
    try:
        yield
    finally:
        _active.reset(token)


def active() -> Kernels:
    """The selection in force (Kernels("numpy") outside any use_kernels block)."""
    return _active.get() or Kernels()


def swappable(fn):
    """Mark a spec function as an operation a kernel may replace (looked up by the function's name).

    The wrapper's `.spec` is the spec function itself: a kernel may call it for cases it leaves to
    the spec, without going through the switch again.
    """
    name = fn.__name__
    if name in SPEC:
        raise RuntimeError(f"two swappable operations named {name}")
    SPEC[name] = fn

    @functools.wraps(fn)
    def dispatch(*args, **kwargs):
        sel = _active.get()
        if sel is None:
            return fn(*args, **kwargs)
        impl = _RESOLVED.get((name, sel))
        if impl is None:
            impl = _RESOLVED[(name, sel)] = sel.impl(name) or fn
        return impl(*args, **kwargs)

    dispatch.spec = fn
    return dispatch
