"""Weight codes decoded inside a kernel, from their bits (shared by linear.py and moe.py).

Formats (refimpl/numerics.py; codes are raw bytes or bits, never ml_dtypes arrays):

    FP8    e4m3fn [N, K] uint8, E8M0 scale [ceil(N/128), ceil(K/128)] per 128x128 block.  The
           bits b & 0x7F placed at bit 20 of a float32 (sign at bit 31) are the e4m3 value times
           2^-120, for normals and subnormals alike (`fp8_raw`); the block scale 2^(S-127) times
           2^120 makes it exact. 0x7F / 0xFF (e4m3fn NaN) are not decoded: linear.py sends a
           matrix holding one to the spec function.
    FP4    packed e2m1 [N, K/2] uint8, low nibble first (element 2i in bits 0-3 of byte i), E8M0
           scale [N, ceil(K/32)] per 1x32 block. The magnitude bits eem placed at bit 22 of a
           float32 (sign at bit 31) are the e2m1 value times 2^-126 (`fp4_pair_raw`; 0.5 is a float32
           subnormal, exact); the scale 2^(S-127) times 2^126 makes it exact.
    BF16   uint16 [N, K] (a bfloat16 matrix's bits): bits << 16 is the float32.
    F32    uint32 [N, K] (a float32 matrix's bits).

All decoding is integer bit work and one reinterpretation (`f32_from_bits`), which LLVM
vectorizes; the one table lookup is fp4_dot128's on AVX-512 machines (vpermd: 16 int32 entries,
4 · e2m1 of each nibble; elsewhere the same values by bit arithmetic). Every decoded value is exact
in float64.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

BLOCK = 128     # input columns per block: the FP8 scale block, four FP4 blocks; also the lane count

FMT_FP8, FMT_FP4, FMT_BF16, FMT_F32 = 0, 1, 2, 3

if numba.config.DISABLE_JIT:                     # plain Python (NUMBA_DISABLE_JIT=1): a NumPy reinterpretation
    def f32_from_bits(bits):
        """The float32 whose bits are `bits` (uint32)."""
        return np.uint32(bits).view(np.float32)

    def f64_from_bits(bits):
        """The float64 whose bits are `bits` (uint64)."""
        return np.uint64(bits).view(np.float64)
else:
    def _target_has(context, feature: str) -> bool:
        """True if the machine code is compiled for a CPU with `feature` (an LLVM name such as "avx512f"): Numba's
        target features (the host's, or NUMBA_CPU_FEATURES)."""
        features = getattr(context.codegen(), "_tm_features", "") or ""
        return "+" + feature in features.split(",")

    def _element_ptr(context, builder, aty, arr, idx_vals, idx_tys):
        """LLVM pointer to arr[idx] (array type aty; indices of types idx_tys), for the intrinsics below."""
        from numba.core import cgutils
        ary = context.make_array(aty)(context, builder, arr)
        idx = [context.cast(builder, v, t, types.intp) for v, t in zip(idx_vals, idx_tys)]
        return cgutils.get_item_pointer(context, builder, aty, ary, idx, wraparound=False)

    @intrinsic
    def f32_from_bits(typingctx, bits):
        """The float32 whose bits are `bits` (uint32): one LLVM bitcast."""
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def f64_from_bits(typingctx, bits):
        """The float64 whose bits are `bits` (uint64): one LLVM bitcast."""
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.uint64), codegen


def _fp8_raw_bits(code):
    """e4m3fn byte -> the bits of fp8_raw's float32 (plain Python: NUMBA_DISABLE_JIT=1)."""
    v = (int(np.int8(np.uint8(code))) << 20) & 0x87F00000
    return np.uint32(v)                           # non-negative: the mask has no bit above 31


def _fp4_pair_bits(byte):
    """Packed e2m1 byte -> the bits of fp4_pair_raw's two float32 values (plain Python)."""
    b = int(np.uint8(byte))
    return (np.uint32(((b & 0x08) << 28) | ((b & 0x07) << 22)),
            np.uint32(((b & 0x80) << 24) | ((b & 0x70) << 18)))


if numba.config.DISABLE_JIT:
    def fp8_raw(code):
        """e4m3fn byte -> float32 e4m3 value · 2^-120 (see the compiled version below)."""
        return f32_from_bits(_fp8_raw_bits(code))

    def fp4_pair_raw(byte):
        """Packed e2m1 byte -> (low nibble, high nibble) as float32 e2m1 values · 2^-126."""
        lo, hi = _fp4_pair_bits(byte)
        return f32_from_bits(lo), f32_from_bits(hi)
else:
    # The decoders are written as LLVM IR on 32-bit integers: Numba widens every integer operation
    # to 64 bits, and 64-bit lanes halve what one vector instruction decodes (measured: the FP4
    # one-row product read 1.70 GB/s per thread with int64 operations, 1.98 GB/s with these).
    def _low_byte(builder, v):
        """The low 8 bits of an LLVM integer (the codes are uint8; a kernel's branch for another
        format may be typed with wider codes and never run)."""
        from llvmlite import ir
        return builder.trunc(v, ir.IntType(8)) if v.type.width > 8 else v

    @intrinsic
    def fp8_raw(typingctx, code):
        """e4m3fn byte -> float32 e4m3 value · 2^-120: sign at bit 31, eeeemmm at bits 20-26.

        The byte sign-extended to 32 bits and shifted left by 20 has the sign at bit 31 and the
        code's low 7 bits at 20-26; the mask clears the copies of the sign at bits 27-30.
        """
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            v = builder.shl(builder.sext(_low_byte(builder, args[0]), i32), ir.Constant(i32, 20))
            v = builder.and_(v, ir.Constant(i32, 0x87F00000))
            return builder.bitcast(v, ir.FloatType())
        if isinstance(code, types.Integer):
            return types.float32(code), codegen

    @intrinsic
    def fp4_pair_raw(typingctx, byte):
        """Packed e2m1 byte -> (low nibble, high nibble) as float32 e2m1 values · 2^-126.

        Each nibble's sign bit goes to bit 31 and its magnitude eem to bits 22-24 (two shifts, two
        masks, one or per nibble, on the byte zero-extended to 32 bits).
        """
        from llvmlite import ir

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            b = builder.zext(_low_byte(builder, args[0]), i32)

            def field(mask, shift):
                return builder.shl(builder.and_(b, ir.Constant(i32, mask)), ir.Constant(i32, shift))
            lo = builder.or_(field(0x08, 28), field(0x07, 22))
            hi = builder.or_(field(0x80, 24), field(0x70, 18))
            f32 = ir.FloatType()
            return context.make_tuple(builder, signature.return_type,
                                      [builder.bitcast(lo, f32), builder.bitcast(hi, f32)])
        if isinstance(byte, types.Integer):
            return types.UniTuple(types.float32, 2)(byte), codegen


@njit(cache=True, inline="always")
def bf16_value(bits):
    """bfloat16 bits (uint16) -> float32."""
    return f32_from_bits(np.uint32(bits) << np.uint32(16))


@njit(cache=True, inline="always")
def fp8_block_scale(byte):
    """E8M0 byte S (0..254) -> 2^(S-127) · 2^120 (float64, from its exponent bits): scales fp8_raw to the exact weight."""
    return f64_from_bits(np.uint64((np.int64(np.uint8(byte)) - 7 + 1023) << 52))


@njit(cache=True, inline="always")
def fp4_block_scale(byte):
    """E8M0 byte S (0..254) -> 2^(S-127) · 2^126 (float64, from its exponent bits): scales fp4_pair_raw to the exact weight."""
    return f64_from_bits(np.uint64((np.int64(np.uint8(byte)) - 1 + 1023) << 52))


# ---------------------------------------------------------------- FP4 one-row products in integers
#
# Mirror's activations are e4m3 values times a power of two per 128 columns (act_fp8): within a
# 1x32 FP4 block, x = xq · 2^g with xq an integer (xq < 2^21 in magnitude: linear.py checks it per
# call), and 4 · e2m1 is an integer in [-24, 24]. So the block's 32 products x·w are integers times
# 2^g · 2^(S-127) / 4, and their sum, below 32 · 24 · 2^21 < 2^31, is an exact int32: summed in any
# order it is the exact value that the float64 lanes of the spec's order also reach (every one of
# their partial sums is exact). Integer addition is associative, so LLVM may vectorize it freely.

FP4_XQ_LIMIT = 1 << 21   # |xq| below this: a 1x32 block's integer sum stays below 2^31


def fp4_times4(nibble):
    """e2m1 nibble (sign at bit 3) -> 4 · its value, an integer in [-24, 24] (plain-Python reference)."""
    m, neg = int(nibble) & 7, int(nibble) & 8
    v = 2 * m if m < 2 else (2 | (m & 1)) << (m >> 1)           # 0, 2 (0.5); then (1 + f/2) · 2^(e-1) · 4
    return -v if neg else v


if numba.config.DISABLE_JIT:
    _TIMES4 = np.array([fp4_times4(c) for c in range(16)], np.int64)

    def fp4_dot32(codes, n, j, xq, i):
        """Σ_l xq[i + l] · 4·e2m1(low nibble of codes[n, j + l]) + xq[i + 16 + l] · 4·e2m1(high nibble), l < 16."""
        c = codes[n, j:j + 16].astype(np.int64) & 0xFF
        return int(np.dot(xq[i:i + 16], _TIMES4[c & 15]) + np.dot(xq[i + 16:i + 32], _TIMES4[c >> 4]))
else:
    def _row_operands(codes, n, j, x, i, x_dtype) -> bool:
        """Typing of the one-row intrinsics below: codes a 2-D array, x a 1-D array of x_dtype, n, j, i integers."""
        return (isinstance(codes, types.Array) and codes.ndim == 2 and isinstance(x, types.Array)
                and x.ndim == 1 and x.dtype == x_dtype and all(isinstance(t, types.Integer) for t in (n, j, i)))

    def _times4_ir(builder, nib, splat):
        """LLVM IR: 4·e2m1 of each nibble of a vector of int32 nibbles (0-15): nibble s·8 + m decodes to 2m for
        m < 2, else (2 | m & 1) << (m >> 1), negated for s = 1 (fp4_times4 on vectors; splat(k) is the
        constant vector of k)."""
        m = builder.and_(nib, splat(7))
        big = builder.shl(builder.or_(builder.and_(m, splat(1)), splat(2)), builder.lshr(m, splat(1)))
        v = builder.select(builder.icmp_unsigned("<", m, splat(2)), builder.shl(m, splat(1)), big)
        s = builder.sub(splat(0), builder.lshr(nib, splat(3)))          # 0 or -1
        return builder.sub(builder.xor(v, s), s)

    @intrinsic
    def fp4_dot32(typingctx, codes, n, j, xq, i):
        """Σ_l xq[i + l] · 4·e2m1(low nibble of codes[n, j + l]) + xq[i + 16 + l] · 4·e2m1(high nibble), l < 16,
        as an int32 (the caller keeps it below 2^31; indices in bounds).

        Written as LLVM IR on vectors of 16 int32 (LLVM lowers them to the machine's vectors: AVX-512,
        AVX2, or plain registers): each nibble n = s·8 + m decodes to v = 2m for m < 2, else
        (2 | m & 1) << (m >> 1), negated for s = 1; the 32 products are added in one reduction.
        """
        if not _row_operands(codes, n, j, xq, i, types.int32):
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            from numba.core import cgutils
            c_ty, _, _, x_ty, _ = signature.args
            i32, lanes = ir.IntType(32), 16
            v8, v32 = ir.VectorType(ir.IntType(8), lanes), ir.VectorType(i32, lanes)

            def splat(k):
                return ir.Constant(v32, [k] * lanes)

            pc = _element_ptr(context, builder, c_ty, args[0], args[1:3], signature.args[1:3])
            px = _element_ptr(context, builder, x_ty, args[3], args[4:5], signature.args[4:5])
            c = builder.zext(builder.load(builder.bitcast(pc, v8.as_pointer()), align=1), v32)
            xp = builder.bitcast(px, v32.as_pointer())
            xe = builder.load(xp, align=4)
            xo = builder.load(builder.gep(xp, [ir.Constant(i32, 1)]), align=4)

            lo = _times4_ir(builder, builder.and_(c, splat(15)), splat)
            hi = _times4_ir(builder, builder.lshr(c, splat(4)), splat)
            prod = builder.add(builder.mul(xe, lo), builder.mul(xo, hi))
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [v32]),
                                                "llvm.vector.reduce.add.v16i32")
            return builder.call(fn, [prod])
        return types.int32(codes, n, j, xq, i), codegen


# ---------------------------------------------------------------- FP8 one-row products: exact block sums
#
# A 128-column block of an FP8 product whose activations are integers below 2^28 times one power of
# two (mirror's are e4m3 values times their 1x128 scale: 18 bits) has an exact float64 sum in any
# order: each product x · fp8_raw(code) is an integer below 2^(28+18) times one power of two, and
# 128 of them stay below 2^53 of it. linear.py checks the activations once per call, and the
# scale range, so that the lanes' sums are exact too: then any order gives the lanes' bits.

FP8_XQ_LIMIT = 1 << 28   # |xq| below this: a 128-column FP8 block's sum is exact in any order

if numba.config.DISABLE_JIT:
    def fp8_dot128(codes, n, j, x, i):
        """Σ_l x[i + l] · fp8_raw(codes[n, j + l]), l < 128 (exact: see above), in float64."""
        raw = np.array([fp8_raw(c) for c in codes[n, j:j + 128]], np.float64)
        return float(np.dot(x[i:i + 128], raw))
else:
    @intrinsic
    def fp8_dot128(typingctx, codes, n, j, x, i):
        """Σ_l x[i + l] · fp8_raw(codes[n, j + l]), l < 128, in float64, in no particular order: only for sums
        that are exact in every order (the caller checks; indices in bounds).

        LLVM IR on vectors of 8: the codes decoded as fp8_raw does (sign-extend, shift, mask, bitcast),
        widened to float64, fused multiply-adds into four accumulators (a product is exact, so the fused
        and the separate forms agree), then the accumulators and their lanes added pairwise.
        """
        if not _row_operands(codes, n, j, x, i, types.float64):
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            from numba.core import cgutils
            c_ty, _, _, x_ty, _ = signature.args
            i32, lanes = ir.IntType(32), 8
            v8, v32 = ir.VectorType(ir.IntType(8), lanes), ir.VectorType(i32, lanes)
            vf, vd = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(ir.DoubleType(), lanes)

            pc = builder.bitcast(_element_ptr(context, builder, c_ty, args[0], args[1:3], signature.args[1:3]), v8.as_pointer())
            px = builder.bitcast(_element_ptr(context, builder, x_ty, args[3], args[4:5], signature.args[4:5]), vd.as_pointer())
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]), "llvm.fma.v8f64")
            acc = [ir.Constant(vd, [0.0] * lanes)] * 4
            for c in range(128 // lanes):
                k = ir.Constant(i32, c)
                v = builder.shl(builder.sext(builder.load(builder.gep(pc, [k]), align=1), v32),
                                ir.Constant(v32, [20] * lanes))
                v = builder.and_(v, ir.Constant(v32, [0x87F00000 - (1 << 32)] * lanes))
                w = builder.fpext(builder.bitcast(v, vf), vd)
                acc[c % 4] = builder.call(fma, [builder.load(builder.gep(px, [k]), align=8), w, acc[c % 4]])
            s = builder.fadd(builder.fadd(acc[0], acc[1]), builder.fadd(acc[2], acc[3]))
            for width in (4, 2, 1):                                   # lanes added pairwise
                lo = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, width), list(range(width))))
                hi = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width))))
                s = builder.fadd(lo, hi)
            return builder.extract_element(s, ir.Constant(i32, 0))
        return types.float64(codes, n, j, x, i), codegen


# ---------------------------------------------------------------- dense one-row products: the lanes in registers

if numba.config.DISABLE_JIT:
    def dense_lanes128(codes, n, j, x, i):
        """The 128-column block sum of linear.py's order (16 lanes, positions ascending, lanes added ascending) of
        x[i:i+128] times the bf16 (uint16 codes) or float32 (uint32 codes) weights codes[n, j:j+128]."""
        c = codes[n, j:j + 128]
        w = (c.astype(np.uint32) << 16).view(np.float32) if c.dtype == np.uint16 else c.view(np.float32)
        a = np.zeros(16)
        for p in range(0, 128, 16):
            a = a + x[i + p:i + p + 16] * w[p:p + 16].astype(np.float64)
        y = 0.0
        for v in a:
            y += v
        return y
else:
    @intrinsic
    def dense_lanes128(typingctx, codes, n, j, x, i):
        """The 128-column block sum of linear.py's order of x[i:i+128] times the bf16 (uint16 codes) or float32
        (uint32 codes) weights codes[n, j:j+128]: lane l = Σ over p = 0, 16, .., 112 of x · w at position
        p + l, in that order (a float64 multiply, then an add: no fused multiply-add), the 16 lanes then
        added in ascending order from +0.0. The same operations as the kernel's lane loops, bit for bit,
        with the lanes held in a vector register instead of memory.
        """
        if not (_row_operands(codes, n, j, x, i, types.float64) and isinstance(codes.dtype, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            from numba.core import cgutils
            c_ty, _, _, x_ty, _ = signature.args
            if c_ty.dtype not in (types.uint16, types.uint32):         # a branch for other codes, typed, never run
                return ir.Constant(ir.DoubleType(), float("nan"))
            i32, lanes = ir.IntType(32), 16
            bits = 16 if c_ty.dtype == types.uint16 else 32
            vc, v32 = ir.VectorType(ir.IntType(bits), lanes), ir.VectorType(i32, lanes)
            vf, vd = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(ir.DoubleType(), lanes)

            pc = builder.bitcast(_element_ptr(context, builder, c_ty, args[0], args[1:3], signature.args[1:3]), vc.as_pointer())
            px = builder.bitcast(_element_ptr(context, builder, x_ty, args[3], args[4:5], signature.args[4:5]), vd.as_pointer())
            acc = ir.Constant(vd, [0.0] * lanes)
            for c in range(128 // lanes):
                k = ir.Constant(i32, c)
                v = builder.load(builder.gep(pc, [k]), align=bits // 8)
                if bits == 16:                                        # bf16: the bits above 16 zeros
                    v = builder.shl(builder.zext(v, v32), ir.Constant(v32, [16] * lanes))
                w = builder.fpext(builder.bitcast(v, vf), vd)
                acc = builder.fadd(acc, builder.fmul(builder.load(builder.gep(px, [k]), align=8), w))
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.DoubleType(), [ir.DoubleType(), vd]),
                                                "llvm.vector.reduce.fadd.v16f64")
            return builder.call(fn, [ir.Constant(ir.DoubleType(), 0.0), acc])   # ordered: no reassociation flag
        return types.float64(codes, n, j, x, i), codegen


# ---------------------------------------------------------------- dense one-row products: eight rows at a time
#
# dense_lanes128's lanes end in an ordered sum of 16 scalars, one after the other: about a quarter of
# the instructions of the Flash head's product (129280 bf16 rows). dense_lanes128x8 takes eight weight
# rows against one x: each row's 16 lanes exactly as dense_lanes128 (one x load serves the eight),
# then the 8 x 16 lanes transposed (shuffles), so that lane l of the eight rows is one vector, and the
# ordered sum (+0.0, then lane 0, 1, .. 15) is 16 vector additions for all eight rows.
# dense_fma128x8 is the same with fused multiply-adds, for an x of float32 values (finite; the caller
# checks): a float32 value times a bf16 or float32 weight is exact in float64 (at most 24 + 24
# significant bits, magnitudes within 2^-298 .. 2^256), so fma(x, w, lane) rounds once, as the
# separate add of the exact product does: the same bits, one instruction less per product.

ROWS8 = 8    # weight rows per dense_lanes128x8

if numba.config.DISABLE_JIT:
    def dense_lanes128x8(codes, n, j, x, i):
        """(dense_lanes128 of rows n .. n+7): eight block sums."""
        return tuple(dense_lanes128(codes, n + r, j, x, i) for r in range(ROWS8))

    def dense_fma128x8(codes, n, j, x, i):
        """dense_lanes128x8 with fused multiply-adds: the same values where every product x·w is exact."""
        return dense_lanes128x8(codes, n, j, x, i)
else:
    def _transpose_ir(builder, rows):
        """LLVM IR: rows, R vectors of R·m elements (R a power of two) -> R·m vectors of R, out[l][r] = rows[r][l]:
        halves of the columns and pairs of row groups combined by two-vector shuffles (log2 R stages)."""
        from llvmlite import ir
        i32 = ir.IntType(32)
        R = len(rows)
        width = rows[0].type.count
        items = []                                            # (vector, [(row, column) of each element])
        for r, v in enumerate(rows):                          # each row cut into vectors of R elements
            for c0 in range(0, width, R):
                part = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, R), list(range(c0, c0 + R))))
                items.append((part, [(r, c) for c in range(c0, c0 + R)]))
        while any(len({c for _, c in lab}) > 1 for _, lab in items):
            groups: dict = {}                                 # vectors holding the same columns, rows ascending
            for v, lab in items:
                groups.setdefault(tuple(sorted({c for _, c in lab})), []).append((v, lab))
            items = []
            for cols, vs in groups.items():
                vs.sort(key=lambda it: min(r for r, _ in it[1]))
                for (a, la), (b, lb) in zip(vs[0::2], vs[1::2]):
                    where = {e: k for k, e in enumerate(la)} | {e: R + k for k, e in enumerate(lb)}
                    rs = sorted({r for r, _ in la} | {r for r, _ in lb})
                    h = len(cols) // 2
                    for half in (cols[:h], cols[h:]):
                        lab = [(r, c) for c in half for r in rs]
                        mask = ir.Constant(ir.VectorType(i32, R), [where[e] for e in lab])
                        items.append((builder.shuffle_vector(a, b, mask), lab))
        return [v for v, _ in sorted(items, key=lambda it: it[1][0][1])]

    def _dense_rows8_typing(codes, n, j, x, i):
        """The signature of dense_lanes128x8 / dense_fma128x8, or None (as dense_lanes128's typing)."""
        if not (_row_operands(codes, n, j, x, i, types.float64) and isinstance(codes.dtype, types.Integer)):
            return None
        return types.UniTuple(types.float64, ROWS8)(codes, n, j, x, i)

    def _dense_rows8_codegen(fused: bool):
        """The IR of dense_lanes128x8 (fused False) or dense_fma128x8 (True)."""
        def codegen(context, builder, signature, args):
            from llvmlite import ir
            from numba.core import cgutils
            c_ty, n_ty, j_ty, x_ty, _ = signature.args
            f64 = ir.DoubleType()
            if c_ty.dtype not in (types.uint16, types.uint32):         # a branch for other codes, typed, never run
                return context.make_tuple(builder, signature.return_type, [ir.Constant(f64, float("nan"))] * ROWS8)
            i32, lanes = ir.IntType(32), 16
            bits = 16 if c_ty.dtype == types.uint16 else 32
            vc, v32 = ir.VectorType(ir.IntType(bits), lanes), ir.VectorType(i32, lanes)
            vf, vd = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(f64, lanes)

            px = builder.bitcast(_element_ptr(context, builder, x_ty, args[3], args[4:5], signature.args[4:5]), vd.as_pointer())
            n0 = context.cast(builder, args[1], n_ty, types.intp)
            pcs = [builder.bitcast(_element_ptr(context, builder, c_ty, args[0], [builder.add(n0, ir.Constant(n0.type, r)), args[2]],
                                                [types.intp, j_ty]), vc.as_pointer()) for r in range(ROWS8)]
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd, [vd, vd, vd]), "llvm.fma.v16f64")
            acc = [ir.Constant(vd, [0.0] * lanes)] * ROWS8
            for c in range(128 // lanes):
                k = ir.Constant(i32, c)
                xv = builder.load(builder.gep(px, [k]), align=8)
                for r in range(ROWS8):
                    v = builder.load(builder.gep(pcs[r], [k]), align=bits // 8)
                    if bits == 16:                                    # bf16: the bits above 16 zeros
                        v = builder.shl(builder.zext(v, v32), ir.Constant(v32, [16] * lanes))
                    w = builder.fpext(builder.bitcast(v, vf), vd)
                    acc[r] = builder.call(fma, [xv, w, acc[r]]) if fused else builder.fadd(acc[r], builder.fmul(xv, w))
            s = ir.Constant(ir.VectorType(f64, ROWS8), [0.0] * ROWS8)
            for lane in _transpose_ir(builder, acc):                  # lane l of the eight rows, l ascending
                s = builder.fadd(s, lane)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_element(s, ir.Constant(i32, r)) for r in range(ROWS8)])
        return codegen

    @intrinsic
    def dense_lanes128x8(typingctx, codes, n, j, x, i):
        """(dense_lanes128(codes, n + r, j, x, i) for r < 8) as a tuple, bit for bit: the same multiplies and adds in
        the same lanes, the lane sums taken for the eight rows at once (see above). Rows n..n+7 in bounds."""
        sig = _dense_rows8_typing(codes, n, j, x, i)
        return None if sig is None else (sig, _dense_rows8_codegen(False))

    @intrinsic
    def dense_fma128x8(typingctx, codes, n, j, x, i):
        """dense_lanes128x8 with llvm.fma for each lane's multiply and add: its bits only where every product x·w is
        exact in float64 (x holds finite float32 values: the caller checks)."""
        sig = _dense_rows8_typing(codes, n, j, x, i)
        return None if sig is None else (sig, _dense_rows8_codegen(True))


if numba.config.DISABLE_JIT:
    def fp4_dot128(codes, n, j, xq, i):
        """(fp4_dot32 at j, j + 16, j + 32, j + 48 against xq at i, i + 32, i + 64, i + 96): a 128-column block's
        four 1x32 sums."""
        return tuple(fp4_dot32(codes, n, j + 16 * q, xq, i + 32 * q) for q in range(4))

    def fp4_block128(codes, n, j, xq, i, scale, xg):
        """Σ_q fp4_dot128's sum q · 2^(scale[n, i/32 + q] - 129 + xg[i/32 + q]), q ascending (see the compiled one)."""
        b = None
        for q, isum in enumerate(fp4_dot128(codes, n, j, xq, i)):
            sq = float(isum) * 2.0 ** (int(scale[n, i // 32 + q]) - 129 + int(xg[i // 32 + q]))
            b = sq if b is None else b + sq
        return b
else:
    def _fp4_sums_ir(context, builder, signature, args):
        """LLVM IR of fp4_dot128 (args: codes, n, j, xq, i): the four 1x32 sums of the block as a vector of 4 int32."""
        from llvmlite import ir
        from numba.core import cgutils
        c_ty, _, _, x_ty, _ = signature.args[:5]
        i32, lanes = ir.IntType(32), 16
        v8, v32 = ir.VectorType(ir.IntType(8), lanes), ir.VectorType(i32, lanes)

        def splat(k):
            return ir.Constant(v32, [k] * lanes)

        pc = builder.bitcast(_element_ptr(context, builder, c_ty, args[0], args[1:3], signature.args[1:3]), v8.as_pointer())
        xp = builder.bitcast(_element_ptr(context, builder, x_ty, args[3], args[4:5], signature.args[4:5]), v32.as_pointer())

        table = _target_has(context, "avx512f")
        if table:                                                 # AVX-512's vpermd: a 16-entry int32 table
            perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32, v32]),
                                                  "llvm.x86.avx512.permvar.si.512")
            values = ir.Constant(v32, [fp4_times4(k) for k in range(16)])

        def times4(nib):                                          # as fp4_dot32
            if table:                                             # the lookup reads bits 0-3 of each index only
                return builder.call(perm, [values, nib])
            return _times4_ir(builder, builder.and_(nib, splat(15)), splat)
        p = []
        for q in range(4):
            c = builder.zext(builder.load(builder.gep(pc, [ir.Constant(i32, q)]), align=1), v32)
            xe = builder.load(builder.gep(xp, [ir.Constant(i32, 2 * q)]), align=4)
            xo = builder.load(builder.gep(xp, [ir.Constant(i32, 2 * q + 1)]), align=4)
            p.append(builder.add(builder.mul(xe, times4(c)), builder.mul(xo, times4(builder.lshr(c, splat(4))))))

        def fold(a, b, idx_lo, idx_hi):
            w = len(idx_lo)
            lo = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, w), idx_lo))
            hi = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, w), idx_hi))
            return builder.add(lo, hi)
        halves = (list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32)))
        a = fold(p[0], p[1], *halves)                             # [p0 (8 partial sums), p1 (8)]
        b = fold(p[2], p[3], *halves)
        c = fold(a, b, [k for g in range(0, 32, 8) for k in range(g, g + 4)],
                 [k for g in range(0, 32, 8) for k in range(g + 4, g + 8)])     # [p0 (4), p1, p2, p3]
        d = fold(c, c, [k for g in range(0, 16, 4) for k in (g, g + 1)], [k for g in range(0, 16, 4) for k in (g + 2, g + 3)])
        return fold(d, d, [0, 2, 4, 6], [1, 3, 5, 7])             # [s0, s1, s2, s3]

    @intrinsic
    def fp4_dot128(typingctx, codes, n, j, xq, i):
        """The four 1x32 sums of fp4_dot32 over a 128-column block (bytes j..j+63, xq[i:i+128]), as a tuple of
        int32: the four product vectors reduced together (pairwise shuffles), not one at a time.

        Compiled for AVX-512, each nibble's 4 · e2m1 comes from one vpermd (a 16-entry int32 table indexed
        by bits 0-3 of each lane) instead of fp4_dot32's dozen bit operations: measured on the Flash
        checkpoint's expert matrices (2048 x 4096), the one-row product took 0.93 instead of 1.67 ms of
        thread CPU time. The integers, and so the sums, are the same."""
        if not _row_operands(codes, n, j, xq, i, types.int32):
            return None
        sig = types.UniTuple(types.int32, 4)(codes, n, j, xq, i)

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            e = _fp4_sums_ir(context, builder, signature, args)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_element(e, ir.Constant(ir.IntType(32), q)) for q in range(4)])
        return sig, codegen

    @intrinsic
    def fp4_block128(typingctx, codes, n, j, xq, i, scale, xg):
        """Row n's sum over a 128-column FP4 block in _fp4_matvec_rows_int's order: the four 1x32 integer sums of
        fp4_dot128 (bytes j..j+63, xq[i:i+128]), each times 2^E with E = scale[n, i/32 + q] - 129 + xg[i/32 + q],
        then added in ascending order (b = s0, b + s1, + s2, + s3), in float64. The caller has checked that
        every E of the row lies in [-1022, 992] (each 2^E a normal float64, built from its exponent bits) and
        that scale's rows and xg are contiguous. The scaling is done on the 4 sums as one vector (integer to
        float64, exponent bits, multiply) instead of four times in scalars; the same operations per sum."""
        if not (_row_operands(codes, n, j, xq, i, types.int32) and isinstance(scale, types.Array)
                and scale.ndim == 2 and scale.dtype == types.uint8 and isinstance(xg, types.Array)
                and xg.ndim == 1 and xg.dtype == types.int64):
            return None
        sig = types.float64(codes, n, j, xq, i, scale, xg)

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            e = _fp4_sums_ir(context, builder, signature, args)
            i32, i64 = ir.IntType(32), ir.IntType(64)
            v4i64, v4d = ir.VectorType(i64, 4), ir.VectorType(ir.DoubleType(), 4)
            s_ty, g_ty = signature.args[5], signature.args[6]
            blk = builder.ashr(context.cast(builder, args[4], signature.args[4], types.intp), ir.Constant(i64, 5))
            ps = _element_ptr(context, builder, s_ty, args[5], [args[1], blk], [signature.args[1], types.intp])
            pg = _element_ptr(context, builder, g_ty, args[6], [blk], [types.intp])
            sc = builder.zext(builder.load(builder.bitcast(ps, ir.VectorType(ir.IntType(8), 4).as_pointer()), align=1), v4i64)
            g = builder.load(builder.bitcast(pg, v4i64.as_pointer()), align=8)
            biased = builder.add(builder.add(sc, g), ir.Constant(v4i64, [1023 - 129] * 4))      # E + 1023
            two_e = builder.bitcast(builder.shl(biased, ir.Constant(v4i64, [52] * 4)), v4d)     # 2^E
            s = builder.fmul(builder.sitofp(e, v4d), two_e)
            b = builder.extract_element(s, ir.Constant(i32, 0))
            for q in range(1, 4):
                b = builder.fadd(b, builder.extract_element(s, ir.Constant(i32, q)))
            return b
        return sig, codegen
