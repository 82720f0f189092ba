"""Tests of refimpl.model.indexer: index scores, top-k with -1 padding, Hadamard, the selection on the tiny model.

docs/architecture.md §9; watch points §19.8, §19.12, §19.24, §19.30, §19.35.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import numerics as nx
from refimpl.config import Config
from refimpl.model.indexer import index_scores
from refimpl.oracle.trace import Trace

TINY = Config.tiny()
CSA_LAYERS = (2, 4)


def test_index_scores_hand_worked():
    """Scores: I[e] = Σ_h w[h] · ReLU(q[h] · K[e])."""
    q = np.array([[1.0, 0.0], [0.0, 1.0]])                      # 2 heads, dim 2
    keys = np.array([[1.0, 1.0], [-1.0, 2.0], [2.0, -3.0]])     # 3 entries
    w = np.array([0.5, 2.0])
    # q·K = [[1, -1, 2], [1, 2, -3]] -> ReLU -> [[1, 0, 2], [1, 2, 0]] -> weighted sum over heads
    assert np.array_equal(index_scores(q, keys, w, "float64"), [2.5, 4.0, 1.0])
    # without the ReLU the negative products would count: -0.5+4 = 3.5 for entry 1
    assert index_scores(q, keys, w, "float64")[1] != 3.5


def test_top_k_ties_lower_index_wins_and_descending_order():
    """docs/architecture.md §19.24 (our rule): top-k is descending, ties go to the lower index."""
    x = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -np.inf])
    assert nx.top_k(x, 3).tolist() == [1, 2, 4]
    assert nx.top_k(x, 4).tolist() == [1, 2, 4, 3]
    assert nx.top_k(np.zeros(5), 2).tolist() == [0, 1]
    assert nx.top_k(np.array([[0.0, 5.0, 5.0], [7.0, 7.0, 1.0]]), 1).tolist() == [[1], [0]]


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), heads=st.integers(1, 8), n=st.integers(1, 20),
       j=st.sampled_from([32, 64, 128]))
def test_hadamard_on_q_and_keys_leaves_scores_unchanged(seed, heads, n, j):
    """Hadamard: (qH)·(KH) = q·K (H/sqrt(n) orthogonal), so with FP4 off (float64) the rotation is invisible."""
    rng = np.random.default_rng(seed)
    q, keys = rng.standard_normal((heads, j)), rng.standard_normal((n, j))
    w = rng.uniform(0.1, 1, heads)
    plain = index_scores(q, keys, w, "float64")
    rotated = index_scores(nx.hadamard(q, prec="float32"), nx.hadamard(keys, prec="float32"), w, "float64")
    assert np.allclose(rotated, plain, rtol=1e-10, atol=1e-10)


def test_hadamard_on_query_only_changes_scores():
    """docs/architecture.md §19.8: a key left unrotated while the query is rotated gives (Hq)·k, a different score."""
    rng = np.random.default_rng(1)
    q, keys, w = rng.standard_normal((8, 128)), rng.standard_normal((20, 128)), rng.uniform(0.1, 1, 8)
    plain = index_scores(q, keys, w, "float64")
    assert not np.allclose(index_scores(nx.hadamard(q, prec="float32"), keys, w, "float64"), plain, rtol=1e-3)


def test_index_scores_mirror_are_bf16_values():
    """Scores: einsum, ReLU, weighting and head sum are bf16 tensors in the official code."""
    rng = np.random.default_rng(0)
    q = nx.round_bf16(rng.standard_normal((16, 128)))
    keys = nx.round_bf16(rng.standard_normal((9, 128)))
    w = nx.round_bf16(rng.uniform(0, 0.1, 16))
    s = index_scores(q, keys, w, "mirror")
    assert s.dtype == np.float32 and np.array_equal(s, nx.round_bf16(s))
    assert np.allclose(s, index_scores(q.astype(np.float64), keys, w, "float64"), rtol=2**-6, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# the indexer inside the tiny model

def indexer_trace(model, n):
    t = Trace(("layers.*.attn.indexer.*",))
    model.forward(np.random.default_rng(n).integers(0, TINY.vocab_size, n), trace=t)
    return t


def vis(topk_row):
    return "".join("." if v < 0 else "x" for v in topk_row)


@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_topk_padding_drawn_prefill_of_10(tiny_model, prec):
    """Width min(16, 10//4) = 2; query t sees entries e with 4(e+1) <= t+1, -1 elsewhere.

    docs/architecture.md §19.10, §19.12.
    """
    t = indexer_trace(tiny_model(prec), 10)
    for layer in CSA_LAYERS:
        topk = t.tensors[f"layers.{layer}.attn.indexer.topk"]
        drawn = [vis(r) for r in topk]
        assert drawn == ["..", "..", "..",                      # t = 0..2: no entry yet
                         "x.", "x.", "x.", "x.",                # t = 3..6: entry 0
                         "xx", "xx", "xx"]                      # t = 7..9: entries 0, 1
        assert topk[3:7, 0].tolist() == [0] * 4
        assert all(sorted(r) == [0, 1] for r in topk[7:].tolist())
        scores = t.tensors[f"layers.{layer}.attn.indexer.scores"]
        assert scores.shape == (10, 2)
        for q in range(10):
            visible = (q + 1) // 4
            assert np.all(np.isneginf(scores[q, visible:])) and np.all(np.isfinite(scores[q, :visible]))


@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_topk_drops_entries_past_index_topk(tiny_model, prec):
    """From t = 67 on, more than index_topk = 16 entries are visible and the best 16 are kept.

    docs/architecture.md §19.35.
    """
    n = 100
    t = indexer_trace(tiny_model(prec), n)
    for layer in CSA_LAYERS:
        topk = t.tensors[f"layers.{layer}.attn.indexer.topk"]
        scores = t.tensors[f"layers.{layer}.attn.indexer.scores"]
        assert topk.shape == (n, TINY.index_topk) and scores.shape == (n, n // 4)
        for q in range(n):
            visible = (q + 1) // 4
            k = min(visible, TINY.index_topk)
            row = topk[q]
            assert np.all(row[k:] == -1) and np.all(row[:k] >= 0), q          # no -1 once 16 are visible
            assert len(set(row[:k].tolist())) == k and np.all(row[:k] < visible)
            # the kept ones are the top-k scores, descending, lower index first on ties
            assert row[:k].tolist() == nx.top_k(scores[q, :visible], k).tolist(), q
        assert np.all(topk[63:] >= 0) and np.any(topk[62] < 0)
        dropped = [set(range((q + 1) // 4)) - set(topk[q].tolist()) for q in range(67, n)]
        assert all(len(d) == (q + 1) // 4 - 16 for d, q in zip(dropped, range(67, n)))
        assert any(set(topk[q].tolist()) != set(range(16)) for q in range(67, n))   # not just a prefix


def test_decode_step_selection_matches_prefill(tiny_model):
    """Decode: the step's top-k (no -1 once >= 16 visible) equals the prefill's row for that position."""
    model = tiny_model("float64")
    toks = np.random.default_rng(100).integers(0, TINY.vocab_size, 100)
    full = indexer_trace(model, 100)
    _, state = model.prefill(toks[:99])
    t = Trace(("layers.*.attn.indexer.*",))
    model.prefill(toks[99:], state, trace=t)
    for layer in CSA_LAYERS:
        assert np.array_equal(t.tensors[f"layers.{layer}.attn.indexer.topk"][0],
                              full.tensors[f"layers.{layer}.attn.indexer.topk"][99])
