import mykernels


def test_fp8_linear(refimpl_check):                  # FP8 block-scaled product, partial 128-blocks included
    refimpl_check(mykernels.fp8_linear, "fp8_linear")


def test_sparse_attention(refimpl_check):            # sparse attention with the per-head sink
    refimpl_check(mykernels.sparse_attention, "sparse_attention")
