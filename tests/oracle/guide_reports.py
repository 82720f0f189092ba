"""The planted bugs of docs/checking.md's worked example, and the reports compare gives for each.

Each "implementation under test" is refimpl's own float32 path with one fault of the bug zoo injected
(or, for a trace-writer bug, its correct trace with one site written in another layout), traced on
the tokens of a golden input and compared with the stored golden float64 trace, as a user would.
`report(name)` -> the text report; tests/oracle/test_checking_guide.py checks the doc's excerpts
against it; `python tests/oracle/guide_reports.py` prints them, `... --write` rewrites the doc's quotes
(after a deliberate change of compare's report; review the diff: the prose around a quote may need it too).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from refimpl.config import Config
from refimpl.formats.weights import load
from refimpl.oracle import golden
from refimpl.oracle.compare import compare, format_report
from refimpl.oracle.trace import run_trace
from refimpl.synthetic.writer import make_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bugzoo import inject  # noqa: E402

GOLDEN = golden.default_dir()
# name -> (what the bug is, the golden input, the bug zoo fault or None, a change of the written trace or None)
EXAMPLES = {
    "rope_halves": ("RoPE rotating the two halves of the rotary dims instead of adjacent pairs",
                    "prefill-80", "rope_halves", None),
    "q_norm_missing": ("the weightless per-head RMS norm of q left out", "prefill-80", "q_norm_missing", None),
    "unrotated_compressed_keys": ("compressed entries never rotated", "prefill-80", "unrotated_compressed_keys", None),
    "comb_written_transposed": ("a trace writer that stores hc_attn.comb as [t, k, j]", "prefill-80", None,
                                lambda t: {k: (np.swapaxes(v, 1, 2) if k.endswith("hc_attn.comb") else v)
                                           for k, v in t.items()}),
    "fp8_block_height_from_grid": ("an FP8 loader taking the block height from the scale grid",
                                   "tiny-partial-prefill-5", "fp8_block_height_from_grid", None),
}


def _models(cache={}):   # noqa: B006 (one model per checkpoint, made once)
    if not cache:
        tmp = Path(tempfile.mkdtemp(prefix="refimpl-guide-"))
        for name, cfg in ((None, Config.tiny()), (golden.PARTIAL, Config.tiny_partial())):
            make_checkpoint(cfg, tmp / str(name), seed=golden.SEED, progress=False)
            cache[name] = load(tmp / str(name), precision="float32", kernels="numpy")   # faults patch spec functions
    return cache


def report(name: str, out_dir) -> str:
    """The text report of example `name` (its trace written into out_dir)."""
    _, input_name, fault, rewrite = EXAMPLES[name]
    manifest = golden.read_manifest(GOLDEN)
    spec = next(golden.GoldenInput.from_dict(d) for d in manifest["inputs"] if d["name"] == input_name)
    model = _models()[spec.checkpoint]
    tokens = manifest["tokens"][:spec.length]
    if fault:
        with inject(fault):
            trace = run_trace(model, tokens)
    else:
        trace = run_trace(model, tokens)
    if rewrite:
        trace.tensors = rewrite(trace.tensors)
    path = Path(out_dir) / f"{name}.safetensors"
    trace.save(path)
    return format_report(compare(path, GOLDEN / "traces" / "float64" / f"{input_name}.safetensors"))


def tail(text: str) -> str:
    """The report from its FIRST OUT OF TOLERANCE line on (the lines the guide quotes)."""
    lines = text.splitlines()
    return "\n".join(lines[next(i for i, l in enumerate(lines) if l.startswith("FIRST OUT OF TOLERANCE")):])


def rewrite_guide(guide: Path, out_dir) -> list[str]:
    """Replace each quoted report of the guide by what compare says now; -> the names that changed."""
    text, changed = guide.read_text(encoding="utf-8"), []
    for name in EXAMPLES:
        head = f"<!-- checked: {name} -->\n```\n"
        start = text.index(head) + len(head)
        end = text.index("\n```", start)
        new = tail(report(name, out_dir))
        if text[start:end] != new:
            text, changed = text[:start] + new + text[end:], changed + [name]
    guide.write_text(text, encoding="utf-8")
    return changed


if __name__ == "__main__":
    # python tests/oracle/guide_reports.py [--write]: print the reports, or rewrite docs/checking.md's quotes
    with tempfile.TemporaryDirectory() as d:
        if sys.argv[1:] == ["--write"]:
            guide = Path(__file__).resolve().parents[2] / "docs" / "checking.md"
            print("rewrote:", ", ".join(rewrite_guide(guide, d)) or "nothing (every quote is current)")
        else:
            for n in sys.argv[1:] or EXAMPLES:
                print(f"<!-- checked: {n} -->\n```\n{tail(report(n, d))}\n```\n")
