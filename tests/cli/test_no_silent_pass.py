"""The command line where a flag used to be ignored or a check to pass with nothing checked (issue 25):
an empty --sites, --replay-weights without --replay, empty paths, a golden selection matching nothing.
Usage errors exit 2, refused inputs 1, each with one line `error: ...`; nothing is run or written."""
import pytest

from refimpl.cli.main import main


def refused(capsys, argv, code, words):
    got = main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("error: "), (got, cap.err)
    assert words in lines[0], lines[0]
    assert "passed" not in cap.out and "wrote" not in cap.out


@pytest.mark.parametrize("argv, code, words", [
    (["trace", "CK", "--tokens", "0,5", "--sites", "", "--out", "OUT"], 2,       # used to trace every site
     "argument --sites: must be comma-separated site patterns, none empty"),
    (["trace", "CK", "--tokens", "0,5", "--sites", "embed,", "--out", "OUT"], 2, "none empty"),
    (["trace", "CK", "--tokens", "0,5", "--replay-weights", "--out", "OUT"], 2,  # used to exit 1
     "argument --replay-weights: needs --replay TRACE"),
    (["trace", "NOWHERE", "--tokens", "0,5", "--replay-weights", "--out", "OUT"], 2,   # before the checkpoint
     "argument --replay-weights: needs --replay TRACE"),
    (["trace", "CK", "--tokens", "0,5", "--replay", "", "--out", "OUT"], 2,      # used to run without a replay
     "argument --replay: the path is empty"),
    (["golden", "verify", ""], 2, "argument dir: the path is empty"),             # was the current folder
    (["golden", "verify", "--ckpt", ""], 2, "argument --ckpt: the path is empty"),
    (["golden", "verify", "--input", "prefill-8O"], 1, "no input named 'prefill-8O'"),   # used to pass
    # (an input with no trace in the precision asked for: every input is stored in every precision since
    # golden format 3; tests/oracle/test_golden.py refuses one with a changed manifest)
    (["golden", "verify", "--ckpt", "CK", "--input", "prefill-1"], 1,                   # used to be ignored
     "--ckpt is for a set made with tools/make_golden.py --ckpt"),
])
def test_a_flag_that_would_be_ignored_or_match_nothing_is_refused(tiny_ckpt, tmp_path, capsys, argv, code, words):
    argv = [{"CK": tiny_ckpt, "OUT": tmp_path / "t", "NOWHERE": tmp_path / "none"}.get(a, a) for a in argv]
    refused(capsys, argv, code, words)
    assert not (tmp_path / "t").exists()


def test_sites_are_the_patterns_given_and_the_logits(tiny_ckpt, tmp_path, capsys):
    from safetensors import safe_open
    out = tmp_path / "t.st"
    assert main(["trace", str(tiny_ckpt), "--tokens", "0,5", "--sites", "embed,layers.0.attn.q",
                 "--out", str(out)]) == 0
    with safe_open(str(out), "np") as f:
        assert sorted(f.keys()) == ["embed", "layers.0.attn.q", "logits"]
