"""refimpl.testing: the records, the tolerance, the assertion's verdicts and messages, and the strategies' reach.

Planted bugs: test_planted_bugs.py; the pytest plugin and the kit used from another folder: test_plugin.py.
"""
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import Phase, given, settings

import candidates
from refimpl.testing import OPS, MismatchError, assert_matches, check_op, noise_bound, op
from refimpl.testing.tolerance import FACTOR, FLOOR

# every record's strategy reaches every one of its edge cases within this many derandomized examples
# (measured: at most 41, index_layout's prefill longer than the window; then 31, index_topk's tie at the top-k boundary)
REACH_EXAMPLES = 100
# edge cases a strategy leaves out at one precision, and why
NOT_AT = {("fp8_linear", "mirror"): {"partial_column_block"}}   # mirror's act_quant needs K % 128 == 0 (K:L40-125)


def test_the_records_are_complete_and_in_data_flow_order():
    assert list(OPS) == ["act_quant_fp8", "fp8_linear", "fp4_linear", "rms_norm", "head_rms_norm", "apply_rope",
                         "split_sinkhorn", "hc_pre", "hc_post", "hc_head", "compress", "hadamard", "act_quant_fp4",
                         "index_topk", "index_layout", "sparse_attention", "route", "expert_sum", "mtp_input"]
    for rec in OPS.values():
        assert rec.summary and rec.official and rec.inputs and rec.edge_cases
        assert set(rec.axes) <= set(rec.outputs) and set(rec.selections) <= set(rec.outputs)
    with pytest.raises(KeyError, match="no operation 'sparse_attn'.*sparse_attention"):
        op("sparse_attn")


@pytest.mark.parametrize("name,precision", [(n, p) for n, r in OPS.items() for p in
                                            (("float32", "mirror") if "float32" in r.precisions else r.precisions)])
def test_each_strategy_reaches_its_edge_cases(name, precision):
    rec = OPS[name]
    seen = set()

    @settings(max_examples=REACH_EXAMPLES, derandomize=True, database=None, phases=[Phase.generate], deadline=None)
    @given(inputs=rec.strategy(precision))
    def draw(inputs):
        labels = rec.edges(inputs)
        assert labels <= set(rec.edge_cases), labels - set(rec.edge_cases)   # no label the record does not list
        seen.update(labels)
    draw()
    assert set(rec.edge_cases) - NOT_AT.get((name, precision), set()) <= seen


@pytest.mark.parametrize("name", list(OPS))
def test_refimpl_itself_passes_at_every_precision(name):
    """The bound admits the reference at each precision it runs in (the noise it measures is its own)."""
    rec = OPS[name]
    for p in rec.precisions:
        check_op(lambda inputs: rec.reference(inputs, p), name, p, max_examples=4, derandomize=True)


@pytest.mark.parametrize("name", ["act_quant_fp8", "fp8_linear", "fp4_linear", "rms_norm", "apply_rope",
                                  "split_sinkhorn", "hc_post", "hc_head", "hadamard", "act_quant_fp4", "index_layout",
                                  "sparse_attention", "index_topk", "route", "expert_sum",
                                  "mtp_input"])
def test_an_independent_correct_implementation_passes(name):
    """tests/testing/candidates.py, written from the official code without refimpl's spec, float64 inside and
    rounded once: a correct float32 implementation that sums in another order must pass."""
    precision = "mirror" if name in ("act_quant_fp8", "act_quant_fp4") else "float32"
    check_op(getattr(candidates, name), name, precision, max_examples=30, derandomize=True)


# ------------------------------------------------------------------------------------------------ the tolerance

def test_noise_bound_by_hand():
    """Row 0: refimpl at float32 is off by 2^-20 on a row of scale 2 -> bound 8·2^-20 + 64·2^-23·2.
    Row 1: refimpl is exact there, but the output's worst row relative noise (2^-20 / 2 = 2^-21) at the row's
    scale 0.5 still counts: 8·2^-22 + 64·2^-23·0.5."""
    exact = np.array([[1.0, 2.0], [0.5, 0.25]])
    approx = exact + np.array([[0.0, 2.0**-20], [0.0, 0.0]])
    b = noise_bound(exact, approx, "float32")
    assert FACTOR == 8 and FLOOR["float32"] == 64 * 2.0**-23
    assert b.bound[0, 0] == 8 * 2.0**-20 + 64 * 2.0**-23 * 2
    assert b.bound[1, 0] == 8 * 2.0**-22 + 64 * 2.0**-23 * 0.5
    assert noise_bound(exact, exact, "float64").bound[0, 0] == 2.0**-40 * 2


def sparse_inputs(h=4, sink=None):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, h, 8)).astype(np.float32)
    kv = rng.standard_normal((1, 6, 8)).astype(np.float32)
    idx = np.array([[[0, 1, -1], [2, 3, 4]]])
    return {"q": q, "kv": kv, "attn_sink": np.arange(h, dtype=np.float32) if sink is None else sink,
            "topk_idxs": idx, "softmax_scale": 8 ** -0.5}


def test_a_failure_says_where_how_far_against_what_and_why():
    inputs = sparse_inputs()
    wrong = dict(inputs, attn_sink=np.tile(inputs["attn_sink"][:2], 2))   # heads 2, 3 take heads 0, 1's sinks
    mine = OPS["sparse_attention"].reference(wrong, "float32")["o"]
    with pytest.raises(MismatchError) as e:
        assert_matches(mine, "sparse_attention", inputs, "float32")
    msg = str(e.value)
    assert "sparse_attention.o at float32:" in msg and "elements out of bound" in msg
    assert "worst at [b=0, s=" in msg and ", h=2" in msg or ", h=3" in msg
    assert "x measured noise" in msg and "refimpl at float32 vs float64" in msg
    assert "confined: the out-of-bound elements lie only at axis 2 (h heads) 2-3 of 0..3" in msg
    assert "sinks of the first of 2 groups" in msg
    assert_matches(OPS["sparse_attention"].reference(inputs, "float32")["o"], "sparse_attention", inputs, "float32")


def test_hints_factor_transpose_and_shift():
    rec = OPS["hc_post"]
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((1, 2, 4)).astype(np.float32),
              "residual": rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
              "post": rng.uniform(0, 2, (1, 2, 4)).astype(np.float32),
              "comb": rng.uniform(0, 1, (1, 2, 4, 4)).astype(np.float32)}
    y = rec.reference(inputs, "float64")["y"]
    for wrong, hint in ((y * 0.5, "factor: the result is 0.5 = 2^-1 times"),
                        (np.swapaxes(y, 2, 3), "transpose: the result is the exact one with axes axis 2 (n streams) "
                                               "and axis 3 (c channels) swapped"),
                        (np.roll(y, 1, axis=3), "shift: the result is the exact one shifted by 1 along axis 3")):
        with pytest.raises(MismatchError, match=re.escape(hint)):
            assert_matches(wrong, rec, inputs, "float32")


def test_a_nan_gets_no_transform_hint():
    """NaN where the exact value is finite: said so, and no factor / transpose / shift is claimed."""
    inputs = {"x": np.ones((1, 4), np.float32), "weight": np.ones(4, np.float32), "eps": 1e-6}
    mine = np.array([[1.0, np.nan, 1.0, 1.0]], np.float32)
    with pytest.raises(MismatchError) as e:
        assert_matches(mine, "rms_norm", inputs, "float32")
    msg = str(e.value)
    assert "non-finite: the result holds NaN or inf at 1 of 4 elements" in msg
    assert "confined: the out-of-bound elements lie only at axis 1 (c channels) 1 of 0..3" in msg
    assert "shift" not in msg and "factor" not in msg and "transpose" not in msg
    with pytest.raises(MismatchError) as e:                   # a constant row: a shift would change nothing
        assert_matches(np.array([[1.0, 1.0, 1.0, 0.5]], np.float32), "rms_norm", inputs, "float32")
    assert "shift" not in str(e.value) and "confined" in str(e.value)


def test_wrong_shapes_and_output_counts_are_named():
    inputs = sparse_inputs()
    o = OPS["sparse_attention"].reference(inputs, "float32")["o"]
    with pytest.raises(MismatchError, match=r"shape \(1, 2, 8, 4\), expected \(1, 2, 4, 8\) \(the last two axes swapped"):
        assert_matches(np.swapaxes(o, 2, 3), "sparse_attention", inputs)
    with pytest.raises(MismatchError, match=r"expected 3 outputs \(pre, post, comb\), got tuple of 2"):
        assert_matches((o, o), "split_sinkhorn", {})
    with pytest.raises(MismatchError, match="has no output comb"):
        assert_matches({"pre": o, "post": o}, "split_sinkhorn", {})
    with pytest.raises(ValueError, match="split_sinkhorn: the inputs have no 'mixes'"):
        assert_matches((o, o, o), "split_sinkhorn", {})


# ------------------------------------------------------------------------------------------------ selections

def topk_inputs():
    """One query at position 7 (ratio 4: entries 0, 1 visible), one head, k = 1; keys 0 and 1 equal: a tie."""
    return {"q": np.ones((1, 1, 1, 2), np.float32), "keys": np.array([[[1, 0], [1, 0]]], np.float32),
            "weights": np.ones((1, 1, 1), np.float32), "start_pos": 7, "ratio": 4, "index_topk": 1}


def test_an_exact_tie_goes_to_the_lower_index():
    inputs = topk_inputs()
    scores = np.array([[[1.0, 1.0]]], np.float32)
    assert_matches((np.array([[[0]]]), scores), "index_topk", inputs, "float32")
    with pytest.raises(MismatchError, match="1 exact tie.*resolved to the HIGHER index"):
        assert_matches((np.array([[[1]]]), scores), "index_topk", inputs, "float32")


def test_a_near_tie_may_go_either_way_but_a_clear_margin_may_not():
    inputs = topk_inputs()
    near = dict(inputs, keys=np.array([[[1, 0], [1 + 2.0**-23, 0]]], np.float32))   # entry 1 wins by one ulp
    sc = OPS["index_topk"].reference(near, "float64")["scores"].astype(np.float32)
    assert_matches((np.array([[[0]]]), sc), "index_topk", near, "float32")           # within the scores' bound
    far = dict(inputs, keys=np.array([[[1, 0], [1.5, 0]]], np.float32))
    sc = OPS["index_topk"].reference(far, "float64")["scores"].astype(np.float32)
    with pytest.raises(MismatchError, match="1 of 1 rows choose differently"):
        assert_matches((np.array([[[0]]]), sc), "index_topk", far, "float32")


def test_import_refimpl_does_not_import_hypothesis():
    code = "import sys, refimpl, refimpl.model.transformer, refimpl.oracle.compare; print('hypothesis' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_at_mirror_the_bound_is_mirrors_error_and_bitwise_asks_for_its_bits():
    """An exact product is as close to the exact value as mirror's own error allows: it passes at mirror; with
    bitwise=True it fails (no FP8 activation quantization, no bf16 output)."""
    check_op(candidates.fp8_linear, "fp8_linear", "mirror", max_examples=10, derandomize=True)
    with pytest.raises(MismatchError, match=r"fp8_linear.y at mirror \(bitwise\)"):
        check_op(candidates.fp8_linear, "fp8_linear", "mirror", max_examples=10, derandomize=True, bitwise=True)
    rec = OPS["fp8_linear"]
    check_op(lambda inp: rec.reference(inp, "mirror"), rec, "mirror", max_examples=5, derandomize=True, bitwise=True)
    with pytest.raises(ValueError, match="use it with precision='mirror'"):
        check_op(candidates.fp8_linear, "fp8_linear", "float32", max_examples=1, bitwise=True)
