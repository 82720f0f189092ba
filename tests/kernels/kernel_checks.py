"""Helpers of the kernel tests of refimpl/kernels/{indexer,compressor,hyperconn,norm,rope}.py: the agreement
each kernel must have with its spec function.

mirror: bit-identical to the spec (the kernels keep NumPy's summation orders, see
rounding.pairwise_sum, and the spec's separate IEEE ops), except where a float64 value that is
not exact (a sum, an exp: Numba calls the C library's exp, NumPy its own) lands on an fp32
rounding boundary; each case allows at most one such element in 10,000 (none seen).
float64: within 1e-12 relative (mostly bit-identical; exp may differ in the last bit).
float32: the kernels work in float64 and round once; the spec rounds every step to fp32, so the
bound is a few fp32 ulps of the result's scale (stated per kernel).
"""
import ml_dtypes
import numpy as np

PRECS = ["mirror", "float64", "float32"]


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def dtype_of(prec):
    return np.float64 if prec == "float64" else np.float32


def check(got, want, prec, f32_atol):
    """Equal in mirror (up to counted one-ulp boundary cases) and float64; f32_atol in float32."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if prec == "float32":
        np.testing.assert_allclose(got, want, rtol=0, atol=f32_atol)
        return
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite) and np.array_equal(got[~finite], want[~finite])
    if prec == "float64":                        # exp / sum order may differ from NumPy's in the last bit
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=0)
        return
    diff = got != want
    assert diff.sum() <= max(1, want.size * 1e-4), f"mirror: {int(diff.sum())} of {want.size} elements differ"
    if diff.any():                               # one bf16/fp32 ulp at a rounding boundary, and rare
        print(f"mirror boundary case: {int(diff.sum())} of {want.size} element(s)")
        ulp = np.abs(got[diff].astype(np.float32).view(np.int32) - want[diff].astype(np.float32).view(np.int32))
        assert (ulp <= 1 << 16).all()
        assert diff.mean() <= 1e-3 if want.size >= 1000 else diff.sum() <= 1
