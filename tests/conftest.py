"""Shared fixtures: the tiny config, a synthetic tiny checkpoint, models in each precision.

NUMBA_CACHE_DIR points at a writable folder for any test that JIT-compiles; Hypothesis runs with
deadline=None (JIT compilation and first calls are slow) through one of two profiles:
  "refimpl" (local runs): a fresh random seed per test on every run, so runs keep exploring; a
            failing test's report names its seed (rerun with --hypothesis-seed=N) and Hypothesis
            prints a @reproduce_failure blob;
  "ci"      (HYPOTHESIS_PROFILE=ci as .ci/run sets, or else CI set to any value, as Hypothesis reads it):
            derandomized, so a run is reproducible: the same code draws the same examples.
"""
import os
import stat
import tempfile

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "refimpl-numba-cache"))

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# parent: Hypothesis's "default" (not the active profile, which is its own "ci" where CI is set)
settings.register_profile("refimpl", settings.get_profile("default"), deadline=None, max_examples=25,
                          print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", settings.get_profile("refimpl"), derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if "CI" in os.environ else "refimpl"))

from refimpl.config import Config  # noqa: E402

TINY = Config.tiny()

# another project's folder (tests/testing/test_plugin.py runs it as its user would, with the installed refimpl)
collect_ignore = ["testing/elsewhere"]


def pytest_report_header(config):
    profile = settings.get_current_profile_name()
    return f"hypothesis profile {profile!r}: " + ("derandomized" if settings().derandomize else "random seeds")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed Hypothesis test's report names the seed it ran with (None where derandomized or
    forced by --hypothesis-seed), so a random failure can be rerun."""
    outcome = yield
    report = outcome.get_result()
    seed = getattr(getattr(item, "obj", None), "_hypothesis_internal_use_generated_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("hypothesis seed", f"rerun with: python -m pytest '{item.nodeid}' "
                                                   f"--hypothesis-seed={seed}"))


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-weight checkpoint in the official format (seed 0), with its tokenizer."""
    from refimpl.synthetic.writer import make_checkpoint
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(TINY, path, seed=0)
    return path


_MODELS = {}


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """tiny_model(precision="float64", revision="current", layout="official", kernels=None) -> Model (cached per
    session); kernels None is the default selection (refimpl/ops.py), "numpy" the spec functions only."""
    from refimpl.formats.weights import load

    def get(precision="float64", revision="current", layout="official", kernels=None):
        key = (precision, revision, layout, kernels)
        if key not in _MODELS:
            _MODELS[key] = load(tiny_ckpt, precision=precision, revision=revision, layout=layout, kernels=kernels)
        return _MODELS[key]
    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def patched_ckpt(tiny_ckpt, tmp_path):
    """patched_ckpt({tensor: {flat element index: value}}) -> a copy of the tiny checkpoint with those
    elements overwritten in its shard bytes (value: a number in the tensor's dtype, or raw bytes)."""
    import shutil
    from refimpl.formats.checkpoint import DTYPES, SafetensorsFile, TensorSource

    def make(changes: dict, name: str = "patched"):
        out = tmp_path / name
        shutil.copytree(tiny_ckpt, out)
        src = TensorSource(out)
        for tensor, items in changes.items():
            sf = SafetensorsFile(src.file_of(tensor))
            info, dt = sf.tensors[tensor], DTYPES[sf.tensors[tensor].dtype]
            with open(sf.path, "r+b") as f:
                for index, value in items.items():
                    raw = value if isinstance(value, bytes) else np.asarray(value, dt).tobytes()
                    assert len(raw) == dt.itemsize and 0 <= index < info.nbytes // dt.itemsize
                    f.seek(sf.data_start + info.begin + index * dt.itemsize)
                    f.write(raw)
        return out
    return make


@pytest.fixture
def char_device(tmp_path):
    """A character device to offer as an output path: a private copy of /dev/null (made with mknod where
    we may, i.e. as root), else /dev/null itself, which a process that may not mknod cannot replace
    either. A test must never offer the real /dev/null as root: a regression would destroy it."""
    node = tmp_path / "null-device"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        if os.geteuid() == 0:
            pytest.skip("cannot make a private device node")
        return "/dev/null"
    return str(node)
