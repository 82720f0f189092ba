"""refimpl's Numba kernels tested through refimpl.testing, as another implementation would test its own (dogfood).

Each kernel runs on inputs drawn by its operation's record (the kit's strategies reach the edge cases on
purpose: partial FP8 blocks, e4m3 max and subnormals, -1 padding, exact ties, incomplete compressor groups)
and must pass twice: against the kit's bound at its precision (`assert_matches`, what a user's kernel must
pass), and against the spec (mirror: the spec's bits up to counted boundary cases, kernel_checks.py;
float64: within 1e-12 of the output's largest magnitude, since a sum of products may cancel; integer
outputs: equal). The per-kernel files keep their own hand-made cases.
"""
import numpy as np
import pytest
from hypothesis import given, settings

from kernel_checks import PRECS, check
from refimpl.testing import OPS, assert_matches

# the records whose operation (or the swappable operations inside it) has a Numba kernel (refimpl/ops.py KERNELS)
KERNEL_OPS = ["fp8_linear", "fp4_linear", "rms_norm", "head_rms_norm", "apply_rope", "split_sinkhorn", "hc_pre", "hc_post",
              "hc_head", "compress", "index_topk", "sparse_attention", "expert_sum"]


@pytest.mark.parametrize("prec", PRECS)
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_kernel_through_the_kit(name, prec):
    rec = OPS[name]

    @settings(max_examples=6, deadline=None)
    @given(inputs=rec.strategy(prec))
    def run(inputs):
        got = rec.reference(inputs, prec, kernels="numba")
        assert_matches(got, rec, inputs, prec)
        if prec == "float32":
            return                                   # the kernels round once where float32 BLAS rounds per step
        want = rec.reference(inputs, prec)
        for k in rec.outputs:
            if want[k].dtype.kind in "iu":
                assert np.array_equal(got[k], want[k]), k
            elif prec == "mirror":
                check(got[k], want[k], prec, f32_atol=None)
            else:
                finite = np.isfinite(want[k])
                assert np.array_equal(got[k][~finite], want[k][~finite]), k
                scale = np.abs(want[k][finite]).max(initial=0.0)
                np.testing.assert_allclose(got[k][finite], want[k][finite], rtol=0, atol=1e-12 * scale)
    run()
