"""The pytest plugin, used as another project uses it: a test file in another folder, refimpl installed.

tests/testing/elsewhere/ is that project: two NumPy implementations (mykernels.py) and the ten-line test
file docs/testing.md shows (not collected by this suite: its tests are meant to run as the user runs them).
Each test copies the folder to a temporary place and runs pytest there in a subprocess, with this
environment's installed refimpl; a planted bug and a file using every fixture are added to the copy.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ELSEWHERE = Path(__file__).parent / "elsewhere"

BUGGY = """import mykernels


def test_sparse_attention_with_a_planted_bug(refimpl_check):
    refimpl_check(lambda inp: mykernels.sparse_attention(inp, sink_head_offset=1), "sparse_attention")
"""

FIXTURES = """def test_fixtures(refimpl_ops, refimpl_precision, refimpl_tiny_checkpoint, refimpl_golden):
    assert "sparse_attention" in refimpl_ops and refimpl_precision == "float32"
    assert (refimpl_tiny_checkpoint / "config.json").is_file()
    assert refimpl_golden and all(c.traces and all(p.is_file() for p in c.traces.values()) for c in refimpl_golden)
    assert all(len(c.tokens) >= 1 for c in refimpl_golden)
"""


def run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "project"
    shutil.copytree(ELSEWHERE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_the_ten_line_file_passes_a_planted_bug_fails_and_the_fixtures_work(project):
    assert len((project / "test_mykernels.py").read_text().splitlines()) <= 10
    (project / "test_buggy.py").write_text(BUGGY)
    (project / "test_fixtures.py").write_text(FIXTURES)
    out = run_pytest(project, "--refimpl-examples=40", "-rA")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 failed, 3 passed" in out.stdout, out.stdout[-3000:]
    assert "PASSED test_mykernels.py::test_fp8_linear" in out.stdout
    assert "PASSED test_mykernels.py::test_sparse_attention" in out.stdout
    assert "FAILED test_buggy.py::test_sparse_attention_with_a_planted_bug" in out.stdout
    assert "MismatchError: sparse_attention.o at float32:" in out.stdout and "x measured noise" in out.stdout


def test_the_precision_options_reach_the_check(project):
    """--refimpl-precision mirror --refimpl-bitwise asks for mirror's bits, which the exact float32 product lacks
    (no FP8 activation quantization, no bf16 output). (An unknown precision is refused by pytest's option
    parser: choices=PRECISIONS.)"""
    out = run_pytest(project, "--refimpl-precision=mirror", "--refimpl-bitwise", "--refimpl-examples=40", "-k", "fp8")
    assert out.returncode == 1 and "fp8_linear.y at mirror (bitwise)" in out.stdout, out.stdout[-3000:]


@pytest.mark.slow
def test_a_fresh_venv_with_the_wheel_runs_the_ten_line_file(project, tmp_path):
    """`pip install refimpl` (the wheel of this tree, its dependencies from the package index) in a new virtual
    environment, then the ten-line file: the kit, its records and the plugin travel with the package."""
    wheels = tmp_path / "wheels"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(root)], check=True,
                   timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", *map(str, wheels.glob("refimpl-*.whl")), "pytest"],
                   check=True, timeout=1200)
    out = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--refimpl-examples=20"],
                         cwd=project, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
