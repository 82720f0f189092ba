"""Host side of the CUDA kernels: modes, transfers, launches, and kernel timing with CUDA events.

Each wrapper copies its inputs to the device, launches, and copies the result back (the model
around it is NumPy). Weights that do not change between calls (FP8/FP4 matrices, decode tables)
are kept on the device in a small cache keyed by the host array (`cached_device`).
`timing()` turns on CUDA-event timing of every launch (tools/gpu_check.py reads `TIMES`).
"""
from __future__ import annotations

import collections
import contextlib

import numpy as np
from numba import cuda

from refimpl.cuda.device import MODES, SIMULATOR
from refimpl.numerics import PRECISIONS, work_dtype

# threads per block of the 1-D launches; the simulator starts a Python thread for every thread of a
# block, idle ones included, so it gets smaller blocks (no result depends on the block size)
THREADS = 32 if SIMULATOR else 128
TIMES: dict[str, list[float]] = collections.defaultdict(list)   # kernel name -> milliseconds per launch
_timing = [False]


def check_mode(prec: str):
    """prec -> (kernel mode number, working dtype); ValueError for an unknown precision (as the spec)."""
    if prec not in MODES:
        raise ValueError(f"unknown precision {prec!r}; expected one of {PRECISIONS}")
    return MODES[prec], work_dtype(prec)


def to_device(a: np.ndarray):
    """A contiguous host array on the device."""
    return cuda.to_device(np.ascontiguousarray(a))


def to_host(d) -> np.ndarray:
    return d.copy_to_host()


_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
CACHE_BYTES = (256 << 20) if SIMULATOR else (16 << 30)   # weights kept on the device at most (an H200 has 141 GB;
                                                         # the simulator's "device" is host memory)
_cached_bytes = [0]


def cached_device(a: np.ndarray, as_dtype=None):
    """The device copy of a weight array (viewed as as_dtype), made once; least recently used dropped first.

    Keyed by the array object (id, shape, dtype, data pointer); the host array is held so the id stays
    valid. Weights are read-only in refimpl, so a cached copy never goes stale.
    """
    key = (id(a), a.shape, str(a.dtype), a.__array_interface__["data"][0], str(as_dtype))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[1]
    host = np.ascontiguousarray(a if as_dtype is None else a.view(as_dtype))
    dev = cuda.to_device(host)
    _CACHE[key] = (a, dev, host.nbytes)
    _cached_bytes[0] += host.nbytes
    while _cached_bytes[0] > CACHE_BYTES and len(_CACHE) > 1:
        _, (_, _, nbytes) = _CACHE.popitem(last=False)
        _cached_bytes[0] -= nbytes
    return dev


def clear_cache() -> None:
    _CACHE.clear()
    _cached_bytes[0] = 0


@contextlib.contextmanager
def timing():
    """Record every kernel launch's device time (CUDA events) into TIMES while the block runs."""
    TIMES.clear()
    _timing[0] = True
    try:
        yield TIMES
    finally:
        _timing[0] = False


def launch(kernel, grid, block, *args) -> None:
    """kernel[grid, block](*args), timed with CUDA events when timing() is on (not in the simulator)."""
    if not _timing[0] or SIMULATOR:
        kernel[grid, block](*args)
        return
    start, end = cuda.event(), cuda.event()
    start.record()
    kernel[grid, block](*args)
    end.record()
    end.synchronize()
    TIMES[getattr(getattr(kernel, "py_func", kernel), "__name__", str(kernel))].append(
        cuda.event_elapsed_time(start, end))


def launch_1d(kernel, n: int, *args) -> None:
    """One thread per item 0..n-1 (cuda.grid(1)), THREADS per block."""
    if n > 0:
        launch(kernel, (n + THREADS - 1) // THREADS, THREADS, *args)
