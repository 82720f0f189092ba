"""Backward of RoPE (refimpl/model/rope.py): a rotation's transpose is its inverse.

Each adjacent pair of the last p dims is rotated by the angle t·f_i; the Jacobian is that
rotation, so the gradient is rotated back by the same angle (the conjugate cis), and the
non-rope dims pass unchanged. The backward of the inverse rotation (the output's de-rotation,
docs/architecture.md §19.4) is the forward rotation.
"""
from __future__ import annotations

import numpy as np

from refimpl.model.rope import RopeTable, apply_rope


def apply_rope_backward(dy: np.ndarray, table: RopeTable, *, inverse: bool = False) -> np.ndarray:
    """Backward of apply_rope(x, table, "float64", inverse=inverse). dy [b, s, (heads,) d] -> dx, same shape."""
    return apply_rope(dy.astype(np.float64), table, "float64", inverse=not inverse)
