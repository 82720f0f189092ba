"""Any split of a sequence into prefill chunks and decode steps == one prefill (logits and state).

docs/architecture.md §15 (state, prefill, decode), §19.12, §19.13, §19.29 and §20 (irregular chunkings
must equal one prefill). Bit-identical in float64 and in mirror with the canonical index layout;
within 1e-4 in float32 (one BLAS call per product there, so rows may move in the last bit with
the row count). With the official layout, mirror's decode and prefill differ where the official
code's do (tests/model/test_index_layout.py); with the tiny window of 32 that needs sequences of
~500 tokens, so the canonical layout is what these tests rely on, not the tiny config. Also bad input:
every refusal is a ValueError subclass with a clear message and leaves the given state untouched.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.config import Config
from refimpl.model.state import StateError
from refimpl.formats.weights import load
from refimpl.model.transformer import InputError

TINY = Config.tiny()
V = TINY.vocab_size
EXACT = ("float64", "mirror")
CSA, HCA = (2, 4), (3, 5)


def chunk_model(tiny_model, prec):
    """The model of a chunking test: mirror runs with the canonical layout (decode == prefill bit for bit)."""
    return tiny_model(prec, layout="canonical" if prec == "mirror" else "official")


def tokens(n, seed):
    return np.random.default_rng(seed).integers(0, V, n)


def state_arrays(state):
    """Every array of every layer state, by name (window, compressed, compressor, indexer)."""
    out = {}
    for i, ls in enumerate(state.layers):
        out[f"{i}.window"] = ls.window
        if ls.compressed is not None:
            out[f"{i}.compressed"] = ls.compressed
            out[f"{i}.compressor.kv"] = ls.compressor.kv
            out[f"{i}.compressor.score"] = ls.compressor.score
        if ls.indexer is not None:
            out[f"{i}.indexer.keys"] = ls.indexer.keys
            out[f"{i}.indexer.compressor.kv"] = ls.indexer.compressor.kv
            out[f"{i}.indexer.compressor.score"] = ls.indexer.compressor.score
    return out


def snapshot(state):
    return (state.pos, state.batch, state.precision, state.revision,
            {k: v.copy() for k, v in state_arrays(state).items()})


def assert_same_state(a, b, prec, tol=1e-4):
    """Same position and the same arrays (bit-identical in the exact modes)."""
    assert (a.pos, a.batch, a.precision, a.revision) == (b.pos, b.batch, b.precision, b.revision)
    sa, sb = state_arrays(a), state_arrays(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
        if prec in EXACT:
            assert np.array_equal(sa[k], sb[k]), k
        else:
            assert np.allclose(sa[k], sb[k], rtol=0, atol=tol), k         # -inf rows: same place, same sign


def assert_unchanged(state, snap):
    pos, batch, prec, rev, arrays = snap
    assert (state.pos, state.batch, state.precision, state.revision) == (pos, batch, prec, rev)
    now = state_arrays(state)
    assert now.keys() == arrays.keys()
    for k in arrays:
        assert np.array_equal(now[k], arrays[k]), k


def same(a, b, prec, tol=1e-4):
    return np.array_equal(a, b) if prec in EXACT else np.allclose(a, b, rtol=0, atol=tol)


def run_chunks(model, toks, sizes):
    """Feed toks in chunks; size-1 chunks go through decode(), the others through prefill()."""
    state, out = None, []
    pos = 0
    for n in sizes:
        if n == 1 and state is not None:
            logits, state = model.decode(int(toks[pos]), state)
            out.append(logits[None])
        else:
            logits, state = model.prefill(toks[pos:pos + n], state)
            out.append(logits)
        pos += n
    return np.concatenate(out), state


# ------------------------------------------------------------------------------------------------
# the property

@st.composite
def chunkings(draw, max_len=80):
    """A length <= 80 (half the draws 60..80: past 64 and the top-k boundary 68) and a split of it:
    <= 6 random cuts, then 0..6 single-token decode steps."""
    n = draw(st.integers(1, max_len) | st.integers(60, max_len))
    n_dec = draw(st.integers(0, min(6, n - 1)))
    head = n - n_dec
    cuts = sorted(draw(st.sets(st.integers(1, head - 1), max_size=6))) if head > 1 else []
    bounds = [0] + cuts + [head]
    return [b - a for a, b in zip(bounds, bounds[1:])] + [1] * n_dec


@pytest.mark.parametrize("prec", ["float64", "mirror", "float32"])
@settings(max_examples=6)
@given(sizes=chunkings(), seed=st.integers(0, 2**32 - 1))
def test_any_chunking_equals_one_prefill(tiny_model, prec, sizes, seed):
    """Chunked logits and final state == one prefill (float64, mirror bit-identical; float32 1e-4).

    docs/architecture.md §15, §20.
    """
    model = chunk_model(tiny_model, prec)
    toks = tokens(sum(sizes), seed)
    whole, state_whole = model.prefill(toks)
    got, state = run_chunks(model, toks, sizes)
    assert got.shape == whole.shape
    assert same(got, whole, prec), sizes
    assert_same_state(state, state_whole, prec)


IRREGULAR = [
    [3, 2, 1, 3, 1, 1, 5, 16, 1, 1, 1, 2, 31, 1, 1, 1, 10],     # 80: crosses 4, 8, 16, 32, 64, 68
    [31, 1, 1, 1, 30, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],   # decode across 32, 64, 68
    [67, 1, 1, 1, 1, 1],                                         # the index_topk boundary by decode
]


@pytest.mark.parametrize("prec", EXACT)
@pytest.mark.parametrize("sizes", IRREGULAR, ids=["mixed", "decode-boundaries", "topk-boundary"])
def test_irregular_chunkings_bit_identical(tiny_model, prec, sizes):
    """docs/architecture.md §20: chunks of 3, 2, 1, 3 ... and token-by-token decode across every tiny threshold."""
    model = chunk_model(tiny_model, prec)
    toks = tokens(sum(sizes), sum(sizes) + len(sizes))
    whole, state_whole = model.prefill(toks)
    got, state = run_chunks(model, toks, sizes)
    assert np.array_equal(got, whole)
    assert_same_state(state, state_whole, prec)


# ------------------------------------------------------------------------------------------------
# known field bugs

@pytest.mark.parametrize("prec", EXACT)
def test_overlap_kept_when_decoding_after_prefill(tiny_model, prec):
    """Prefill 6, decode to 12: the ratio-4 entries 1, 2 (made by decode) == a 12-token prefill's.

    docs/architecture.md §19.13.
    """
    model = chunk_model(tiny_model, prec)
    toks = tokens(12, 8)
    whole, sw = model.prefill(toks)
    logits, state = model.prefill(toks[:6])
    steps = [logits]
    for p in range(6, 12):
        lg, state = model.decode(int(toks[p]), state)
        steps.append(lg[None])
    for layer in CSA:
        a, b = state.layers[layer], sw.layers[layer]
        assert a.compressed.shape == (1, 3, TINY.head_dim)
        assert np.array_equal(a.compressed, b.compressed), layer
        assert np.array_equal(a.indexer.keys, b.indexer.keys), layer
    assert np.array_equal(np.concatenate(steps), whole)
    assert_same_state(state, sw, prec)


@pytest.mark.parametrize("prec", EXACT)
@pytest.mark.parametrize("m", [4, 16])
def test_first_entry_at_exactly_ratio_tokens(tiny_model, prec, m):
    """Prefill m-1 then decode token m: entry 0 (and the logits) == an m-token prefill's.

    docs/architecture.md §19.12.
    """
    model = chunk_model(tiny_model, prec)
    toks = tokens(m, 12 + m)
    whole, sw = model.prefill(toks)
    _, state = model.prefill(toks[:m - 1])
    layers = CSA if m == 4 else HCA
    for layer in layers:
        assert state.layers[layer].compressed.shape[1] == 0            # nothing before the block completes
    last, state = model.decode(int(toks[m - 1]), state)
    for layer in layers:
        got = state.layers[layer].compressed
        assert got.shape == (1, 1, TINY.head_dim)
        assert np.array_equal(got, sw.layers[layer].compressed), layer
        if m == 4:
            assert np.array_equal(state.layers[layer].indexer.keys, sw.layers[layer].indexer.keys)
    assert np.array_equal(last, whole[-1])
    assert_same_state(state, sw, prec)


@pytest.mark.parametrize("prec", EXACT)
def test_new_short_sequence_does_not_see_the_previous_one(tiny_ckpt, tiny_model, prec):
    """After a long sequence, a new 2-token prompt decoded past 4 == a fresh model's run.

    docs/architecture.md §19.29.
    """
    model = chunk_model(tiny_model, prec)
    _, old = model.prefill(tokens(50, 20))
    old_snap = snapshot(old)
    new = tokens(8, 21)
    fresh = load(tiny_ckpt, precision=prec, layout=model.layout)
    want = fresh.forward(new)
    for start in (None, model.new_state()):
        logits, state = model.prefill(new[:2], start)
        got = [logits]
        for p in range(2, 8):
            lg, state = model.decode(int(new[p]), state)
            got.append(lg[None])
        assert np.array_equal(np.concatenate(got), want)
        _, sf = fresh.prefill(new)
        assert_same_state(state, sf, prec)
    assert_unchanged(old, old_snap)


def test_state_is_a_value_calls_never_write_into_it(tiny_model):
    """Prefill/decode return a new state; the one given stays as it was (restorable).

    docs/architecture.md §15, §19.29.
    """
    model = tiny_model("mirror")
    toks = tokens(40, 30)
    _, s20 = model.prefill(toks[:20])
    snap = snapshot(s20)
    a, _ = model.prefill(toks[20:], s20)
    assert_unchanged(s20, snap)
    b, _ = model.prefill(toks[20:], s20)                     # the same saved state, reused
    assert np.array_equal(a, b)
    model.decode(int(toks[20]), s20)
    assert_unchanged(s20, snap)


# ------------------------------------------------------------------------------------------------
# bad input

def test_token_ids_outside_vocabulary(tiny_model):
    """Ids must lie in [0, vocab): InputError (a ValueError) naming the id, state untouched."""
    model = tiny_model("float64")
    for bad in ([0, V], [-1, 3], [[1, 2], [3, V + 5]]):
        with pytest.raises(InputError, match="outside the vocabulary"):
            model.forward(bad)
    _, state = model.prefill([1, 2, 3])
    snap = snapshot(state)
    with pytest.raises(ValueError, match=f"token id {V} .*vocabulary"):
        model.decode(V, state)
    with pytest.raises(ValueError, match="vocabulary"):
        model.prefill([5, -2], state)
    assert_unchanged(state, snap)
    with pytest.raises(ValueError, match="integers"):
        model.forward([1.5, 2.0])


def test_non_integer_token_ids_are_refused_not_coerced(tiny_model):
    """Floats, bools and strings never run as other ids ([1.7, 15.2] as [1, 15], "0152" as [0, 1, 5, 2])."""
    model = tiny_model("float64")
    _, state = model.prefill([1, 2, 3])
    snap = snapshot(state)
    for bad in ([1.7, 15.2], [1, True], [[1, 2], [3, 2.0]], "0152", [1, "2"], [[1, 2], [3]], [1, None],
                np.array([True, False])):
        with pytest.raises(InputError, match="integers"):
            model.forward(bad)
        with pytest.raises(InputError, match="integers"):
            model.prefill(bad, state)
    for bad in (True, 4.0, [4, False], "4"):
        with pytest.raises(InputError, match="integers"):
            model.decode(bad, state)
    assert_unchanged(state, snap)
    assert np.array_equal(model.forward([np.int32(1), 15]), model.forward(np.array([1, 15], np.uint16)))


def test_edited_state_is_refused(tiny_model):
    """A State edited by hand to a negative or inconsistent position (or batch) is a StateError."""
    import dataclasses
    model = tiny_model("float64")
    _, state = model.prefill(tokens(9, 8))
    for change in ({"pos": -1}, {"pos": 2.0}, {"pos": True}, {"batch": 0}):
        with pytest.raises(StateError, match="pos|batch"):
            dataclasses.replace(state, **change)
    moved = dataclasses.replace(state, pos=12)           # 9 tokens made 2 CSA entries; 12 would make 3
    with pytest.raises(StateError, match=r"layer 2: compressed of shape \(1, 2, 128\) does not fit .* position 12"):
        model.decode(5, moved)
    with pytest.raises(StateError, match="layers"):
        model.decode(5, dataclasses.replace(state, layers=state.layers[:3]))
    with pytest.raises(StateError, match="batch"):
        model.new_state(batch=1.5)
    recast = dataclasses.replace(state.layers[0], window=state.layers[0].window.astype(np.int32))
    with pytest.raises(StateError, match=r"layer 0: window of dtype int32 does not fit a float64 state"):
        model.decode(5, dataclasses.replace(state, layers=(recast,) + state.layers[1:]))


def test_empty_input(tiny_model):
    """An empty sequence is refused (InputError), from an empty or a running state."""
    model = tiny_model("float64")
    with pytest.raises(InputError, match="empty"):
        model.forward([])
    with pytest.raises(InputError, match="empty"):
        model.forward(np.zeros((2, 0), np.int64))
    _, state = model.prefill([1, 2])
    snap = snapshot(state)
    with pytest.raises(ValueError, match="empty"):
        model.prefill(np.array([], np.int64), state)
    assert_unchanged(state, snap)


def test_max_seq_len_prefill_and_decode(tiny_ckpt):
    """A load option: sequences and decode steps past max_seq_len are refused with the option named."""
    model = load(tiny_ckpt, precision="float64", max_seq_len=8)
    toks = tokens(9, 40)
    with pytest.raises(InputError, match="max_seq_len=8"):
        model.forward(toks)
    logits, state = model.prefill(toks[:8])                 # exactly 8 is fine
    assert logits.shape == (8, V)
    snap = snapshot(state)
    with pytest.raises(InputError, match="max_seq_len"):
        model.decode(int(toks[8]), state)
    assert_unchanged(state, snap)
    _, s5 = model.prefill(toks[:5])
    with pytest.raises(ValueError, match="exceeds"):
        model.prefill(toks[:4], s5)


def test_state_from_another_precision_revision_or_batch(tiny_model):
    """A state belongs to one precision, revision and batch size: StateError (a ValueError) otherwise."""
    f64, mirror, initial = tiny_model("float64"), tiny_model("mirror"), tiny_model("float64", "initial")
    _, s_mirror = mirror.prefill([1, 2, 3])
    snap = snapshot(s_mirror)
    with pytest.raises(StateError, match="precision 'mirror'"):
        f64.decode(4, s_mirror)
    with pytest.raises(ValueError, match="precision"):
        f64.prefill([4, 5], s_mirror)
    assert_unchanged(s_mirror, snap)
    _, s_init = initial.prefill([1, 2, 3])
    with pytest.raises(StateError, match="revision 'initial'"):
        f64.decode(4, s_init)
    _, s1 = f64.prefill([1, 2, 3])
    snap1 = snapshot(s1)
    with pytest.raises(StateError, match="holds 1 sequences, the input 2"):
        f64.decode(np.array([4, 5]), s1)
    with pytest.raises(StateError, match="sequences"):
        f64.prefill([[4], [5]], s1)
    _, s2 = f64.prefill([[1, 2], [3, 4]])
    with pytest.raises(StateError, match="holds 2 sequences"):
        f64.decode(4, s2)
    assert_unchanged(s1, snap1)
    with pytest.raises(StateError, match="expected a refimpl State"):
        f64.decode(4, {"pos": 3})


def test_state_from_another_configuration(tiny_model):
    """A state made for another Config (here index_topk 8) is refused: StateError naming the configuration."""
    from refimpl.model.state import State
    model = tiny_model("float64")
    other = State.empty(TINY.replace(index_topk=8), 1, "float64", "current", weights_id=model.weights_id)
    with pytest.raises(StateError, match="another configuration"):
        model.prefill([1, 2, 3], other)
    assert other.pos == 0 and all(ls.window.sum() == 0 for ls in other.layers)


def test_state_from_another_checkpoint_is_refused(tiny_model, tmp_path):
    """A state made over other weights of the same config (here seed 1's) is refused, not decoded: the
    model's identity covers a fingerprint of its weights, also for a Model built by hand from ModelWeights."""
    from refimpl.model.transformer import Model
    from refimpl.synthetic.writer import make_checkpoint
    make_checkpoint(TINY, tmp_path / "seed1", seed=1, progress=False)
    seed0, seed1 = tiny_model("float64"), load(tmp_path / "seed1", precision="float64")
    assert seed0.config_id == seed1.config_id and seed0.weights_id != seed1.weights_id
    _, s1 = seed1.prefill([1, 2, 3])
    with pytest.raises(StateError, match="other weights .*another checkpoint"):
        seed0.decode(4, s1)
    with pytest.raises(StateError, match="other weights"):
        seed0.prefill([4, 5], s1)
    by_hand = Model(TINY, seed0.weights, precision="float64")          # the same weights: the same identity
    _, s0 = seed0.prefill([1, 2, 3])
    assert by_hand.weights_id == seed0.weights_id and same(by_hand.decode(4, s0)[0], seed0.decode(4, s0)[0], "float64")
    with pytest.raises(StateError, match="other weights"):
        Model(TINY, seed1.weights, precision="float64").decode(4, s0)


@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_state_arrays_are_read_only(tiny_model, prec):
    """Every array of a state (fresh, from prefill, from decode) is read-only: an edit in place raises
    instead of being decoded (it made every logit 0.0), and the model never needs to write into one."""
    import copy
    import dataclasses
    import pickle
    model = chunk_model(tiny_model, prec)
    _, state = model.prefill(tokens(9, 3))                   # 9 tokens: every kind of layer holds entries
    for st in (model.new_state(), state, model.decode(5, state)[1]):
        arrays = state_arrays(st)
        assert arrays and not any(a.flags.writeable for a in arrays.values())
    snap = snapshot(state)
    for a in state_arrays(state).values():
        with pytest.raises(ValueError, match="read-only"):
            a[...] = 0
        with pytest.raises(ValueError, match="read-only"):
            a.reshape(-1)[0] = 1
    assert_unchanged(state, snap)
    logits, _ = model.decode(5, state)                        # decode == one prefill (canonical layout in mirror)
    assert np.array_equal(logits, model.forward(np.append(tokens(9, 3), 5))[-1])
    mine = state.layers[0].window.copy()                      # a State built by hand views the arrays it is
    edited = dataclasses.replace(state, layers=(dataclasses.replace(state.layers[0], window=mine),)
                                 + state.layers[1:])
    assert mine.flags.writeable and not edited.layers[0].window.flags.writeable   # given; theirs stay as they were
    for again in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):     # rebuilt without __init__
        assert not any(a.flags.writeable for a in state_arrays(again).values())
        assert np.array_equal(model.decode(5, again)[0], logits)


def test_arguments_of_the_wrong_kind_are_value_errors(tiny_model):
    """A trace that is no Recording, mtp that is no bool, decode without a state, a Model without a Config or
    ModelWeights: a ValueError subclass naming the argument (they were AttributeError / TypeError)."""
    from refimpl.config import ConfigError
    from refimpl.model.transformer import Model
    model = tiny_model("float64")
    for trace in ("x", [], [["embed"]], {"embed": []}):
        with pytest.raises(InputError, match="trace must be None or a Recording"):
            model.forward([1, 2], trace=trace)
        with pytest.raises(InputError, match="trace must be"):
            model.prefill([1, 2], trace=trace)
    with pytest.raises(InputError, match="mtp must be True or False"):
        model.forward([1, 2], mtp="yes")
    with pytest.raises(StateError, match="decode needs the state"):
        model.decode(1, None)
    with pytest.raises(ConfigError, match="Config"):
        Model(None, model.weights)
    with pytest.raises(InputError, match="ModelWeights"):
        Model(TINY, None)


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["float64", "mirror", "float32"])
def test_long_sequence_random_chunks_slow(tiny_model, prec):
    """Random chunks and decode runs == one prefill.

    docs/architecture.md §20 at length 300 (many HCA entries, top-k dropping 60 of 75).
    """
    rng = np.random.default_rng(77)
    toks = tokens(300, 77)
    sizes, left = [], 300
    while left:
        n = int(min(left, rng.choice([1, 1, 1, 2, 3, 5, 17, 40])))
        sizes.append(n)
        left -= n
    model = chunk_model(tiny_model, prec)
    whole, sw = model.prefill(toks)
    got, state = run_chunks(model, toks, sizes)
    assert same(got, whole, prec)
    assert_same_state(state, sw, prec)
