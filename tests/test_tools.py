"""Tests of tools/: the mutation check (rounding steps, orders, threads); the simulated engine of measure_profiles."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "mutation_check.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutation_list_matches_the_code():
    """Every mutation's source text occurs exactly once: a code change that moves a rounding step
    (or a summation order, a prange's scratch buffer, the MTP pairing) fails here, in the default
    suite, until the lists in tools/mutation_check.py follow it. Each mutation of order, reduction
    or threads names test files that exist to pin it."""
    tool = load_tool()
    assert len(tool.MUTATIONS) >= 46 and len(tool.ORDER_AND_THREADS) >= 10
    assert tool.check_sources(tool.ALL) == []
    drifted = [("x", tool.MUTATIONS[0][1], [("this text is not in the file", "")])]
    assert len(tool.check_sources(drifted)) == 1
    assert {m[0] for m in tool.ORDER_AND_THREADS} == set(tool.PINNED_BY)
    root = TOOL.parent.parent
    assert all((root / t.split("::")[0]).is_file() for ts in tool.PINNED_BY.values() for t in ts)


@pytest.mark.slow
def test_every_rounding_mutation_is_caught():
    """10-30 minutes: each rounding step removed in turn makes the suite fail."""
    assert load_tool().main([]) == 0


def test_the_simulated_engine_differs_from_mirror_only_inside_its_context(tiny_model):
    """measure_profiles.simulated_engine: fp32 BLAS products in mirror change last bits (so the
    bf16-engine-vs-mirror numbers measure something), and leave mirror as it was afterwards."""
    import numpy as np
    from refimpl.oracle.trace import run_trace
    spec = importlib.util.spec_from_file_location("measure_profiles", TOOL.parent / "measure_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, toks = tiny_model("mirror", kernels="numpy"), [3, 17, 250, 9, 1000, 44, 5, 61]
    before = run_trace(model, toks, patterns=("logits", "layers.0.hc_attn.pre")).tensors
    with mod.simulated_engine():
        engine = run_trace(model, toks, patterns=("logits", "layers.0.hc_attn.pre")).tensors
    after = run_trace(model, toks, patterns=("logits", "layers.0.hc_attn.pre")).tensors
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not np.array_equal(before["layers.0.hc_attn.pre"], engine["layers.0.hc_attn.pre"])
    assert np.allclose(before["layers.0.hc_attn.pre"], engine["layers.0.hc_attn.pre"], rtol=1e-5)


@pytest.mark.slow
def test_each_profile_accepts_the_pair_it_was_measured_on(tiny_ckpt):
    """A fresh measurement run (tiny seed 0, 100 tokens, not one of the measured lengths): every
    pair of modes is within the profile made for it."""
    import numpy as np
    from refimpl.oracle.compare import compare, format_report
    spec = importlib.util.spec_from_file_location("measure_profiles", TOOL.parent / "measure_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    toks = [int(t) for t in np.random.default_rng(5).integers(2, 1280, 100)]
    tr = mod.traces(tiny_ckpt, toks)
    for profile, (x, y) in mod.PAIRS.items():
        r = compare(tr[x], tr["mirror-again" if profile == "mirror-vs-mirror" else y], profile)
        assert r.ok, format_report(r)


@pytest.mark.slow
def test_measure_noise_finds_no_false_alarm(capsys):
    """tools/measure_noise.py: correct float32, float64, mirror and bf16-engine runs of every golden input pass
    against both references (docs/compare.md gives the figures; about 4 minutes)."""
    spec = importlib.util.spec_from_file_location("measure_noise", TOOL.parent / "measure_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 0, capsys.readouterr().out[-3000:]
    assert "0 comparisons failed" in capsys.readouterr().out
