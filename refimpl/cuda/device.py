"""Device functions shared by the CUDA kernels: fp32 ops without contraction, bf16 / e4m3 rounding.

Two facts decide how the kernels are written (docs/cuda.md):

* NVVM contracts `a * b + c` into one fused multiply-add (fma.rn.f32) even without fastmath;
  numba-cuda offers no switch for it. Where the spec does separate fp32 ops (mirror), the kernels
  call `mul32` / `add32` / `sub32` / `div32`, the libdevice `__nv_f*_rn` intrinsics, which NVVM
  never fuses (tests/cuda check the PTX for fma.rn.f32). float64 sums of exact products (bf16 x
  bf16, fp32 x e4m3 x 2^k) are the same whether fused or not, so float64 code is written plainly.
* The CUDA simulator (NUMBA_ENABLE_CUDASIM=1, the CPU test path) has no libdevice. There the fp32
  ops are NumPy float32 scalar ops (the same IEEE results) and the bit casts (`bits32`,
  `from_bits32`) NumPy views; the helpers are plain Python functions there (`device_function`).
  Everything else (bf16 and e4m3 rounding, the power-of-two scales, the kernels) runs as written.

Mode numbers passed to kernels: MODE_FLOAT64, MODE_FLOAT32, MODE_MIRROR (numerics.PRECISIONS).
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)


def device_function(fn):
    """@cuda.jit(device=True) on a GPU. In the simulator the plain Python function: the simulator's
    wrapper around a device function costs ~50 µs a call, and these helpers touch no CUDA state."""
    return fn if SIMULATOR else cuda.jit(device=True)(fn)


MODE_FLOAT64, MODE_FLOAT32, MODE_MIRROR = 0, 1, 2
MODES = {"float64": MODE_FLOAT64, "float32": MODE_FLOAT32, "mirror": MODE_MIRROR}
NEG_INF = -math.inf
RNE_MAGIC = 6755399441055744.0          # 1.5 * 2^52: (r + M) - M rounds r (|r| < 2^51) to an integer, ties to even

if SIMULATOR:
    @device_function
    def mul32(a, b):
        """fp32 a * b, one rounding (never fused with an add)."""
        return np.float32(np.float32(a) * np.float32(b))

    @device_function
    def add32(a, b):
        """fp32 a + b."""
        return np.float32(np.float32(a) + np.float32(b))

    @device_function
    def sub32(a, b):
        """fp32 a - b."""
        return np.float32(np.float32(a) - np.float32(b))

    @device_function
    def div32(a, b):
        """fp32 a / b, correctly rounded."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.float32(np.float32(a) / np.float32(b))

    @device_function
    def bits32(x):
        """The bits of fp32 x as an int64 in 0 .. 2^32-1."""
        return np.int64(np.float32(x).view(np.uint32))

    @device_function
    def from_bits32(u):
        """The fp32 whose bits are u (0 .. 2^32-1)."""
        return np.uint32(u).view(np.float32)
else:
    from numba.cuda import libdevice

    @device_function
    def mul32(a, b):
        """fp32 a * b, one rounding (never fused with an add)."""
        return libdevice.fmul_rn(np.float32(a), np.float32(b))

    @device_function
    def add32(a, b):
        """fp32 a + b."""
        return libdevice.fadd_rn(np.float32(a), np.float32(b))

    @device_function
    def sub32(a, b):
        """fp32 a - b."""
        return libdevice.fsub_rn(np.float32(a), np.float32(b))

    @device_function
    def div32(a, b):
        """fp32 a / b, correctly rounded."""
        return libdevice.fdiv_rn(np.float32(a), np.float32(b))

    @device_function
    def bits32(x):
        """The bits of fp32 x as an int64 in 0 .. 2^32-1."""
        return np.int64(libdevice.float_as_int(np.float32(x))) & 0xFFFFFFFF

    @device_function
    def from_bits32(u):
        """The fp32 whose bits are u (0 .. 2^32-1)."""
        v = np.int64(u)
        if v >= 0x80000000:
            v -= 0x100000000
        return libdevice.int_as_float(np.int32(v))


@device_function
def bf16(x):
    """fp32 x rounded to bf16 (RNE), as fp32 (numerics.round_bf16 of an fp32 value); NaN stays NaN."""
    x = np.float32(x)
    if x != x:
        return x
    u = bits32(x)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000                  # RNE on the low 16 bits; overflow -> inf
    return from_bits32(u)


# The kernels keep every value in a float64 variable. With fp32 = True (mirror and float32 modes)
# the value is an fp32 number and each op below is the fp32 op (one rounding, never fused);
# with fp32 = False (float64 mode) it is the plain float64 op.

@device_function
def rnd(x, fp32):
    """A value computed exactly (float64) rounded once to fp32 when fp32 (numerics.rounded_once)."""
    if fp32:
        return np.float64(np.float32(x))
    return x


@device_function
def mul(a, b, fp32):
    if fp32:
        return np.float64(mul32(a, b))
    return a * b


@device_function
def add(a, b, fp32):
    if fp32:
        return np.float64(add32(a, b))
    return a + b


@device_function
def sub(a, b, fp32):
    if fp32:
        return np.float64(sub32(a, b))
    return a - b


@device_function
def div(a, b, fp32):
    if fp32:
        return np.float64(div32(a, b))
    return a / b


@device_function
def ex(x, fp32):
    """exp as one op: float64 exp, rounded once to fp32 when fp32 (numerics.exp in mirror)."""
    return rnd(math.exp(x), fp32)


@device_function
def sigmoid(x, fp32):
    """1 / (1 + exp(-|x|)) arranged as numerics.sigmoid, in float64, rounded once when fp32."""
    e = math.exp(-abs(x))
    if x >= 0:
        return rnd(1.0 / (1.0 + e), fp32)
    return rnd(e / (1.0 + e), fp32)


@device_function
def bf16_if(x, mirror):
    """bf16(x) in mirror (numerics.bf16), x otherwise; float64 in and out."""
    if mirror:
        return np.float64(bf16(np.float32(x)))
    return x


@device_function
def pow2_scale(amax, inv_max):
    """2^ceil(log2(fp32(amax * inv_max))) from the bits (numerics.pow2_scale, K:L22-37); fp32."""
    u = bits32(mul32(amax, inv_max))
    e = ((u >> 23) & 0xFF) - 127
    if (u & 0x7FFFFF) != 0:
        e += 1
    return from_bits32((e + 127) << 23)


@device_function
def round_e4m3(v):
    """fp32 v with |v| <= 448 rounded to the nearest e4m3fn value (RNE, subnormals 2^-9 apart); fp32."""
    a = abs(np.float64(v))
    if a == 0.0:
        return np.float32(v)
    e = ((bits32(np.float32(a)) >> 23) & 0xFF) - 127               # binade of |v|
    if e < -6:
        e = -6                                                       # subnormal range: quantum 2^-9
    quantum = np.float64(from_bits32((e - 3 + 127) << 23))           # 3 mantissa bits
    r = (a / quantum + RNE_MAGIC) - RNE_MAGIC                        # exact scaling, RNE to an integer
    q = r * quantum
    if v < 0:
        q = -q
    return np.float32(q)
