"""Rotary position embedding with YaRN frequencies (docs/architecture.md §6).

Pair layout: INTERLEAVED (adjacent pairs). On the last p dims of a vector, the pair
(x[2i], x[2i+1]) is the complex number x[2i] + i·x[2i+1], multiplied by cis[t, i] = e^{i·t·f_i}
(or its conjugate for the inverse rotation). This is not the "rotate_half" split-halves layout.

    f_i = base^(-2i/p)                                                  i = 0 .. p/2-1
    YaRN (original_seq_len > 0):  f_i = f_i/factor · ramp_i + f_i · (1 - ramp_i)
        ramp_i = clamp((i - low) / (high - low), 0, 1),  low/high from beta_fast/beta_slow
    angle[t, i] = t · f_i             (no mscale: the rotation has unit magnitude)

Per layer: ratio-0 layers use rope_theta without YaRN, compressed layers compress_rope_theta with
YaRN (Config.rope_base / rope_original_seq_len). The table is computed for the positions asked
for, so there is no max_seq_len limit here. Rounding (mirror): the power base^(2i/p) and
the complex product (a + ib)(cos + i·sin) are each one official op (numerics.rounded_once), the
product then rounded to bf16 when written back into the bf16 tensor; cos/sin of the fp32 angle are
correctly rounded in every mode.
Official: model.py precompute_freqs_cis (M:L199-229), apply_rotary_emb (M:L232-244).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from refimpl.numerics import bf16, power, rounded_once, work_dtype
from refimpl.ops import swappable


@dataclass(frozen=True)
class RopeTable:
    """cos/sin of the rotation angles for a run of positions."""
    cos: np.ndarray   # [s, p/2]
    sin: np.ndarray   # [s, p/2]


def yarn_frequencies(*, dim: int, base: float, original_seq_len: int, factor: float,
                     beta_fast: int, beta_slow: int, dtype=np.float32, prec: str) -> np.ndarray:
    """Rotation frequency of each of the dim/2 pairs. -> [dim/2]

    Each official fp32 op rounds once; in mirror the power `base ** e` is one correctly rounded op.
    """
    # official: freqs = 1 / base ** (arange(0, dim, 2, fp32) / dim)   (fp32 unless dtype is float64)
    freqs = dtype(1.0) / power(base, np.arange(0, dim, 2, dtype=dtype) / dtype(dim), prec).astype(dtype)
    if original_seq_len > 0:
        def correction_dim(rot):                                       # official: find_correction_dim
            return dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001                                              # official: linear_ramp_factor
        ramp = np.clip((np.arange(dim // 2, dtype=dtype) - dtype(low)) / dtype(high - low), 0, 1).astype(dtype)
        smooth = dtype(1) - ramp
        freqs = (freqs / dtype(factor) * (dtype(1) - smooth) + freqs * smooth).astype(dtype)
    return freqs


def rope_table(positions: np.ndarray, *, dim: int, base: float, original_seq_len: int,
               factor: float, beta_fast: int, beta_slow: int, prec: str) -> RopeTable:
    """cos/sin for absolute positions. positions: [s] int -> RopeTable([s, dim/2])."""
    freqs = yarn_frequencies(dim=dim, base=base, original_seq_len=original_seq_len, factor=factor,
                             beta_fast=beta_fast, beta_slow=beta_slow, dtype=work_dtype(prec), prec=prec)
    return _table(positions, freqs, prec)


def _table(positions: np.ndarray, freqs: np.ndarray, prec: str) -> RopeTable:
    dt = work_dtype(prec)
    angle = np.asarray(positions).astype(dt)[:, None] * freqs[None, :]   # official: torch.outer, fp32 product
    # official: torch.polar (fp32 cos/sin); cos/sin of the fp32 angle, rounded once to fp32
    return RopeTable(cos=np.cos(angle.astype(np.float64)).astype(dt),
                     sin=np.sin(angle.astype(np.float64)).astype(dt))


def layer_rope_table(positions: np.ndarray, cfg, layer: int, prec: str) -> RopeTable:
    """The RoPE table of one layer (base and YaRN by layer type, docs/architecture.md §19.2)."""
    freqs = _frequencies(cfg.rope_head_dim, cfg.rope_base(layer), cfg.rope_original_seq_len(layer), cfg.rope_factor,
                         cfg.beta_fast, cfg.beta_slow, prec)
    return _table(positions, freqs, prec)


@functools.lru_cache(maxsize=64)
def _frequencies(dim: int, base: float, original_seq_len: int, factor: float, beta_fast: int, beta_slow: int,
                 prec: str) -> np.ndarray:
    """yarn_frequencies computed once per set of arguments (a layer type of a config, in a precision); read-only."""
    freqs = yarn_frequencies(dim=dim, base=base, original_seq_len=original_seq_len, factor=factor,
                             beta_fast=beta_fast, beta_slow=beta_slow, dtype=work_dtype(prec), prec=prec)
    freqs.flags.writeable = False
    return freqs


@swappable
def apply_rope(x: np.ndarray, table: RopeTable, prec: str, *, inverse: bool = False) -> np.ndarray:
    """Rotate the last p dims of x by position. x: [b, s, (heads,) d], table [s, p/2] -> same shape."""
    dt = work_dtype(prec)
    half = table.cos.shape[-1]
    x = x.astype(dt)
    pairs = x[..., -2 * half:].reshape(*x.shape[:-1], half, 2)        # [..., p/2, 2] adjacent pairs
    cos, sin = table.cos.astype(dt), table.sin.astype(dt)              # a table of the mode (in its dtype)
    sin = -sin if inverse else sin                                     # inverse: conjugate cis
    if x.ndim == 4:                                                    # [b, s, h, d]: broadcast over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = rounded_once(_complex_product, pairs[..., 0], pairs[..., 1], cos, sin, prec=prec)   # [..., p/2, 2]
    out = x.copy()
    out[..., -2 * half:] = bf16(rotated.reshape(*x.shape[:-1], 2 * half), prec)   # official: copy_ back into bf16
    return out


def _complex_product(a, b, cos, sin):
    """(a + ib)(cos + i·sin) as interleaved (re, im) pairs: the official x * freqs_cis, one complex fp32 op."""
    return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
