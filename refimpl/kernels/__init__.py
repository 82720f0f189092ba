"""Numba kernels of the swappable operations (refimpl/ops.py); each has its spec function's signature.

Each is tested against its spec function (tests/kernels/). These modules import numba; nothing
outside a numba/cuda kernel selection imports them. Importing the package starts Numba's threads
under refimpl's wait policy (threads.start_threads: they sleep between parallel regions).
"""
from refimpl.kernels import threads as _threads

_threads.start_threads()
