"""refimpl's thread policy (refimpl/kernels/threads.py): Numba's OpenMP threads sleep between parallel
regions unless the user says otherwise, and a whole forward pass gives the same bits on one thread and on
two, with every parallel path taken (Numba regions, the BLAS task pool, OpenBLAS's own threads)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from refimpl.kernels import threads


def test_wait_policy_is_passive_unless_the_user_set_one():
    assert threads.wait_policy({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.wait_policy({"PATH": "/bin"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert threads.wait_policy({"GOMP_SPINCOUNT": "1000"}) == {}


# What GNU OpenMP itself reports (omp_display_env, verbose: its spin count) after refimpl.kernels started
# Numba's threads: 0 spins for the passive policy, 300000 (libgomp's default) had nothing been set.
_DISPLAY = textwrap.dedent("""
    import ctypes, json, os, sys
    import numba
    import refimpl.kernels
    libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "libgomp" in ln and ".so" in ln})
    if numba.threading_layer() != "omp" or len(libs) != 1:
        print(json.dumps({"skip": f"threading layer {numba.threading_layer()}, libgomp {libs}"}))
        sys.exit(0)
    sys.stdout.flush()
    ctypes.CDLL(libs[0]).omp_display_env(1)          # to stderr
    print(json.dumps({"env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}))
""")


def _display(extra_env: dict):
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES and k != "NUMBA_THREADING_LAYER"}
    r = subprocess.run([sys.executable, "-c", _DISPLAY], env={**env, **extra_env}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    spin = [ln.split("=")[1].strip().strip("'") for ln in r.stderr.splitlines() if "GOMP_SPINCOUNT" in ln]
    assert len(spin) == 1, r.stderr[-2000:]
    return int(spin[0]), out["env"]


def test_numba_threads_start_passive_and_the_environment_is_left_as_it_was():
    spin, env = _display({})
    assert spin == 0                                  # a worker sleeps as soon as a region ends
    assert env == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}   # nothing left for later OpenMP libraries


def test_a_users_wait_setting_is_kept():
    assert _display({"GOMP_SPINCOUNT": "12345"}) == (12345, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "12345"})
    spin, env = _display({"OMP_WAIT_POLICY": "ACTIVE"})
    assert spin > 300000 and env["OMP_WAIT_POLICY"] == "ACTIVE"


# The tiny model's prefill (40 tokens: past the window, several compressed entries) and two decode steps in
# each precision, every threshold at 0 so that each parallel path is taken even on these small shapes.
_FORWARD = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    import refimpl.kernels.threads as T, refimpl.kernels.linear as L, refimpl.kernels.hyperconn
    from refimpl.formats.weights import load
    T.SMALL_WORK = 0                                  # every Numba kernel parallel, every task pool split
    L.PARALLEL_MIN = 0                                # one-row and several-row products in parallel regions
    L.PANEL_ROWS = 64                                 # BLAS products in several panels: several pool tasks
    out = {}
    tokens = (np.arange(40) * 37) % 900 + 3
    for prec in ("mirror", "float64", "float32"):
        model = load(sys.argv[1], precision=prec)
        h = hashlib.sha256()
        logits, state = model.prefill(tokens)
        h.update(np.ascontiguousarray(logits).tobytes())
        for token in (5, 77):
            logits, state = model.decode(token, state)
            h.update(np.ascontiguousarray(logits).tobytes())
        out[prec] = h.hexdigest()
    print(json.dumps(out))
""")


def _forward(ckpt, n: str) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}
    r = subprocess.run([sys.executable, "-c", _FORWARD, str(ckpt)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_forward_gives_the_same_bits_on_one_thread_and_two(tiny_ckpt):
    assert _forward(tiny_ckpt, "1") == _forward(tiny_ckpt, "2")
