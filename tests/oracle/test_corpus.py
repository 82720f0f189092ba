"""Golden corpora (oracle/corpus.py) and their comparison (oracle/corpus_compare.py), in one process.

The Ray runner's tests are tests/oracle/test_corpus_ray.py (skipped without the extra).
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st
from safetensors.numpy import save_file

from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.formats.weights import load
from refimpl.model.transformer import Model
from refimpl.oracle import corpus_compare
from refimpl.oracle.corpus import (CorpusError, Job, Progress, Prompt, corpus_hash, make_corpus, read_corpus,
                                   read_manifest, run_prompt, run_stage, split_layers, top_k_form, write_prompt)
from refimpl.oracle.corpus_compare import CorpusCompareError, Rows, compare_corpora, kl_rows

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def random_corpus(path, n=4, seed=1, longest=20, vocab=1280):
    rng = np.random.default_rng(seed)
    return write_jsonl(path, [{"id": f"p{i}", "tokens": [int(t) for t in rng.integers(0, vocab, rng.integers(1, longest))]}
                              for i in range(n)])


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- reading a corpus

def test_read_corpus_takes_tokens_text_and_chat_messages(tiny_ckpt, tmp_path):
    from refimpl.formats.encoding import encode_messages
    from refimpl.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "ids", "tokens": [0, 15, 27]}, "",
                                              {"text": "Hello there"},
                                              {"id": "chat", "messages": messages, "thinking": True}])
    prompts = read_corpus(path, tiny_ckpt)
    assert prompts[0] == Prompt("ids", (0, 15, 27))
    assert prompts[1] == Prompt("line-3", tuple(tok.encode("Hello there")))          # its line number
    assert prompts[2] == Prompt("chat", tuple(tok.encode(encode_messages(messages, thinking_mode="thinking"))))
    assert prompts[2].tokens[0] == tok.tok.token_to_id(tok.bos_token)                # the encoder writes BOS
    # the corpus hash follows the prompts as run, not the file's spelling
    same = write_jsonl(tmp_path / "d.jsonl", [{"id": p.id, "tokens": list(p.tokens)} for p in prompts])
    assert corpus_hash(read_corpus(same, tiny_ckpt)) == corpus_hash(prompts)
    assert corpus_hash(prompts[:2]) != corpus_hash(prompts)


@pytest.mark.parametrize("line, why", [
    ('{"tokens": [1, 2', "line 2: not a JSON object"),
    ('[1, 2]', "line 2: a prompt is a JSON object"),
    ('{"tokens": [1], "text": "a"}', "exactly one of"),
    ('{"token": [1]}', "exactly one of"),
    ('{"tokens": [1, 1280]}', "token id 1280 is outside the vocabulary [0, 1280)"),
    ('{"tokens": [-1]}', "token id -1 is outside"),
    ('{"tokens": [1.0]}', "'tokens' must be a list of integers"),
    ('{"tokens": []}', "no tokens"),
    ('{"id": "a", "tokens": [2]}', "id 'a' is already the id of line 1"),
    ('{"id": "../x", "tokens": [2]}', "'id' must be a file name"),
    ('{"tokens": [2], "thinking": true}', "'thinking' (true or false) goes with 'messages' only"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "line 2"),
    ('{"tokens": [1, 2, 3, 4, 5]}', "5 tokens exceed the context max_seq_len=4"),
])
def test_read_corpus_refuses_a_bad_line_naming_it(tiny_ckpt, tmp_path, line, why):
    path = write_jsonl(tmp_path / "c.jsonl", ['{"id": "a", "tokens": [1]}', line])
    with pytest.raises(CorpusError) as e:
        read_corpus(path, tiny_ckpt, max_seq_len=4)
    assert "c.jsonl, line 2: " in str(e.value) and why in str(e.value)


def test_an_empty_corpus_is_refused(tiny_ckpt, tmp_path):
    with pytest.raises(CorpusError, match="holds no prompt"):
        read_corpus(write_jsonl(tmp_path / "c.jsonl", ["", "  "]), tiny_ckpt)


def test_a_fifo_corpus_is_refused_without_waiting_for_a_writer(tiny_ckpt, tmp_path):
    """A named pipe with no writer would block the run for ever (and a rerun could not read it again)."""
    fifo = tmp_path / "c.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match="c.jsonl: is a FIFO.*regular file"):
        read_corpus(fifo, tiny_ckpt)


# ---------------------------------------------------------------- one prompt, the compact form

def test_top_k_form_by_hand():
    logits = np.array([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    f = top_k_form(logits, 3)
    assert f["logits.top_k.ids"].tolist() == [[1, 2, 0], [0, 1, 2]]                 # ties: the lower id first
    assert f["logits.top_k.ids"].dtype == np.int32
    assert f["logits.top_k.values"].tolist() == [[3.0, 3.0, 1.0], [0.0, 0.0, 0.0]]
    assert f["logits.logsumexp"].dtype == np.float64
    assert f["logits.logsumexp"][1] == pytest.approx(np.log(4.0), rel=1e-15)
    assert f["logits.logsumexp"][0] == pytest.approx(np.log(np.exp([1.0, 3, 3, -2]).sum()), rel=1e-15)
    assert top_k_form(logits, 9)["logits.top_k.ids"].shape == (2, 4)                # k beyond v: every entry


def test_a_prompt_file_holds_the_models_logits_exactly(tiny_ckpt, tiny_model):
    model = tiny_model("mirror", kernels="numpy")
    p = Prompt("x", (0, 15, 27, 3, 99))
    tensors, meta = run_prompt(model, Job(str(tiny_ckpt), kernels="numpy"), p)
    assert np.array_equal(tensors["logits"], model.forward(list(p.tokens)))
    assert (meta["prompt"], meta["tokens"], meta["precision"], meta["keep"]) == ("x", list(p.tokens), "mirror", "logits")
    tensors, _ = run_prompt(model, Job(str(tiny_ckpt), kernels="numpy", keep="top-k", top_k=4,
                                       sites=("layers.0.out",)), p)
    assert sorted(tensors) == ["layers.0.out", "logits.logsumexp", "logits.top_k.ids", "logits.top_k.values"]


def test_job_refuses_bad_settings(tiny_ckpt):
    for kw, why in (({"precision": "bf16"}, "precision"), ({"keep": "all"}, "keep"), ({"top_k": 0}, "top_k"),
                    ({"sites": ("logits",)}, "always kept")):
        with pytest.raises(CorpusError, match=why):
            Job(str(tiny_ckpt), **kw)


# ---------------------------------------------------------------- a run: files, manifest, resuming

def job(ckpt, **kw):
    return Job(str(ckpt), kernels="numpy", **kw)


def test_make_corpus_writes_a_file_per_prompt_and_a_manifest(tiny_ckpt, tiny_model, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=3)
    seen = []
    manifest = make_corpus(tiny_ckpt, corpus, tmp_path / "out", job=job(tiny_ckpt, precision="float64"),
                           progress=lambda s: seen.append((s.done, s.total, s.line())))
    prompts = read_corpus(corpus, tiny_ckpt)
    assert manifest == read_manifest(tmp_path / "out") and manifest["complete"]
    assert manifest["corpus"]["sha256"] == corpus_hash(prompts)
    assert manifest["run"] == {"precision": "float64", "revision": "current", "layout": "official", "keep": "logits",
                               "top_k": None, "sites": []}
    assert set(manifest["checkpoint"]["sha256"]) == {"config.json", "model.safetensors.index.json"}
    assert {"refimpl", "commit", "numpy", "numba", "ml_dtypes", "safetensors"} <= set(manifest["generated_by"])
    from refimpl.oracle.corpus import sha256_file
    assert manifest["files"] == {f"prompts/{p.id}.safetensors": sha256_file(tmp_path / "out" / "prompts" /
                                                                             f"{p.id}.safetensors") for p in prompts}
    model = tiny_model("float64", kernels="numpy")
    for p in prompts:
        f = SafetensorsFile(tmp_path / "out" / "prompts" / f"{p.id}.safetensors")
        assert np.array_equal(f.get("logits"), model.forward(list(p.tokens)))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[-1][2].startswith("corpus: 3/3 prompts, ") and "tokens/s, ETA" in seen[-1][2]


class Stop(Exception):
    pass


def test_a_killed_run_continues_where_it_stopped(tiny_ckpt, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=4)
    whole = tmp_path / "whole"
    make_corpus(tiny_ckpt, corpus, whole, job=job(tiny_ckpt))
    out = tmp_path / "out"

    def stop_after_two(state):
        if state.done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt), progress=stop_after_two)
    assert sorted(p.name for p in (out / "prompts").iterdir()) == ["p0.safetensors", "p1.safetensors"]  # no temporaries
    assert read_manifest(out)["complete"] is False and read_manifest(out)["files"] == {}
    states = []
    make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt), progress=states.append)
    assert states[-1].skipped == 2 and states[-1].tokens == sum(len(p.tokens) for p in read_corpus(corpus, tiny_ckpt)[2:])
    assert files_of(out) == files_of(whole)                   # the same bytes as a run that never stopped


def test_a_folder_of_another_run_is_refused_and_kept(tiny_ckpt, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=2)
    out = tmp_path / "out"
    make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt))
    before = files_of(out)
    other = random_corpus(tmp_path / "other.jsonl", n=2, seed=2)
    for kw, corpus_file, why in (({}, other, "another corpus"), ({"precision": "float32"}, corpus, "another precision"),
                                 ({"keep": "top-k"}, corpus, "kept sites")):
        with pytest.raises(CorpusError, match=why):
            make_corpus(tiny_ckpt, corpus_file, out, job=job(tiny_ckpt, **kw))
    assert files_of(out) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a corpus folder"):
        make_corpus(tiny_ckpt, corpus, foreign, job=job(tiny_ckpt))
    assert files_of(foreign) == {"notes.txt": b"keep me"}


def test_a_prompt_file_of_other_tokens_is_not_taken_as_done(tiny_ckpt, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "tokens": [1, 2]}])
    out = tmp_path / "out"
    make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt))
    os.replace(out / "prompts" / "a.safetensors", tmp_path / "a.safetensors")
    make_corpus(tiny_ckpt, write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "tokens": [1, 3]}]),
                tmp_path / "out2", job=job(tiny_ckpt))
    os.replace(tmp_path / "out2" / "prompts" / "a.safetensors", out / "prompts" / "a.safetensors")
    with pytest.raises(CorpusError, match="holds another prompt's run than the corpus's 'a'"):
        make_corpus(tiny_ckpt, write_jsonl(tmp_path / "c2.jsonl", [{"id": "a", "tokens": [1, 2]}]), out,
                    job=job(tiny_ckpt))


def test_progress_line():
    assert Progress(done=5, total=16, tokens=100, seconds=4.0, left_tokens=250).line() == \
        "corpus: 5/16 prompts, 100 tokens, 25.0 tokens/s, ETA 0:00:10"
    assert Progress(done=1, total=9, tokens=10, seconds=10.0, left_tokens=100000).line().endswith("ETA 27:46:40")
    assert Progress(done=2, total=3, skipped=2, retried=["a"]).line() == \
        "corpus: 2/3 prompts, 0 tokens, 0.0 tokens/s, ETA ?, 2 already written, 1 retried"


# ---------------------------------------------------------------- KL

def rows(logits):
    x = np.asarray(logits, np.float64)
    return Rows(x - np.log(np.exp(x).sum(-1, keepdims=True)), None, x.shape[-1])


def test_kl_by_hand():
    b = rows(np.log([[0.5, 0.25, 0.25]]))                   # the reference
    a = rows(np.log([[0.8, 0.1, 0.1]]))                     # the candidate
    # KL(B || A) = 0.5 ln(0.5/0.8) + 2 * 0.25 ln(0.25/0.1) = 0.5 ln(0.625 * 2.5) = ln 1.25  (KL(A || B) = 0.193)
    assert kl_rows(b, a)[0] == pytest.approx(np.log(1.25), rel=1e-13)
    assert kl_rows(b, b)[0] == 0.0
    top1 = Rows(np.log([[0.5]]), np.array([[0]]), None)     # B's top 1 only: {0} and the rest (0.5 vs 0.2)
    assert kl_rows(top1, a)[0] == pytest.approx(0.5 * np.log(0.5 / 0.8) + 0.5 * np.log(0.5 / 0.2), rel=1e-13)


@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_the_top_k_kl_is_the_kl_of_a_coarser_distribution(seed, k):
    """Never above the whole rows' KL, never below 0, and equal to it when the kept ids carry all the mass."""
    rng = np.random.default_rng(seed)
    la, lb = (rng.normal(0, rng.uniform(0.1, 4), (3, 8)) for _ in range(2))
    full = kl_rows(rows(lb), rows(la))
    fb = top_k_form(lb, k)
    compact = Rows(fb["logits.top_k.values"] - fb["logits.logsumexp"][:, None], fb["logits.top_k.ids"].astype(np.int64),
                   None)
    coarse = kl_rows(compact, rows(la))
    assert np.all(coarse >= -1e-12) and np.all(coarse <= full + 1e-12)
    fa = top_k_form(la, 8)
    whole = Rows(fa["logits.top_k.values"] - fa["logits.logsumexp"][:, None], fa["logits.top_k.ids"].astype(np.int64), None)
    assert np.allclose(kl_rows(rows(lb), whole), full, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------- comparing corpora

@pytest.fixture(scope="module")
def corpora(tiny_ckpt, tmp_path_factory):
    """float64, float32 and compact mirror corpora of 4 prompts, and a float32 one with a planted one-layer bug."""
    root = tmp_path_factory.mktemp("corpora")
    corpus = random_corpus(root / "c.jsonl", n=4, seed=7)
    out = {}
    for name, kw in (("float64", {"precision": "float64"}), ("float32", {"precision": "float32"})):
        out[name] = root / name
        make_corpus(tiny_ckpt, corpus, out[name], job=job(tiny_ckpt, **kw))

    def planted(j, pending, folder, done):                  # layer 3's attention sinks read as 0: one layer wrong
        model = j.load()
        layers = list(model.weights.layers)
        attn = dataclasses.replace(layers[3].attn, attn_sink=np.zeros_like(layers[3].attn.attn_sink))
        layers[3] = dataclasses.replace(layers[3], attn=attn)
        bad = Model(model.cfg, dataclasses.replace(model.weights, layers=tuple(layers)), precision=j.precision,
                    kernels=j.kernels)
        for p in pending:
            write_prompt(folder, p, *run_prompt(bad, j, p))
            done(p)
    out["bug"] = root / "bug"
    make_corpus(tiny_ckpt, corpus, out["bug"], job=job(tiny_ckpt, precision="float32"), runner=planted)
    return out


def test_refimpls_float32_corpus_passes_against_its_float64_corpus(corpora):
    r = compare_corpora(corpora["float32"], corpora["float64"])
    assert r.profile == "float32-vs-float64" and r.ok, corpus_compare.format_report(r)
    assert 0 < np.max(r.kl) < 1e-10 and r.top1 == 1.0


def test_a_planted_one_layer_bug_is_flagged(corpora):
    r = compare_corpora(corpora["bug"], corpora["float64"])
    assert not r.ok
    why = r.failures()
    assert any(w.startswith("kl max") for w in why) and any(w.startswith("kl mean") for w in why)
    assert np.max(r.kl) > 1e4 * r.bounds["kl_max"]
    text = corpus_compare.format_report(r)
    assert "OUT OF the corpus profile float32-vs-float64" in text
    j = r.to_json()
    assert j["ok"] is False and j["overall"]["prompts"] == 4 and j["overall"]["kl_max"] == float(np.max(r.kl))


def test_the_first_greedy_split_is_reported_with_both_margins(corpora):
    r = compare_corpora(corpora["bug"], corpora["float64"], top_n=3)
    split = next(p.first_split for p in r.prompts if p.first_split)
    p = next(p for p in r.prompts if p.first_split)
    a = SafetensorsFile(corpora["bug"] / "prompts" / f"{p.id}.safetensors").get("logits")[split["position"]]
    b = SafetensorsFile(corpora["float64"] / "prompts" / f"{p.id}.safetensors").get("logits")[split["position"]]
    assert (split["candidate_token"], split["reference_token"]) == (int(np.argmax(a)), int(np.argmax(b)))
    assert split["reference_margin"] == pytest.approx(float(np.sort(b)[-1] - np.sort(b)[-2]), rel=1e-9)
    assert split["candidate_margin"] == pytest.approx(float(np.sort(a)[-1] - np.sort(a)[-2]), rel=1e-6)
    assert split["candidate_token_in_reference_top_n"] == (int(np.argmax(a)) in np.argsort(-b, kind="stable")[:3])
    earlier = np.argmax(SafetensorsFile(corpora["bug"] / "prompts" / f"{p.id}.safetensors").get("logits"), -1)
    assert np.array_equal(earlier[:split["position"]], np.argmax(
        SafetensorsFile(corpora["float64"] / "prompts" / f"{p.id}.safetensors").get("logits"), -1)[:split["position"]])


def test_a_candidate_written_without_refimpl(corpora, tmp_path):
    """The documented layout: prompts/{id}.safetensors with `logits` (here F16) and a `tokens` tensor, no manifest."""
    ref = corpora["float64"]
    cand = tmp_path / "engine" / "prompts"
    cand.mkdir(parents=True)
    manifest = read_manifest(ref)
    for p in manifest["prompts"]:
        f = SafetensorsFile(ref / "prompts" / f"{p['id']}.safetensors")
        tokens = json.loads(f.metadata["refimpl"])["tokens"]
        save_file({"logits": np.asarray(f.get("logits")).astype(np.float16),
                   "tokens": np.array(tokens, np.int32)}, str(cand / f"{p['id']}.safetensors"))
    r = compare_corpora(cand.parent, ref)
    assert r.profile == "float32-vs-float64"                      # no manifest: an engine against float64
    assert 0 < np.max(r.kl) and not r.missing
    (cand / f"{manifest['prompts'][0]['id']}.safetensors").unlink()
    r = compare_corpora(cand.parent, ref, profile="mirror-vs-float64")
    assert r.missing == [manifest["prompts"][0]["id"]] and not r.ok and "missing" in r.failures()[0]


def test_corpora_of_other_tokens_are_refused(corpora, tiny_ckpt, tmp_path):
    other = tmp_path / "other"
    make_corpus(tiny_ckpt, random_corpus(tmp_path / "c.jsonl", n=4, seed=8), other, job=job(tiny_ckpt))
    with pytest.raises(CorpusCompareError, match="ran other tokens"):
        compare_corpora(other, corpora["float64"])
    with pytest.raises(CorpusCompareError, match="not a corpus folder"):
        compare_corpora(tmp_path, corpora["float64"])


# ---------------------------------------------------------------- the command line

def run_cli(*args):
    from refimpl.cli.main import main
    return main([str(a) for a in args])


def test_cli_golden_make_and_compare(tiny_ckpt, corpora, tmp_path, capsys):
    corpus = random_corpus(tmp_path / "c.jsonl", n=2)
    assert run_cli("golden", "make", tiny_ckpt, corpus, tmp_path / "a", "--kernels", "numpy", "--keep", "top-k",
                   "--top-k", "5") == 0
    assert "wrote" in capsys.readouterr().out
    assert read_manifest(tmp_path / "a")["run"]["top_k"] == 5
    assert run_cli("compare", corpora["float32"], corpora["float64"], "--json") == 0
    j = json.loads(capsys.readouterr().out)
    assert j["kind"] == "corpus" and j["ok"] and j["overall"]["prompts"] == 4
    assert run_cli("compare", corpora["bug"], corpora["float64"]) == 1
    assert "OUT OF the corpus profile" in capsys.readouterr().out


@pytest.mark.parametrize("args, code, why", [
    (["golden", "make", "CKPT", "BAD", "OUT"], 1, "line 1: not a JSON object"),
    (["golden", "make", "CKPT", "EMPTY", "OUT"], 1, "holds no prompt"),
    (["golden", "make", "CKPT", "BAD", "OUT", "--top-k", "0"], 2, "--top-k"),
    (["golden", "make", "CKPT", "EMPTY", "OUT", "--sites", "layers.0.atn.q"], 1, "match no site of this model"),
    (["compare", "REF", "REF", "--profile", "nope"], 2, "unknown corpus profile"),
    (["compare", "REF", "REF", "--partial"], 2, "--partial"),
])
def test_cli_bad_input_is_one_line(tiny_ckpt, corpora, tmp_path, capsys, args, code, why):
    (tmp_path / "bad.jsonl").write_text('{"tokens": [1,\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    subst = {"CKPT": tiny_ckpt, "BAD": tmp_path / "bad.jsonl", "EMPTY": tmp_path / "empty.jsonl",
             "OUT": tmp_path / "out", "REF": corpora["float64"]}
    assert run_cli(*[subst.get(a, a) for a in args]) == code
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()                                    # nothing made for a refused run


def test_cli_ray_options(tiny_ckpt, tmp_path, capsys, monkeypatch):
    corpus = random_corpus(tmp_path / "c.jsonl", n=1)
    assert run_cli("golden", "make", tiny_ckpt, corpus, tmp_path / "o", "--workers", "2", "--stages", "2") == 2
    assert "not with --workers" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "refimpl.oracle.corpus_ray", None)        # as without the extra
    assert run_cli("golden", "make", tiny_ckpt, corpus, tmp_path / "o", "--stages", "2") == 1
    assert "need Ray: pip install 'refimpl[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plot_of_kl_by_position(corpora, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'refimpl[plot]')")
    assert run_cli("compare", corpora["bug"], corpora["float64"], "--plot", tmp_path / "kl.png") == 1
    assert (tmp_path / "kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refimpl_runs_without_ray():
    """Nothing refimpl imports at import time (the corpus modules and the command line included) imports ray."""
    code = ("import sys, refimpl, refimpl.oracle.corpus, refimpl.oracle.corpus_compare, refimpl.cli.main; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------- pipeline stages (the Ray runner's, run here)

def test_split_layers():
    assert split_layers(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert split_layers(43, 8)[0] == (0, 6) and split_layers(43, 8)[-1] == (38, 43)
    assert split_layers(2, 2) == [(0, 1), (1, 2)]
    for bad in (0, 7):
        with pytest.raises(CorpusError, match="give 1 to 6 stages"):
            split_layers(6, bad)


@pytest.mark.parametrize("precision", ["mirror", "float64"])
def test_stages_chained_give_the_one_pass_prompt_file(tiny_ckpt, tiny_model, precision):
    """Model.forward_layers over contiguous ranges, the streams handed on: forward()'s sites and logits bit for bit."""
    model = tiny_model(precision, kernels="numpy")
    p = Prompt("x", tuple(range(3, 43)))
    j = Job(str(tiny_ckpt), precision=precision, kernels="numpy", keep="top-k",
            sites=("embed", "layers.[0-5].out", "layers.3.attn.*", "final.x"))
    want, want_meta = run_prompt(model, j, p)
    for stages in (1, 2, 4, 6):
        carry = None
        for start, stop in split_layers(6, stages):
            carry = run_stage(model, j, p, carry, start, stop)
        got, meta = carry
        assert meta == want_meta and sorted(got) == sorted(want)
        assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want), stages


def test_forward_layers_refuses_streams_that_do_not_fit(tiny_model):
    from refimpl.model.transformer import InputError
    model = tiny_model("mirror", kernels="numpy")
    h = model.forward_layers([1, 2, 3], start=0, stop=2)
    assert h.shape == (1, 3, 4, 256) and h.dtype == np.float32
    for kw, why in (({"start": 2, "stop": 2}, "start < stop"), ({"start": 0, "stop": 7}, "n_layers = 6"),
                    ({"h": h, "start": 0, "stop": 3}, "h must be None"), ({"start": 2, "stop": 3}, "h must be the streams"),
                    ({"h": h[:, :2], "start": 2, "stop": 3}, "h must be the streams"),
                    ({"h": h.astype(np.float64), "start": 2, "stop": 3}, "h must be the streams")):
        with pytest.raises(InputError, match=why):
            model.forward_layers([1, 2, 3], **kw)
