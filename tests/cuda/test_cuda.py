"""The CUDA path without a GPU: the kernels in the CUDA simulator, PTX for cc 9.0, the availability error.

Each check runs in a subprocess: NUMBA_ENABLE_CUDASIM must be set before numba is imported, and this
pytest process may already have imported numba (the numba kernels' tests). What the checks prove
and what they do not: docs/cuda.md.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA,
                                      reason="numba-cuda is not installed (pip install -e '.[test]' or '.[gpu]')")


def _env(sim: bool) -> dict:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba-cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, *, sim: bool, timeout: int = 600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(sim), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ptx_job():
    """The PTX compile (about 25 s), started in the background when the simulator test starts, so the two
    subprocesses overlap; the PTX test collects it."""
    if not HAVE_NUMBA_CUDA:
        yield None
        return
    job = subprocess.Popen([sys.executable, "-c", PTX_SCRIPT], cwd=ROOT, env=_env(False), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    yield job
    if job.poll() is None:
        job.kill()
        job.communicate()


@needs_numba_cuda
def test_every_cuda_kernel_matches_its_spec_in_the_simulator(ptx_job):
    """tests/cuda/sim_kernels.py under NUMBA_ENABLE_CUDASIM=1 (about 20 s on 2 cores)."""
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "tests/cuda/sim_kernels.py"], sim=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]
    assert "elements differed from the spec" in out.stdout


PTX_SCRIPT = r"""
import json, sys
from numba import cuda
from refimpl import ops
import refimpl.model.transformer  # noqa: F401  (registers the swappable operations)
from refimpl.cuda.ptx import KERNEL_MODULES, compile_all, contractions, _no_device

try:
    ptx = compile_all((9, 0))
except Exception as e:
    if "NVVM" in str(e) or "nvvm" in str(e):
        print(json.dumps({"skip": str(e).splitlines()[0][:300]}))
        sys.exit(0)
    raise

def plain(out, a, b, c):                     # the control: NVVM fuses this unless told otherwise
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] * b[i] + c[i]
with _no_device((9, 0)):
    control, _ = cuda.compile_ptx(plain, "void(float32[::1], float32[::1], float32[::1], float32[::1])", cc=(9, 0))
wrappers = sorted({path.split(":")[0] for path in ops.KERNELS["cuda"].values()})
print(json.dumps({"kernels": {k: {"sm_90": ".target sm_90" in v, "entry": ".entry" in v, "fma_f32": contractions(v)}
                              for k, v in ptx.items()},
                  "control_fma_f32": contractions(control), "modules": list(KERNEL_MODULES), "wrappers": wrappers}))
"""


@needs_numba_cuda
def test_every_cuda_kernel_compiles_to_ptx_for_cc90_without_fused_fp32_ops(ptx_job):
    """Every kernel (float32 and float64 variants) compiles for sm_90; no fp32 fused multiply-add in any
    (mirror needs separate fp32 roundings), while a plain a*b+c kernel does get one (the check can fail)."""
    stdout, stderr = ptx_job.communicate(timeout=600)
    assert ptx_job.returncode == 0, stdout[-3000:] + stderr[-6000:]
    res = json.loads(stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"no libnvvm to compile with (CUDA toolkit or the nvidia-cuda-nvcc wheel): {res['skip']}")
    kernels = res["kernels"]
    assert len(kernels) >= 19, sorted(kernels)
    assert all(v["sm_90"] and v["entry"] for v in kernels.values()), kernels
    assert {k: v["fma_f32"] for k, v in kernels.items() if v["fma_f32"]} == {}
    assert res["control_fma_f32"] > 0
    assert set(res["wrappers"]) <= set(res["modules"])                       # every registered kernel is checked


NO_GPU_SCRIPT = r"""
import sys, refimpl
from refimpl.ops import KernelError
import refimpl.cuda
if refimpl.cuda.unavailable_reason() is None:
    print("HAS-GPU"); sys.exit(0)
try:
    refimpl.load(sys.argv[1], kernels="cuda")
except KernelError as e:
    print("ERROR", e)
sys.argv[0] = "tools/gpu_check.py"
from tools.gpu_check import main
print("EXIT", main([]))
"""


@needs_numba_cuda
def test_kernels_cuda_without_a_gpu_is_a_one_line_error_and_gpu_check_exits_2(tiny_ckpt):
    out = _run(["-c", NO_GPU_SCRIPT, str(tiny_ckpt)], sim=False)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("HAS-GPU"):
        pytest.skip("this machine has a usable GPU")
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("ERROR kernels=cuda needs "), lines
    assert lines[1].startswith("gpu_check: cannot run the CUDA path here: kernels=cuda needs ") and lines[2] == "EXIT 2"


def test_importing_refimpl_cuda_imports_no_numba():
    code = "import sys, refimpl, refimpl.cuda, refimpl.ops\nprint('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



def _gpu_check(args, *, sim: bool, pre: str = ""):
    code = (pre + "import sys\nsys.argv[0] = 'tools/gpu_check.py'\nfrom tools.gpu_check import main\n"
            f"sys.exit(main({list(args)!r}))\n")
    return _run(["-c", code], sim=sim)


@needs_numba_cuda
def test_gpu_check_in_the_simulator_with_three_kernels():
    """tools/gpu_check.py end to end in simulator mode (the kernels with few threads, so it stays short):
    says it is the simulator, compares every site (mirror: exact profile), exits 0."""
    out = _gpu_check(["--tokens", "6", "--cuda-kernels", "numpy,index_topk=cuda,gated_pool=cuda,split_sinkhorn=cuda"],
                     sim=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "SIMULATOR MODE" in out.stdout and "not a GPU result" in out.stdout
    assert "compare (mirror-vs-mirror): 115 sites, 0 out of tolerance" in out.stdout, out.stdout[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("OK: every comparison within its profile")


BROKEN = r"""
import numpy as np
from refimpl import ops
from refimpl.model.norm import rms_norm

def broken_rms_norm(x, weight, *, eps, prec):          # one ulp-sized error in one element is enough
    y = rms_norm.spec(x, weight, eps=eps, prec=prec).copy()
    y.flat[0] = np.nextafter(y.flat[0], np.inf) * 1.01
    return y

ops.KERNELS["cuda"]["rms_norm"] = "__main__:broken_rms_norm"
"""


@needs_numba_cuda
def test_gpu_check_exits_1_on_a_mismatch():
    out = _gpu_check(["--tokens", "3", "--cuda-kernels", "numpy,rms_norm=cuda"], sim=True, pre=BROKEN)
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-3000:]
    assert "FIRST OUT OF TOLERANCE" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("MISMATCH")


@pytest.mark.slow
@needs_numba_cuda
def test_gpu_check_in_the_simulator_with_every_kernel():
    """Every CUDA kernel in the tiny model (2 tokens, mirror) in the simulator: 2.5 to 4 minutes on 2 cores.
    Measured 2026-12-02 (108 sites then; 115 since hc_attn.out), all bit-identical to the CPU path."""
    out = _gpu_check(["--tokens", "2"], sim=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "compare (mirror-vs-mirror): 115 sites, 0 out of tolerance; elements one ulp apart 0" in out.stdout
