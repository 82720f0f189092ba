"""The command line on bad input (issue 7): never destroys data, never a traceback, never runs away.

One section per cause of the issue. Every failure is one line `error: ...` on stderr and exit 1
(a refused input), 2 (usage), 130 (Ctrl-C) or 143 (SIGTERM); nothing is left half-written.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from refimpl.cli.demo import DEMO_MARKER, ensure_tiny_checkpoint
from refimpl.cli.main import main
from refimpl.formats import files

ROOT = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    """main(argv) in-process -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def refused(capsys, *argv, code=1, words=""):
    """Run argv and check: exit `code`, stderr exactly one line `error: ...` holding `words`; -> that line."""
    got, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("error: "), (got, err)
    assert words in lines[0], lines[0]
    return lines[0]


def listing(folder):
    """Every path under folder with its kind and bytes: equal before and after means nothing changed."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        st = os.lstat(p)
        out[str(p)] = (stat.S_IFMT(st.st_mode), p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def leftovers(folder):
    return [str(p) for p in Path(folder).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def ck(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint (tests may break it)."""
    out = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, out)
    return out


# ---------------------------------------------------------------- cause 1: demo --dir replaces only its own folder

def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = listing(tmp_path)
    refused(capsys, "demo", "--dir", mine, words=f"{mine}: not a folder written by `refimpl demo`")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "link to a folder", "link to nothing"])
def test_demo_refuses_a_file_or_a_link(tmp_path, capsys, kind):
    target, path = tmp_path / "target", tmp_path / "dir"
    if kind == "file":
        path.write_text("data")
    else:
        if kind == "link to a folder":
            target.mkdir()
        path.symlink_to(target)
    before = listing(tmp_path)
    refused(capsys, "demo", "--dir", path, words=str(path))
    assert listing(tmp_path) == before


def test_demo_writes_new_or_empty_folders_and_rewrites_only_its_own(tmp_path, tiny_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_tiny_checkpoint(empty) == (empty, True) and (empty / DEMO_MARKER).is_file()
    assert ensure_tiny_checkpoint(empty) == (empty, False)                   # valid: reused
    shard = next(empty.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])                             # broken: the demo's own, rewritten
    assert ensure_tiny_checkpoint(empty) == (empty, True) and shard.stat().st_size > 1000
    shard.write_bytes(shard.read_bytes()[:1000])
    (empty / "notes.txt").write_text("mine")                                 # ... but not with a file of yours
    before = listing(tmp_path)
    with pytest.raises(files.FileError, match="not a folder written by `refimpl demo`"):
        ensure_tiny_checkpoint(empty)
    assert listing(tmp_path) == before
    made = tmp_path / "a" / "b" / "tiny"                                     # missing: made, with its parents
    assert ensure_tiny_checkpoint(made) == (made, True) and leftovers(tmp_path) == []
    theirs = tmp_path / "theirs"                                             # a valid tiny checkpoint without
    shutil.copytree(tiny_ckpt, theirs)                                       # the marker: reused as it is
    assert ensure_tiny_checkpoint(theirs) == (theirs, False) and not (theirs / DEMO_MARKER).exists()


# ---------------------------------------------------------------- cause 2: outputs

@pytest.fixture
def bad_outs(tmp_path, ck, char_device):
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    shard = next(ck.glob("model-*.safetensors"))
    return {"fifo": (tmp_path / "fifo", "(a FIFO)"), "device": (char_device, "(a character device)"),
            "folder": (tmp_path / "folder", "(a folder)"), "empty": ("", "the output path is empty"),
            "no parent": (tmp_path / "nope" / "t.st", "parent folder"),
            "link": (tmp_path / "link", "is a symbolic link"),
            "config.json": (ck / "config.json", "is a file of the checkpoint"),
            "shard": (shard, "is a file of the checkpoint")}


@pytest.mark.parametrize("which", ["fifo", "device", "folder", "empty", "no parent", "link", "config.json", "shard"])
def test_trace_refuses_an_output_that_is_not_a_new_or_regular_file(tmp_path, ck, capsys, bad_outs, which):
    out, words = bad_outs[which]
    before = listing(tmp_path)                                   # the device node included
    t0 = time.perf_counter()
    line = refused(capsys, "trace", ck, "--tokens", "0,5", "--out", out, words=words)
    assert str(out) in line and listing(tmp_path) == before
    assert time.perf_counter() - t0 < 5                                      # before the model is loaded


def test_trace_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, ck, capsys, monkeypatch):
    real = files._open_temporary

    class Full:                                               # every write fails as on a full disk
        def __init__(self, tmp):
            self.f = real(tmp)

        def write(self, b):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(files, "_open_temporary", Full)
    out = tmp_path / "t.st"
    refused(capsys, "trace", ck, "--tokens", "0,5", "--out", out,
            words=f"{out}: cannot write (No space left on device)")
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_while_a_trace_is_written_leaves_nothing(tmp_path, ck, capsys, monkeypatch):
    real = files._open_temporary

    class Interrupted:                                        # Ctrl-C after the first write
        def __init__(self, tmp):
            self.f = real(tmp)

        def write(self, b):
            self.f.write(b)
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(files, "_open_temporary", Interrupted)
    out = tmp_path / "t.st"
    refused(capsys, "trace", ck, "--tokens", "0,5", "--out", out, code=130, words="error: interrupted")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "link", "folder of yours", "missing parent"])
def test_make_checkpoint_force_replaces_only_a_checkpoint_folder(tmp_path, ck, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("data")
    elif kind == "link":
        out.symlink_to(ck)
    elif kind == "folder of yours":
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "results.csv").write_text("1,2")
    else:
        out = tmp_path / "nope" / "out"
    before = listing(tmp_path)
    refused(capsys, "make-checkpoint", "tiny", out, "--force", "--layers", "1", "--experts", "2", words=str(out))
    assert listing(tmp_path) == before                                       # no OUT.old-xxxx, no temporaries


def test_make_checkpoint_force_replaces_a_checkpoint_it_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "make-checkpoint", "tiny", out, "--layers", "2", "--experts", "2")[0] == 0
    assert run(capsys, "make-checkpoint", "tiny", out, "--layers", "1", "--experts", "2")[0] == 1   # no --force
    assert run(capsys, "make-checkpoint", "tiny", out, "--force", "--layers", "1", "--experts", "2")[0] == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- cause 7 (landed before): verified at the CLI

@pytest.mark.parametrize("text", ["hi\n\n<｜DSML｜tool_calls", "hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"])
def test_parse_refuses_a_completion_cut_off_inside_its_tool_calls(tmp_path, capsys, text):
    f = tmp_path / "c.txt"
    f.write_text(text)
    refused(capsys, "parse", f, words="ends inside the tool-call block")


# ---------------------------------------------------------------- cause 8: one line, never a traceback

def test_config_json_that_is_a_folder(ck, tmp_path, capsys):
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()
    refused(capsys, "trace", ck, "--tokens", "0", "--out", tmp_path / "t", words="config.json: is a folder")
    code, out, _ = run(capsys, "inspect", ck)
    assert code == 1 and "config: " in out and "is a folder" in out


DEEP = "[" * 100_000 + "]" * 100_000


def test_json_nested_100k_deep(ck, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    refused(capsys, "encode", deep, words=f"{deep}: JSON nested more than 100 levels deep")
    refused(capsys, "generate", ck, "--chat", deep, words=f"{deep}: JSON nested more than 100 levels deep")
    (ck / "config.json").write_text(DEEP)
    refused(capsys, "trace", ck, "--tokens", "0", "--out", tmp_path / "t", words="config.json: JSON nested more")


def test_empty_token_list(ck, tmp_path, capsys):
    refused(capsys, "trace", ck, "--tokens", "", "--out", tmp_path / "t", code=2, words="argument --tokens: is empty")
    refused(capsys, "generate", ck, "--tokens", " , ", code=2, words="argument --tokens")


@pytest.mark.parametrize("broken", ["missing", "corrupt", "a folder"])
def test_prompt_and_chat_on_a_checkpoint_without_a_usable_tokenizer(ck, tmp_path, capsys, broken):
    tok = ck / "tokenizer.json"
    tok.unlink()
    if broken == "corrupt":
        tok.write_text('{"model": ')
    elif broken == "a folder":
        tok.mkdir()
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    for argv in (["generate", ck, "--prompt", "hi"], ["generate", ck, "--chat", chat],
                 ["trace", ck, "--prompt", "hi", "--out", tmp_path / "t"]):
        refused(capsys, *argv, words="tokenizer.json")


@pytest.mark.parametrize("message, words", [
    ({"role": "user", "content": "hi", "task": ["query"]}, "unknown `task` of type list"),
    ({"role": "user", "content": "hi", "task": {"query": 1}}, "unknown `task` of type dict"),
    ({"role": "user", "content": "a\ud800b"}, "lone surrogate"),
    ({"role": "user", "content": "hi", "tool_calls": "x"}, "tool_calls"),
    ({"role": "wizard", "content": "hi"}, "role"),
])
def test_malformed_messages(ck, tmp_path, capsys, message, words):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([message]))                      # json.dumps writes the surrogate as \ud800
    refused(capsys, "encode", chat, words=words)
    refused(capsys, "generate", ck, "--chat", chat, words=words)


def test_folders_given_as_input_files(ck, tmp_path, capsys):
    refused(capsys, "encode", tmp_path, words=f"{tmp_path}: is a folder, not a chat JSON file")
    refused(capsys, "parse", tmp_path, words=f"{tmp_path}: is a folder, not a completion text file")
    refused(capsys, "generate", ck, "--chat", tmp_path, words=f"{tmp_path}: is a folder")


@pytest.mark.parametrize("flag, value, code, words", [
    ("--temperature", "abc", 2, "argument --temperature: must be a finite decimal number >= 0 (0 = greedy), got 'abc'"),
    ("--temperature", "-1", 2, "argument --temperature: must be a finite decimal number >= 0 (0 = greedy), got '-1'"),
    ("--temperature", "nan", 2, "argument --temperature: must be a finite decimal number >= 0 (0 = greedy), got 'nan'"),
    ("--temperature", "inf", 2, "argument --temperature: must be a finite decimal number >= 0 (0 = greedy), got 'inf'"),
    ("--top-p", "0", 2, "argument --top-p: must be a decimal number in (0, 1], got '0'"),
    ("--top-p", "1.5", 2, "argument --top-p: must be a decimal number in (0, 1], got '1.5'"),
    ("--top-p", "nan", 2, "argument --top-p: must be a decimal number in (0, 1], got 'nan'"),
    ("--max-new-tokens", "-1", 2, "argument --max-new-tokens: must be an integer >= 0"),
    ("--seed", "x", 2, "argument --seed: must be an integer >= 0"),
])
def test_sampling_parameters_are_checked_before_anything_is_loaded(tmp_path, capsys, flag, value, code, words):
    # the checkpoint does not even exist: the flag is reported first
    refused(capsys, "generate", tmp_path / "nothing", "--tokens", "0", flag, value, code=code, words=words)


def _ctrl_c_as_in_a_terminal():
    """A child's Ctrl-C as a user's terminal gives it (SIG_DFL, which Python turns into KeyboardInterrupt): a test
    suite started in the background by a shell without job control inherits SIGINT ignored, and a process that
    ignores SIGINT rightly goes on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_while_writing(tmp_path, sig):
    """Start `make-checkpoint`, send sig once its temporary folder exists; -> (exit code, stderr)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "refimpl.cli.main", "make-checkpoint", "tiny", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("out.tmp-*")):
        assert proc.poll() is None, "make-checkpoint ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert list(tmp_path.iterdir()) == [], "a half-written checkpoint was left behind"
    return proc.returncode, err


def test_ctrl_c_exits_130_without_a_traceback_and_leaves_nothing(tmp_path):
    code, err = _interrupt_while_writing(tmp_path, signal.SIGINT)
    assert code == 130 and err.strip() == "error: interrupted"


def test_sigterm_exits_143_and_leaves_nothing(tmp_path):
    code, err = _interrupt_while_writing(tmp_path, signal.SIGTERM)
    assert code == 143 and err.strip() == "error: terminated"


# ---------------------------------------------------------------- cause 9: bounded reads

def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)                                         # no disk used: zeros are holes
    return path


def _bounded(capsys, *argv, words):
    """refused(...) in under a second of our own work and under 16 MB of Python memory."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        refused(capsys, *argv, words=words)
        assert time.perf_counter() - t0 < 2.0
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_a_50_mb_chat_or_completion_fails_fast(ck, tmp_path, capsys):
    big = _sparse(tmp_path / "big.json", 50 << 20)
    _bounded(capsys, "encode", big, words=f"{big}: 50 MiB, more than the 8 MiB allowed for a chat JSON file")
    _bounded(capsys, "generate", ck, "--chat", big, words="more than the 8 MiB allowed")
    _bounded(capsys, "parse", big, words="more than the 8 MiB allowed for a completion text file")
    _bounded(capsys, "encode", "/dev/zero", words="/dev/zero: more than the 8 MiB allowed")   # no size to check


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(ck, capsys):
    _bounded(capsys, "generate", ck, "--prompt", "ab " * 500_000, words="before tokenizing")


def test_a_shard_given_for_the_checkpoint_is_not_read(tmp_path, capsys):
    shard = _sparse(tmp_path / "model-00001-of-00046.safetensors", 3 << 30)
    _bounded(capsys, "trace", shard, "--tokens", "0", "--out", tmp_path / "t",
             words="is a file: a checkpoint is a folder")
    _bounded(capsys, "generate", shard, "--tokens", "0", words="is a file: a checkpoint is a folder")


@pytest.mark.parametrize("name, words", [("config.json", "more than the 1 MiB allowed for a config.json"),
                                         ("tokenizer_config.json", "more than the 1 MiB allowed"),
                                         ("tokenizer.json", "more than the 64 MiB allowed"),
                                         ("model.safetensors.index.json", "more than the 64 MiB allowed")])
def test_checkpoint_json_reads_are_bounded(ck, tmp_path, capsys, name, words):
    _sparse(ck / name, 3 << 30)
    _bounded(capsys, "generate", ck, "--prompt", "hi", words=words)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json",
                                  "model.safetensors.index.json", "model-00001-of-00001.safetensors"])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(ck, capsys, name):
    (ck / name).unlink()
    os.mkfifo(ck / name)                                         # opening it to read would block for ever
    refused(capsys, "generate", ck, "--prompt", "hi", words=name)
    if name != "tokenizer.json" and name != "tokenizer_config.json":
        code, out, err = run(capsys, "inspect", ck)
        assert code == 1 and name in out + err


def test_an_empty_checkpoint_path_is_not_the_current_folder(capsys):
    refused(capsys, "inspect", "", words="the checkpoint path is empty")
    refused(capsys, "generate", "", "--tokens", "0", words="the checkpoint path is empty")


# ---------------------------------------------------------------- cause 10: one exit-code convention

@pytest.mark.parametrize("argv, code", [
    (["--no-such-option"], 2),
    (["trace", "CK", "--tokens", "0,x", "--out", "OUT"], 2),          # malformed flag value: usage
    (["trace", "CK", "--tokens", "1_0", "--out", "OUT"], 2),          # int() would read 10
    (["trace", "CK", "--tokens", "\u0663", "--out", "OUT"], 2),       # and this Arabic-Indic digit as 3
    (["trace", "CK", "--tokens", "0,5", "--chunks", "0", "--out", "OUT"], 2),
    (["trace", "CK", "--tokens", "0,99999", "--out", "OUT"], 1),      # well-formed but refused
    (["trace", "CK", "--tokens", "0,5", "--chunks", "1,2", "--out", "OUT"], 1),
    (["trace", "CK", "--tokens", "0,5", "--sites", "nope", "--out", "OUT"], 1),
    (["encode", "MISSING"], 1),
])
def test_exit_codes(ck, tmp_path, capsys, argv, code):
    argv = [{"CK": ck, "OUT": tmp_path / "t", "MISSING": tmp_path / "m.json"}.get(a, a) for a in argv]
    refused(capsys, *argv, code=code)
    assert not (tmp_path / "t").exists()


def test_success_and_help_exit_0(ck, tmp_path, capsys):
    assert run(capsys, "trace", ck, "--tokens", "0,5", "--sites", "embed", "--out", tmp_path / "t")[0] == 0
    assert run(capsys, "trace", "--help")[0] == 0


def test_max_seq_len_is_reported_as_the_flag(ck, tmp_path, capsys):
    line = refused(capsys, "trace", ck, "--tokens", "0", "--max-seq-len", "0", "--out", tmp_path / "t", code=2,
                   words="argument --max-seq-len: must be an integer >= 1")
    assert "config.json" not in line
    from refimpl.config import ConfigError
    from refimpl.formats.weights import load
    with pytest.raises(ConfigError, match="max_seq_len = 0: must be between 1") as e:   # the API: not the file's
        load(ck, max_seq_len=0)
    assert "config.json" not in str(e.value)


def test_utf8_errors_name_the_file(ck, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    for argv in (["encode", bad], ["parse", bad], ["generate", ck, "--chat", bad]):
        refused(capsys, *argv, words=f"{bad}: not UTF-8 text (byte 0xe9 at offset 33)")
    (ck / "config.json").write_bytes(b"{\xff}")
    refused(capsys, "trace", ck, "--tokens", "0", "--out", tmp_path / "t",
            words=f"{ck / 'config.json'}: not UTF-8 text (byte 0xff at offset 1)")


def test_the_readme_states_the_exit_codes():
    readme = (ROOT / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |", "| 143 |"):
        assert code in readme, code


# ---------------------------------------------------------------- found by a review after the first fixes

def test_make_checkpoint_force_refuses_a_folder_that_only_looks_like_a_checkpoint(tmp_path, capsys):
    """A downloaded checkpoint has the official file names too: --force replaces only a folder refimpl marked."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text('{"mine": 1}')
    (real / "model-00001-of-00046.safetensors").write_bytes(os.urandom(1000))
    code, _, err = run(capsys, "make-checkpoint", "tiny", str(real), "--force")
    assert code == 1 and "no written_by_refimpl.json" in err
    assert (real / "config.json").read_text() == '{"mine": 1}' and len(list(real.iterdir())) == 2


def test_demo_never_replaces_a_trace_file_it_did_not_write(tmp_path, capsys, tiny_ckpt):
    folder = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, folder)                        # a valid tiny checkpoint the demo did not write
    mine = folder / "demo_trace.safetensors"
    mine.write_bytes(b"my own file")
    code, out, _ = run(capsys, "demo", "--dir", str(folder), "--max-new-tokens", "1")
    assert code == 0 and "not written" in out and mine.read_bytes() == b"my own file"
    mine.unlink()
    assert run(capsys, "demo", "--dir", str(folder), "--max-new-tokens", "1")[0] == 0    # writes its own...
    assert run(capsys, "demo", "--dir", str(folder), "--max-new-tokens", "1")[0] == 0    # ...and replaces it
    assert "not written" not in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "x")])
def test_malformed_sampling_flags_are_usage_errors(tiny_ckpt, capsys, flag, value):
    code, _, err = run(capsys, "generate", str(tiny_ckpt), "--tokens", "1", flag, value)
    assert code == 2 and f"argument {flag}" in err


@pytest.mark.parametrize("flag", ["--layers", "--experts"])
def test_more_layers_or_experts_than_the_preset_is_a_usage_error_naming_the_flag(tmp_path, capsys, flag):
    code, _, err = run(capsys, "make-checkpoint", "tiny", str(tmp_path / "x"), flag, "1000")
    assert code == 2 and f"argument {flag}: 1000 is more than" in err and not (tmp_path / "x").exists()


def test_a_command_started_with_stdout_closed_is_one_line(tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text('[{"role": "user", "content": "hi"}]')
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m refimpl.cli.main encode "{chat}" >&-'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: standard output is closed: the command has nowhere to write its output"]


def test_a_long_legal_output_name_is_written(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / ("b" * 250)                              # legal; NAME.tmp-XXXXXXXX would not be
    code, _, err = run(capsys, "trace", str(tiny_ckpt), "--tokens", "1,2", "--sites", "embed", "--out", str(out))
    assert code == 0, err
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]


# ---------------------------------------------------------------- issue 25: CLI words and the first run

@pytest.mark.parametrize("how", ["--kernels", "REFIMPL_KERNELS"])
@pytest.mark.parametrize("value, words", [("cuda", "needs an NVIDIA GPU (test)"), ("fast", "the first item must be")])
def test_a_kernel_selection_is_one_rule_from_the_flag_or_the_environment(ck, tmp_path, capsys, monkeypatch,
                                                                         how, value, words):
    """A selection that cannot be made (malformed, or cuda without a GPU) is a usage error, exit 2, whether it
    comes from --kernels or from REFIMPL_KERNELS (the variable gave 1), before anything is loaded."""
    import refimpl.cuda
    monkeypatch.setattr(refimpl.cuda, "unavailable_reason", lambda: "kernels=cuda needs an NVIDIA GPU (test)")
    flag = ["--kernels", value] if how == "--kernels" else []
    if how == "REFIMPL_KERNELS":
        monkeypatch.setenv("REFIMPL_KERNELS", value)
    refused(capsys, "trace", ck, "--tokens", "0,5", "--out", tmp_path / "t", *flag, code=2, words=words)
    refused(capsys, "generate", ck, "--tokens", "0", *flag, code=2, words=words)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag", ["--temperature", "--top-p", "--tokens", "--seed", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["\u0661", "1_0", " 1_0", "\uff11", "0x1", "1e999"])
def test_every_numeric_flag_reads_numbers_alike(ck, capsys, flag, value):
    """One parser for every numeric flag: ASCII decimal only ('1_0' and non-ASCII digits were read by
    --temperature and --top-p as 10 and 1, and refused by --tokens and --seed)."""
    refused(capsys, "generate", ck, *(["--tokens", "0"] if flag != "--tokens" else []), flag, value,
            code=2, words=f"argument {flag}")


def test_decimal_sampling_flags_still_read(ck, capsys):
    code, _, err = run(capsys, "generate", ck, "--tokens", "0", "--temperature", ".5e1", "--top-p", "+0.25",
                       "--max-new-tokens", "1")
    assert code == 0 and "1 tokens" in err


def test_thinking_without_chat_is_refused_not_ignored(ck, capsys):
    """--thinking sets the chat encoding's mode: with --prompt or --tokens it did nothing, silently."""
    for given in (["--prompt", "Hi"], ["--tokens", "0,5"]):
        refused(capsys, "generate", ck, *given, "--thinking", code=2, words="--thinking: applies to --chat only")


def test_generate_says_it_stopped_at_max_seq_len(ck, capsys):
    """A full context: '0 tokens ... decode nan ms/token' before; now why it stopped, and no nan."""
    code, _, err = run(capsys, "generate", ck, "--tokens", "0,5,9", "--max-seq-len", "3")
    assert code == 0 and err.strip() == ("[0 tokens; stopped at max_seq_len=3: the prompt (3 tokens) and the new "
                                         "tokens fill the context (--max-seq-len N sets it)]")
    code, _, err = run(capsys, "generate", ck, "--tokens", "0,5,9", "--max-seq-len", "5", "--max-new-tokens", "9")
    assert code == 0 and "[2 tokens; prefill" in err and "stopped at max_seq_len=5" in err and "nan" not in err
    code, _, err = run(capsys, "generate", ck, "--tokens", "0,5,9", "--max-new-tokens", "1")
    assert code == 0 and "decode" not in err and "max_seq_len" not in err        # one token: no decode step


def test_an_empty_demo_dir_is_not_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    refused(capsys, "demo", "--dir", "", code=2, words="argument --dir: is empty")
    with pytest.raises(files.FileError, match=r"the demo's folder \(--dir\) is empty"):
        ensure_tiny_checkpoint("")
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_a_demo_racing_another_reuses_its_checkpoint(tmp_path, tiny_ckpt, monkeypatch):
    """Two demos at once: the second finds the folder written while it wrote its own; it reuses it instead of
    telling the user to pass overwrite=True or --force (which demo does not have)."""
    from refimpl.synthetic import writer
    target, real = tmp_path / "tiny", writer.write_sharded

    def meanwhile(make):
        def write_sharded(*args, **kwargs):          # while this demo writes its shards, the folder appears
            real(*args, **kwargs)
            make(target)
        return write_sharded

    def other_demo(out):
        shutil.copytree(tiny_ckpt, out)
        (out / DEMO_MARKER).write_text("x")
    monkeypatch.setattr(writer, "write_sharded", meanwhile(other_demo))
    assert ensure_tiny_checkpoint(target) == (target, False)
    assert not leftovers(tmp_path)
    shutil.rmtree(target)

    def someone_else(out):                           # anything else arriving meanwhile: refused, untouched
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(writer, "write_sharded", meanwhile(someone_else))
    with pytest.raises(files.FileError, match="another program wrote into this folder") as e:
        ensure_tiny_checkpoint(target)
    assert "--force" not in str(e.value) and "overwrite" not in str(e.value)
    assert os.listdir(target) == ["notes.txt"] and not leftovers(tmp_path)


@pytest.mark.parametrize("command", [["make-checkpoint", "tiny", "OUT"], ["demo", "--dir", "OUT"]])
def test_a_full_disk_names_the_folder_not_its_removed_temporary(tmp_path, capsys, monkeypatch, command):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "tiny"
    line = refused(capsys, *[str(out) if a == "OUT" else a for a in command], words="No space left on device")
    assert line.startswith(f"error: {out}/") and ".tmp-" not in line
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- issue 25: checkpoint, config and tokenizer inputs

def test_a_shard_with_bytes_no_tensor_covers_is_refused(ck, tmp_path, capsys):
    """Trailing bytes (and gaps, overlaps) passed `inspect` and ran; the safetensors library refuses them."""
    shard = next(ck.glob("model-*.safetensors"))
    with open(shard, "ab") as f:
        f.write(b"\0")
    words = f"{shard}: 1 byte(s) after the last tensor"
    refused(capsys, "inspect", ck, words=words)
    refused(capsys, "trace", ck, "--tokens", "0,5", "--out", tmp_path / "t", words=words)


def test_inspect_refuses_a_shard_file(ck, capsys):
    shard = next(ck.glob("model-*.safetensors"))
    refused(capsys, "inspect", shard, words="is a file: a checkpoint is a folder")


@pytest.mark.parametrize("where", ["chat", "config.json", "tokenizer_config.json"])
def test_duplicate_json_keys_are_refused(ck, tmp_path, capsys, where):
    """json keeps the last of two equal keys: a chat or config said one thing and ran another."""
    if where == "chat":
        path = tmp_path / "chat.json"
        path.write_text('[{"role": "user", "content": "hi", "content": "bye"}]')
        refused(capsys, "encode", path, words=f"{path}: duplicate key 'content' in a JSON object")
        refused(capsys, "generate", ck, "--chat", path, words="duplicate key 'content'")
        return
    path, key = ck / where, "vocab_size" if where == "config.json" else "eos_token"
    path.write_text(path.read_text().replace("{", f'{{"{key}": 1, ', 1))        # the file's own comes later
    refused(capsys, "generate", ck, "--prompt", "hi", words=f"{path}: duplicate key '{key}' in a JSON object")


@pytest.mark.parametrize("value, words", [("NaN", "NaN is not a JSON number (JSON numbers are finite)"),
                                          ("1e308", "route_scale = 1e+308: must be > 0 and <= 10000 "
                                                    "(key 'routed_scaling_factor')")])
def test_non_finite_or_huge_config_values_are_named(ck, tmp_path, capsys, value, words):
    """NaN read as 'wrong type: nan'; 1e308 printed RuntimeWarnings and blamed the weights (issue 25)."""
    raw = json.loads((ck / "config.json").read_text())
    raw["routed_scaling_factor"] = "VALUE"
    (ck / "config.json").write_text(json.dumps(raw).replace('"VALUE"', value))
    refused(capsys, "trace", ck, "--tokens", "0,5", "--out", tmp_path / "t", words=words)
    code, out, _ = run(capsys, "inspect", ck)
    assert code == 1 and words in out


def test_generate_refuses_a_tokenizer_smaller_than_the_vocabulary_before_running(ck, capsys):
    """It failed mid-generation, after printing part of the text (issue 25)."""
    from refimpl.synthetic.tokenizer import build_tiny_tokenizer, write_tokenizer_files
    write_tokenizer_files(ck, build_tiny_tokenizer(1024))
    got, out, err = run(capsys, "generate", ck, "--tokens", "0,5", "--max-new-tokens", "4")
    assert got == 1 and out == "" and err.startswith("error: tokenizer.json has no token for 256 of the model's 1280")


def _tokenizer_with(ck, **parts):
    import tokenizers
    t = tokenizers.Tokenizer.from_file(str(ck / "tokenizer.json"))
    for name, value in parts.items():
        setattr(t, name, value)
    (ck / "tokenizer.json").write_text(t.to_str())


def test_a_prompt_an_expanding_normalizer_blows_up_is_refused_before_tokenizing(ck, capsys):
    from tokenizers import normalizers
    _tokenizer_with(ck, normalizer=normalizers.Replace("a", "x" * 2000))
    t0 = time.perf_counter()
    refused(capsys, "generate", ck, "--prompt", "a" * 100_000, words="normalizes to more than")
    assert time.perf_counter() - t0 < 5                           # was: 1.6 GB at 5 KB, an abort (134) at 100 KB


def test_a_tokenizer_regex_that_panics_is_one_line(ck, capfd):
    """A Rust panic report and a Python traceback (issue 25): now one line, the panic's report held back."""
    from tokenizers import Regex, pre_tokenizers
    _tokenizer_with(ck, pre_tokenizer=pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"(a+)+$"), "isolated"),
                                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    capfd.readouterr()
    code = main(["generate", str(ck), "--prompt", "a" * 40 + "b"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "the tokenizers library failed tokenizing this text" in err[0], err


def test_a_shard_truncated_while_generate_runs_is_one_line(ck):
    """The process died of SIGBUS (exit 135) with no error line (issue 25): the fault is in NumPy's machine
    code, so formats/sigbus.py answers it there, naming the file."""
    shard = next(ck.glob("model-*.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "refimpl.cli.main", "generate", str(ck), "--tokens", "0,5",
                             "--max-new-tokens", "4000", "--kernels", "numpy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.read(1), "generate printed nothing"             # the model runs, over the mapped shard
        os.truncate(shard, 4096)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and err.decode().splitlines() == [
        f"error: {shard}: changed while in use (truncated while refimpl read it through a memory map)"]


def test_a_fault_outside_the_mapped_files_still_ends_the_process(tmp_path):
    """The handler answers only for registered mappings; any other SIGBUS ends the process as before (no hang)."""
    script = tmp_path / "fault.py"
    script.write_text(
        "import mmap, os, sys\n"
        "from refimpl.formats import sigbus\n"
        "sigbus.install()\n"
        f"f = open({str(tmp_path / 'x')!r}, 'w+b'); f.truncate(1 << 16)\n"
        "m = mmap.mmap(f.fileno(), 1 << 16, access=mmap.ACCESS_READ)\n"
        "f.truncate(0)\n"
        "print(m[40000])\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == -signal.SIGBUS and "changed while in use" not in r.stderr
