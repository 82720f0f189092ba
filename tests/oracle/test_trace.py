"""trace.py: the NaN/Inf check at every site, and traces that hold the same sites in one call or in chunks."""
import numpy as np
import pytest

from refimpl.config import Config
from refimpl.context import RunContext
from refimpl.oracle.trace import Trace, run_trace
from refimpl.sites import NonFiniteError, check_finite, record, site_names

TINY = Config.tiny()
EXACT = ("float64", "mirror")          # chunking-invariant modes (mirror: canonical layout): bit-identical sites


def test_check_finite_names_the_site_layer_and_first_index():
    x = np.zeros((1, 4, 3), np.float32)
    x[0, 2, 1] = np.nan
    x[0, 3, 0] = -np.inf
    with pytest.raises(NonFiniteError, match=r"site 'layers\.3\.attn\.out' \(layer 3\): 1 NaN, 1 Inf of 12, "
                                             r"the first at index \(0, 2, 1\)"):
        record(RunContext(Config.tiny(), "float64"), "layers.3.attn.out", x)   # checked even when nothing is recorded
    check_finite("layers.3.ffn.expert_ids", np.full((1, 2), -1, np.int32))   # integer sites: nothing to check


@pytest.mark.parametrize("where", [0, 4 * 7 - 1, 3 * 7 + 2])
def test_check_finite_in_slices_finds_a_value_in_any_slice(monkeypatch, where):
    """A contiguous site is checked a slice at a time (no mask of its size): a NaN in the first, a middle or
    the last, partial slice is found; a strided view (checked whole) too."""
    import refimpl.sites as sites
    monkeypatch.setattr(sites, "CHECK_ELEMENTS", 5)
    x = np.zeros((1, 4, 7), np.float32)
    check_finite("logits", x)
    x.reshape(-1)[where] = np.nan
    with pytest.raises(NonFiniteError, match="1 NaN, 0 Inf of 28"):
        check_finite("logits", x)
    with pytest.raises(NonFiniteError, match="1 NaN, 0 Inf of 28"):
        check_finite("logits", np.asfortranarray(x))
    check_finite("logits", x[:, :, ::7][:, :, :0])                      # an empty view: nothing to find


def test_check_finite_hidden_entries_must_be_exactly_minus_inf():
    """The indexer scores hold -inf where an entry is not visible, and only there."""
    hidden = np.array([[False, True], [False, False]])
    ok = np.array([[[0.5, -np.inf], [1.0, 2.0]]])
    check_finite("layers.2.attn.indexer.scores", ok, hidden=hidden)
    for bad in ([[[0.5, np.nan], [1.0, 2.0]]],              # NaN where -inf belongs
                [[[0.5, 3.0], [1.0, 2.0]]],                 # a score where the entry is not visible
                [[[0.5, -np.inf], [-np.inf, 2.0]]]):        # -inf for a visible entry
        with pytest.raises(NonFiniteError, match="indexer.scores' \\(layer 2\\)"):
            check_finite("layers.2.attn.indexer.scores", np.array(bad), hidden=hidden)


def test_trace_patterns_must_be_a_tuple_not_a_str():
    with pytest.raises(ValueError, match="tuple of glob strings"):
        Trace("logits")                                   # would otherwise be ('l', 'o', 'g', ...): records nothing


def test_trace_of_mtp_layer_sites_runs_the_mtp_block(tiny_model):
    """Asking for the MTP block's sites (layer n_layers) records them, not an empty trace."""
    t = run_trace(tiny_model("float64"), [0, 5, 9, 2], patterns=(f"layers.{TINY.n_layers}.*",))
    assert f"layers.{TINY.n_layers}.attn.q" in t.tensors and f"layers.{TINY.n_layers}.out" in t.tensors
    assert t.tensors[f"layers.{TINY.n_layers}.out"].shape == (3, TINY.hc_mult, TINY.dim)


@pytest.mark.parametrize("prec", EXACT)
def test_chunked_trace_holds_every_site_of_one_forward(tiny_model, prec):
    """Chunks crossing the ratio-4 and ratio-16 boundaries: the same site names, shapes and (exact modes) bits."""
    model = tiny_model(prec, layout="canonical")
    toks = [int(t) for t in np.random.default_rng(3).integers(0, TINY.vocab_size, 21)]
    one = run_trace(model, toks)
    chunked = run_trace(model, toks, chunks=[3, 5, 1, 9, 3])
    assert sorted(chunked.tensors) == sorted(one.tensors)
    assert {f"layers.2.attn.indexer.scores", "mtp.logits", f"layers.{TINY.n_layers}.out"} <= set(one.tensors)
    for name, a in one.tensors.items():
        b = chunked.tensors[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert chunked.metadata["chunks"] == [3, 5, 1, 9, 3] and one.metadata["chunks"] == [21]
    assert {k: v for k, v in chunked.metadata.items() if k != "chunks"} == \
           {k: v for k, v in one.metadata.items() if k != "chunks"}


def test_run_trace_refuses_bad_chunks_and_tokens(tiny_model):
    model = tiny_model("float64")
    with pytest.raises(ValueError, match="add up to 4, but there are 3 tokens"):
        run_trace(model, [1, 2, 3], chunks=[2, 2])
    for chunks in ([2, 0, 1], [1.5, 1.5], [True, 2]):
        with pytest.raises(ValueError, match="chunk sizes must be positive integers"):
            run_trace(model, [1, 2, 3], chunks=chunks)
    with pytest.raises(ValueError, match="integers"):
        run_trace(model, [1.0, 2.0])


@pytest.mark.parametrize("chunks", [None, [7, 13]])
def test_a_full_trace_records_exactly_the_listed_sites_in_order(tiny_model, chunks):
    """site_names (the site list of docs/trace-format.md expanded for a config) is what a forward pass records, in its order."""
    model = tiny_model("float64")
    t = run_trace(model, list(range(20)), chunks=chunks)
    assert list(t.tensors) == site_names(TINY)
    # 14 sites on window-only layers (0, 1, MTP 6), 15 on HCA (3, 5), 17 on CSA (2, 4), one more
    # (gate_scores) on the score-routed layers (3, 4, 5, MTP 6), plus embed, final.x, logits,
    # mtp.final.x, mtp.logits
    assert len(site_names(TINY)) == 3 * 14 + 2 * 15 + 2 * 17 + 4 + 5 == 115


def test_a_pattern_matching_no_site_is_refused_before_running(tiny_model):
    """A typo ('layer.' for 'layers.') used to give a trace holding only the logits."""
    with pytest.raises(ValueError, match=r"\['layer\.\*\.out'\] match no site"):
        run_trace(tiny_model("float64"), [1, 2], patterns=("layer.*.out", "logits"))


@pytest.mark.parametrize("kwargs, words", [({"patterns": None}, "tuple of glob strings"),
                                           ({"chunks": 12}, "chunks must be a list"),
                                           ({"replay": "f32.st"}, "replay must be a refimpl.oracle.replay.Replay")])
def test_run_trace_refuses_arguments_of_the_wrong_type(tiny_model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        run_trace(tiny_model("float64"), [1, 2, 3], **kwargs)


@pytest.mark.parametrize("path", [None, 5, b"ck"])
def test_load_refuses_a_path_of_the_wrong_type(path):
    from refimpl.formats.weights import load
    with pytest.raises(ValueError, match="the checkpoint path must be a str or a path"):
        load(path)


def test_no_pattern_is_refused_not_run_to_record_nothing(tiny_model):
    with pytest.raises(ValueError, match="no trace pattern given: nothing would be recorded"):
        run_trace(tiny_model("float64"), [1, 2, 3], patterns=())
