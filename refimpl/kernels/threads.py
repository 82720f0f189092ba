"""Thread use of the kernels: Numba's worker threads sleep between parallel regions; small calls run on
the calling thread only.

Two pools of threads serve the kernels: Numba's (its OpenMP layer, for the prange kernels) and the
Python threads of `refimpl.kernels.blas.run_tasks` (BLAS products, each on one OpenBLAS thread). GNU
OpenMP's workers, by default, spin for a few milliseconds after each parallel region (libgomp's
GOMP_SPINCOUNT of 300,000 pauses when OMP_WAIT_POLICY is unset), waiting for the next one. On a
2-core machine such a spinning worker holds the core that the other pool's thread, or the waiting
master itself, needs next: a tiny-model forward with two threads took more CPU time than with one
(0.45-0.49 s against 0.20-0.23 s, float32) and was slower in wall time even on an idle machine, and
on a loaded one a parallel region of 0.1 ms of work took 7-15 ms (the master spinning at the end
barrier on the core its descheduled worker waited for; benchmarks/README.md, "the small model,
third pass"). So refimpl starts Numba's threads with OMP_WAIT_POLICY=PASSIVE: a worker sleeps as
soon as it has nothing to do, and is woken (tens of microseconds) by the next region. The variable is
set only while Numba starts its threads (`start_threads`, when refimpl.kernels is first imported)
and removed again afterwards, so other OpenMP libraries loaded later keep their own defaults; a
user who sets OMP_WAIT_POLICY or GOMP_SPINCOUNT keeps that setting (docs/usage.md, "Kernels").

A parallel region costs a wake-up of the worker threads (tens of microseconds, and milliseconds on
a loaded machine); a decode step of the tiny model is smaller than that. `serial_below(work)` runs
the block with one Numba thread when `work` (multiply-adds, roughly) is under SMALL_WORK. Results
never depend on either: every kernel computes each output in a fixed order whatever the thread count.
"""
from __future__ import annotations

import contextlib
import os

import numba

SMALL_WORK = 1 << 20
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")   # a user's setting of either is kept as given
WAIT_POLICY = "PASSIVE"                                   # refimpl's default for Numba's OpenMP threads


def wait_policy(environ) -> dict:
    """The variables start_threads sets while Numba starts its threads: {} when the environment already
    says how OpenMP threads wait (either variable of WAIT_VARIABLES), else OMP_WAIT_POLICY=PASSIVE."""
    if any(name in environ for name in WAIT_VARIABLES):
        return {}
    return {"OMP_WAIT_POLICY": WAIT_POLICY}


def start_threads() -> int:
    """Start Numba's threading layer (if not yet started) under wait_policy(os.environ), then remove what it
    set: the OpenMP runtime reads the variable once, when it is loaded. Returns Numba's thread count.

    Has no effect on the wait where the runtime was loaded before (Numba's threads already running,
    or another library that loaded the same libgomp), or with Numba's tbb or workqueue layers."""
    extra = wait_policy(os.environ)
    os.environ.update(extra)
    try:
        return numba.get_num_threads()          # launches the threading layer (loads libgomp) on its first call
    finally:
        for name in extra:
            os.environ.pop(name, None)


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
