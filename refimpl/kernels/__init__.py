"""Numba kernels of the swappable operations (refimpl/ops.py); each has its spec function's signature."""
