"""The `refimpl` command, run in-process as a user would."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from refimpl.cli.main import main


def test_make_checkpoint_and_inspect(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["make-checkpoint", "tiny", str(out), "--seed", "3"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tensors" in text and "experts" in text
    # an existing directory is refused (nothing is overwritten by accident)
    assert main(["make-checkpoint", "tiny", str(out)]) != 0


def test_inspect_reports_an_invalid_checkpoint(tmp_path, tiny_ckpt, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    cfg["compress_ratios"] = cfg["compress_ratios"][:5] + [0]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(bad)]) == 1
    assert "unexpected tensor" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["float64", "float32", "mirror"])
def test_trace_writes_the_stable_sites(tiny_ckpt, tmp_path, precision):
    out = tmp_path / "t.safetensors"
    assert main(["trace", str(tiny_ckpt), "--tokens", "0,15,27", "--precision", precision, "--out", str(out)]) == 0
    t = load_file(str(out))
    assert t["logits"].shape == (3, 1280)
    for i in range(6):
        assert t[f"layers.{i}.out"].shape == (3, 4, 256)
    from safetensors import safe_open
    with safe_open(str(out), "np") as f:
        meta = json.loads(f.metadata()["refimpl"])
    assert meta["tokens"] == [0, 15, 27] and meta["precision"] == precision and meta["layout"] == "official"


def test_trace_chunked_equals_one_shot(tiny_ckpt, tmp_path):
    a, b = tmp_path / "a.st", tmp_path / "b.st"
    toks = ",".join(str(i * 7 % 1280) for i in range(10))
    common = ["--tokens", toks, "--precision", "mirror", "--layout", "canonical"]
    assert main(["trace", str(tiny_ckpt), *common, "--out", str(a)]) == 0
    assert main(["trace", str(tiny_ckpt), *common, "--chunks", "3,2,1,4", "--out", str(b)]) == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    assert np.array_equal(ta["logits"], tb["logits"])
    assert np.array_equal(ta["layers.5.out"], tb["layers.5.out"])
    from safetensors import safe_open
    with safe_open(str(b), "np") as f:
        assert json.loads(f.metadata()["refimpl"])["layout"] == "canonical"
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2", "--layout", "dense", "--out", str(a)]) == 2   # usage


def test_trace_bad_input_is_a_clear_error(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "x.st"
    assert main(["trace", str(tiny_ckpt), "--tokens", "0,99999", "--out", str(out)]) == 1   # a refused input
    assert "outside the vocabulary" in capsys.readouterr().err
    assert not out.exists()
    assert main(["trace", str(tiny_ckpt), "--tokens", "1,2,3", "--max-seq-len", "2", "--out", str(out)]) == 1
    assert "max_seq_len" in capsys.readouterr().err


def test_generate_streams_tokens(tiny_ckpt, capsys):
    assert main(["generate", str(tiny_ckpt), "--tokens", "0,5,9", "--max-new-tokens", "3"]) == 0
    cap = capsys.readouterr()
    assert "3 tokens" in cap.err and cap.out.strip()


def test_encode_prints_exactly_the_prompt(tmp_path, capsys):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    assert main(["encode", str(f)]) == 0
    assert capsys.readouterr().out == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    assert main(["encode", str(f), "--thinking"]) == 0
    assert capsys.readouterr().out.endswith("<｜Assistant｜><think>")


def test_parse_prints_json(tmp_path, capsys):
    f = tmp_path / "c.txt"
    f.write_text("I think so</think>Paris.<｜end▁of▁sentence｜>")
    assert main(["parse", str(f), "--thinking"]) == 0
    msg = json.loads(capsys.readouterr().out)
    assert msg["content"] == "Paris." and msg["reasoning_content"] == "I think so"


def test_demo_explains_its_lines_and_ends_with_what_to_do_next(tmp_path, capsys, monkeypatch):
    """The first run as a newcomer sees it: no leading blank line (the progress bar of a 0.3 s write, on a
    terminal), `precision`, `layout` and the trace's sites explained in one line each, and last the next steps,
    whose commands run as printed (a float64 trace of the same tokens compares within tolerance)."""
    import shlex
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.startswith("checkpoint  ")
    lines = cap.out.splitlines()
    words = {line[:12].strip(): line[12:] for line in lines if line[:1] != " "}
    assert words["precision"].startswith("mirror: rounds where the official code rounds")
    assert words["layout"].startswith("canonical: every call lays out") and "bit for bit" in words["layout"]
    assert "sites (named intermediate tensors, docs/trace-format.md)" in words["trace"]
    assert lines[-4].startswith("next        compare mirror with float64 on the same tokens")
    assert lines[-1].strip().startswith("run the tests:  pip install '.[test]' && python -m pytest")
    trace, compare = (shlex.split(line)[1:] for line in lines[-3:-1])
    assert trace[0] == "trace" and compare[0] == "compare"
    assert main(trace) == 0 and main(compare) == 0
    assert "within tolerance (mirror-vs-float64)" in capsys.readouterr().out


def test_demo_compiles_nothing_after_its_kernels_line(tiny_ckpt):
    """'kernels ready' was followed by 8 s more compiling on a first run (the trace's longer forward pass
    reaches other kernels): prepare_kernels now reaches every kernel the demo runs. Checked in a fresh
    process by the kernels' signatures, which grow on a compile and on a load from the cache alike."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = f"""
import sys, numba
from refimpl.cli.demo import DEMO_MESSAGES, prepare_kernels
from refimpl.formats.encoding import encode_messages
from refimpl.formats.tokenizer import Tokenizer
from refimpl.formats.weights import load
from refimpl.generate import generate
from refimpl.oracle.trace import run_trace

def signatures():
    return sum(len(v.overloads) for name, m in list(sys.modules.items()) if name.startswith("refimpl.kernels")
               for v in vars(m).values() if isinstance(v, numba.core.registry.CPUDispatcher))
model = load({str(tiny_ckpt)!r}, precision="mirror", layout="canonical")
ids = Tokenizer.from_checkpoint({str(tiny_ckpt)!r}).encode(encode_messages(DEMO_MESSAGES, thinking_mode="chat"))
n = 4
prepare_kernels(model, ids, ids + ids[:n - 1])
before = signatures()
g = generate(model, ids, max_new_tokens=n, stop_on_eos=False)
run_trace(model, ids + g.tokens[:-1])
print(before, signatures())
"""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=root,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split()[-2:])
    assert before > 0 and after == before


def test_compiling_reports_progress_on_a_terminal():
    """A line when Numba starts compiling; on a terminal one line kept up to date (the kernel, the seconds),
    cleared at the end; elsewhere (a log) nothing more. A block that compiles nothing says nothing."""
    import io
    import numba
    from refimpl.cli.demo import Compiling

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for out in (Terminal(), io.StringIO()):
        with Compiling("mirror", out=out) as c:
            numba.njit(lambda x: x + 1)(1)             # a new function: compiled here, whatever the cache holds
        header = ("kernels     compiling the Numba kernels for mirror: the first run only, up to about a minute "
                  "on 2 cores\n")
        assert c.kernels == 1 and out.getvalue().startswith(header)
        rest = out.getvalue()[len(header):]
        if isinstance(out, Terminal):
            assert "\r\033[K            compiling kernel 1: <lambda> (" in rest and rest.endswith("\r\033[K")
        else:
            assert rest == ""
    with Compiling("mirror", out=Terminal()) as c:
        pass
    assert c.kernels == 0 and c.out.getvalue() == ""


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "reproduces every decoded token: yes" in out
    assert (tmp_path / "tiny" / "demo_trace.safetensors").exists()
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "2"]) == 0   # reuses it
    assert "reused" in capsys.readouterr().out
