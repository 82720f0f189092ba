"""Decode traces and replay (oracle/replay.py): the decode path recorded site by site, and another
run's routing and indexer selections forced onto this one."""
import numpy as np
import pytest
from safetensors.numpy import save_file

from refimpl.config import Config
from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.formats.weights import load
from refimpl.oracle.replay import Replay, ReplayError
from refimpl.oracle.trace import run_trace

TINY = Config.tiny()
TOKENS = [int(t) for t in np.random.default_rng(7).integers(0, TINY.vocab_size, 40)]
ROUTED = [i for i in range(TINY.n_layers) if i >= TINY.n_hash_layers]          # score-routed layers
CSA = [i for i in range(TINY.n_layers) if TINY.uses_indexer(i)]


def perturbed(patched_ckpt, tiny_ckpt, names, scale, seed=0):
    """A copy of the tiny checkpoint with noise of `scale` x the tensor's std added to each named bf16 tensor."""
    from refimpl.formats.checkpoint import TensorSource
    src, rng, changes = TensorSource(tiny_ckpt), np.random.default_rng(seed), {}
    for name in names:
        w = np.asarray(src.get(name), np.float32).reshape(-1)
        noisy = w + rng.normal(0, scale * w.std(), w.shape).astype(np.float32)
        changes[name] = {i: v for i, v in enumerate(noisy)}
    return patched_ckpt(changes, "perturbed")


# ---------------------------------------------------------------- decode traces

@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_decode_trace_holds_every_site_of_one_forward(tiny_model, prec):
    """Prefill 6 then 34 decode steps: the same sites, and (float64; mirror with the canonical layout of
    prefill and decode) the same bits as one forward pass — the ring, the compressor state across
    calls and the ratio-4 overlap all pass through the decode path."""
    model = tiny_model(prec, layout="canonical") if prec == "mirror" else tiny_model(prec)
    one = run_trace(model, TOKENS)
    dec = run_trace(model, TOKENS, decode_from=6)
    assert sorted(dec.tensors) == sorted(one.tensors)
    assert dec.metadata["chunks"] == [6] + [1] * 34 and dec.metadata["decode_from"] == 6
    assert one.metadata["decode_from"] is None
    for name, a in one.tensors.items():
        assert np.array_equal(a, dec.tensors[name]), name


def test_decode_trace_float32_is_close(tiny_model):
    model = tiny_model("float32")
    one, dec = run_trace(model, TOKENS[:20]), run_trace(model, TOKENS[:20], decode_from=3)
    np.testing.assert_allclose(dec.tensors["logits"], one.tensors["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [0, 40, 41, -1, True, 2.0])
def test_decode_from_must_leave_a_prefill_and_a_decode_step(tiny_model, bad):
    with pytest.raises(ValueError, match="decode_from must be an integer in \\[1, 39\\]"):
        run_trace(tiny_model("float64"), TOKENS, decode_from=bad)


def test_decode_from_and_chunks_exclude_each_other(tiny_model):
    with pytest.raises(ValueError, match="either chunked or a decode trace"):
        run_trace(tiny_model("float64"), TOKENS, decode_from=4, chunks=[4, 36])


# ---------------------------------------------------------------- replay

def test_replaying_a_run_of_itself_changes_nothing(tiny_model):
    model = tiny_model("float64")
    ref = run_trace(model, TOKENS)
    for weights in (False, True):
        again = run_trace(model, TOKENS, replay=Replay.from_tensors(ref.tensors, weights=weights, tokens=TOKENS))
        for name, a in ref.tensors.items():
            assert np.array_equal(a, again.tensors[name]), name
        assert again.metadata["replay"]["expert_ids"] == list(range(TINY.n_hash_layers, TINY.n_layers + 1))
    forced = run_trace(model, TOKENS, replay=Replay.from_tensors(ref.tensors, tokens=TOKENS, hash_layers=True))
    assert forced.metadata["replay"]["expert_ids"] == list(range(TINY.n_layers + 1))
    assert forced.metadata["replay"]["hash_layers"] is True


def test_replay_leaves_the_hash_layers_to_their_table_unless_asked(tiny_model):
    """A hash table bug must not be hidden by a replay of the reference: the hash layers' expert ids (their
    tid2eid lookup) are forced only with hash_layers=True (--replay-hash-ids)."""
    model = tiny_model("float64")
    ref = run_trace(model, TOKENS)
    wrong = dict(ref.tensors)
    wrong["layers.0.ffn.expert_ids"] = np.roll(ref.tensors["layers.0.ffn.expert_ids"], 1, axis=1)   # other order
    wrong["layers.1.ffn.expert_ids"] = (ref.tensors["layers.1.ffn.expert_ids"] + 1) % TINY.n_routed_experts
    default = run_trace(model, TOKENS, replay=Replay.from_tensors(wrong, tokens=TOKENS))
    assert np.array_equal(default.tensors["layers.1.ffn.expert_ids"], ref.tensors["layers.1.ffn.expert_ids"])
    asked = run_trace(model, TOKENS, replay=Replay.from_tensors(wrong, tokens=TOKENS, hash_layers=True))
    assert np.array_equal(asked.tensors["layers.1.ffn.expert_ids"], wrong["layers.1.ffn.expert_ids"])
    only_hash = {k: v for k, v in wrong.items() if k in ("layers.0.ffn.expert_ids", "layers.1.ffn.expert_ids")}
    with pytest.raises(ReplayError, match="only the expert ids of hash layers"):
        run_trace(model, TOKENS, replay=Replay.from_tensors(only_hash, tokens=TOKENS))


def test_replay_removes_the_routing_differences_of_a_perturbed_gate(tiny_ckpt, patched_ckpt, tiny_model):
    """A checkpoint whose gates are perturbed routes some positions to other experts. Replaying the
    original trace forces the original choices everywhere; the logits move back towards the original."""
    gates = [f"layers.{i}.ffn.gate.weight" for i in ROUTED]
    other = load(perturbed(patched_ckpt, tiny_ckpt, gates, 0.5), precision="float64")
    ref = run_trace(tiny_model("float64"), TOKENS)
    free = run_trace(other, TOKENS)
    forced = run_trace(other, TOKENS, replay=Replay.from_tensors(ref.tensors, tokens=TOKENS))
    differing = [i for i in ROUTED if not np.array_equal(ref.tensors[f"layers.{i}.ffn.expert_ids"],
                                                         free.tensors[f"layers.{i}.ffn.expert_ids"])]
    assert differing, "the perturbation must change some routing for this test to mean anything"
    for i in range(TINY.n_layers + 1):
        assert np.array_equal(forced.tensors[f"layers.{i}.ffn.expert_ids"], ref.tensors[f"layers.{i}.ffn.expert_ids"])
    # the weights are the perturbed model's own scores at the forced ids: they differ, but little
    i = differing[0]
    assert not np.array_equal(forced.tensors[f"layers.{i}.ffn.expert_weights"], ref.tensors[f"layers.{i}.ffn.expert_weights"])
    err = lambda t: np.abs(t.tensors["logits"] - ref.tensors["logits"]).max()
    assert err(forced) < err(free)
    # with the weights replayed too, every routing site equals the original's
    both = run_trace(other, TOKENS, replay=Replay.from_tensors(ref.tensors, weights=True, tokens=TOKENS))
    for i in range(TINY.n_layers + 1):
        assert np.array_equal(both.tensors[f"layers.{i}.ffn.expert_weights"], ref.tensors[f"layers.{i}.ffn.expert_weights"])


def test_replay_forces_the_indexer_selection_but_keeps_its_own_scores(tiny_ckpt, patched_ckpt, tiny_model):
    names = [f"layers.{i}.attn.indexer.weights_proj.weight" for i in CSA]
    other = load(perturbed(patched_ckpt, tiny_ckpt, names, 1.0, seed=1), precision="float64")
    ref = run_trace(tiny_model("float64"), TOKENS)
    free = run_trace(other, TOKENS)
    forced = run_trace(other, TOKENS, replay=Replay.from_tensors(ref.tensors, tokens=TOKENS))
    site = lambda i: f"layers.{i}.attn.indexer.topk"
    assert any(not np.array_equal(ref.tensors[site(i)], free.tensors[site(i)]) for i in CSA)
    for i in CSA:
        assert np.array_equal(forced.tensors[site(i)], ref.tensors[site(i)])
    scores = f"layers.{CSA[0]}.attn.indexer.scores"           # the first CSA layer: same inputs as the free run,
    assert np.array_equal(forced.tensors[scores], free.tensors[scores])   # its own scores, not the replayed run's
    assert not np.array_equal(forced.tensors[scores], ref.tensors[scores])


def test_replay_file_written_without_refimpl(tiny_model, tmp_path):
    """The documented format (docs/replay.md): plain safetensors, int32 rows by position, no metadata needed."""
    model = tiny_model("float64")
    ref = run_trace(model, TOKENS)
    path = tmp_path / "peer.safetensors"
    save_file({f"layers.{i}.ffn.expert_ids": ref.tensors[f"layers.{i}.ffn.expert_ids"].astype(np.int64)
               for i in ROUTED}, str(path))
    r = Replay.load(path)
    assert r.tokens is None and sorted(r.expert_ids) == ROUTED and not r.topk
    t = run_trace(model, TOKENS, replay=r)
    assert np.array_equal(t.tensors["logits"], ref.tensors["logits"])


def test_replay_of_a_decode_trace_in_a_decode_trace(tiny_model):
    model = tiny_model("float64")
    dec = run_trace(model, TOKENS, decode_from=5)
    again = run_trace(model, TOKENS, decode_from=5, replay=Replay.from_tensors(dec.tensors, weights=True, tokens=TOKENS))
    assert np.array_equal(again.tensors["logits"], dec.tensors["logits"])


# ---------------------------------------------------------------- bad replay input

def _ids(layer=3, rows=40):
    return np.tile(np.arange(TINY.n_activated_experts, dtype=np.int32), (rows, 1))


@pytest.mark.parametrize("tensors, match", [
    ({}, "holds no layers"),
    ({"layers.3.ffn.expert_ids": _ids()[:, :1]}, r"shape \(40, 1\), this run needs \[40, 2\]"),
    ({"layers.3.ffn.expert_ids": _ids(rows=10)}, r"shape \(10, 2\), this run needs \[40, 2\]"),
    ({"layers.3.ffn.expert_ids": _ids() + TINY.n_routed_experts - 1}, r"row 0 holds \[7, 8\]: expert ids must lie"),
    ({"layers.3.ffn.expert_ids": np.zeros((40, 2), np.int32)}, "names an expert twice"),
    ({"layers.3.ffn.expert_ids": _ids().astype(np.float32)}, "expected an integer type"),
    ({"layers.99.ffn.expert_ids": _ids()}, "the model has no layer 99"),
    ({"layers.1.attn.indexer.topk": np.full((40, 2), -1, np.int32)}, "layer 1 of this model has no indexer"),
    ({"layers.2.attn.indexer.topk": np.array([[5]] * 40, np.int32)}, r"row 0 \(\[5\]...\) must hold at most"),
])
def test_replay_that_does_not_fit_is_refused(tiny_model, tensors, match):
    with pytest.raises(ReplayError, match=match):
        run_trace(tiny_model("float64"), TOKENS, replay=Replay.from_tensors(tensors))


def test_replay_from_other_tokens_is_refused(tiny_model):
    ref = run_trace(tiny_model("float64"), TOKENS[:10])
    r = Replay.from_tensors(ref.tensors, tokens=TOKENS[:10])
    with pytest.raises(ReplayError, match="was made on other tokens"):
        run_trace(tiny_model("float64"), TOKENS[:9] + [TOKENS[0]], replay=r)


def test_replay_weights_need_the_weights(tiny_model):
    ref = run_trace(tiny_model("float64"), TOKENS[:8], patterns=("layers.*.ffn.expert_ids",))
    with pytest.raises(ReplayError, match="needs layers.{i}.ffn.expert_weights for every layer"):
        Replay.from_tensors(ref.tensors, weights=True)


def test_replay_forces_one_sequence_only(tiny_model):
    model = tiny_model("float64")
    from refimpl.oracle.trace import Trace
    ref = run_trace(model, TOKENS[:8])
    t = Trace(("logits",), replay=Replay.from_tensors(ref.tensors))
    with pytest.raises(ValueError, match="batch of 1"):
        model.forward([TOKENS[:8], TOKENS[:8]], trace=t)


def test_replay_load_refuses_a_folder_and_a_non_safetensors_file(tmp_path):
    with pytest.raises(ReplayError, match="is a folder"):
        Replay.load(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="x.txt"):
        Replay.load(tmp_path / "x.txt")


# ---------------------------------------------------------------- the command line

def test_cli_decode_trace_and_replay(tiny_ckpt, tmp_path, capsys):
    from refimpl.cli.main import main
    toks = ",".join(map(str, TOKENS[:12]))
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--decode-from", "4", "--precision", "float64",
                 "--out", str(tmp_path / "d.st")]) == 0
    assert "prefill 4 + 8 decode steps" in capsys.readouterr().out
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--precision", "float64", "--replay",
                 str(tmp_path / "d.st"), "--replay-weights", "--out", str(tmp_path / "r.st")]) == 0
    said = capsys.readouterr().out                                    # what was forced, in one line
    assert "replayed expert ids of layers [3, 4, 5, 6], expert weights of layers [3, 4, 5, 6], indexer top-k of " \
           "layers [2, 4]" in said and "hash layers" not in said
    a, b = SafetensorsFile(tmp_path / "d.st"), SafetensorsFile(tmp_path / "r.st")
    assert np.array_equal(a.get("logits"), b.get("logits"))
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--replay-weights", "--out", str(tmp_path / "x.st")]) == 2
    assert capsys.readouterr().err == "error: argument --replay-weights: needs --replay TRACE\n"   # usage: exit 2
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--decode-from", "4", "--chunks", "4,8",
                 "--out", "x"]) == 2                                  # argparse: usage error
    assert "not allowed with argument" in capsys.readouterr().err


def test_compare_sees_no_routing_difference_once_the_reference_routing_is_replayed(
        tiny_ckpt, patched_ckpt, tiny_model, tmp_path):
    """The comparison a user runs: perturbed-gate model vs the original, before and after replay.
    Before: compare reports rows whose expert sets disagree. After replaying the original trace:
    every expert-id site agrees in every row, so what remains is arithmetic."""
    from refimpl.oracle.compare import compare, format_report
    gates = [f"layers.{i}.ffn.gate.weight" for i in ROUTED]
    other = load(perturbed(patched_ckpt, tiny_ckpt, gates, 0.5), precision="float64")
    ref = run_trace(tiny_model("float64"), TOKENS)
    ref.save(tmp_path / "ref.st")
    run_trace(other, TOKENS).save(tmp_path / "free.st")
    run_trace(other, TOKENS, replay=Replay.load(tmp_path / "ref.st")).save(tmp_path / "forced.st")

    def disagreeing_rows(path):
        sites = compare(path, tmp_path / "ref.st", profile="float32-vs-float64").sites
        return {s["site"]: s["rows"] - s["agree"] for s in sites if s["site"].endswith(".ffn.expert_ids")}

    before, after = disagreeing_rows(tmp_path / "free.st"), disagreeing_rows(tmp_path / "forced.st")
    assert sum(before.values()) > 0
    assert set(after) == set(before) and sum(after.values()) == 0
    report = compare(tmp_path / "forced.st", tmp_path / "ref.st", profile="float32-vs-float64")
    assert report.to_json()["a"]["replay"]["expert_ids"] == [3, 4, 5, 6]          # the report says what was forced
    assert f"A replayed expert ids of layers [3, 4, 5, 6], indexer top-k of layers [2, 4] from {tmp_path / 'ref.st'}" \
        in format_report(report)


def test_replay_load_refuses_bad_metadata_in_one_line(tmp_path):
    ids = {"layers.3.ffn.expert_ids": _ids()}
    for meta, msg in (("[" * 100000 + "]" * 100000, "nested too deeply"),
                      ('{"tokens": 5}', "'tokens' must be a list of integer token ids"),
                      ('{"tokens": [1, true]}', "'tokens' must be a list of integer token ids"),
                      ("[1]", "is not a JSON object")):
        save_file(ids, str(tmp_path / "r.st"), metadata={"refimpl": meta})
        with pytest.raises(ReplayError, match=msg) as e:
            Replay.load(tmp_path / "r.st")
        assert "\n" not in str(e.value)


def test_cli_trace_replay_with_deep_metadata_is_one_line(tiny_ckpt, tmp_path, capsys):
    from refimpl.cli.main import main
    save_file({"layers.3.ffn.expert_ids": _ids(rows=4)}, str(tmp_path / "r.st"),
              metadata={"refimpl": "[" * 100000 + "]" * 100000})
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2,3,4", "--replay", str(tmp_path / "r.st"),
                 "--out", str(tmp_path / "o.st")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nested too deeply" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", [3e38, np.inf, -0.5, np.nan])
def test_replay_weights_out_of_range_are_refused_naming_the_file(tiny_ckpt, tmp_path, capsys, value):
    """Weights of 3e38 overflowed inside the model (RuntimeWarnings, an error blaming the checkpoint)."""
    import warnings
    from refimpl.cli.main import main
    toks = ",".join(map(str, TOKENS[:6]))
    ref = tmp_path / "ref.st"
    assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--precision", "float64", "--out", str(ref)]) == 0
    from safetensors import safe_open
    with safe_open(str(ref), "np") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["layers.3.ffn.expert_weights"][2, 1] = value
    bad = tmp_path / "bad.st"
    save_file(t, str(bad), metadata=meta)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["trace", str(tiny_ckpt), "--tokens", toks, "--precision", "float64", "--replay", str(bad),
                     "--replay-weights", "--out", str(tmp_path / "o.st")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {bad}: layers.3.ffn.expert_weights row 2 holds" in err, err
    assert "at most 10000 x route_scale" in err and "Warning" not in err
    assert not (tmp_path / "o.st").exists()
