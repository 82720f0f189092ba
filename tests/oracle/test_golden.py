"""The golden set (golden/): intact, reproduced by this refimpl, and a changed number is named by site."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from refimpl.config import Config
from refimpl.oracle import golden
from refimpl.oracle.golden import GoldenError, check_files, golden_inputs, read_manifest, sample_rows, verify

GOLDEN = Path(__file__).resolve().parents[2] / "golden"     # the repository's, whatever is installed
TINY = Config.tiny()
QUICK = ["prefill-80", "prefill-33", "prefill-4-swiglu-limit-2"]   # float64 and mirror (a few seconds)


def quiet(*_):
    pass


def test_the_inputs_straddle_every_threshold():
    """Lengths 1, m-1, m, m+1 for both ratios, W-1, W, W+1, W+2m, past index_topk entries; decode; chunks."""
    inputs = golden_inputs(TINY)
    lengths = {i.length for i in inputs if i.chunks is None and i.decode_from is None}
    W = TINY.window_size
    assert {1, 3, 4, 5, 15, 16, 17, W - 1, W, W + 1, W + 8, W + 32} <= lengths
    assert max(lengths) > 4 * (TINY.index_topk + 1)          # the indexer's top-k drops entries
    decode = [i for i in inputs if i.decode_from]
    assert decode and decode[0].decode_from < W - 1 < decode[0].length     # decode across the ring's wrap
    chunked = [i for i in inputs if i.chunks]
    assert chunked and len(set(chunked[0].chunks)) > 3 and sum(chunked[0].chunks) == chunked[0].length


def test_an_input_may_change_only_the_listed_config_keys():
    """The clamp input runs the same weights with swiglu_limit 2; other keys in an input are refused."""
    from refimpl.oracle.golden import GoldenInput
    clamp = [i for i in golden_inputs(TINY) if i.config]
    assert [dict(i.config) for i in clamp] == [{"swiglu_limit": 2.0}]
    assert GoldenInput.from_dict(clamp[0].as_dict()) == clamp[0]
    with pytest.raises(GoldenError, match="config changes"):
        GoldenInput.from_dict(dict(clamp[0].as_dict(), config={"vocab_size": 3}))


def test_manifest_lists_every_file_with_its_hash():
    manifest = read_manifest(GOLDEN)
    check_files(GOLDEN, manifest)
    on_disk = {p.relative_to(GOLDEN).as_posix() for p in (GOLDEN / "traces").rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"])
    assert manifest["config"] == TINY.to_hf_dict()
    assert sum((GOLDEN / f).stat().st_size for f in manifest["files"]) < 6e6        # the set stays small


def test_a_changed_file_is_refused(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    name = next(iter(read_manifest(copy)["files"]))
    raw = bytearray((copy / name).read_bytes())
    raw[-1] ^= 1
    (copy / name).write_bytes(bytes(raw))
    with pytest.raises(GoldenError, match="SHA-256 differs from the manifest"):
        verify(copy, progress=quiet)


def test_another_format_version_is_refused(tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GoldenError, match="format_version 99"):
        verify(copy, progress=quiet)


def test_refimpl_reproduces_the_golden_set_quick():
    assert verify(GOLDEN, inputs=QUICK, progress=quiet) == []


@pytest.mark.slow
def test_refimpl_reproduces_the_whole_golden_set():
    assert verify(GOLDEN, progress=quiet) == []


def test_a_changed_number_is_named_by_its_first_site(monkeypatch):
    """Logits off by one part in 10^4 (everything before them intact): the failure names `logits`."""
    import refimpl.model.transformer as tr
    real = tr.fp32_linear
    monkeypatch.setattr(tr, "fp32_linear", lambda x, w, prec: real(x, w, prec) * np.float32(1.0001))
    failures = verify(GOLDEN, precisions=("float64",), inputs=["prefill-80"], progress=quiet)
    assert len(failures) == 1 and "first differing site logits (position 0)" in failures[0], failures


def test_a_changed_checkpoint_writer_is_named(monkeypatch, tmp_path):
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["checkpoint"]["seed"] = 1                            # the traces were made from seed 0
    (copy / "manifest.json").write_text(json.dumps(m))
    failures = verify(copy, progress=quiet)
    assert failures and all("the writer changed" in f for f in failures)


def test_sample_rows_keeps_the_listed_positions():
    s = 10
    t = {"logits": np.arange(s * 3, dtype=np.float64).reshape(s, 3),       # [s, v]
         "mtp.logits": np.arange((s - 1) * 3).reshape(s - 1, 3).astype(np.float32),
         "layers.2.attn.compressed_kv": np.ones((2, 4), np.float32),
         "layers.2.ffn.expert_ids": np.arange(s * 2, dtype=np.int32).reshape(s, 2)}
    kept = sample_rows(t, (0, 4, 9), s)
    assert kept["logits"].dtype == np.float32 and kept["logits"][:, 0].tolist() == [0, 12, 27]
    assert kept["mtp.logits"][:, 0].tolist() == [0, 12]                    # position 9 has no MTP row
    assert kept["layers.2.attn.compressed_kv"].shape == (2, 4)
    assert kept["layers.2.ffn.expert_ids"].dtype == np.int32
    with pytest.raises(GoldenError, match="has 3 rows for an input of 10 tokens"):
        sample_rows({"embed": np.zeros((3, 2))}, (0,), s)


def test_cli_golden_verify(tmp_path, capsys):
    from refimpl.cli.main import main
    assert main(["golden", "verify", str(GOLDEN), "--precision", "mirror", "--input", "prefill-1"]) == 0
    assert "golden verify: passed" in capsys.readouterr().out
    assert main(["golden", "verify", str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_a_set_made_from_a_given_checkpoint_verifies_on_it(tiny_ckpt, tmp_path, patched_ckpt):
    """tools/make_golden.py --ckpt (the real-checkpoint path, here on the tiny checkpoint): the set
    verifies on its checkpoint and refuses another one."""
    import subprocess
    import sys
    out = tmp_path / "set"
    tool = Path(__file__).resolve().parents[2] / "tools" / "make_golden.py"
    r = subprocess.run([sys.executable, str(tool), "--ckpt", str(tiny_ckpt), "--out", str(out), "--max-length", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    assert manifest["precisions"] == ["mirror"] and manifest["checkpoint"]["path"] == str(Path(tiny_ckpt).resolve())
    assert verify(out, progress=quiet) == []
    other = patched_ckpt({"norm.weight": {0: 2.0}})               # same config, other weights: a site differs
    failures = verify(out, ckpt=other, progress=quiet)
    assert failures and all("first differing site" in f for f in failures)
