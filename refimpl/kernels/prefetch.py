"""A software prefetch for kernels that stream memory-mapped weights.

Checkpoint weights are file pages mapped 4 KiB at a time (no transparent huge pages for a file
mapping), so a one-row product streaming a large matrix walks the page tables at every 4 KiB and
the hardware prefetcher stops at each page boundary: measured on the Flash head (129280 x 4096
bf16, 1.06 GB), the product took 128 ms from the mapping and 64 ms from an anonymous copy.
`prefetch(a, i, j)` asks for the cache line of a[i, j] ahead of its use (LLVM's llvm.prefetch:
a hint, never a fault, no effect on any value).
"""
from __future__ import annotations

import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

if numba.config.DISABLE_JIT:
    def prefetch(a, i, j):
        """No-op in plain Python (NUMBA_DISABLE_JIT=1)."""
        return None
else:
    @intrinsic
    def prefetch(typingctx, a, i, j):
        """Prefetch the cache line holding a[i, j] (2-D array, in-bounds indices) for reading."""
        if not (isinstance(a, types.Array) and a.ndim == 2 and isinstance(i, types.Integer)
                and isinstance(j, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir
            aty = signature.args[0]
            ary = context.make_array(aty)(context, builder, args[0])
            idx = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
            ptr = cgutils.get_item_pointer(context, builder, aty, ary, idx, wraparound=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0i8")
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.none(a, i, j), codegen
