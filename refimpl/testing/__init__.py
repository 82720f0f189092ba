"""refimpl.testing: property-based tests of another implementation of DeepSeek V4, operation by operation.

For each operation that implementations write kernels for, a record (`OPS[name]`, an `OpRecord`) holds

    reference(inputs, precision)   refimpl's spec function on plain NumPy arrays in the official tensor layouts,
                                   in "float64" (exact math), "float32" or "mirror" (the official roundings)
    strategy(precision)            a Hypothesis strategy of input dicts that reaches the cases that broke field
                                   implementations on purpose (partial FP8 blocks, e4m3 max and subnormals,
                                   scales over many binades, -1 padding, exact ties, incomplete groups, ...)
    edges(inputs), edge_cases      the labels of the edge cases an input reaches, and those the strategy must reach
    the tolerance                  the error a correct implementation at the candidate's precision makes on the
                                   same input, measured per input (tolerance.py: one function, noise_bound)

and two calls test a candidate:

    assert_matches(mine, "sparse_attention", inputs, precision="float32")    # MismatchError: where, how far, hint
    check_op(my_impl, "fp8_linear", precision="float32", max_examples=50)    # a whole Hypothesis property test

The operations, in data-flow order: act_quant_fp8, fp8_linear, fp4_linear, rms_norm, head_rms_norm,
apply_rope, split_sinkhorn, hc_pre, hc_post, hc_head, compress, hadamard, act_quant_fp4, index_topk,
index_layout, sparse_attention, route, expert_sum, mtp_input.
The pytest plugin (`refimpl.testing.plugin`, registered as a pytest11 entry point) gives fixtures and
the --refimpl-precision option. Guide and worked examples: docs/testing.md. This module (and only it)
imports Hypothesis; `import refimpl` does not.

KIT_VERSION changes when a record's inputs, outputs or tolerance rule change in a way that can
turn a passing test into a failing one (or the reverse).
"""
# importing the record modules registers their records, in data-flow order
from refimpl.testing import ops_linear  # noqa: F401  isort: skip
from refimpl.testing import ops_layers  # noqa: F401  isort: skip
from refimpl.testing import ops_attention  # noqa: F401  isort: skip
from refimpl.testing import ops_moe  # noqa: F401  isort: skip
from refimpl.testing import ops_mtp  # noqa: F401  isort: skip
from refimpl.testing.check import MismatchError, as_outputs, assert_matches, check_op
from refimpl.testing.record import OPS, OpRecord, op
from refimpl.testing.tolerance import FACTOR, FLOOR, Bound, noise_bound

KIT_VERSION = "1.0"
__version__ = KIT_VERSION

__all__ = ["KIT_VERSION", "OPS", "Bound", "FACTOR", "FLOOR", "MismatchError", "OpRecord", "as_outputs",
           "assert_matches", "check_op", "noise_bound", "op"]
