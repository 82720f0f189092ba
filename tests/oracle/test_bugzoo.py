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
import contextlib
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

from bugzoo import FAULTS, cpu_bf16_rsqrt, faulted_model, inject

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
def partial_ckpt(tmp_path_factory):
    """The golden set's second checkpoint (tiny-partial: wkv [192, 256] ends in a partial FP8 block)."""
    recipe = MANIFEST["checkpoints"][golden.PARTIAL]
    path = tmp_path_factory.mktemp("partial") / golden.PARTIAL
    make_checkpoint(Config.preset(recipe["preset"]), path, seed=recipe["seed"], progress=False)
    assert checkpoint_hashes(path) == recipe["sha256"]
    return path


@pytest.fixture(scope="module")
def partial_model(partial_ckpt):
    """The second checkpoint in mirror."""
    return load(partial_ckpt, precision="mirror", layout="official", kernels="numpy")


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
        mine = traced(faulted_model(models[spec.checkpoint], name), spec, tmp_path / f"{name}.safetensors",
                      load_trace(ref).meta)
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


# ---------------------------------------------------------------- float32 and the noise model (issue 21)

FLOAT_FAULTS = sorted(n for n, f in FAULTS.items() if not f.rounding_only)   # the rest change roundings only


def _tool(name):
    """A script of tools/ as a module (its helpers: the correct alternative implementations below)."""
    import importlib.util
    path = GOLDEN.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def float32_model(tiny_model, tiny_ckpt):
    assert checkpoint_hashes(tiny_ckpt) == MANIFEST["checkpoint"]["sha256"]
    return tiny_model("float32", "current", "official", kernels="numpy")   # the faults patch spec functions


@pytest.fixture(scope="module")
def float32_models(float32_model, partial_ckpt):
    """{checkpoint name (None: the main one): that checkpoint in float32 with the spec's functions}."""
    return {None: float32_model,
            golden.PARTIAL: load(partial_ckpt, precision="float32", layout="official", kernels="numpy")}


def test_in_float32_the_noise_model_names_every_fault_where_it_enters(float32_models, tmp_path):
    """The planted-bug measurement (docs/compare.md, "The noise model"): each fault that changes the math, run
    in float32 (a candidate's precision) on its golden input and compared with the stored float64 trace, is
    judged by the noise model (the golden float32 trace as companion) and must be named at the site and
    position where it enters the data flow. The tally: named there / named elsewhere / missed."""
    tally, wrong = {"at entry": 0, "elsewhere": 0, "missed": 0}, []
    for name in FLOAT_FAULTS:
        fault, spec = FAULTS[name], INPUTS[FAULTS[name].input]
        ref = GOLDEN / "traces" / "float64" / f"{spec.name}.safetensors"
        companion = GOLDEN / "traces" / "float32" / f"{spec.name}.safetensors"
        with inject(name):
            mine = traced(faulted_model(float32_models[spec.checkpoint], name), spec, tmp_path / f"{name}.safetensors",
                          load_trace(companion).meta)
        report = compare(mine, ref)
        assert report.noise is not None and report.noise["companion"] == str(companion.resolve())
        site, row = fault.float_at or (fault.site, fault.row)
        layer = int(site.split(".")[1]) if site.startswith("layers.") else None
        if report.first is None:
            tally["missed"] += 1
            wrong.append(f"{name}: missed")
        elif first_divergence(report, spec) == (site, layer, row):
            tally["at entry"] += 1
        else:
            tally["elsewhere"] += 1
            wrong.append(f"{name}: named at {first_divergence(report, spec)}, enters at {(site, row)}")
    assert tally == {"at entry": len(FLOAT_FAULTS), "elsewhere": 0, "missed": 0}, (tally, wrong)


CONTROL_INPUTS = sorted({f.input for f in FAULTS.values()} - {"decode-29-to-80", "prefill-80"})


@pytest.mark.parametrize("name", CONTROL_INPUTS)
def test_correct_implementations_raise_no_false_alarm(name, tiny_model, partial_ckpt, tmp_path):
    """The false alarms of the same measurement: correct runs of the fault inputs pass, each judged by the noise
    model: refimpl float32 with the Numba kernels, a float32 run whose products sum in another order (an
    independent float32 implementation's arithmetic) and the simulated bf16 engine against the float64 trace;
    the bf16 engine also against the mirror trace (float64 companion), mirror against float64."""
    spec = INPUTS[name]
    split, engine = _tool("measure_noise").split_float32_products, _tool("measure_profiles").simulated_engine
    if spec.checkpoint is not None:                          # the second checkpoint (a partial FP8 block)
        def tiny_model(precision, kernels=None, _path=partial_ckpt):
            return load(_path, precision=precision, layout="official",
                        **({} if kernels is None else {"kernels": kernels}))
    runs = {"float32 (Numba kernels)": (tiny_model("float32"), contextlib.nullcontext(), "float32"),
            "float32, other summation order": (tiny_model("float32", kernels="numpy"), split(), "float32"),
            "bf16 engine (simulated)": (tiny_model("mirror", kernels="numpy"), engine(), "bf16"),
            "mirror (Numba kernels)": (tiny_model("mirror"), contextlib.nullcontext(), "mirror")}
    for label, (model, within, precision) in runs.items():
        meta = dict(load_trace(GOLDEN / "traces" / "float64" / f"{name}.safetensors").meta, precision=precision)
        with within:
            mine = traced(model, spec, tmp_path / "run.safetensors", meta)
        refs = ("float64", "mirror") if precision == "bf16" else ("float64",)
        for ref in refs:
            report = compare(mine, GOLDEN / "traces" / ref / f"{name}.safetensors")
            assert report.noise is not None, (label, ref)
            assert report.ok, (label, ref, report.first)
