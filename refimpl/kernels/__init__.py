"""Numba kernels for the swappable spec functions of refimpl/model/ (chosen through refimpl/ops.py).

Each kernel has its spec function's signature and is tested against it (tests/kernels/). These
modules import numba; nothing outside a numba/cuda kernel selection imports them.
"""
