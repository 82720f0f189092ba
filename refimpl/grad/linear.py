"""Backward of the products of refimpl/model/linear.py: every kind is y = x @ Wᵀ in float64.

    dx = dy @ W            dW = Σ_rows dyᵀ x          (W [out, in], used as x @ W.T)

quantized_linear, bf16_linear, fp32_linear and matmul differ only in their roundings, which are
identities in float64; the gradient of a quantized weight is with respect to its dequantized
float64 matrix (refimpl/grad/params.py).
"""
from __future__ import annotations

import numpy as np


def linear_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Backward of y = x @ w.T. dy [.., out], x [.., in], w [out, in] -> (dx [.., in], dw [out, in])."""
    rows_dy = dy.reshape(-1, dy.shape[-1])                            # [rows, out]
    rows_x = x.reshape(-1, x.shape[-1]).astype(np.float64)           # [rows, in]
    dx = (rows_dy @ w).reshape(*dy.shape[:-1], w.shape[1])
    return dx, rows_dy.T @ rows_x
