"""Compile every CUDA kernel to PTX without a GPU (the CPU check that the GPU build works).

`compile_all(cc)` compiles each kernel of KERNEL_MODULES for every signature its module lists in
`PTX_SIGNATURES` (float32 and float64 variants, the dtypes the wrappers pass) with
`cuda.compile_ptx` (NVVM from the nvidia-cuda-nvrtc / -nvvm wheels; no driver, no device).
Kernels call device functions compiled lazily for "the current device"; with no device the
dispatcher's lookup of its compute capability is answered with `cc` while compiling.
`contractions(ptx)` counts fused multiply-adds in fp32, which mirror must not have.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import types
from unittest import mock

KERNEL_MODULES = ("refimpl.cuda.attention", "refimpl.cuda.linear", "refimpl.cuda.compressor",
                  "refimpl.cuda.indexer", "refimpl.cuda.hyperconn")


@contextlib.contextmanager
def _no_device(cc):
    from numba.cuda import dispatcher
    fake = types.SimpleNamespace(compute_capability=tuple(cc))
    with mock.patch.object(dispatcher, "get_current_device", lambda: fake):
        yield


def compile_all(cc=(9, 0)) -> dict[str, str]:
    """{"module.kernel[i]": ptx} for every kernel and listed signature; raises on a compile error."""
    from numba import cuda
    out = {}
    with _no_device(cc):
        for name in KERNEL_MODULES:
            mod = importlib.import_module(name)
            for kernel, sigs in mod.PTX_SIGNATURES():
                for i, sig in enumerate(sigs):
                    sig = tuple(_c_layout(t) for t in sig)
                    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=tuple(cc))
                    out[f"{name.rsplit('.', 1)[1]}.{kernel.py_func.__name__}[{i}]"] = ptx
    return out


def _c_layout(t):
    """Array types as C-contiguous, as the wrappers pass them (device_array / to_device of contiguous arrays)."""
    from numba import types
    return t.copy(layout="C") if isinstance(t, types.Array) else t


def contractions(ptx: str) -> int:
    """Number of fp32 fused multiply-adds (fma.rn.f32 / fma.rn.ftz.f32) in a PTX text."""
    return len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx))
