"""The bug zoo (tests/oracle/bugzoo.py) against the golden set: every field bug is caught, at the right site.

For each fault: run the golden input that exposes it with the fault injected (mirror, the official
layout, as golden/ stores it), keep the golden rows (golden.sample_rows), write the trace with the
golden trace's metadata and `compare` it with the stored golden trace under the exact
`mirror-vs-mirror` profile: the comparison must fail, and name the fault's site, layer and
position (or compressed entry) as the first one out of tolerance.

The missing shared-expert clamp shows only where the clamp binds: the tiny model's activations
stay below 4.5, under the released limit of 10, so the golden set holds an input for it,
`prefill-4-swiglu-limit-2`: the same weights with config.json's `swiglu_limit` set to 2.
"""
import subprocess
import sys

import numpy as np
import pytest

from refimpl.config import Config
from refimpl.formats.weights import load
from refimpl.numerics import bf16
from refimpl.oracle import golden
from refimpl.oracle.compare import compare, load_trace
from refimpl.oracle.golden import GoldenInput, checkpoint_hashes, read_manifest, sample_rows
from refimpl.oracle.trace import Trace, run_trace
from refimpl.synthetic.writer import make_checkpoint

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
    return tiny_model("mirror", "current", "official", kernels="numpy")   # the faults patch spec functions


@pytest.fixture(scope="module")
def partial_model(tmp_path_factory):
    """The golden set's second checkpoint (tiny-partial: wkv [192, 256] ends in a partial FP8 block), in mirror."""
    recipe = MANIFEST["checkpoints"][golden.PARTIAL]
    path = tmp_path_factory.mktemp("partial") / golden.PARTIAL
    make_checkpoint(Config.preset(recipe["preset"]), path, seed=recipe["seed"], progress=False)
    assert checkpoint_hashes(path) == recipe["sha256"]
    return load(path, precision="mirror", layout="official", kernels="numpy")


@pytest.fixture(scope="module")
def models(mirror_model, partial_model):
    """{checkpoint name (None: the main one): the mirror model of the golden input's checkpoint}."""
    return {None: mirror_model, golden.PARTIAL: partial_model}


def traced(model, spec: GoldenInput, path, meta: dict):
    """Run spec on model (under the input's config keys), keep its golden rows, write them with meta -> path."""
    model = spec.model(model)
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
    return f["site"], f["layer"], f["position"]                  # a token position (compare maps golden rows)


def golden_path(name: str):
    return GOLDEN / "traces" / "mirror" / f"{name}.safetensors"


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_the_golden_set_catches_the_fault_at_its_site(name, models, tmp_path):
    fault = FAULTS[name]
    spec = INPUTS[fault.input]
    ref = golden_path(spec.name)
    with inject(name):
        mine = traced(models[spec.checkpoint], spec, tmp_path / f"{name}.safetensors", load_trace(ref).meta)
    report = compare(mine, ref, profile=PROFILE)
    assert not report.ok, f"{name}: the golden set does not see the fault"
    layer = int(fault.site.split(".")[1]) if fault.site.startswith("layers.") else None
    assert first_divergence(report, spec) == (fault.site, layer, fault.row), report.first


@pytest.mark.parametrize("name", sorted({f.input for f in FAULTS.values()} - {"decode-29-to-80"}))
def test_without_a_fault_the_same_runs_match_the_golden_set(name, models, tmp_path):
    """The control: the short inputs the faults use, unfaulted, equal their golden traces exactly."""
    spec, ref = INPUTS[name], golden_path(name)
    mine = traced(models[spec.checkpoint], spec, tmp_path / "clean.safetensors", load_trace(ref).meta)
    assert compare(mine, ref, profile=PROFILE).ok


# Every FP8 scale-layout fault on the partial-block input: each is caught at the first site that uses
# the first weight it changes. The two partial-block faults change wkv (rows 96-127, rows 64-127) and
# nothing else, so layer 0's attn.kv; the grid read column-major changes no weight of layer 0 before wo_a
# (wkv's 2x2 grid in layer 0 happens to be symmetric), so attn.out; one scale row for every block row
# changes wq_b, whose 128-row blocks are no longer heads (head_dim 192), so attn.q.
PARTIAL_SITES = {"fp8_block_height_from_grid": "layers.0.attn.kv", "fp8_scales_cropped_at_the_end": "layers.0.attn.kv",
                 "fp8_scale_grid_column_major": "layers.0.attn.out", "fp8_one_scale_row": "layers.0.attn.q"}


@pytest.mark.parametrize("name", sorted(PARTIAL_SITES))
def test_the_partial_block_input_catches_every_scale_layout_fault(name, partial_model, tmp_path):
    spec = INPUTS[f"{golden.PARTIAL}-prefill-5"]
    ref = golden_path(spec.name)
    with inject(name):
        mine = traced(partial_model, spec, tmp_path / f"{name}.safetensors", load_trace(ref).meta)
    report = compare(mine, ref, profile=PROFILE)
    assert not report.ok and first_divergence(report, spec) == (PARTIAL_SITES[name], 0, 0), report.first


def test_the_partial_block_faults_change_nothing_without_a_partial_block(mirror_model, tmp_path):
    """On the main checkpoint (every FP8 row count a multiple of 128) the two partial-block faults read every
    weight right: only the second checkpoint can catch them, which is why the set holds it."""
    spec = INPUTS["prefill-1"]
    ref = golden_path(spec.name)
    for name in ("fp8_block_height_from_grid", "fp8_scales_cropped_at_the_end"):
        with inject(name):
            mine = traced(mirror_model, spec, tmp_path / f"{name}.safetensors", load_trace(ref).meta)
        assert compare(mine, ref, profile=PROFILE).ok, name


def test_the_clamp_binds_in_the_clamp_input(mirror_model):
    """The clamp input exists for the shared clamp: there its activations pass the limit (they do not at 10)."""
    from refimpl.model import moe as moe_mod
    spec = INPUTS["prefill-4-swiglu-limit-2"]
    peaks = {}
    real = moe_mod.swiglu

    def watch(gate, up, prec, *, swiglu_limit, weights=None):
        key = "routed" if weights is not None else "shared"
        peaks[key] = max(peaks.get(key, 0.0), float(np.abs(up).max()), float(gate.max()))
        return real(gate, up, prec, swiglu_limit=swiglu_limit, weights=weights)

    import unittest.mock
    with unittest.mock.patch.object(moe_mod, "swiglu", watch):
        run_trace(spec.model(mirror_model), golden.golden_tokens(mirror_model.cfg, spec.length))
    assert peaks["shared"] > golden.CLAMP_LIMIT and peaks["routed"] > golden.CLAMP_LIMIT
    assert peaks["shared"] < mirror_model.cfg.swiglu_limit          # why the input exists


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
