"""Planted bugs in reference-shaped implementations (candidates.py): the kit finds each within a stated number of
examples, and its message names the bug where a hint can.

Each case runs the kit's property test derandomized (the same examples on every run) and records the index of
the first example that fails; the limit is the stated number (measured: see the table's comments).
"""
import pytest

import candidates
from refimpl.testing import MismatchError, assert_matches, check_op

# (operation, bug, precision, found within N examples, a hint the message must give or ""). Measured (derandomized,
# Hypothesis 6.170): every bug fails by its 15th example (route bias_weighs: 15th; most by the 3rd to 7th)
BUGS = [
    ("act_quant_fp8", "scale_rounded_to_nearest", "mirror", 25, "factor: the result is 0.5 = 2^-1"),
    ("act_quant_fp8", "per_column_scale", "mirror", 25, ""),
    ("fp8_linear", "block_height_from_grid", "float32", 25, "confined: the out-of-bound elements lie only at axis 1 "
                                                          "(o output channels)"),
    ("fp8_linear", "block_height_from_grid", "mirror", 25, "confined"),
    ("fp8_linear", "scale_grid_transposed", "float32", 25, ""),
    ("fp4_linear", "high_nibble_first", "float32", 25, ""),
    ("rms_norm", "eps_outside_sqrt", "float32", 25, ""),
    ("apply_rope", "missing_yarn", "float32", 25, "known bug: the result is what RoPE without YaRN"),
    ("apply_rope", "rotate_half", "float32", 25, ""),
    ("apply_rope", "inverse_not_conjugated", "float32", 25, "the rotation in the other direction"),
    ("split_sinkhorn", "one_iteration_short", "float32", 25, "Sinkhorn one iteration short"),
    ("hc_post", "transposed_mix", "float32", 25, "a transposed mixing matrix"),
    ("hc_head", "rms_per_stream", "float32", 25, ""),
    ("hc_head", "sinkhorn_on_pre", "float32", 25, ""),
    ("hadamard", "walsh_order", "float32", 25, ""),
    ("hadamard", "unnormalised", "float32", 25, "factor"),
    ("act_quant_fp4", "ties_away_from_zero", "mirror", 25, ""),
    ("act_quant_fp4", "scale_rounded_to_nearest", "mirror", 25, ""),
    ("index_layout", "window_one_too_wide", "float32", 25, ""),
    ("index_layout", "entry_visible_early", "float32", 25, ""),
    ("index_layout", "prefill_padded_to_window", "float32", 25, ""),
    ("sparse_attention", "sink_of_rank_0", "float32", 25, "sinks of the first of 2 groups"),
    ("sparse_attention", "sink_in_the_max", "float32", 25, ""),
    ("sparse_attention", "sink_as_bf16", "float32", 25, "the sink rounded to bf16"),
    ("index_topk", "ties_broken_upward", "float32", 25, "resolved to the HIGHER index"),
    ("route", "bias_weighs", "float32", 25, ""),
    ("route", "ties_broken_upward", "float32", 25, "resolved to the HIGHER index"),
    ("expert_sum", "shared_clamp_in_initial", "float32", 25, "the shared expert's clamp of the other revision"),
    ("expert_sum", "symmetric_gate_clamp", "float32", 25, ""),
    ("mtp_input", "pairs_token_t", "float32", 25, "the streams of t with token t itself"),
]


def first_failure(name, bug, precision, limit):
    """(index of the first failing example, the final message) of a derandomized run of up to `limit` examples."""
    seen = {"n": 0, "first": None}
    impl = getattr(candidates, name)

    def buggy(inputs):
        out = impl(inputs, bug)
        seen["n"] += 1
        if seen["first"] is None:
            try:
                assert_matches(out, name, inputs, precision)
            except MismatchError as e:
                seen["first"] = (seen["n"], str(e))
        return out
    with pytest.raises(MismatchError) as e:
        check_op(buggy, name, precision, max_examples=limit, derandomize=True)
    return seen["first"][0], str(e.value)          # the message of the shrunk example, as a user sees it


@pytest.mark.parametrize("name,bug,precision,limit,hint", BUGS, ids=[f"{b[0]}-{b[1]}-{b[2]}" for b in BUGS])
def test_the_kit_finds_the_planted_bug(name, bug, precision, limit, hint):
    index, message = first_failure(name, bug, precision, limit)
    assert index <= limit
    assert hint in message, message
