"""Number formats, simulated roundings and the small math every module uses.

Precision modes (docs/architecture.md §3). Every function that stands for an official rounding takes `prec`:

    float64   exact math: weights dequantized exactly, activations in float64, no simulated rounding
    float32   the same math in float32
    mirror    round exactly where the official code rounds (docs/architecture.md §3, the precision map): activations
              are float32 arrays holding bf16-representable values; FP8/FP4 QDQ as the kernels do

The mode steps `bf16`, `act_fp8`, `qdq_fp8`, `qdq_fp4` are identities outside `mirror`; each
rounding point of mirror is one call of one of them. Inside one official operation mirror computes
exactly and rounds once, one idea with one name: `rounded_once(f, *args, prec=prec)`; `reduce_sum`,
`reduce_mean`, `exp`, `rsqrt`, `power`, `softmax`, `sigmoid`, `softplus`, `silu` and `hadamard` are
it applied to one function each (plain math in the input's dtype outside mirror).

Formats (docs/architecture.md §3; "fp32(v)" = v rounded to float32):

    bf16       fp32 with the low 16 bits rounded off, round-to-nearest-even (RNE)
    e4m3fn     s eeee mmm, bias 7: (1 + m/8)·2^(e-7); e = 0: (m/8)·2^-6 (subnormals down to 2^-9);
               max 448 (0x7E); NaN only 0x7F / 0xFF; no ∞; 0x80 = -0
    ue8m0      byte b -> 2^(b-127); 255 = NaN
    e2m1       s ee m, bias 1: {0, .5, 1, 1.5, 2, 3, 4, 6}; nibble bit 3 = sign
    FP4 pack   byte j holds element 2j in bits 0-3 and element 2j+1 in bits 4-7 (C:L30-33)

Block quantization (K:L22-200), per block of the last axis, all in fp32:

    amax = max(max|x_block|, floor)               floor 1e-4 (FP8) or 6·2^-126 (FP4)
    s    = 2^ceil(log2(fp32(amax · fp32(1/max))))  max 448 (e4m3) or 6 (e2m1); ceil(log2) from the bits
    q    = round(clamp(x / s, -max, max))         RNE to e4m3 / e2m1; x / s is exact (s = 2^k)
    QDQ  = bf16(q · s)                            the official in-place mode (current revision)

Weights (docs/architecture.md §16):  W[o, i] = e4m3(Wq[o, i]) · 2^(S[o//128, i//128] - 127)     (FP8, 128x128 blocks)
                      W[o, k] = e2m1(nib(o, k)) · 2^(S[o, k//32] - 127)           (FP4, 1x32 blocks)

Rounding choices: `round_bf16` rounds float64 input to float32 first (the official code only ever
rounds fp32 values to bf16); the e4m3 / e2m1 encoders round the given value directly (exact for
float32 and float64 input). fp32(1/448) and fp32(1/6) lie above 1/448 and 1/6, so s·max >= amax
always and the official clamp never fires (a test checks the binade edges).
Hadamard: y = x·H_n/sqrt(n), H_n Sylvester (natural order). softmax raises on an all -inf slice
instead of returning NaN. top_k breaks ties by a stable rule: the lower index wins (NaN counts
as the largest, as in torch.topk).

Official: kernel.py fast_log2_ceil / fast_pow2 (K:L22-37), act_quant (K:L40-125), fp4_act_quant
(K:L128-200); model.py linear (M:L108-120), rotate_activation (M:L247-251); convert.py FP4_TABLE.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

PRECISIONS = ("float64", "float32", "mirror")

FP8_MAX = 448.0                        # largest finite e4m3fn value (0x7E)
FP4_MAX = 6.0                          # largest e2m1 value (nibble 7)
FP8_AMAX_FLOOR = np.float32(1e-4)      # official: T.max(amax, 1e-4) (K:L79)
FP4_AMAX_FLOOR = np.float32(6 * 2.0**-126)   # official: T.max(amax, 6 * 2**-126) (K:L163)
FP8_MAX_INV = np.float32(1 / 448)      # official: fp8_max_inv = 1 / fp8_max, used in fp32
FP4_MAX_INV = np.float32(1 / 6)        # official: fp4_max_inv = 1.0 / fp4_max
# block sizes: each is fixed by the official code, named once here and used everywhere
FP8_BLOCK = 128      # official block_size (M:L17): FP8 weight blocks (128x128) and the 1x128 blocks of a GEMM's activation quantization
FP4_BLOCK = 32       # official fp4_block_size (M:L18): FP4 weight blocks (1x32) and the indexer's FP4 QDQ blocks
KV_FP8_BLOCK = 64    # FP8 QDQ of the KV's non-rope dims: act_quant(kv[..., :-rd], 64, ...) (M:L372 compressed, M:L506 window)
SPARSE_ATTN_BLOCK = 64   # index entries per step of the sparse-attention kernel's online softmax: block = 64 (K:L290)


# ------------------------------------------------------------------------------------------------
# precision modes

def check_precision(prec: str) -> None:
    """Raise ValueError unless prec is one of PRECISIONS."""
    if prec not in PRECISIONS:
        raise ValueError(f"unknown precision {prec!r}; expected one of {PRECISIONS}")


def work_dtype(prec: str) -> type:
    """Activation dtype of a mode: float64 for "float64", float32 otherwise."""
    check_precision(prec)
    return np.float64 if prec == "float64" else np.float32


def storage_dtype(prec: str):
    """dtype of stored activations (KV caches in a decode state): bfloat16 in mirror, else work_dtype."""
    check_precision(prec)
    return ml_dtypes.bfloat16 if prec == "mirror" else work_dtype(prec)


MIRROR = "mirror"     # the mode steps below test `prec == MIRROR`; the run context checked prec once (context.py)


# ------------------------------------------------------------------------------------------------
# bf16 / fp32

def round_f32(x) -> np.ndarray:
    """Round to float32 (RNE)."""
    return np.asarray(x).astype(np.float32)                      # RNE, the fp32 accumulator


def round_bf16(x) -> np.ndarray:
    """Round to bfloat16 (RNE), returned as float32; float64 input is rounded to float32 first.

    On the float32 bits: adding 0x7FFF plus the lowest kept bit and cutting the low 16 bits is RNE
    (a carry into the exponent is the correct rounding up, to ∞ past the bf16 maximum). It gives
    the bits of ml_dtypes' bfloat16 cast (tests/test_numerics.py checks both against each other)
    in about a third of the time; NaN, the one input it would not keep, takes ml_dtypes' cast.
    """
    x = np.asarray(x, dtype=np.float32)                          # f64 -> f32 first (documented above); x is only read
    u = x.reshape(-1).view(np.uint32)                            # [n] (a 0-d input too)
    r = (u >> np.uint32(16)) & np.uint32(1)                      # the lowest kept bit (ties to even)
    r += np.uint32(0x7FFF)
    r += u
    r &= np.uint32(0xFFFF0000)
    y = r.view(np.float32)
    nan = np.isnan(x.reshape(-1))                                # (the sum above may turn a NaN into ∞ or 0)
    if nan.any():
        with np.errstate(invalid="ignore"):                      # NaN is intended
            y[nan] = x.reshape(-1)[nan].astype(ml_dtypes.bfloat16).astype(np.float32)   # a NaN stays NaN (quieted)
    return y.reshape(x.shape)


# ------------------------------------------------------------------------------------------------
# minifloats: e4m3fn, e2m1, ue8m0
#
# The ml_dtypes casts are exact round-to-nearest-even codecs for these formats (float32 and
# float64 input, subnormals, -0 and NaN included; tests/test_numerics.py checks every code and
# every tie against an independent reference). The one thing kept by hand is saturation:
# ml_dtypes' e4m3fn cast turns |x| >= 464 into NaN (the format has no ∞), where the official
# kernels clamp to ±448 first, so values are clipped to ±max before every cast. E8M0 encoding
# is checked by hand too (only exact powers of two are scales; ml_dtypes would round others).

def _to_e4m3(x: np.ndarray) -> np.ndarray:
    """x (no NaN) -> ml_dtypes float8_e4m3fn, RNE, saturating at ±448."""
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def _minifloat_values(x, top: float, frac_bits: int, min_normal: float) -> np.ndarray:
    """float32 x (finite) -> float32: the nearest value (RNE) of a minifloat with frac_bits fraction bits, normal
    from min_normal, saturating at ±top (its largest value); taken on the float32 bits.

    A normal value keeps frac_bits of float32's 23 fraction bits: adding 2^(cut-1) - 1 plus the lowest
    kept bit and cutting the low cut = 23 - frac_bits bits is RNE (a carry into the exponent is the
    correct rounding up; |x| <= top after the clamp, so nothing passes top). Below min_normal the
    values are the multiples of q = min_normal·2^-frac_bits (subnormals): |x| + 2^23·q - 2^23·q in
    float32 rounds |x| to one, ties to even (2^23·q's last fraction bit is worth q), and the count's
    parity is the code's. The sign is put back (-0 stays -0).
    """
    x = np.asarray(x, dtype=np.float32)
    cut = 23 - frac_bits
    a = np.abs(x)
    np.minimum(a, np.float32(top), out=a)                         # clamp (the official kernels' saturation)
    u = a.view(np.uint32)
    r = u >> np.uint32(cut)
    r &= np.uint32(1)                                             # the lowest kept bit (ties to even)
    r += np.uint32((1 << (cut - 1)) - 1)
    r += u
    r &= np.uint32((0xFFFFFFFF >> cut) << cut)
    small = a < np.float32(min_normal)
    big = np.float32(2.0 ** 23 * min_normal * 2.0 ** -frac_bits)
    a += big                                                      # multiples of q (kept below min_normal only)
    a -= big
    q = r.view(np.float32)
    np.copyto(q, a, where=small)
    return np.copysign(q, x, out=q)


def e4m3_values(x) -> np.ndarray:
    """float32 x (finite) -> float32: the nearest e4m3fn value (RNE), saturating at ±448: the value of _to_e4m3(x),
    on the float32 bits (_minifloat_values: about 4x faster than the ml_dtypes cast and back; act_quant's step).
    tests/test_numerics.py checks it against the ml_dtypes cast at every tie and on random bits."""
    return _minifloat_values(x, FP8_MAX, 3, 2.0 ** -6)


def e2m1_values(x) -> np.ndarray:
    """float32 x (finite) -> float32: the nearest e2m1 value (RNE), saturating at ±6: the value of _to_e2m1(x),
    on the float32 bits (_minifloat_values; fp4_act_quant's step), checked as e4m3_values is."""
    return _minifloat_values(x, FP4_MAX, 1, 1.0)


def _to_e2m1(x: np.ndarray) -> np.ndarray:
    """x (no NaN) -> ml_dtypes float4_e2m1fn, RNE, saturating at ±6."""
    return np.clip(x, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)


def _as_float(x, name: str) -> np.ndarray:
    """x as a float32/float64 array (other dtypes -> float64); ValueError on NaN."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)                                 # float16, bfloat16, small ints: exact
    if np.isnan(x).any():
        raise ValueError(f"{name}: NaN input cannot be encoded")
    return x


def _as_codes(a, name: str) -> np.ndarray:
    """Byte codes as uint8: accepts uint8/int8 or a 1-byte ml_dtypes array (reinterpreted)."""
    a = np.asarray(a)
    if a.dtype.itemsize != 1 or a.dtype == np.bool_:
        raise TypeError(f"{name}: expected 1-byte codes (uint8, int8 or an ml_dtypes 8-bit type), "
                        f"got {a.dtype}")
    return a.view(np.uint8)                                      # reinterpret, no conversion


def decode_fp8_e4m3(codes) -> np.ndarray:
    """e4m3fn codes -> float32 values (0x7F / 0xFF -> NaN, 0x80 -> -0)."""
    c = _as_codes(codes, "decode_fp8_e4m3")
    return c.view(ml_dtypes.float8_e4m3fn).astype(np.float32)   # exact


def encode_fp8_e4m3(x) -> np.ndarray:
    """Values -> e4m3fn codes, RNE, saturating at ±448; ValueError on NaN."""
    x = _as_float(x, "encode_fp8_e4m3")
    return _to_e4m3(x).view(np.uint8)


def decode_ue8m0(codes) -> np.ndarray:
    """E8M0 scale bytes -> float32 2^(b-127) (255 -> NaN; 0 -> 2^-127, an fp32 subnormal)."""
    c = _as_codes(codes, "decode_ue8m0")
    return c.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)  # exact


def encode_ue8m0(s) -> np.ndarray:
    """Exact powers of two 2^-127..2^127 -> E8M0 bytes; ValueError for anything else."""
    s = np.asarray(s, dtype=np.float64)                          # exact for float32 input
    f, e = np.frexp(s)                                           # s = f·2^e; a power of two has f = 0.5
    code = e.astype(np.int64) - 1 + 127
    ok = (f == 0.5) & (code >= 0) & (code <= 254)
    if not ok.all():
        bad = s[~ok].ravel()[:4]
        raise ValueError(f"encode_ue8m0: not a power of two in [2^-127, 2^127]: {bad.tolist()}")
    return code.astype(np.uint8)


def decode_fp4_e2m1(nibbles) -> np.ndarray:
    """e2m1 nibbles 0..15 -> float32 values (table above; 8 -> -0)."""
    c = _as_codes(nibbles, "decode_fp4_e2m1")
    if (c > 15).any():
        raise ValueError("decode_fp4_e2m1: nibbles must be 0..15")
    return c.view(ml_dtypes.float4_e2m1fn).astype(np.float32)   # exact; one nibble per byte, bits 0-3


def encode_fp4_e2m1(x) -> np.ndarray:
    """Values -> e2m1 nibbles (uint8 0..15), RNE, saturating at ±6; ValueError on NaN."""
    x = _as_float(x, "encode_fp4_e2m1")
    return _to_e2m1(x).view(np.uint8) & np.uint8(0x0F)           # the code is the low nibble


def pack_fp4(nibbles) -> np.ndarray:
    """[..., K] nibbles -> [..., K/2] int8; element 2j in bits 0-3, 2j+1 in bits 4-7 (C:L30-33)."""
    n = _as_codes(nibbles, "pack_fp4")
    if n.shape[-1] % 2 or (n > 15).any():
        raise ValueError(f"pack_fp4: need nibbles 0..15 and an even last dim, got shape {n.shape}")
    packed = n[..., 0::2] | (n[..., 1::2] << 4)                  # [..., K/2] uint8
    return packed.view(np.int8)                                  # the checkpoint's I8 storage


def unpack_fp4(packed) -> np.ndarray:
    """[..., K/2] int8/uint8 bytes -> [..., K] uint8 nibbles, low nibble first."""
    p = _as_codes(packed, "unpack_fp4")
    pairs = np.stack([p & 0x0F, p >> 4], axis=-1)                # [..., K/2, 2]
    return pairs.reshape(*p.shape[:-1], p.shape[-1] * 2)         # [..., K]


# ------------------------------------------------------------------------------------------------
# power-of-two scales

def pow2_scale(amax, inv_max) -> np.ndarray:
    """2^ceil(log2(fp32(amax·inv_max))) with the official bit tricks (K:L22-37); float32."""
    v = np.asarray(np.asarray(amax, np.float32) * np.float32(inv_max), np.float32)  # fp32 product
    if not (np.isfinite(v) & (v > 0)).all():
        raise ValueError("pow2_scale: amax * inv_max must be positive and finite")
    bits = v.view(np.uint32)
    exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127           # unbiased exponent (subnormal: -127)
    exp = exp + ((bits & 0x7FFFFF) != 0)                         # + 1 unless an exact power of two
    return ((exp + 127).astype(np.uint32) << 23).view(np.float32)  # fast_pow2: exponent field only


# ------------------------------------------------------------------------------------------------
# weights: dequantize (loading; the synthetic writer quantizes, refimpl/synthetic/quantize.py)

def _check_scale_grid(scale: np.ndarray, shape: tuple[int, int], name: str) -> None:
    """Raise ValueError on a wrong scale-grid shape or a NaN (0xFF) E8M0 byte."""
    if scale.shape != shape:
        raise ValueError(f"{name}: scale grid has shape {scale.shape}, expected {shape}")
    if (scale == 255).any():
        r, c = np.argwhere(scale == 255)[0]
        raise ValueError(f"{name}: scale is NaN (E8M0 byte 0xFF) at block row {r}, col {c}")


def dequant_fp8_weight(values, scale, *, block: int = FP8_BLOCK) -> np.ndarray:
    """e4m3 [N, K] with E8M0 [ceil(N/128), ceil(K/128)] -> float32 [N, K]; block index o//128, i//128."""
    v = _as_codes(values, "dequant_fp8_weight values")
    sc = _as_codes(scale, "dequant_fp8_weight scale")
    if v.ndim != 2:
        raise ValueError(f"dequant_fp8_weight: values must be 2-D, got shape {v.shape}")
    n, k = v.shape
    _check_scale_grid(sc, (-(-n // block), -(-k // block)), "dequant_fp8_weight")
    s = decode_ue8m0(sc)                                         # [ceil(N/128), ceil(K/128)]
    s = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:n, :k]  # fixed block, never from the grid
    return decode_fp8_e4m3(v) * s                                # exact: power-of-two scale


def dequant_fp4_weight(packed, scale) -> np.ndarray:
    """Packed e2m1 [N, K/2] (low nibble first) with E8M0 [N, K/32] -> float32 [N, K]."""
    p = _as_codes(packed, "dequant_fp4_weight values")
    sc = _as_codes(scale, "dequant_fp4_weight scale")
    if p.ndim != 2:
        raise ValueError(f"dequant_fp4_weight: packed values must be 2-D, got shape {p.shape}")
    n, k = p.shape[0], 2 * p.shape[1]
    _check_scale_grid(sc, (n, -(-k // FP4_BLOCK)), "dequant_fp4_weight")
    s = np.repeat(decode_ue8m0(sc), FP4_BLOCK, axis=1)[:, :k]    # [N, K]: scale of column k//32
    return decode_fp4_e2m1(unpack_fp4(p)) * s                    # exact: power-of-two scale


# ------------------------------------------------------------------------------------------------
# activations: dynamic block quantization (official act_quant / fp4_act_quant with ue8m0 scales)

def _act_blocks(x, block: int, name: str) -> np.ndarray:
    """float32 x [..., K] -> [..., K/block, block]; checks dtype, divisibility and finiteness."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"{name}: activations must be float32 (bf16 values), got {x.dtype}")
    if block <= 0 or x.shape[-1] % block:
        raise ValueError(f"{name}: block {block} must divide the last dim {x.shape[-1]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: non-finite activation")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def act_quant_fp8(x, *, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] float32 -> (e4m3 values [..., K] float32, scales [..., K/block] float32) (K:L40-125)."""
    xb = _act_blocks(x, block, "act_quant_fp8")                  # [..., K/blk, blk]
    amax = np.maximum(np.abs(xb).max(axis=-1), FP8_AMAX_FLOOR)   # [..., K/blk]  fp32
    s = pow2_scale(amax, FP8_MAX_INV)                            # official: fast_round_scale
    q = e4m3_values(xb / s[..., None])                           # clamp, e4m3 (RNE); x / s exact: s = 2^k
    return q.reshape(np.shape(x)), s


def act_quant_fp4(x, *, block: int = FP4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] float32 -> (e2m1 values [..., K] float32, scales [..., K/block] float32) (K:L128-200)."""
    xb = _act_blocks(x, block, "act_quant_fp4")                  # [..., K/blk, blk]
    amax = np.maximum(np.abs(xb).max(axis=-1), FP4_AMAX_FLOOR)   # [..., K/blk]  fp32
    s = pow2_scale(amax, FP4_MAX_INV)
    q = e2m1_values(xb / s[..., None])                           # clamp, e2m1 (RNE, as the GPU cast is assumed to); x / s exact
    return q.reshape(np.shape(x)), s


def _dequant_blocks(q: np.ndarray, s: np.ndarray, block: int) -> np.ndarray:
    """bf16(q·s) with s broadcast over its block of the last axis."""
    qb = q.reshape(*q.shape[:-1], q.shape[-1] // block, block)   # [..., K/blk, blk]
    return round_bf16(qb * s[..., None]).reshape(q.shape)        # q·s exact; official: .to(bf16)


def qdq_fp8_values(x, *, block: int) -> np.ndarray:
    """In-place act_quant of the current revision: bf16(e4m3(clamp(x/s))·s), float32 [..., K]."""
    q, s = act_quant_fp8(x, block=block)
    return _dequant_blocks(q, s, block)


def qdq_fp4_values(x, *, block: int = FP4_BLOCK) -> np.ndarray:
    """In-place fp4_act_quant: bf16(e2m1(clamp(x/s))·s), float32 [..., K]."""
    q, s = act_quant_fp4(x, block=block)
    return _dequant_blocks(q, s, block)


# ------------------------------------------------------------------------------------------------
# mode steps: the model calls these at every official rounding site

def bf16(x, prec: str):
    """Round to bf16 in mirror mode; x unchanged otherwise."""
    return round_bf16(x) if prec == MIRROR else x


def act_fp8(x, prec: str):
    """FP8 e4m3 quantization of an FP8/FP4 GEMM's input in mirror mode; x unchanged otherwise.

    The official `linear` quantizes its bf16 input per 1x128 block, act_quant(x, block_size,
    scale_fmt) (M:L108-120), and the GEMM multiplies e4m3 values by power-of-two scales; the
    result here is those dequantized values q·s, exact in float32.
    """
    if prec != MIRROR:
        return x
    q, s = act_quant_fp8(x, block=FP8_BLOCK)
    return q * np.repeat(s, FP8_BLOCK, axis=-1)                  # exact: power-of-two scales


def qdq_fp8(x, prec: str, *, block: int):
    """FP8 QDQ (qdq_fp8_values) in mirror mode; x unchanged otherwise."""
    return qdq_fp8_values(x, block=block) if prec == MIRROR else x


def qdq_fp4(x, prec: str, *, block: int = FP4_BLOCK):
    """FP4 QDQ (qdq_fp4_values) in mirror mode; x unchanged otherwise."""
    return qdq_fp4_values(x, block=block) if prec == MIRROR else x


# ------------------------------------------------------------------------------------------------
# Hadamard rotation (M:L247-251)

def hadamard(x, prec: str) -> np.ndarray:
    """x · H_n / sqrt(n) along the last axis (Sylvester H_n, n a power of two) as one op.

    In x's dtype; in mirror exact (float64) and rounded once to fp32 (the caller rounds to bf16).
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"hadamard: expected a float array, got {x.dtype}")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last dim {n} is not a power of two")
    return rounded_once(_hadamard, x, prec=prec)


def _hadamard(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    y = x.reshape(-1, n).T.copy()                                # [n, rows] (a copy: y is overwritten below)
    out = np.empty_like(y)
    h = 1
    while h < n:                     # butterfly on bit h: (y_i, y_i+h) -> (y_i + y_i+h, y_i - y_i+h)
        pairs = y.reshape(n // (2 * h), 2, h * y.shape[1])       # [n/2h, 2, h·rows]
        to = out.reshape(pairs.shape)
        np.add(pairs[:, 0], pairs[:, 1], out=to[:, 0])           # natural (Sylvester) order
        np.subtract(pairs[:, 0], pairs[:, 1], out=to[:, 1])
        y, out = out, y
        h *= 2
    return np.multiply(y.T, x.dtype.type(n ** -0.5), order="C").reshape(x.shape)   # official: scale = dim ** -0.5


# ------------------------------------------------------------------------------------------------
# rounded once: one official operation, computed exactly and rounded once (mirror)
#
# Inside one official operation the last bits depend on things that are not semantics: the order
# of a reduction on a GPU or CPU, and the elementary-function library (exp, rsqrt, sigmoid, ...;
# PyTorch's CPU bf16 rsqrt is not even correctly rounded, docs/architecture.md §19.5). mirror fixes
# them: each such operation is computed in float64 on its (exact) fp32 inputs and rounded once to
# fp32 (then to bf16 by the caller, for a bf16 op, as a GPU does). A float64 sum of n fp32 values
# is exact while 24 bits + the spread of their magnitudes (in binades) + log2(n) fit in 53 bits,
# which covers the short sums here; otherwise its error lies far below half an fp32 ulp, so the
# one rounding is the correct one except within that distance of a rounding boundary. The same
# holds for float64 exp/sqrt/log1p and for products (an e4m3 x e4m3 block sum is exact in float64,
# docs/architecture.md §3). Every use in the spec goes through `rounded_once`; the kernels' one name
# for the same step is refimpl/kernels/rounding.py `rounded_once_f32`. Outside mirror these are the
# plain math in the arguments' dtype.

def rounded_once(f, *args, prec: str):
    """f(*args) as ONE official fp32 operation: in mirror, f of the float64 arguments, rounded once to fp32;
    in float64 and float32 mode, f of the arguments as given."""
    if prec == MIRROR:
        return round_f32(f(*(np.asarray(a, np.float64) for a in args)))
    return f(*(np.asarray(a) for a in args))


def reduce_sum(x, axis, prec, *, keepdims: bool = False) -> np.ndarray:
    """Σ along axis as one official reduction (torch .sum, T.reduce_sum): exact, rounded once to fp32 (mirror)."""
    return rounded_once(lambda v: np.sum(v, axis=axis, keepdims=keepdims), x, prec=prec)


def reduce_mean(x, axis, prec, *, keepdims: bool = False) -> np.ndarray:
    """Mean along axis as one official reduction (torch .mean): exact, rounded once to fp32 (mirror)."""
    return rounded_once(lambda v: np.mean(v, axis=axis, keepdims=keepdims), x, prec=prec)


def exp(x, prec) -> np.ndarray:
    """exp as one official op (torch.exp, T.exp): correctly rounded to fp32 in mirror."""
    return rounded_once(np.exp, x, prec=prec)


def rsqrt(x, prec) -> np.ndarray:
    """1/sqrt(x) as ONE official op (torch.rsqrt): rounded once to fp32 in mirror, not 1/sqrt rounded twice."""
    return rounded_once(lambda v: 1 / np.sqrt(v), x, prec=prec)


def power(base: float, x, prec) -> np.ndarray:
    """base ** x (a Python float base, as in the RoPE frequencies) as one official fp32 op."""
    return rounded_once(lambda v: v.dtype.type(base) ** v, x, prec=prec)


def softmax(x, axis: int, prec: str) -> np.ndarray:
    """exp(x - max) / sum as one op (torch .softmax); ValueError if a slice is all -inf (never NaN for finite input)."""
    x = np.asarray(x)
    if np.isneginf(np.max(x, axis=axis)).any():
        raise ValueError("softmax: a slice is entirely -inf (no position to attend to)")

    def f(v):
        e = np.exp(v - np.max(v, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)
    return rounded_once(f, x, prec=prec)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(v))                                       # in (0, 1]: never overflows
    return np.where(v >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid(x, prec: str) -> np.ndarray:
    """1 / (1 + exp(-x)) as one op (torch.sigmoid, T.sigmoid), without overflow for large |x|."""
    return rounded_once(_sigmoid, x, prec=prec)


def softplus(x, prec: str) -> np.ndarray:
    """torch softplus (beta 1, threshold 20) as one op: x where x > 20, else log1p(exp(x))."""
    return rounded_once(lambda v: np.where(v > 20, v, np.log1p(np.exp(np.minimum(v, 20)))), x, prec=prec)  # min: no overflow


def silu(x, prec: str) -> np.ndarray:
    """x · sigmoid(x) as one op (F.silu): the product inside the op, one rounding in mirror."""
    return rounded_once(lambda v: v * _sigmoid(v), x, prec=prec)


def top_k(x, k: int, axis: int = -1) -> np.ndarray:
    """Indices (int64) of the k largest values along axis, largest first; ties: the lower index wins."""
    x = np.asarray(x)
    n = x.shape[axis]
    if not 0 <= k <= n:
        raise ValueError(f"top_k: k={k} not in [0, {n}]")
    # a stable ascending sort of the reversed axis, reversed back, is descending with ties in
    # ascending index order; no negation, so it works for every dtype. NaN sorts as the largest,
    # as in torch.topk.
    rev = np.flip(x, axis=axis)
    order = np.flip(np.argsort(rev, axis=axis, kind="stable"), axis=axis)
    idx = (n - 1) - order                                        # back to indices of x
    return np.take(idx, np.arange(k), axis=axis).astype(np.int64)
