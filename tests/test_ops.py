"""The kernel switch (refimpl/ops.py): selections, dispatch, and that the NumPy path imports no Numba."""
import subprocess
import sys

import numpy as np
import pytest

import refimpl
from refimpl import ops
from refimpl.cli.main import main
from refimpl.model.norm import rms_norm


def test_parse_kernels_defaults_and_overrides():
    sel = ops.parse_kernels("numpy,rms_norm=numpy")
    assert sel.default == "numpy" and sel.backend("rms_norm") == "numpy" and sel.backend("moe") == "numpy"
    assert str(sel) == "numpy,rms_norm=numpy"
    assert ops.parse_kernels(sel) is sel


@pytest.mark.parametrize("text, words", [
    ("fast", "first item"),
    ("numpy,rms_norm", "OPERATION=BACKEND"),
    ("numpy,rms_norm=gpu", "names no backend"),
    ("numpy,rms_norm=numba,rms_norm=numpy", "named twice"),
    ("numba,moe=numpy", "no swappable operation 'moe'"),
    ("numpy,no_such_op=numpy", "no swappable operation"),
    ("numpy,rms_norm=cuda", "no cuda kernel for rms_norm"),
])
def test_parse_kernels_refuses_naming_the_problem(text, words):
    with pytest.raises(ops.KernelError, match=words):
        ops.parse_kernels(text)
    with pytest.raises(ValueError):                            # a KernelError is a ValueError
        ops.parse_kernels(text)


def test_a_registered_kernel_runs_only_where_selected(monkeypatch):
    calls = []

    def fake_rms_norm(x, weight, *, eps, prec):
        calls.append(prec)
        return rms_norm.spec(x, weight, eps=eps, prec=prec)

    monkeypatch.setitem(ops.KERNELS["numba"], "rms_norm", f"{__name__}:_FAKE")
    monkeypatch.setattr(ops, "_RESOLVED", {})                  # forget kernels resolved by earlier tests
    monkeypatch.setattr(sys.modules[__name__], "_FAKE", fake_rms_norm, raising=False)
    x, w = np.ones((2, 8), np.float32), np.ones(8, np.float32)
    rms_norm(x, w, eps=1e-6, prec="float32")                   # no selection: the spec
    with ops.use_kernels("numpy"):
        rms_norm(x, w, eps=1e-6, prec="float32")
    assert calls == []
    with ops.use_kernels("numba"):
        got = rms_norm(x, w, eps=1e-6, prec="float32")
    with ops.use_kernels("numba,rms_norm=numpy"):
        rms_norm(x, w, eps=1e-6, prec="float32")
    with ops.use_kernels("numpy,rms_norm=numba"):
        rms_norm(x, w, eps=1e-6, prec="mirror")
    assert calls == ["float32", "mirror"]
    np.testing.assert_array_equal(got, rms_norm.spec(x, w, eps=1e-6, prec="float32"))
    assert ops.active() == ops.Kernels()                        # restored after the blocks


def test_a_selection_made_directly_is_checked_too(monkeypatch):
    with pytest.raises(ops.KernelError, match="first item"):
        ops.Kernels("bogus")
    with pytest.raises(ops.KernelError, match="no swappable operation"):
        ops.Kernels("numba", (("nothing", "numpy"),))


def test_a_bad_environment_default_names_the_variable(monkeypatch):
    monkeypatch.setenv("REFIMPL_KERNELS", "fast")
    with pytest.raises(ops.KernelError, match="REFIMPL_KERNELS: kernels 'fast'"):
        ops.parse_kernels(None)
    monkeypatch.setenv("REFIMPL_KERNELS", "numpy")
    assert ops.parse_kernels(None) == ops.Kernels("numpy")


def test_import_and_the_numpy_path_never_import_numba(tmp_path):
    code = ("import sys, refimpl, numpy as np\n"
            "from refimpl.model.norm import rms_norm\n"
            "from refimpl.ops import use_kernels\n"
            "with use_kernels('numpy'):\n"
            "    rms_norm(np.ones((1, 4), np.float32), np.ones(4, np.float32), eps=1e-6, prec='mirror')\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_takes_a_selection_and_refuses_a_bad_one(tiny_ckpt):
    model = refimpl.load(tiny_ckpt, kernels="numpy,rms_norm=numba")
    assert str(model.kernels) == "numpy,rms_norm=numba"
    with pytest.raises(ops.KernelError, match="no swappable operation"):
        refimpl.load(tiny_ckpt, kernels="numpy,nothing=numpy")


def test_cli_kernels_flag_is_a_usage_error_when_bad(tiny_ckpt, capsys):
    assert main(["generate", str(tiny_ckpt), "--tokens", "1", "2", "--kernels", "numpy,nothing=numpy"]) == 2
    err = capsys.readouterr().err
    assert "--kernels" in err and "no swappable operation" in err


def test_every_swappable_operation_has_a_kernel():
    """@swappable marks only what some backend replaces; the other spec functions are plain functions."""
    import refimpl.model.transformer  # noqa: F401  (defines every swappable operation)
    with_kernels = {op for backend in ops.KERNELS.values() for op in backend}
    assert ops.SPEC and set(ops.SPEC) <= with_kernels, sorted(set(ops.SPEC) - with_kernels)
