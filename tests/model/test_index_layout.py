"""The index layout of each call type, and what it does to mirror's decode == prefill.

docs/architecture.md §15. The official code lays out a query's window part differently in its two
calls: a prefill from position 0 of s tokens min(s, W) wide, a decode step always W wide (the ring
slots oldest first, -1 padded while t < W-1), each followed by the compressed part. Its sparse
attention kernel rounds per block of 64 entries, so where the layouts put entries in different
blocks, the official decode and prefill differ in the last bits, and mirror follows them
(layout="official"). layout="canonical" gives every call the decode layout: decode == prefill ==
any chunking bit for bit in mirror too. float64 does not depend on the layout.

The model tests use the tiny config with W = 128 (two blocks of window) and 3 layers: window-only,
CSA (ratio 4, top-16), HCA (ratio 16). With the tiny default W = 32 every index set below ~500
tokens lies in one block, and the two layouts agree there.
"""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import Config
from refimpl.formats.weights import load
from refimpl.model.attention import compressed_indices, window_indices, window_width
from refimpl.model.state import StateError
from refimpl.model.transformer import Model
from refimpl.synthetic.writer import make_checkpoint

W128 = Config.tiny().replace(window_size=128, n_layers=3, n_hash_layers=1, compress_ratios=(0, 4, 16, 0))


# ------------------------------------------------------------------------------------------------
# the layouts against a transcription of the official index builders

def official_window_topk_idxs(window_size, seqlen, start_pos):
    """NumPy transcription of get_window_topk_idxs (M:L255-266), batch axis left out."""
    if start_pos >= window_size - 1:
        start_pos %= window_size
        return np.concatenate([np.arange(start_pos + 1, window_size), np.arange(0, start_pos + 1)])[None]
    if start_pos > 0:
        return np.pad(np.arange(start_pos + 1), (0, window_size - start_pos - 1), constant_values=-1)[None]
    base = np.arange(seqlen)[:, None]
    matrix = np.clip(base - window_size + 1, 0, None) + np.arange(min(seqlen, window_size))
    return np.where(matrix > base, -1, matrix)


def official_compress_topk_idxs(ratio, seqlen, start_pos):
    """NumPy transcription of get_compress_topk_idxs (M:L269-276) with offset 0."""
    if start_pos > 0:
        return np.arange(0, (start_pos + 1) // ratio)[None]
    matrix = np.tile(np.arange(seqlen // ratio), (seqlen, 1))
    return np.where(matrix >= np.arange(1, seqlen + 1)[:, None] // ratio, -1, matrix)


def positions(idx, first):
    return np.where(idx >= 0, idx + first, -1)


@settings(max_examples=80)
@given(window=st.integers(2, 200), s=st.integers(1, 300))
def test_official_prefill_layout_is_the_official_one(window, s):
    """(W >= 2: with W = 1 the official builder takes its decode branch for a prefill too, 0 >= W-1.)"""
    idx, n_prev = window_indices(0, s, window, "official")
    assert n_prev == 0 and np.array_equal(idx, official_window_topk_idxs(window, s, 0))
    assert np.array_equal(compressed_indices(0, s, 4), official_compress_topk_idxs(4, s, 0))


@settings(max_examples=80)
@given(window=st.integers(1, 200), t=st.integers(1, 600))
def test_official_decode_layout_is_the_ring_in_age_order(window, t):
    """Decode at position t: the official ring slots, mapped to the positions they hold, oldest first."""
    slots = official_window_topk_idxs(window, 1, t)[0]                       # [W] ring slots
    held = np.where(slots >= 0, t - (t - slots) % window, -1)                # latest position p <= t in each slot
    idx, n_prev = window_indices(t, 1, window, "official")
    assert idx.shape == (1, window)
    assert np.array_equal(positions(idx[0], t - n_prev), held)
    assert np.array_equal(compressed_indices(t, 1, 16), official_compress_topk_idxs(16, 1, t))


def test_layout_literals():
    """W = 4. official prefill: min(s, W) wide; decode (and any call from p > 0): W wide; canonical: W wide."""
    assert window_indices(0, 2, 4, "official")[0].tolist() == [[0, -1], [0, 1]]
    assert window_indices(0, 2, 4, "canonical")[0].tolist() == [[0, -1, -1, -1], [0, 1, -1, -1]]
    assert window_indices(1, 1, 4, "official")[0].tolist() == [[0, 1, -1, -1]]            # t = 1 < W-1
    assert window_indices(2, 3, 4, "official")[0].tolist() == [[0, 1, 2, -1], [0, 1, 2, 3], [1, 2, 3, 4]]
    assert [window_width(0, s, 4, "official") for s in (1, 3, 4, 9)] == [1, 3, 4, 4]
    assert [window_width(p, s, 4, lay) for p, s, lay in ((5, 1, "official"), (5, 7, "official"),
                                                        (0, 1, "canonical"))] == [4, 4, 4]
    with pytest.raises(ValueError, match="layout"):
        window_width(0, 2, 4, "dense")


# ------------------------------------------------------------------------------------------------
# decode vs prefill in a model with W = 128

@pytest.fixture(scope="module")
def w128(tmp_path_factory):
    path = tmp_path_factory.mktemp("w128") / "ckpt"
    make_checkpoint(W128, path, seed=3, progress=False)
    models = {}

    def get(precision="mirror", layout="official"):
        if (precision, layout) not in models:
            models[precision, layout] = load(path, precision=precision, layout=layout)
        return models[precision, layout]
    return get


TOKS = np.random.default_rng(11).integers(0, W128.vocab_size, 134)


def prefill_then_decode(model, n_prefill, n_decode):
    logits, state = model.prefill(TOKS[:n_prefill])
    out = [logits]
    for p in range(n_prefill, n_prefill + n_decode):
        lg, state = model.decode(int(TOKS[p]), state)
        out.append(lg[None])
    return np.concatenate(out), state


def same_rows(a, b):
    return [bool(np.array_equal(x, y)) for x, y in zip(a, b)]


def test_mirror_official_decode_differs_from_prefill_where_the_layouts_do(w128):
    """Prefill 40, decode 8 vs one prefill of 48. Positions 0..39: both prefills lay out 40 or 48
    window entries, then at most 12 compressed ones: every set lies in the first block of 64, so
    they agree. Positions 40..47: the decode layout puts the compressed entries at 128.., in a
    later block than the prefill's 48..: every decoded position differs (as the official code's)."""
    model = w128("mirror", "official")
    got, _ = prefill_then_decode(model, 40, 8)
    whole = model.forward(TOKS[:48])
    assert same_rows(got, whole) == [True] * 40 + [False] * 8
    assert np.allclose(got, whole, rtol=0, atol=0.05 * np.abs(whole).max())    # last-bit effects only


def test_mirror_official_decode_after_a_prefill_of_at_least_w_equals_one_prefill(w128):
    """A prefill of s >= W tokens lays out W entries for every query, as decode does."""
    model = w128("mirror", "official")
    got, state = prefill_then_decode(model, 130, 3)
    whole, state_whole = model.prefill(TOKS[:133])
    assert np.array_equal(got, whole)
    for a, b in zip(state.layers, state_whole.layers):
        assert np.array_equal(a.window, b.window) and (a.compressed is None or np.array_equal(a.compressed, b.compressed))


def test_mirror_official_chunk_from_a_nonzero_position_equals_decoding_it(w128):
    """The official code has no multi-token call from p > 0; refimpl gives one the decode layout."""
    model = w128("mirror", "official")
    logits, state = model.prefill(TOKS[:40])
    chunk, _ = model.prefill(TOKS[40:48], state)
    decoded, _ = prefill_then_decode(model, 40, 8)
    assert np.array_equal(chunk, decoded[40:])


def test_mirror_official_rows_depend_on_the_prefill_length_only_through_min_s_w(w128):
    """Row-count independence within a call type: prefills of 130 and 134 (both >= W) agree on every
    common position; prefills of 60 and 100 (widths 60 and 100) do not, the canonical layout does."""
    model = w128("mirror", "official")
    assert np.array_equal(model.forward(TOKS[:130]), model.forward(TOKS[:134])[:130])
    assert not all(same_rows(model.forward(TOKS[:60]), model.forward(TOKS[:100])))
    canonical = w128("mirror", "canonical")
    assert np.array_equal(canonical.forward(TOKS[:60]), canonical.forward(TOKS[:100])[:60])


def test_mirror_canonical_decode_and_any_chunking_equal_one_prefill(w128):
    model = w128("mirror", "canonical")
    whole, state_whole = model.prefill(TOKS[:48])
    got, state = prefill_then_decode(model, 40, 8)
    assert np.array_equal(got, whole)
    parts, st_ = [], None
    for a, b in ((0, 13), (13, 14), (14, 34), (34, 40), (40, 41), (41, 48)):
        lg, st_ = model.prefill(TOKS[a:b], st_)
        parts.append(lg)
    assert np.array_equal(np.concatenate(parts), whole)
    for a, b in zip((state, st_), (state_whole, state_whole)):
        assert all(np.array_equal(x.window, y.window) for x, y in zip(a.layers, b.layers))


def test_float64_does_not_depend_on_the_layout(w128):
    official, canonical = w128("float64", "official"), w128("float64", "canonical")
    got, _ = prefill_then_decode(official, 40, 8)
    whole = official.forward(TOKS[:48])
    assert np.array_equal(got, whole)
    assert np.allclose(canonical.forward(TOKS[:48]), whole, rtol=0, atol=1e-12)


def test_a_state_belongs_to_one_layout(w128):
    _, state = w128("float64", "official").prefill(TOKS[:5])
    with pytest.raises(StateError, match="layout 'official'"):
        w128("float64", "canonical").decode(7, state)
    with pytest.raises(StateError, match="layout"):
        dataclasses.replace(state, layout="dense")
    with pytest.raises(ValueError, match="unknown index layout 'dense'"):
        Model(W128, w128("float64").weights, precision="float64", layout="dense")
