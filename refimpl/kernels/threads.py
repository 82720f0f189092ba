"""Thread use of the kernels: small calls run on the calling thread only.

A parallel region costs a wake-up of the worker threads (tens of microseconds, and milliseconds on
a loaded machine); a decode step of the tiny model is smaller than that. `serial_below(work)` runs
the block with one Numba thread when `work` (multiply-adds, roughly) is under SMALL_WORK. Results
never depend on it: every kernel computes each output in a fixed order whatever the thread count.
"""
from __future__ import annotations

import contextlib

import numba

SMALL_WORK = 1 << 20


@contextlib.contextmanager
def serial_below(work: int):
    """Run the block with one Numba thread if work < SMALL_WORK (thread-local; restored afterwards)."""
    if work >= SMALL_WORK:                       # read at each call: tests set it to 0 to force threads
        yield
        return
    before = numba.get_num_threads()
    if before == 1:                              # already serial: nothing to set (a decode step has hundreds)
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)
