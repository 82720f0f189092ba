"""numba.cuda kernels of the hot operations, selected with kernels="cuda" (refimpl/ops.py; docs/cuda.md).

    sparse_attention   refimpl/cuda/attention.py   block-64 online softmax with sink over index sets
    quantized_linear   refimpl/cuda/linear.py      FP8 / packed FP4 weight products (experts, attention)
    matmul             refimpl/cuda/linear.py      fp32 / bf16 dense products (router, compressor, mHC, head)
    gated_pool         refimpl/cuda/compressor.py  the compressor's softmax pooling
    indexer            refimpl/cuda/indexer.py     indexer scores + top-k of every query in one launch each
    index_scores       refimpl/cuda/indexer.py     (the per-query scoring, for selections that keep the spec indexer)
    split_sinkhorn     refimpl/cuda/hyperconn.py   mHC split + Sinkhorn, one thread per token

Each wrapper has its spec function's signature and results (bit-identical in mirror except where
a float64 sum lands within ~1e-16 of an fp32 rounding boundary; see docs/cuda.md). Importing this
package imports nothing from numba: only `check_available()` and the kernel modules do.
With NUMBA_ENABLE_CUDASIM=1 (set before numba is imported) the kernels run in Numba's CUDA
simulator on the CPU: slow, and the way the tests check them without a GPU.
"""
from __future__ import annotations

import os

from refimpl.ops import KernelError


def simulator() -> bool:
    """True when Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba import config
        return bool(config.ENABLE_CUDASIM)
    except ImportError:
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def unavailable_reason() -> str | None:
    """None if kernels="cuda" can run here (a GPU, or the simulator); else why not, in one line."""
    try:
        from numba import cuda
    except Exception as e:                       # no numba-cuda, or no libcudart: the import itself fails
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (f"kernels=cuda needs numba-cuda and the CUDA runtime (pip install 'refimpl[gpu]'): "
                f"importing numba.cuda failed: {first[:200]}")
    if simulator():
        return None
    try:
        if cuda.is_available() and len(cuda.gpus) > 0:
            return None
        why = "no CUDA driver or device found"
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    reason = getattr(cuda, "cuda_error", lambda: None)()
    if reason:
        why = (str(reason).strip().splitlines() or [why])[0]
    return f"kernels=cuda needs an NVIDIA GPU: {why[:200]}"


def check_available() -> None:
    """Raise KernelError (a ValueError) saying why kernels="cuda" cannot run here; ops.AVAILABILITY["cuda"]."""
    reason = unavailable_reason()
    if reason is not None:
        raise KernelError(reason)
