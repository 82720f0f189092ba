"""benchmarks/kernels.py: its smallest mode runs and prints one JSON line of positive ratios; its counts add up.

No timing is asserted (a shared machine's timings say nothing about correctness): the test checks
the report's structure, that every ratio is a positive finite number, and the byte and FLOP
arithmetic the figures rest on.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.formats.config_file import read_config
from refimpl.config import Config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernels.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_smallest_mode_prints_positive_ratios(tiny_ckpt):
    # one Numba thread: on a busy 2-core machine the kernels' parallel regions wait for a second core
    r = subprocess.run([sys.executable, str(SCRIPT), "--smallest", "--tiny-ckpt", str(tiny_ckpt), "--numba-threads", "1"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])          # the last line is the JSON object
    assert report["mode"] == "smallest"
    assert {"date", "machine", "kernels", "precision", "kernel_ops", "limits", "tiny", "ratios"} <= set(report)
    lim = report["limits"]
    assert _positive(lim["read_GBps"]) and _positive(lim["sgemm_GFLOPs"]) and _positive(lim["dgemm_GFLOPs"])
    assert lim["threads"]["cpu_count"] >= 1
    assert report["numba_num_threads_env"] == "1"
    tiny = report["tiny"]
    assert "error" not in tiny, tiny
    for side in ("spec", "kernels"):
        assert _positive(tiny[side]["decode_ms_per_token"]) and _positive(tiny[side]["prefill_ms"])
    assert tiny["same_tokens"] is True                              # kernels decode the same tokens as the spec
    assert _positive(tiny["peak_rss_bytes"])
    ratios = report["ratios"]
    assert {"tiny_decode_speedup", "tiny_prefill_speedup", "tiny_decode_vs_65ms"} <= set(ratios)
    assert set(tiny["ops"]) <= set(report["kernel_ops"])            # only kernels are timed against a spec
    assert {f"tiny_op_{op}" for op in tiny["ops"]} <= set(ratios)
    bad = {k: v for k, v in ratios.items() if not _positive(v)}
    assert not bad, bad
    for op, v in tiny["ops"].items():
        assert v["calls"] >= 1 and 0 <= v["identical_calls"] <= v["calls"], (op, v)


def test_bytes_table_matches_the_checkpoint_files(tiny_ckpt):
    """The byte table the decode figures count from equals the tensors' bytes in the shards."""
    from refimpl.formats.checkpoint import TensorSource
    bench = _bench()
    cfg = read_config(tiny_ckpt)
    sizes = bench.tensor_bytes(cfg)
    src = TensorSource(tiny_ckpt)
    assert sizes == {name: src.nbytes(name) for name in src.keys()}
    # every weight is counted once: non-expert kinds (all rows) + every routed expert + the MTP block
    layers = range(cfg.n_layers)
    kinds = bench.non_expert_bytes(cfg, sizes, layers, distinct_tokens=cfg.vocab_size)
    experts = sum(bench.expert_bytes(sizes, i, e) for i in layers for e in range(cfg.n_routed_experts))
    mtp = sum(n for name, n in sizes.items() if name.startswith("mtp."))
    assert sum(kinds.values()) + experts + mtp == sum(sizes.values())
    # one token reads one embedding row
    one = bench.non_expert_bytes(cfg, sizes, layers, distinct_tokens=1)
    assert one["embedding"] == cfg.dim * 2


@pytest.mark.parametrize("preset", ["tiny", "flash"])
def test_prefill_flops_add_up_over_chunks(preset):
    """The FLOPs of a prefill are the sum over any split into chunks (each position counted once)."""
    bench = _bench()
    cfg = getattr(Config, preset)()
    layers = range(cfg.n_layers)
    whole = bench.prefill_flops(cfg, layers, 0, 300)
    parts = [bench.prefill_flops(cfg, layers, lo, n) for lo, n in ((0, 7), (7, 128), (135, 165))]
    for key in whole:
        assert whole[key] == pytest.approx(sum(p[key] for p in parts), rel=1e-12)
    # a decode step at position t attends min(t+1, W) window entries (+ compressed ones) per head
    swa = [i for i in layers if cfg.compress_ratio(i) == 0][0]
    one = bench.prefill_flops(cfg, [swa], 1000, 1, head=False)
    assert one["attention"] == 4 * cfg.n_heads * cfg.head_dim * cfg.window_size


def test_peers_benchmark_skips_with_a_reason_without_torch():
    """benchmarks/peers.py without torch (hidden here even where installed): says why, prints a JSON line, exit 0."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['peers.py']; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'peers.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("skipped: ") and "pip install '.[peers]'" in lines[0]
    assert "skipped" in json.loads(lines[-1])


@pytest.mark.slow
def test_peers_benchmark_runs_where_the_peers_extra_is_installed(tmp_path):
    """benchmarks/peers.py end to end on a few tokens (it loads transformers' model through tools/trace_transformers.py,
    whose signatures it must follow): both ratios reported, positive and finite."""
    for name in ("torch", "transformers", "accelerate"):
        pytest.importorskip(name, reason="the peers extra (pip install '.[peers]') is not installed")
    ckpt = tmp_path / "tiny"
    subprocess.run([sys.executable, "-c", "import sys; from refimpl.cli.main import main; sys.exit(main())",
                    "make-checkpoint", "tiny", str(ckpt)], check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--ckpt", str(ckpt), "--tokens", "8",
                        "--threads", "1", "--repeats", "1"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(report["ratios"]) == {"refimpl_float32_over_transformers", "refimpl_mirror_over_transformers"}
    assert all(0 < v < math.inf for v in report["ratios"].values())
    assert set(report["cpu_ratios"]) == set(report["ratios"])
    assert all(0 < v < math.inf for v in report["cpu_ratios"].values())


def test_prefill_limits():
    """The Flash prefill is measured in --precision and float32, each against its own BLAS rate (issue 23)."""
    bench = _bench()
    assert bench.prefill_precisions("mirror") == ["mirror", "float32"]
    assert bench.prefill_precisions("float32") == ["float32"]
    assert bench.prefill_limit("mirror")[0] == bench.prefill_limit("float64")[0] == "dgemm"
    assert bench.prefill_limit("float32")[0] == "sgemm"


def test_prefill_cpu_prints_positive_figures(tiny_ckpt):
    """benchmarks/prefill_cpu.py on the tiny checkpoint: one line of positive figures (CPU seconds, FLOP, rates,
    efficiency), the RSS samples with --sample; a missing checkpoint is a message and exit 2."""
    import re
    script = str(ROOT / "benchmarks" / "prefill_cpu.py")
    r = subprocess.run([sys.executable, script, "--ckpt", str(tiny_ckpt), "--tokens", "24", "--sample"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    cpu = float(re.search(r"process CPU ([0-9.]+) s", first).group(1))
    eff = float(re.search(r"CPU efficiency ([0-9.]+)", first).group(1))
    assert cpu > 0 and 0 < eff
    assert any("GiB" in line and "<" in line for line in r.stdout.splitlines()[1:])   # sampled stacks
    r = subprocess.run([sys.executable, script, "--ckpt", str(ROOT / "no-such-checkpoint")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr
