"""The golden set (golden/): intact, reproduced by this refimpl, and a changed number is named by site."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from refimpl.config import Config
from refimpl.oracle import golden
from refimpl.oracle.golden import GoldenError, check_files, golden_inputs, read_manifest, sample_rows, verify

GOLDEN = Path(__file__).resolve().parents[2] / "golden"     # the repository's, whatever is installed
TINY = Config.tiny()
QUICK = ["prefill-80", "prefill-33", "prefill-4-swiglu-limit-2",   # float64 and mirror (a few seconds),
         "tiny-partial-prefill-5"]                                   # the second checkpoint's input too


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
    on_disk = {p.relative_to(GOLDEN).as_posix() for d in ("traces", "gradients") for p in (GOLDEN / d).rglob("*")
               if p.is_file()}
    assert on_disk == set(manifest["files"])
    assert manifest["config"] == TINY.to_hf_dict()
    assert sum((GOLDEN / f).stat().st_size for f in manifest["files"]) < 15e6       # the set stays small (14.7 MB)


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
    r = subprocess.run([sys.executable, str(tool), "--ckpt", str(tiny_ckpt), "--out", str(out), "--max-length", "4",
                        "--reason", "a test"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    assert manifest["precisions"] == ["mirror"] and manifest["checkpoint"]["path"] == str(Path(tiny_ckpt).resolve())
    assert verify(out, progress=quiet) == []
    other = patched_ckpt({"norm.weight": {0: 2.0}})               # same config, other weights: a site differs
    failures = verify(out, ckpt=other, progress=quiet)
    assert failures and all("first differing site" in f for f in failures)


# ---------------------------------------------------------------- bad manifests and selections (issue 25)

def manifest_copy(tmp_path, change) -> Path:
    """A golden folder holding only a changed copy of the manifest (refused before any trace is read)."""
    m = json.loads((GOLDEN / "manifest.json").read_text())
    change(m)
    folder = tmp_path / "golden"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def no_checkpoint(monkeypatch):
    """Fail the test if verify gets as far as making the checkpoint (a refusal must come first)."""
    import refimpl.synthetic.writer as writer
    monkeypatch.setattr(writer, "make_checkpoint", lambda *a, **k: pytest.fail("verify ran"))


@pytest.mark.parametrize("kwargs, change, words", [
    ({"inputs": ["prefill-8O"]}, None, "no input named 'prefill-8O' in the golden set; its inputs: prefill-1, "),
    ({"inputs": ["prefill-1"], "precisions": ["float64"]},
     lambda m: m["inputs"][0].update(precisions=["mirror"]),
     "input prefill-1 has no trace in float64; it is stored in mirror"),
    ({"precisions": ["float64"]}, lambda m: m.update(precisions=["mirror"]),
     "precision 'float64': this golden set holds mirror only"),
    ({}, lambda m: m.update(precisions=[]), "'precisions' must list one or more of float64, float32, mirror"),
    ({}, lambda m: m.update(inputs=[]), "'inputs' lists no input"),
    ({"inputs": "prefill-80"}, None, "inputs must be a non-empty list of names"),
    ({"precisions": ()}, None, "precisions must be a non-empty list of names"),
])
def test_a_selection_that_matches_nothing_is_refused_before_running(tmp_path, monkeypatch, kwargs, change, words):
    """Zero checks used to print `golden verify: passed`: a misspelt input, an input with no trace in
    the precision asked for, a manifest listing no precision."""
    no_checkpoint(monkeypatch)
    folder = GOLDEN if change is None else manifest_copy(tmp_path, change)
    with pytest.raises(GoldenError, match=re.escape(words)):
        verify(folder, progress=quiet, **kwargs)


def test_cli_golden_verify_of_nothing_is_an_error_not_a_pass(capsys, monkeypatch):
    from refimpl.cli.main import main
    no_checkpoint(monkeypatch)
    assert main(["golden", "verify", "--input", "prefill-8O"]) == 1
    cap = capsys.readouterr()
    assert "passed" not in cap.out and cap.err.startswith("error: no input named 'prefill-8O'")
    assert len(cap.err.strip().splitlines()) == 1


def _drop(*path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]
    return change


def _set(value, *path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    return change


@pytest.mark.parametrize("change, words", [
    *[(_drop(key), f"'{key}' must be a JSON") for key in ("checkpoint", "config", "tokens", "inputs", "precisions",
                                                          "files", "checkpoints")],
    (_set("elsewhere", "inputs", 16, "checkpoint"), "input tiny-partial-prefill-5 runs on checkpoint 'elsewhere', "
                                                    "which 'checkpoints' does not describe"),
    (_set("../x", "inputs", 16, "checkpoint"), "'checkpoint' must be null or the name of an entry"),
    (_drop("checkpoints", "tiny-partial", "config"), "'checkpoints' must map names to a preset, a seed"),
    (_drop("checkpoints", "tiny-partial", "sha256"), "'checkpoint.sha256' must map"),
    (_set(["a"], "tokens"), "'tokens' must be a non-empty list of token ids"),
    (_set("canonical!", "layout"), "'layout' must be one of official, canonical"),
    (_set({"/etc/passwd": "0" * 64}, "files"), "'files' must map paths inside the folder"),
    (_set({"traces/../../x": "0" * 64}, "files"), "'files' must map paths inside the folder"),
    (_drop("checkpoint", "seed"), "a 'seed' (an integer >= 0)"),
    (_set(-1, "checkpoint", "seed"), "a 'seed' (an integer >= 0)"),
    (_drop("checkpoint", "sha256"), "'checkpoint.sha256' must map"),
    (_set({"../config.json": "0" * 64}, "checkpoint", "sha256"), "'checkpoint.sha256' must map"),
    (_drop("inputs", 0, "rows"), "input prefill-1: 'rows' must list increasing positions in [0, 1)"),
    (_drop("inputs", 0, "name"), "an input's 'name' must be a file name"),
    (_set("../../x", "inputs", 0, "name"), "an input's 'name' must be a file name"),
    (_set(81, "inputs", 0, "length"), "input prefill-1: 'length' must be an integer in [1, 80]"),
    (_set("1", "inputs", 0, "length"), "input prefill-1: 'length' must be an integer in [1, 80]"),
    (_set([5], "inputs", 0, "rows"), "'rows' must list increasing positions in [0, 1)"),
    (_set(-100000000, "inputs", 13, "decode_from"), "input decode-29-to-80: 'decode_from' must be null or an "
                                                    "integer in [1, 79]"),
    (_set([3, 5], "inputs", 14, "chunks"), "input chunked-80: 'chunks' must be null or positive integers adding "
                                          "up to its length 80"),
    (_set(["bf16"], "inputs", 0, "precisions"), "input prefill-1: 'precisions' must list one or more of"),
    (_set({"swiglu_limit": "2"}, "inputs", 15, "config"), "config changes must be finite numbers"),
    (_set("prefill-3", "inputs", 0, "name"), "two inputs are named prefill-3"),
    (_drop("files", "traces/mirror/prefill-1.safetensors"),
     "'files' does not list traces/mirror/prefill-1.safetensors"),
])
def test_a_manifest_with_a_missing_or_malformed_key_is_one_clear_error(tmp_path, monkeypatch, change, words):
    """A manifest without one of the keys verify reads used to raise KeyError (a traceback); every
    field is checked against its type and range before anything runs."""
    no_checkpoint(monkeypatch)
    folder = manifest_copy(tmp_path, change)
    with pytest.raises(GoldenError, match=re.escape(words)) as e:
        verify(folder, progress=quiet)
    assert str(e.value).startswith(str(folder / "manifest.json"))


def test_the_cli_reports_a_manifest_without_its_files_in_one_line(tmp_path, capsys, monkeypatch):
    from refimpl.cli.main import main
    no_checkpoint(monkeypatch)
    folder = manifest_copy(tmp_path, _drop("files"))
    assert main(["golden", "verify", str(folder)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'files' must be a JSON object; it is missing" in err


def test_a_checkpoint_given_for_a_set_remade_from_its_seed_is_refused(tmp_path, monkeypatch):
    """--ckpt used to be ignored for the built-in set (made from make-checkpoint tiny --seed 0)."""
    no_checkpoint(monkeypatch)
    with pytest.raises(GoldenError, match=r"a checkpoint was given \(--ckpt .*\), but this set's checkpoint is "
                                          r"re-made by make-checkpoint tiny --seed 0"):
        verify(GOLDEN, ckpt=tmp_path, inputs=["prefill-1"], progress=quiet)


# ---------------------------------------------------------------- the golden set travels with the package

def installed_copy(site: Path) -> Path:
    """refimpl as pyproject.toml installs it (its packages, package dirs and package data), under site."""
    import tomllib
    root = GOLDEN.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    for pkg in tool["packages"]:
        parent = next((p for p in sorted(dirs, key=len, reverse=True) if pkg == p or pkg.startswith(p + ".")), None)
        src = root / dirs[parent] / Path(*pkg[len(parent) + 1:].split(".")) if parent else root / Path(*pkg.split("."))
        dst = site / Path(*pkg.split("."))
        dst.mkdir(parents=True, exist_ok=True)
        for pattern in ["*.py", *tool["package-data"].get(pkg, [])]:
            for f in src.glob(pattern):
                shutil.copy(f, dst / f.name)
    return site


def test_the_package_lists_every_package_and_every_golden_file():
    """pyproject.toml names the packages (to map golden/ into refimpl/golden): none may be left out."""
    import tomllib
    root = GOLDEN.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "refimpl").rglob("__init__.py")}
    listed = set(tool["packages"])
    assert found == {p for p in listed if not p.startswith("refimpl.golden")}
    assert {f"refimpl.golden.traces.{p.name}" for p in (GOLDEN / "traces").iterdir()} | \
        {"refimpl.golden", "refimpl.golden.gradients"} == \
        {p for p in listed if p.startswith("refimpl.golden")}


def test_the_golden_set_is_found_from_any_folder(tmp_path, monkeypatch):
    """After `pip install .`, `refimpl golden verify` used to look for ./golden (`<cwd>/golden: no
    manifest.json`). The set is installed as refimpl/golden; from a source tree, golden/ next to it."""
    import subprocess
    import sys
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert golden.default_dir() == GOLDEN                                      # a clone / an editable install
    site = installed_copy(tmp_path / "site")
    probe = ("import refimpl; from refimpl.oracle.golden import default_dir, read_manifest; "
             "d = default_dir(); read_manifest(d); print(refimpl.__file__); print(d)")
    env = dict(__import__("os").environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(site / "refimpl" / "__init__.py"), str(site / "refimpl" / "golden")]
    installed = site / "refimpl" / "golden"
    assert sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*.*")) == \
        sorted([*read_manifest(GOLDEN)["files"], "README.md", "manifest.json"])
    shutil.rmtree(installed)                                                   # a package without it
    r = subprocess.run([sys.executable, "-m", "refimpl.cli.main", "golden", "verify"], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "it is the golden/ folder of the refimpl repository: pass its path (refimpl golden verify PATH)" in r.stderr



@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(profiles={"mirror": "nope", "float64": "float64-stored-as-float32"}), "'profiles' must name"),
    (lambda m: m.pop("profiles"), "'profiles' must be a JSON object; it is missing"),
])
def test_a_manifest_with_a_wrong_or_missing_profile_is_refused(tmp_path, change, words):
    """verify applies the manifest's rule per precision: a rule it does not know must not pass silently."""
    with pytest.raises(GoldenError, match=words):
        read_manifest(manifest_copy(tmp_path, change))


def test_a_manifest_nested_too_deeply_is_one_error(tmp_path):
    folder = manifest_copy(tmp_path, lambda m: None)
    (folder / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(GoldenError, match="nested too deeply"):
        read_manifest(folder)


def test_the_float32_rule_allows_another_blas_and_nothing_more():
    """float32 traces (the noise companion) are recomputed with the machine's BLAS: another build's last bits,
    carried forward, stay within FLOAT32_REL of the site's largest magnitude; more is a difference."""
    from refimpl.oracle.golden import FLOAT32_REL, compare_site
    want = np.array([[1.0, -2.0], [0.5, -np.inf]], np.float32)
    near = want + np.array([[FLOAT32_REL, 0], [0, 0]], np.float32)          # 1e-4 of max |x| = 2: allowed
    assert compare_site("s", want, near, "float32") is None
    far = want + np.array([[0, 0], [3 * FLOAT32_REL, 0]], np.float32)
    assert "1 of 4 elements differ, the first at (1, 0)" in compare_site("s", want, far, "float32")
    assert compare_site("s", want, near, "mirror") is not None              # mirror: exact
    # with the input's float64 site, the noise model judges: an error 5x the stored one's passes, 20x fails
    exact = np.array([[1.0, -2.0, 0.5, 3.0]])
    stored = (exact + 1e-5).astype(np.float32)                               # errs by 1e-5 (+- its rounding)
    assert compare_site("s", stored, exact + 5e-5, "float32", exact) is None
    why = compare_site("s", stored, exact + 2e-4, "float32", exact)
    assert "x as much against float64 as the stored float32 trace (at most 10x), the first at (0,)" in why
    assert 19 < float(why.split("errs ")[1].split("x")[0]) < 21


def test_the_set_holds_a_weight_with_a_partial_fp8_block():
    """Issue 21 item 8: the second checkpoint (tiny-partial, head_dim 192) holds wkv [192, 256], whose second
    row block is a partial one; one input runs on it, stored in every precision (rows 0 and 4)."""
    manifest = read_manifest(GOLDEN)
    recipe = manifest["checkpoints"][golden.PARTIAL]
    cfg = Config.preset(recipe["preset"])
    assert cfg.to_hf_dict() == recipe["config"] and (cfg.head_dim, cfg.head_dim % 128) == (192, 64)
    inputs = [d for d in manifest["inputs"] if d.get("checkpoint") == golden.PARTIAL]
    assert [(d["name"], d["rows"], d["precisions"]) for d in inputs] == [
        ("tiny-partial-prefill-5", [0, 4], ["float64", "float32", "mirror"])]
    assert all(golden.trace_file(p, "tiny-partial-prefill-5") in manifest["files"]    # (the reason is the last
               for p in ("float64", "float32", "mirror"))                              # regeneration's, not this one's)
