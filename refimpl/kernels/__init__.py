"""Numba kernels of the swappable operations (refimpl/ops.py); each has its spec function's signature.

Each is tested against its spec function (tests/kernels/). These modules import numba; nothing
outside a numba/cuda kernel selection imports them.
"""
