"""`refimpl compare` as a user runs it: exit codes (0 within, 1 out of tolerance or refused, 2 usage), --json, --plot."""
import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from refimpl.cli.main import main

TOKENS = ",".join(str(i * 37 % 1280) for i in range(24))


@pytest.fixture(scope="module")
def cli_traces(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-traces")
    out = {}
    for prec in ("float32", "float64"):
        out[prec] = d / f"{prec}.st"
        assert main(["trace", str(tiny_ckpt), "--tokens", TOKENS, "--precision", prec, "--out", str(out[prec])]) == 0
    return out


def _meta(path):
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        return f.metadata()


def test_within_tolerance_exits_0(cli_traces, capsys):
    assert main(["compare", str(cli_traces["float32"]), str(cli_traces["float64"])]) == 0
    out = capsys.readouterr().out
    assert "profile float32-vs-float64" in out and "within tolerance (float32-vs-float64): 115 sites compared" in out


def test_out_of_tolerance_exits_1_and_names_the_first_site(cli_traces, tmp_path, capsys):
    t = load_file(str(cli_traces["float32"]))
    t["layers.4.ffn.out"][9, 100] += 0.5
    t["logits"][20, 3] += 1.0                              # later in the data flow: not the first
    bad = tmp_path / "bad.st"
    save_file(t, str(bad), metadata=_meta(cli_traces["float32"]))
    assert main(["compare", str(bad), str(cli_traces["float64"])]) == 1
    out = capsys.readouterr().out
    assert "FIRST OUT OF TOLERANCE: layers.4.ffn.out (layer 4), position 9: max_rel" in out
    assert "worst element (9, 100)" in out and "2 of 115 sites out of tolerance" in out


def test_json_output_parses(cli_traces, capsys):
    assert main(["compare", str(cli_traces["float32"]), str(cli_traces["float64"]), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] is True and r["first"] is None and r["profile"] == "float32-vs-float64"
    assert len(r["sites"]) == 115 and r["sites"][0]["site"] == "embed"
    topk = next(s for s in r["sites"] if s["site"] == "layers.2.attn.indexer.topk")
    assert topk["min_margin"] == "inf"                     # non-finite numbers as strings: strict JSON
    json.loads(json.dumps(r), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_refused_input_exits_1_with_one_line(cli_traces, tiny_ckpt, tmp_path, capsys):
    other = tmp_path / "other.st"
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2,3", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["compare", str(other), str(cli_traces["float64"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the traces record different token ids: 3 vs 24 tokens") and err.count("\n") == 1
    assert main(["compare", str(tmp_path / "nope.st"), str(cli_traces["float64"])]) == 1
    assert "no such file" in capsys.readouterr().err


def test_usage_errors_exit_2(cli_traces, capsys):
    assert main(["compare", str(cli_traces["float32"]), str(cli_traces["float64"]), "--profile", "loose"]) == 2
    assert "unknown profile 'loose'" in capsys.readouterr().err
    assert main(["compare", str(cli_traces["float32"])]) == 2          # argparse: one line, exit 2
    assert "error:" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(cli_traces, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    assert main(["compare", str(cli_traces["float32"]), str(cli_traces["float64"]), "--plot", "x.png"]) == 1
    assert "--plot needs matplotlib: pip install 'refimpl[plot]'" in capsys.readouterr().err


def test_plot_writes_a_png(cli_traces, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "err.png"
    assert main(["compare", str(cli_traces["float32"]), str(cli_traces["float64"]), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_path_refused_before_comparing_and_nothing_overwritten(cli_traces, tmp_path, capsys):
    """A symlink, an input trace, a folder, a FIFO, a device: exit 1, one line, no report, nothing written."""
    import os
    pytest.importorskip("matplotlib")
    a, b = str(cli_traces["float32"]), str(cli_traces["float64"])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "t.png"
    link.symlink_to(victim)
    folder = tmp_path / "other.png"
    folder.mkdir()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    before = cli_traces["float64"].read_bytes()
    bp = tmp_path / "f64.png"                              # an input trace named like a plot
    bp.write_bytes(before)
    b = str(bp)
    for bad, says in ((link, "symbolic link"), (b, "is the input trace"), (folder, "a folder"),
                      (fifo, "a FIFO")):
        assert main(["compare", a, b, "--plot", str(bad)]) == 1, bad
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and says in err, (bad, err)
    assert victim.read_text() == "keep me" and bp.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f64.png", "fifo.png", "other.png", "t.png", "victim.txt"]
    assert list(folder.iterdir()) == []


def test_plot_malformed_name_is_a_usage_error_before_the_report(cli_traces, tmp_path, capsys):
    a, b = str(cli_traces["float32"]), str(cli_traces["float64"])
    for bad in ("", str(tmp_path / "out.txt"), str(tmp_path / "other")):
        assert main(["compare", a, b, "--plot", bad]) == 2, bad
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: --plot:") and err.count("\n") == 1, (bad, err)
    assert list(tmp_path.iterdir()) == []


def test_plot_is_atomic_and_quiet(cli_traces, tmp_path, monkeypatch, capsys):
    """Rendered in memory, written by files.write_bytes: an interrupt leaves nothing; no UserWarning."""
    import warnings
    pytest.importorskip("matplotlib")
    from refimpl.formats import files
    a, b = str(cli_traces["float32"]), str(cli_traces["float64"])
    png = tmp_path / "same.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # identical traces: no line is drawn, no legend
        assert main(["compare", a, a, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def interrupted(f, data):
        f.write(data[:100])
        raise KeyboardInterrupt
    real = files.atomic_file

    class Cut:
        def __init__(self, path):
            self.cm = real(path)

        def __enter__(self):
            f = self.cm.__enter__()
            return type("F", (), {"write": lambda _, d: interrupted(f, d)})()

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)
    monkeypatch.setattr(files, "atomic_file", Cut)
    out = tmp_path / "cut.png"
    assert main(["compare", a, b, "--plot", str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_compare_a_checkpoint_shard_or_a_folder_is_one_line(cli_traces, tiny_ckpt, capsys):
    shard = next(tiny_ckpt.glob("model-*.safetensors"))
    for path, says in ((shard, "not a trace file"), (tiny_ckpt, "is a folder, not a trace file")):
        assert main(["compare", str(path), str(cli_traces["float64"])]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_a_candidate_without_logits_exits_1(cli_traces, tmp_path, capsys):
    t = load_file(str(cli_traces["float32"]))
    cand = tmp_path / "embed-only.st"
    save_file({"embed": t["embed"]}, str(cand), metadata=_meta(cli_traces["float32"]))
    assert main(["compare", str(cand), str(cli_traces["float64"])]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED: the candidate") and "no 'logits' site" in out
    save_file({"embed": t["embed"], "logits": t["logits"]}, str(cand), metadata=_meta(cli_traces["float32"]))
    assert main(["compare", str(cand), str(cli_traces["float64"])]) == 0
    assert "note: NOT COMPARED: 113 of the reference's 115 sites are missing" in capsys.readouterr().out


def test_a_partial_trace_is_checked_on_what_it_has_with_partial(cli_traces, tmp_path, capsys):
    """One layer's sites, no logits: refused by default (the end result is not compared), checked with --partial,
    and the report says which of the reference's sites were not compared; a real difference still fails."""
    t = load_file(str(cli_traces["float32"]))
    layer = {k: v for k, v in t.items() if k.startswith("layers.2.")}
    cand = tmp_path / "layer2.st"
    save_file(layer, str(cand), metadata=_meta(cli_traces["float32"]))
    assert main(["compare", str(cand), str(cli_traces["float64"])]) == 1
    capsys.readouterr()
    assert main(["compare", str(cand), str(cli_traces["float64"]), "--partial"]) == 0
    out = capsys.readouterr().out
    assert f"note: NOT COMPARED (partial trace): {115 - len(layer)} of the reference's 115 sites" in out
    assert "only in B (not compared): embed" in out
    layer["layers.2.attn.out"] = layer["layers.2.attn.out"] * 1.5
    save_file(layer, str(cand), metadata=_meta(cli_traces["float32"]))
    assert main(["compare", str(cand), str(cli_traces["float64"]), "--partial"]) == 1
    assert "FIRST OUT OF TOLERANCE: layers.2.attn.out" in capsys.readouterr().out
