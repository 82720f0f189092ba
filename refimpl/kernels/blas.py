"""Many small BLAS products, each on one BLAS thread, spread over a pool of Python threads.

Mirror's block sums (refimpl/model/linear.py) are products with 128 (or 32) input columns: short
BLAS calls. OpenBLAS starts and synchronises its threads on every call; on a loaded 2-core machine
that made a 1024 x 4096 @ 4096 x 4096 product taken in 128-column blocks run at 0.07-0.3 of one
long dgemm (measured 2026-12-07, load average 7), and at 0.7-1.0 of it with one BLAS thread. So
`run_tasks` runs its tasks on a pool of Python threads (NumPy releases the GIL inside a product)
while NumPy's OpenBLAS is held at one thread, and restores the thread count afterwards.

Results never depend on this: every product handed to it here is exact in any order (the block
sums), so the thread counts change the speed only. With a BLAS other than OpenBLAS (or one whose
thread count cannot be asked) the tasks run the same way with that BLAS's own threads.

A task may itself call run_tasks (a whole MoE expert handed to the pool makes its products' panel
calls): those nested tasks run one after another on the task's own thread (`in_task`), whose BLAS
is already at one thread; the kernels ask `in_task` to keep their Numba products on that thread too.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import threading

import numba

_LOCK = threading.Lock()
_STATE: dict = {}            # "lib": (get, set) of NumPy's OpenBLAS or None; "pool": the executor; "workers"
_TASK = threading.local()    # .on: this thread runs a task of run_tasks / run_ordered


def _openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS NumPy loaded, or None."""
    if "lib" not in _STATE:
        found = None
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
            for path in libs:
                lib = ctypes.CDLL(path)
                for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                                 ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                                 ("openblas_get_num_threads", "openblas_set_num_threads")):
                    if hasattr(lib, get) and hasattr(lib, put):
                        found = (getattr(lib, get), getattr(lib, put))
                        break
                if found:
                    break
        except OSError:                          # no /proc (not Linux) or a library that will not load
            found = None
        _STATE["lib"] = found
    return _STATE["lib"]


def workers() -> int:
    """Python threads of the pool: Numba's thread count (NUMBA_NUM_THREADS), as the Numba kernels use."""
    return max(1, numba.get_num_threads())


def in_task() -> bool:
    """True while this thread runs a task of run_tasks / run_ordered: its products stay on this thread."""
    return getattr(_TASK, "on", False)


def _as_task(fn):
    """fn run with this thread marked as a task's (nested run_tasks calls run inline)."""
    def call(t):
        before = in_task()
        _TASK.on = True
        try:
            return fn(t)
        finally:
            _TASK.on = before
    return call


def run_tasks(fn, tasks) -> None:
    """fn(task) for every task, on workers() Python threads with one OpenBLAS thread each; the tasks must
    write disjoint outputs. Exceptions are raised here (the first one). Called from a task: inline."""
    run_ordered(fn, tasks, None)


def run_ordered(fn, tasks, consume) -> None:
    """fn(task) for every task on the pool (as run_tasks), and, unless consume is None, consume(i, fn(tasks[i]))
    on the calling thread for i ascending, each as soon as that result and those before it are done (the
    caller adds the results in a fixed order while the pool computes the next ones). On an error the
    tasks not started are dropped, the running ones finished, and the first error is raised."""
    tasks = list(tasks)
    if in_task() or not tasks:                   # nested in a task: on this thread, BLAS already at one thread
        for i, t in enumerate(tasks):
            r = fn(t)
            if consume is not None:
                consume(i, r)
        return
    n = min(workers(), len(tasks))
    with _LOCK:                                  # one such call at a time: the BLAS thread count is global
        lib = _openblas()
        before = int(lib[0]()) if lib else None
        if lib and before != 1:
            lib[1](ctypes.c_int(1))
        try:
            call = _as_task(fn)
            if n <= 1:
                for i, t in enumerate(tasks):
                    r = call(t)
                    if consume is not None:
                        consume(i, r)
                return
            if _STATE.get("workers") != n:
                if "pool" in _STATE:
                    _STATE["pool"].shutdown()
                _STATE["pool"] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="refimpl-blas")
                _STATE["workers"] = n
            futures = [_STATE["pool"].submit(call, t) for t in tasks]
            try:
                for i, f in enumerate(futures):
                    r = f.result()
                    if consume is not None:
                        consume(i, r)
                    futures[i] = None            # the result is not kept once consumed
            except BaseException:
                for f in futures:
                    if f is not None:
                        f.cancel()
                concurrent.futures.wait([f for f in futures if f is not None])
                raise
        finally:
            if lib and before != 1:
                lib[1](ctypes.c_int(before))
