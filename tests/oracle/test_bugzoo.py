"""The bug zoo (tests/oracle/bugzoo.py) against the golden set: every field bug is caught, at the right site.

For each fault: run the golden input that exposes it with the fault injected (mirror, the official
layout, as golden/ stores it), keep the golden rows (golden.sample_rows), write the trace with the
golden trace's metadata and `compare` it with the stored golden trace under the exact
`mirror-vs-mirror` profile: the comparison must fail, and name the fault's site, layer and
position (or compressed entry) as the first one out of tolerance.

One fault cannot show on the golden set: the tiny model's shared-expert activations stay below 4.5,
under the clamp's limit of 10, so the missing shared-expert clamp changes nothing there. It is
exposed by the same comparison on the same input, against an unfaulted run of a model with the
same weights and `swiglu_limit` 2 (where the clamp binds), computed here.
"""
import subprocess
import sys

import numpy as np
import pytest

from refimpl.numerics import bf16
from refimpl.oracle import golden
from refimpl.oracle.compare import compare, load_trace
from refimpl.oracle.golden import GoldenInput, checkpoint_hashes, read_manifest, sample_rows
from refimpl.oracle.trace import Trace, run_trace

from bugzoo import FAULTS, cpu_bf16_rsqrt, inject

GOLDEN = golden.default_dir()
MANIFEST = read_manifest(GOLDEN)
INPUTS = {d["name"]: GoldenInput.from_dict(d) for d in MANIFEST["inputs"]}
PROFILE = "mirror-vs-mirror"


@pytest.fixture(scope="module")
def mirror_model(tiny_model, tiny_ckpt):
    """The tiny model in mirror, official layout: the checkpoint the golden set was made from (hash checked)."""
    assert checkpoint_hashes(tiny_ckpt) == MANIFEST["checkpoint"]["sha256"]
    assert MANIFEST["layout"] == "official"
    return tiny_model("mirror", "current", "official")


def traced(model, spec: GoldenInput, path, meta: dict):
    """Run spec on model, keep its golden rows, write them with meta -> path."""
    trace = run_trace(model, golden.golden_tokens(model.cfg, spec.length), **spec.run_kwargs())
    out = Trace()
    out.tensors = sample_rows(trace.tensors, spec.rows, spec.length)
    out.save(path, metadata=meta)
    return path


def first_divergence(report, spec: GoldenInput) -> tuple[str, int | None, int]:
    """(site, layer, position or entry) of the report's first site out of tolerance."""
    f = report.first
    if "entry" in f:
        return f["site"], f["layer"], f["entry"]
    return f["site"], f["layer"], spec.rows[f["position"]]


def golden_path(name: str):
    return GOLDEN / "traces" / "mirror" / f"{name}.safetensors"


@pytest.mark.parametrize("name", [n for n, f in FAULTS.items() if f.golden])
def test_the_golden_set_catches_the_fault_at_its_site(name, mirror_model, tmp_path):
    fault = FAULTS[name]
    spec = INPUTS[fault.input]
    ref = golden_path(spec.name)
    with inject(name):
        mine = traced(mirror_model, spec, tmp_path / f"{name}.safetensors", load_trace(ref).meta)
    report = compare(mine, ref, profile=PROFILE)
    assert not report.ok, f"{name}: the golden set does not see the fault"
    layer = int(fault.site.split(".")[1]) if fault.site.startswith("layers.") else None
    assert first_divergence(report, spec) == (fault.site, layer, fault.row), report.first


@pytest.mark.parametrize("name", sorted({f.input for f in FAULTS.values()} - {"decode-29-to-80"}))
def test_without_a_fault_the_same_runs_match_the_golden_set(name, mirror_model, tmp_path):
    """The control: the short inputs the faults use, unfaulted, equal their golden traces exactly."""
    spec, ref = INPUTS[name], golden_path(name)
    mine = traced(mirror_model, spec, tmp_path / "clean.safetensors", load_trace(ref).meta)
    assert compare(mine, ref, profile=PROFILE).ok


def test_the_missing_shared_clamp_shows_where_the_clamp_binds(mirror_model, tmp_path):
    """Invisible on the golden set (shared-expert |gate|, |up| < 4.5 < 10); caught where the clamp binds."""
    from refimpl.model.transformer import Model
    name = "shared_clamp_missing"
    fault, spec = FAULTS[name], INPUTS[FAULTS[name].input]
    meta = load_trace(golden_path(spec.name)).meta
    ref = traced(mirror_model, spec, tmp_path / "golden.safetensors", meta)
    with inject(name):                                        # on the golden model: nothing changes
        mine = traced(mirror_model, spec, tmp_path / "faulted.safetensors", meta)
    assert compare(mine, ref, profile=PROFILE).ok
    m = mirror_model
    low = Model(m.cfg.replace(swiglu_limit=2.0), m.weights, precision="mirror", revision="current", layout="official")
    meta = dict(meta, config_id=low.config_id)
    ref = traced(low, spec, tmp_path / "low-ref.safetensors", meta)
    with inject(name):
        mine = traced(low, spec, tmp_path / "low-faulted.safetensors", meta)
    report = compare(mine, ref, profile=PROFILE)
    assert not report.ok
    assert first_divergence(report, spec) == (fault.site, 0, fault.row), report.first


def test_the_cpu_rsqrt_emulation_gives_the_documented_value():
    """PyTorch's CPU bf16 rsqrt(1.59375) is 0.7890625; the correctly rounded bf16 is 0.79296875."""
    from refimpl.numerics import rsqrt
    x = np.array([1.59375], np.float32)
    assert cpu_bf16_rsqrt(x, "mirror")[0] == 0.7890625
    assert float(bf16(rsqrt(x, "mirror"), "mirror")[0]) == 0.79296875


def test_the_fault_registry_is_not_reachable_from_the_package():
    """`refimpl` cannot import the bug zoo (it lives in the tests): a clean interpreter finds no such module."""
    code = ("import importlib, pkgutil, refimpl\n"
            "names = [m.name for m in pkgutil.walk_packages(refimpl.__path__, 'refimpl.')]\n"
            "assert not any('bugzoo' in n for n in names), names\n"
            "for n in ('bugzoo', 'refimpl.bugzoo', 'refimpl.oracle.bugzoo', 'refimpl.testing.bugzoo'):\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'{n} is importable')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
