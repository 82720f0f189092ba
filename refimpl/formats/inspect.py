"""`refimpl inspect` of any checkpoint: counts and bytes by dtype and kind, validation, a NaN/Inf scan.

`summarize(ckpt)` returns a dict, `format_summary` its text. Validation is `weights.validate`
against the checkpoint's config (names, dtypes, shapes, E8M0 NaN scales, routing tables) and,
where the folder has one, the tokenizer (readable, with exactly the config's vocab_size ids);
`scan_values` adds the weights themselves: every BF16 / F16 / F32 / F64 value for NaN and Inf,
and every FP8 e4m3 byte for the NaN codes 0x7F / 0xFF (e4m3fn has no Inf). FP4 e2m1 codes are
all finite, so the routed experts (most of the bytes of a real checkpoint) are not read.

The scan (`checkpoint.scan_values`) streams: each tensor is read in chunks of at most 16 MiB with
pread, never mapped or loaded whole, so memory stays flat on a 160 GB checkpoint; its duration
is reported.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

from refimpl.formats.config_file import read_config
from refimpl.config import Config, ConfigError
from refimpl.formats.checkpoint import TensorSource, scan_values
from refimpl.formats.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from refimpl.formats.weights import check_checkpoint_folder, expected_size, expected_tensors, size_problem, validate

def summarize(source: TensorSource | str | Path, cfg: Config | None = None, *,
              scan_scales: bool = True, scan: bool = True) -> dict:
    """Counts and bytes by dtype and by kind, and the problems (cfg: from config.json); scan: NaN/Inf of the values.

    source: a checkpoint folder (a shard file is refused: a checkpoint is a folder), or a TensorSource.
    """
    if not isinstance(source, TensorSource):
        check_checkpoint_folder(source)
    src = source if isinstance(source, TensorSource) else TensorSource(source)
    folder = src.path if src.path.is_dir() else src.path.parent
    problems: list[str] = []
    if cfg is None:
        try:
            cfg = read_config(folder)
        except ConfigError as e:
            problems.append(f"config: {e}")
    too_many = size_problem(src, cfg) if cfg is not None else None       # before any per-tensor work
    want = expected_tensors(cfg) if cfg is not None and too_many is None else {}
    expected = len(want) if want or cfg is None else expected_size(cfg)[0]
    if cfg is not None:
        problems += _tokenizer_problems(folder, cfg)
    by_dtype: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
    by_kind: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
    total = 0
    for name in src.keys():
        n = src.nbytes(name)
        total += n
        kind = want[name].kind if name in want else ("unexpected" if want else "unknown")
        for table, key in ((by_dtype, src.dtype(name)), (by_kind, kind)):
            table[key]["count"] += 1
            table[key]["bytes"] += n
    t0 = time.perf_counter()
    if cfg is not None:
        problems += [too_many] if too_many else validate(src, cfg, scan_scales=scan_scales)
    values = None
    if scan:
        found, values = scan_values(src)
        problems += found
        if scan_scales and want:             # validate() read the E8M0 scales
            values["bytes"] += sum(src.nbytes(k) for k in src.keys() if src.dtype(k) == "F8_E8M0")
        values["seconds"] = time.perf_counter() - t0
    return {"path": str(src.path), "files": len(src.files), "tensors": len(src), "expected": expected,
            "bytes": total, "index_total_size": src.index_metadata.get("total_size"),
            "by_dtype": dict(sorted(by_dtype.items())),
            "by_kind": {k: by_kind[k] for k in sorted(by_kind, key=lambda k: -by_kind[k]["bytes"])},
            "config": None if cfg is None else {"n_layers": cfg.n_layers, "dim": cfg.dim,
                                                "n_routed_experts": cfg.n_routed_experts,
                                                "vocab_size": cfg.vocab_size},
            "scan": values, "problems": problems, "ok": not problems}


def _tokenizer_problems(folder: Path, cfg: Config) -> list[str]:
    """The checkpoint's tokenizer, where it has one: readable, and exactly the model's vocabulary."""
    if not any(os.path.lexists(folder / name) for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)):
        return []                        # synthetic flash / pro checkpoints carry none
    try:
        Tokenizer.from_checkpoint(folder).check_vocab(cfg.vocab_size)
    except ValueError as e:              # TokenizerError, or the bos/eos check
        return [f"tokenizer: {e}"]
    return []


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def format_summary(s: dict, *, max_problems: int = 40) -> str:
    """The summarize() dict as text for `refimpl inspect`."""
    lines = [f"{s['path']}: {s['tensors']} tensors in {s['files']} file(s), {_size(s['bytes'])} "
             f"({s['bytes']:,} bytes)"]
    if s["config"]:
        c = s["config"]
        lines.append(f"config: {c['n_layers']} layers, dim {c['dim']}, {c['n_routed_experts']} experts, "
                     f"vocab {c['vocab_size']}; expected {s['expected']} tensors")
    if s["index_total_size"] is not None and s["index_total_size"] != s["bytes"]:
        lines.append(f"index total_size {s['index_total_size']:,} != sum of tensor bytes {s['bytes']:,}")
    for title, table in (("by dtype", s["by_dtype"]), ("by kind", s["by_kind"])):
        lines.append(f"{title}:")
        lines += [f"  {k:<14} {v['count']:>8} tensors  {_size(v['bytes']):>10}" for k, v in table.items()]
    v = s.get("scan")
    if v:
        lines.append(f"scan: {_size(v['bytes'])} of weights and scales read for NaN/Inf in {v['seconds']:.2f} s "
                     f"({_size(v['skipped_bytes'])} of FP4 codes and integer tables skipped: never NaN)")
    probs = s["problems"]
    if not probs:
        lines.append("validation: OK")
    else:
        lines.append(f"validation: {len(probs)} problem(s)")
        lines += [f"  - {p}" for p in probs[:max_problems]]
        if len(probs) > max_problems:
            lines.append(f"  ... and {len(probs) - max_problems} more")
    return "\n".join(lines)
