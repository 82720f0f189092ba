"""Write a golden set: the only writer of golden/ (refimpl/oracle/golden.py says what one holds).

    python tools/make_golden.py --reason WHY          # golden/ for the tiny model (make-checkpoint tiny --seed 0),
                                                      # and the inputs of its second checkpoint (tiny-partial)
    python tools/make_golden.py --ckpt PATH --out DIR [--precision mirror] [--max-length 8]
                                                      # from any official-format checkpoint, e.g. the real
                                                      # DeepSeek-V4-Flash folder: memory-mapped, layer by layer

For a checkpoint given with --ckpt, the inputs are the threshold lengths of the tiny preset that
fit in --max-length, a decode and a chunking (the Flash thresholds run to 2052 tokens, hours on
the NumPy path); the manifest records the checkpoint's config and the SHA-256 of its config and
index files (not of 160 GB of shards). Progress is shown per layer; peak memory is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refimpl.formats.config_file import read_config
from refimpl._version import __version__                                    # noqa: E402
from refimpl.config import Config                                           # noqa: E402
from refimpl.formats.weights import load                                    # noqa: E402
from refimpl.oracle import golden                                           # noqa: E402
from refimpl.oracle.trace import Trace, run_trace                           # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "refimpl"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class LayerProgress(Trace):
    """A trace that also reports each finished block (its `layers.{i}.out` site) on stderr."""

    def __init__(self, patterns, n_layers: int, label: str, **kw):
        super().__init__(patterns, **kw)
        self.n_layers, self.label, self.t0 = n_layers, label, time.perf_counter()

    def record(self, name, x):
        super().record(name, x)
        if name.startswith("layers.") and name.endswith(".out"):
            i = int(name.split(".")[1])
            print(f"\r  {self.label}: layer {i + 1}/{self.n_layers} done "
                  f"({time.perf_counter() - self.t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB)   ",
                  end="", file=sys.stderr, flush=True)


def run_input(model, cfg, spec: golden.GoldenInput, label: str):
    tokens = golden.golden_tokens(cfg, spec.length)
    model = spec.model(model)                                              # the input's config keys
    if spec.chunks is None and spec.decode_from is None and sys.stderr.isatty():
        t = LayerProgress(("*",), cfg.n_layers, label)                     # one forward: per-layer progress
        model.forward(tokens, trace=t)
        print(file=sys.stderr)
        from refimpl.oracle.trace import trace_metadata
        t.metadata = trace_metadata(model, tokens, None)
        return t
    return run_trace(model, tokens, **spec.run_kwargs())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="an official-format checkpoint folder (default: the tiny model, seed 0)")
    p.add_argument("--out", default=str(ROOT / "golden"), help="the golden folder to write (replaced)")
    p.add_argument("--precision", action="append", choices=golden.PRECISIONS,
                   help="precisions to trace (repeatable; default: float64, float32 and mirror, or mirror with --ckpt)")
    p.add_argument("--max-length", type=int, default=None, help="with --ckpt: the longest input (default 8)")
    p.add_argument("--reason", required=True, help="why the set is (re)made: written into the manifest")
    a = p.parse_args(argv)
    if not a.reason.strip():
        p.error("--reason: say why the set is (re)made (it is written into the manifest)")

    out = Path(a.out)
    ours = {golden.MANIFEST, "README.md", "traces", "gradients"}
    if out.exists() and (not out.is_dir() or any(p.name not in ours for p in out.iterdir())):
        raise SystemExit(f"error: {out} exists and holds files a golden set does not; refusing to replace it")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refimpl-golden-") as tmp:
        ckpts, checkpoints = {}, {}                          # the other checkpoints (manifest `checkpoints`)
        if a.ckpt is None:                                                   # the tiny model, from its seed
            from refimpl.synthetic.writer import make_checkpoint
            cfg = Config.tiny()
            ckpt = Path(tmp) / "tiny"
            make_checkpoint(cfg, ckpt, seed=golden.SEED, progress=False)
            checkpoint = {"preset": "tiny", "seed": golden.SEED, "sha256": golden.checkpoint_hashes(ckpt),
                          "made_by": f"refimpl make-checkpoint tiny OUT --seed {golden.SEED}"}
            inputs = golden.golden_inputs(cfg)
            precisions = a.precision or list(golden.PRECISIONS)
            for name, other in golden.extra_checkpoints(cfg).items():    # e.g. tiny-partial: a partial FP8 block
                ckpts[name] = Path(tmp) / name
                make_checkpoint(other, ckpts[name], seed=golden.SEED, progress=False)
                checkpoints[name] = {"preset": name, "seed": golden.SEED, "sha256": golden.checkpoint_hashes(ckpts[name]),
                                     "made_by": f"refimpl make-checkpoint {name} OUT --seed {golden.SEED}",
                                     "config": other.to_hf_dict()}
        else:
            ckpt = Path(a.ckpt)
            cfg = read_config(ckpt)
            n = a.max_length or 8
            inputs = [i for i in golden.golden_inputs(Config.tiny()) if i.length <= n and i.chunks is None
                      and i.decode_from is None and not i.config and i.checkpoint is None]
            inputs = [golden.GoldenInput(i.name, i.length, rows=i.rows) for i in inputs]   # every precision
            inputs.append(golden.GoldenInput(f"decode-{max(n // 2, 1)}-to-{n}", n, decode_from=max(n // 2, 1),
                                             rows=tuple(range(max(n // 2, 1), n))))
            checkpoint = {"path": str(ckpt.resolve()),
                          "sha256": {f: golden.sha256_file(ckpt / f) for f in ("config.json", "model.safetensors.index.json")
                                     if (ckpt / f).is_file()}}
            precisions = a.precision or ["mirror"]

        stage = Path(tmp) / "golden"
        files = {}
        ckpts[None] = ckpt
        for precision in precisions:
            models = {}                                                      # per checkpoint, loaded when used
            (stage / "traces" / precision).mkdir(parents=True)
            for spec in inputs:
                if precision not in spec.precisions:
                    continue
                t0 = time.perf_counter()
                if spec.checkpoint not in models:                          # the spec functions' numbers
                    models[spec.checkpoint] = load(ckpts[spec.checkpoint], precision=precision, kernels="numpy")
                model = models[spec.checkpoint]
                trace = run_input(model, model.cfg, spec, f"{precision} {spec.name}")
                kept = golden.sample_rows(trace.tensors, spec.rows, spec.length)
                name = f"traces/{precision}/{spec.name}.safetensors"
                from safetensors.numpy import save_file
                meta = dict(trace.metadata, golden_rows=list(spec.rows))
                save_file(kept, str(stage / name), metadata={"refimpl": json.dumps(meta, sort_keys=True)})
                files[name] = golden.sha256_file(stage / name)
                print(f"{precision:8s} {spec.name:24s} {len(kept)} sites, rows {list(spec.rows)} "
                      f"({time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB)")

        grads = golden.golden_gradients(cfg) if a.ckpt is None and "float64" in precisions else []
        if grads:                                                            # float64 gradient traces, sampled
            from refimpl.oracle.gradients import save_grad_trace
            (stage / "gradients").mkdir()
            model = load(ckpt, precision="float64", kernels="numpy")
            for i, g in enumerate(grads):
                t0 = time.perf_counter()
                kept, meta = golden.compute_gradient(g, model, golden.golden_tokens(cfg, g.length))
                grads[i] = g = golden.GoldenGradient(g.name, g.length, g.head, g.rows,
                                                     tuple(sorted(n for n in kept if n in golden.parameter_gradients(cfg))))
                name = golden.gradient_file(g.name)
                save_grad_trace(stage / name, kept, meta)
                files[name] = golden.sha256_file(stage / name)
                print(f"gradient {g.name:24s} {len(kept)} gradients ({len(g.params)} parameters), rows {list(g.rows)}, "
                      f"{(stage / name).stat().st_size / 1e6:.2f} MB ({time.perf_counter() - t0:.1f} s)")

        manifest = {
            "format_version": golden.FORMAT_VERSION,
            "reason": a.reason,
            "generated_by": {"tool": "tools/make_golden.py", "refimpl": __version__, "commit": commit(),
                             "python": platform.python_version(), "numpy": np.__version__,
                             "ml_dtypes": __import__("ml_dtypes").__version__, "machine": platform.machine()},
            "checkpoint": checkpoint,
            "checkpoints": checkpoints,               # the other checkpoints inputs run on (an input's `checkpoint`)
            "config": cfg.to_hf_dict(),
            "token_seed": golden.TOKEN_SEED,
            "tokens": golden.golden_tokens(cfg, max(i.length for i in inputs)),
            "inputs": [i.as_dict() for i in inputs],
            "precisions": precisions,
            "layout": "official",                   # each call's index layout as the official code builds it
            "profiles": {p: golden.PROFILES[p] for p in precisions},
            "storage": {"float64": "float64 traces are stored rounded to float32; integer sites as int32",
                        "mirror": "as computed: float32 holding the official roundings; integer sites as int32",
                        "float32": "as computed (refimpl in float32: the noise model's companion, oracle/noise.py); "
                                   "integer sites as int32",
                        "rows": "per input, only the rows of the positions in `rows` (MTP sites: those below "
                                "length-1; compressed_kv: every entry)",
                        "gradients": "float64 as computed: the rows in `rows` of every activation gradient "
                                     "(compressed_kv: every entry) and the parameter gradients in `params`, whole"},
            "gradients": [g.as_dict() for g in grads],   # golden gradient traces (float64, docs/gradients.md)
            "files": files,
        }
        (stage / golden.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        readme = (ROOT / "golden" / "README.md")
        if a.ckpt is None and readme.is_file() and out.resolve() != (ROOT / "golden").resolve():
            shutil.copy(readme, stage / "README.md")
        elif (out / "README.md").is_file():
            shutil.copy(out / "README.md", stage / "README.md")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(stage, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {len(files)} traces, {size / 1e6:.2f} MB; {time.perf_counter() - t_start:.1f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
