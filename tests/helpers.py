"""Helpers shared by the tests: independent references of the number formats, written once here.

Importable as `helpers` from any test (pytest puts tests/ on sys.path through tests/conftest.py).
They use ml_dtypes and NumPy directly, never refimpl, so that a test holds refimpl against them.
"""
import ml_dtypes
import numpy as np


def bf16(x) -> np.ndarray:
    """x rounded to bfloat16 (RNE) through ml_dtypes, as float32."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def bf16_values(rng, shape, scale=1.0) -> np.ndarray:
    """Random float32 arrays holding bf16 values (what mirror-mode activations are)."""
    return bf16(rng.standard_normal(shape) * scale)


def ulp_e4m3(v):
    """Spacing of the e4m3 grid at |v| (subnormal spacing 2^-9 below 2^-6)."""
    _, e = np.frexp(np.abs(v))
    return np.ldexp(1.0, np.maximum(e - 1, -6) - 3)


def ulp_e2m1(v):
    """Spacing of the e2m1 grid at |v| (0.5 below 2)."""
    _, e = np.frexp(np.abs(v))
    return np.ldexp(1.0, np.maximum(e - 1, 0) - 1)
