"""The checkpoint's key table: every official tensor name with its dtype and shape (docs/architecture.md §16).

This module knows names, not bytes (bytes live in `checkpoint.py`). `expected_tensors(cfg)` lists
every tensor the official HF checkpoint holds for a `Config`, in file order (embed, layers, MTP,
final norm / hc_head, head); `validate` / `check_checkpoint` hold a `TensorSource` against it.

Kinds (for `refimpl inspect`, bytes per kind):
  attention      layers.{i}.attn.*  (q/kv paths, wo_a/wo_b, attn_sink, q_norm/kv_norm, compressor, indexer)
  experts        layers.{i}.ffn.experts.*      routed experts (packed FP4 + E8M0 per-32 scales)
  shared_expert  layers.{i}.ffn.shared_experts.*
  router         layers.{i}.ffn.gate.*         (weight; bias or tid2eid)
  mhc            layers.{i}.hc_{attn,ffn}_{fn,base,scale}, hc_head_{fn,base,scale}
  norms          layers.{i}.{attn,ffn}_norm.weight, norm.weight
  embedding      embed.weight
  head           head.weight
  mtp            everything under mtp.0. (the MTP block, all its sublayers)

Official: the module tree of inference/model.py (M:L279-800); names as DeepSeek ships them.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from refimpl.formats.config_file import read_config
from refimpl.formats.checkpoint import (INDEX_NAME, MAX_INDEX_BYTES, CheckpointError, TensorSource, scan_values,
                                        spec_nbytes)
from refimpl.formats.files import read_json, size_text
from refimpl.config import Config, ConfigError
from refimpl.numerics import FP4_BLOCK, FP8_BLOCK
from refimpl.ops import parse_kernels
from refimpl.model.linear import Fp8Matrix, Fp4Matrix
from refimpl.model.hyperconn import HyperConnWeights
from refimpl.model.compressor import CompressorWeights
from refimpl.model.indexer import IndexerWeights
from refimpl.model.attention import AttentionWeights
from refimpl.model.moe import GateWeights, ExpertWeights, MoEWeights
from refimpl.model.block import BlockWeights
from refimpl.model.transformer import Model, MTPWeights, ModelWeights

KINDS = ("attention", "experts", "shared_expert", "router", "mhc", "norms", "embedding", "head", "mtp")


class TensorSpec(NamedTuple):
    """One checkpoint tensor: safetensors dtype string, shape, kind (see the module docstring)."""
    dtype: str
    shape: tuple[int, ...]
    kind: str


def _fp8(out: dict, name: str, n: int, k: int, kind: str):
    # FP8 e4m3 weight [n, k] + E8M0 scale [ceil(n/128), ceil(k/128)] (docs/architecture.md §16)
    out[f"{name}.weight"] = TensorSpec("F8_E4M3", (n, k), kind)
    out[f"{name}.scale"] = TensorSpec("F8_E8M0", (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)), kind)


def _fp4(out: dict, name: str, n: int, k: int, kind: str):
    # FP4 e2m1 weight [n, k] packed two per byte along k (low nibble first) as I8 [n, k/2],
    # + E8M0 scale [n, k/32] (docs/architecture.md §16)
    out[f"{name}.weight"] = TensorSpec("I8", (n, k // 2), kind)
    out[f"{name}.scale"] = TensorSpec("F8_E8M0", (n, k // FP4_BLOCK), kind)


def _hc(out: dict, p: str, sub: str, cfg: Config, kind: str):
    # mHC mixing weights of one sublayer: fn [n_mix, n*c], base [n_mix], scale [3] (all F32)
    n_mix, nc = cfg.n_mix, cfg.hc_mult * cfg.dim
    out[f"{p}hc_{sub}_fn"] = TensorSpec("F32", (n_mix, nc), kind)
    out[f"{p}hc_{sub}_base"] = TensorSpec("F32", (n_mix,), kind)
    out[f"{p}hc_{sub}_scale"] = TensorSpec("F32", (3,), kind)


def _hc_head(out: dict, p: str, cfg: Config, kind: str):
    # final stream collapse: fn [n, n*c], base [n], scale [1] (F32; docs/architecture.md §7)
    n, nc = cfg.hc_mult, cfg.hc_mult * cfg.dim
    out[f"{p}hc_head_fn"] = TensorSpec("F32", (n, nc), kind)
    out[f"{p}hc_head_base"] = TensorSpec("F32", (n,), kind)
    out[f"{p}hc_head_scale"] = TensorSpec("F32", (1,), kind)


def _compressor(out: dict, p: str, layer: int, d: int, cfg: Config, kind: str):
    # Compressor(m=ratio, d): wkv, wgate [coff*d, c] BF16; ape [m, coff*d] F32; norm [d] BF16;
    # coff = 2 where the windows overlap (m == 4, M:L290), else 1 (docs/architecture.md §8)
    ratio = cfg.compress_ratio(layer)
    coff = 2 if cfg.uses_overlap(layer) else 1
    out[f"{p}wkv.weight"] = TensorSpec("BF16", (coff * d, cfg.dim), kind)
    out[f"{p}wgate.weight"] = TensorSpec("BF16", (coff * d, cfg.dim), kind)
    out[f"{p}ape"] = TensorSpec("F32", (ratio, coff * d), kind)
    out[f"{p}norm.weight"] = TensorSpec("BF16", (d,), kind)


def _block(out: dict, p: str, layer: int, cfg: Config, mtp: bool, experts: bool = True):
    """The tensors of one Block (main layer or the MTP block), prefix p = "layers.{i}." or "mtp.0.";
    experts=False leaves out the routed experts (expected_size counts them without listing them)."""
    k = lambda kind: "mtp" if mtp else kind                                   # noqa: E731
    c, d, h, q = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.q_lora_rank
    e, f = cfg.n_routed_experts, cfg.moe_inter_dim
    # attention (docs/architecture.md §10): q/kv low-rank paths, grouped output wo_a [g*r, h*d/g], wo_b [c, g*r]
    a = f"{p}attn."
    out[f"{a}attn_sink"] = TensorSpec("F32", (h,), k("attention"))
    out[f"{a}q_norm.weight"] = TensorSpec("BF16", (q,), k("attention"))
    out[f"{a}kv_norm.weight"] = TensorSpec("BF16", (d,), k("attention"))
    _fp8(out, f"{a}wq_a", q, c, k("attention"))
    _fp8(out, f"{a}wq_b", h * d, q, k("attention"))
    _fp8(out, f"{a}wkv", d, c, k("attention"))
    # wo_a stays FP8 + scale in the checkpoint (convert.py dequantizes it to bf16, C:L137-141)
    _fp8(out, f"{a}wo_a", cfg.o_groups * cfg.o_lora_rank, h * d // cfg.o_groups, k("attention"))
    _fp8(out, f"{a}wo_b", c, cfg.o_groups * cfg.o_lora_rank, k("attention"))
    if cfg.uses_compressor(layer):
        _compressor(out, f"{a}compressor.", layer, d, cfg, k("attention"))
    if cfg.uses_indexer(layer):
        i, j = cfg.index_n_heads, cfg.index_head_dim
        _fp8(out, f"{a}indexer.wq_b", i * j, q, k("attention"))
        out[f"{a}indexer.weights_proj.weight"] = TensorSpec("BF16", (i, c), k("attention"))
        _compressor(out, f"{a}indexer.compressor.", layer, j, cfg, k("attention"))
    # MoE (docs/architecture.md §11): router, e routed FP4 experts, one FP8 shared expert
    g = f"{p}ffn.gate."
    out[f"{g}weight"] = TensorSpec("BF16", (e, c), k("router"))
    if cfg.is_hash_layer(layer) and not mtp:
        out[f"{g}tid2eid"] = TensorSpec("I64", (cfg.vocab_size, cfg.n_activated_experts), k("router"))
    else:
        out[f"{g}bias"] = TensorSpec("F32", (e,), k("router"))
    for x in range(e if experts else 0):
        _expert(out, f"{p}ffn.experts.{x}.", cfg, k("experts"))
    _fp8(out, f"{p}ffn.shared_experts.w1", f, c, k("shared_expert"))
    _fp8(out, f"{p}ffn.shared_experts.w2", c, f, k("shared_expert"))
    _fp8(out, f"{p}ffn.shared_experts.w3", f, c, k("shared_expert"))
    # block norms and mHC (docs/architecture.md §7)
    out[f"{p}attn_norm.weight"] = TensorSpec("BF16", (c,), k("norms"))
    out[f"{p}ffn_norm.weight"] = TensorSpec("BF16", (c,), k("norms"))
    _hc(out, p, "attn", cfg, k("mhc"))
    _hc(out, p, "ffn", cfg, k("mhc"))


def _expert(out: dict, p: str, cfg: Config, kind: str):
    # one routed expert: w1, w3 [f, c] and w2 [c, f], packed FP4 (docs/architecture.md §11, §16)
    c, f = cfg.dim, cfg.moe_inter_dim
    _fp4(out, f"{p}w1", f, c, kind)
    _fp4(out, f"{p}w2", c, f, kind)
    _fp4(out, f"{p}w3", f, c, kind)


def expected_tensors(cfg: Config, *, experts: bool = True) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for cfg (docs/architecture.md §16), in file order
    (experts=False: all but the routed experts)."""
    c = cfg.dim
    out: dict[str, TensorSpec] = {"embed.weight": TensorSpec("BF16", (cfg.vocab_size, c), "embedding")}
    for i in range(cfg.n_layers):
        _block(out, f"layers.{i}.", i, cfg, mtp=False, experts=experts)
    for m in range(cfg.n_mtp_layers):
        # MTP block: layer id n_layers (+m), plus its input projections, norms and own hc_head (docs/architecture.md §14)
        p = f"mtp.{m}."
        _block(out, p, cfg.n_layers + m, cfg, mtp=True, experts=experts)
        _fp8(out, f"{p}e_proj", c, c, "mtp")
        _fp8(out, f"{p}h_proj", c, c, "mtp")
        out[f"{p}enorm.weight"] = TensorSpec("BF16", (c,), "mtp")
        out[f"{p}hnorm.weight"] = TensorSpec("BF16", (c,), "mtp")
        out[f"{p}norm.weight"] = TensorSpec("BF16", (c,), "mtp")
        _hc_head(out, p, cfg, "mtp")
    out["norm.weight"] = TensorSpec("BF16", (c,), "norms")
    _hc_head(out, "", cfg, "mhc")
    out["head.weight"] = TensorSpec("BF16", (cfg.vocab_size, c), "head")
    return out


MISSING_LISTED = 10_000          # missing tensors named one by one at most (beyond 2x the tensors present)


def expected_size(cfg: Config) -> tuple[int, int]:
    """(tensor count, bytes) of expected_tensors(cfg), with the routed experts counted, not listed.

    Cheap at any config the field ranges admit (the experts are most of the tensors: 8 layers of
    65,536 experts are 3 million, which took 18 s and 2.4 GB to list).
    """
    rest, one = expected_tensors(cfg, experts=False), {}
    _expert(one, "", cfg, "experts")
    experts = (cfg.n_layers + cfg.n_mtp_layers) * cfg.n_routed_experts
    nbytes = lambda specs: sum(spec_nbytes(s) for s in specs.values())       # noqa: E731
    return len(rest) + experts * len(one), nbytes(rest) + experts * nbytes(one)


def size_problem(src: TensorSource, cfg: Config) -> str | None:
    """A line when cfg implies far more tensors than the checkpoint holds, else None (before any per-tensor work).

    Listing the expected tensors costs about a kilobyte each; below 2x the tensors the headers
    already hold (plus a margin) that is bounded by what is in memory anyway, and every missing
    tensor is named. Above it the config cannot describe these files, and one line says so.
    """
    n, nbytes = expected_size(cfg)
    if n <= 2 * len(src) + MISSING_LISTED:
        return None
    have = sum(src.nbytes(k) for k in src.keys())
    return (f"the config implies {n:,} tensors of {size_text(nbytes)}, but the checkpoint holds {len(src):,} "
            f"of {size_text(have)}: config.json does not describe these files (not compared tensor by tensor)")


# ---------------------------------------------------------------- validation

def validate(source: TensorSource | str | Path, cfg: Config, *, scan_scales: bool = True) -> list[str]:
    """Problems of a checkpoint against cfg, one line each naming the tensor (empty = valid).

    Checks: a config implying far more tensors than the files hold (one line: size_problem),
    missing, unexpected (extra) and index-unlisted tensors, dtype, shape, every hash-routing
    table (tid2eid) for expert ids outside [0, n_routed_experts), and (scan_scales) every E8M0
    scale for the NaN byte 0xFF. Scanning reads the scales (~5% of the real checkpoint).
    """
    src = source if isinstance(source, TensorSource) else TensorSource(source)
    if (too_many := size_problem(src, cfg)) is not None:
        return [too_many]
    want = expected_tensors(cfg)
    have = set(src.keys())
    problems = [f"missing tensor {n!r} ({s.dtype} {list(s.shape)})" for n, s in want.items() if n not in have]
    problems += [f"unexpected tensor {n!r} ({src.dtype(n)} {list(src.shape(n))})"
                 for n in src.keys() if n not in want]
    problems += [f"unexpected tensor {n!r} in shard {shard!r}: not listed in the index"
                 for n, shard in src.unlisted.items()]
    for n, s in want.items():
        if n not in have:
            continue
        if src.dtype(n) != s.dtype:
            problems.append(f"tensor {n!r} has dtype {src.dtype(n)}, expected {s.dtype}")
        if src.shape(n) != s.shape:
            problems.append(f"tensor {n!r} has shape {list(src.shape(n))}, expected {list(s.shape)}")
        elif scan_scales and s.dtype == "F8_E8M0" and src.dtype(n) == "F8_E8M0":
            # E8M0 byte 0xFF is NaN (docs/architecture.md §3); read in chunks, not mapped, so memory stays flat
            nan = sum(chunk.count(0xFF) for chunk in src.iter_bytes(n))
            if nan:
                problems.append(f"tensor {n!r}: {nan} E8M0 scale byte(s) are 0xFF (NaN)")
        elif n.endswith(".gate.tid2eid") and src.dtype(n) == s.dtype:
            problems += _check_tid2eid(src, n, cfg.n_routed_experts)
    return problems


def _check_tid2eid(src: TensorSource, name: str, n_experts: int) -> list[str]:
    """The hash-routing table [v, a] must hold expert ids in [0, e) (official Gate: tid2eid[input_ids],
    M:L564-584): -1 would pick the last expert (NumPy wraps it), e or more fail mid-forward."""
    table = src.get(name, record=False)                 # [v, a] int64, a few MB (read, not kept)
    bad = (table < 0) | (table >= n_experts)
    if not bad.any():
        return []
    row, col = (int(i) for i in np.argwhere(bad)[0])
    return [f"tensor {name!r}: {int(bad.sum())} expert id(s) outside [0, n_routed_experts = {n_experts}), "
            f"the first {int(table[row, col])} for token id {row}"]


def check_checkpoint(source: TensorSource | str | Path, cfg: Config, *, scan_scales: bool = True,
                     max_lines: int = 40) -> None:
    """Raise CheckpointError listing the problems of validate() (at most max_lines of them)."""
    src = source if isinstance(source, TensorSource) else TensorSource(source)
    problems = validate(src, cfg, scan_scales=scan_scales)
    if problems:
        shown = problems[:max_lines]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CheckpointError(f"{src.path}: {len(problems)} problem(s) against the config:\n  "
                              + "\n  ".join(shown) + more)


# ---------------------------------------------------------------- loaders
# One line per tensor: each load_* builds the weights dataclass of one component module from
# memory-mapped views (TensorSource.get records every key read; nothing is dequantized here).


def _fp8m(t: TensorSource, name: str) -> Fp8Matrix:
    return Fp8Matrix(values=t.get(f"{name}.weight"), scale=t.get(f"{name}.scale"))


def _fp4m(t: TensorSource, name: str) -> Fp4Matrix:
    return Fp4Matrix(values=t.get(f"{name}.weight"), scale=t.get(f"{name}.scale"))


def load_hyperconn(t: TensorSource, p: str, sub: str) -> HyperConnWeights:
    """hc_{sub}_fn / _base / _scale under prefix p (sub = attn, ffn or head)."""
    return HyperConnWeights(fn=t.get(f"{p}hc_{sub}_fn"), base=t.get(f"{p}hc_{sub}_base"),
                            scale=t.get(f"{p}hc_{sub}_scale"))


def load_compressor(t: TensorSource, p: str) -> CompressorWeights:
    return CompressorWeights(wkv=t.get(f"{p}wkv.weight"), wgate=t.get(f"{p}wgate.weight"),
                             ape=t.get(f"{p}ape"), norm=t.get(f"{p}norm.weight"))


def load_attention(t: TensorSource, p: str, layer: int, cfg: Config) -> AttentionWeights:
    a = f"{p}attn."
    indexer = None
    if cfg.uses_indexer(layer):
        indexer = IndexerWeights(wq_b=_fp8m(t, f"{a}indexer.wq_b"),
                                 weights_proj=t.get(f"{a}indexer.weights_proj.weight"),
                                 compressor=load_compressor(t, f"{a}indexer.compressor."))
    return AttentionWeights(
        wq_a=_fp8m(t, f"{a}wq_a"), q_norm=t.get(f"{a}q_norm.weight"), wq_b=_fp8m(t, f"{a}wq_b"),
        wkv=_fp8m(t, f"{a}wkv"), kv_norm=t.get(f"{a}kv_norm.weight"),
        wo_a=_fp8m(t, f"{a}wo_a"), wo_b=_fp8m(t, f"{a}wo_b"), attn_sink=t.get(f"{a}attn_sink"),
        compressor=load_compressor(t, f"{a}compressor.") if cfg.uses_compressor(layer) else None,
        indexer=indexer)


def load_gate(t: TensorSource, p: str, layer: int, cfg: Config, mtp: bool) -> GateWeights:
    g, hashed = f"{p}ffn.gate.", cfg.is_hash_layer(layer) and not mtp
    return GateWeights(weight=t.get(f"{g}weight"),
                       bias=None if hashed else t.get(f"{g}bias"),
                       tid2eid=t.get(f"{g}tid2eid") if hashed else None)


def load_expert(t: TensorSource, p: str, fp4: bool) -> ExpertWeights:
    m = _fp4m if fp4 else _fp8m
    return ExpertWeights(w1=m(t, f"{p}w1"), w2=m(t, f"{p}w2"), w3=m(t, f"{p}w3"))


def load_moe(t: TensorSource, p: str, layer: int, cfg: Config, mtp: bool = False) -> MoEWeights:
    return MoEWeights(gate=load_gate(t, p, layer, cfg, mtp),
                      experts=tuple(load_expert(t, f"{p}ffn.experts.{e}.", fp4=True)
                                    for e in range(cfg.n_routed_experts)),
                      shared=load_expert(t, f"{p}ffn.shared_experts.", fp4=False))


def load_block(t: TensorSource, p: str, layer: int, cfg: Config, mtp: bool = False) -> BlockWeights:
    return BlockWeights(hc_attn=load_hyperconn(t, p, "attn"), attn_norm=t.get(f"{p}attn_norm.weight"),
                        attn=load_attention(t, p, layer, cfg),
                        hc_ffn=load_hyperconn(t, p, "ffn"), ffn_norm=t.get(f"{p}ffn_norm.weight"),
                        ffn=load_moe(t, p, layer, cfg, mtp))


def load_mtp(t: TensorSource, cfg: Config) -> MTPWeights:
    p = "mtp.0."
    return MTPWeights(block=load_block(t, p, cfg.mtp_layer, cfg, mtp=True),
                      e_proj=_fp8m(t, f"{p}e_proj"), h_proj=_fp8m(t, f"{p}h_proj"),
                      enorm=t.get(f"{p}enorm.weight"), hnorm=t.get(f"{p}hnorm.weight"),
                      norm=t.get(f"{p}norm.weight"), hc_head=load_hyperconn(t, p, "head"))


def load_model_weights(t: TensorSource, cfg: Config, *, resident_head: bool = False) -> ModelWeights:
    """Every weight as memory-mapped views (each key read once; nothing dequantized); resident_head: the head
    read into anonymous memory instead (TensorSource.get(resident=True))."""
    return ModelWeights(embed=t.get("embed.weight"),
                        layers=tuple(load_block(t, f"layers.{i}.", i, cfg) for i in range(cfg.n_layers)),
                        norm=t.get("norm.weight"), hc_head=load_hyperconn(t, "", "head"),
                        head=t.get("head.weight", resident=resident_head),
                        mtp=load_mtp(t, cfg) if cfg.n_mtp_layers else None)


def check_checkpoint_folder(path) -> Path:
    """path as a checkpoint folder, or a CheckpointError at once (a shard given for the folder is not read)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"the checkpoint path must be a str or a path, got {type(path).__name__} {path!r:.60}")
    p = Path(path)
    if str(path) == "":
        raise CheckpointError("the checkpoint path is empty")
    if not p.is_dir():
        what = ("is a file" if p.is_file() else "is not a folder") if os.path.lexists(p) else "does not exist"
        raise CheckpointError(f"{str(path)!r} {what}: a checkpoint is a folder holding config.json and the "
                              "safetensors shards")
    return p


CHECKPOINT_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", INDEX_NAME,
                   "inference/config.json")
SHARD_PATTERN = re.compile(r"model(-\d+-of-\d+)?\.safetensors")   # model.safetensors, model-00001-of-00046...


def checkpoint_files(path) -> list[Path]:
    """The existing files a checkpoint folder is made of: its JSON files and its shards (by name or index).

    An output (a trace) must never replace one of them; `refimpl trace --out` checks against this.
    """
    folder = Path(path)
    names = set(CHECKPOINT_JSON)
    if folder.is_dir():
        names |= {f.name for f in folder.iterdir() if SHARD_PATTERN.fullmatch(f.name)}
        try:
            index = read_json(folder / INDEX_NAME, limit=MAX_INDEX_BYTES, what="a safetensors index", regular=True)
            names |= {v for v in index.get("weight_map", {}).values() if isinstance(v, str)}
        except (ValueError, AttributeError):       # no index, or a malformed one: load() reports it
            pass
    return [folder / n for n in sorted(names) if (folder / n).is_file()]


def load(path, *, precision: str = "float32", revision: str = "current", max_seq_len: int | None = None,
         layout: str = "official", kernels: str | None = None, resident_head: bool | None = None) -> Model:
    """A model over a memory-mapped checkpoint directory; nothing is dequantized until used.

    layout: "official" (each call's index layout as the official code has it) or "canonical" (one
    layout for every call: decode == prefill bit for bit in mirror too); see `Model`.
    kernels: "numba" (the kernels; the default, or $REFIMPL_KERNELS), "numpy" (the spec functions), or per
    operation, e.g. "numba,sparse_attention=numpy"; refimpl/ops.py.
    resident_head: read the output head into anonymous memory at load, on huge pages (Flash: 1.06 GB of
    memory at once; faster to stream than 4 KiB file pages: benchmarks/README.md, "Issue 23: Flash
    decode") instead of mapping it; None (default): when the Numba kernel runs fp32_linear (the head's
    product), which every decode step runs over the whole matrix. Results are the same either way.
    """
    if max_seq_len is not None and (not isinstance(max_seq_len, (int, np.integer)) or isinstance(max_seq_len, bool)):
        raise ConfigError(f"max_seq_len = {max_seq_len!r}: must be an int (a number of tokens)", field="max_seq_len")
    overrides = {} if max_seq_len is None else {"max_seq_len": int(max_seq_len)}   # exact: an int already
    check_checkpoint_folder(path)
    cfg = read_config(path, **overrides)
    source = TensorSource(path)
    check_checkpoint(source, cfg)        # config and tensors must agree, exactly
    # The F32 tensors (mHC, attention sinks, compressor ape, router bias: 0.14 GB of Flash's 160)
    # are scanned here: an Inf in them can vanish into a softmax denominator or a top-k choice
    # without reaching any checked site. The rest feeds sites directly; `refimpl inspect` scans all.
    bad, _ = scan_values(source, ("F32",))
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{source.path}: NaN/Inf in the weights: " + "; ".join(bad[:5]) + more)
    if resident_head is None:
        resident_head = parse_kernels(kernels).backend("fp32_linear") == "numba"
    return Model(cfg, load_model_weights(source, cfg, resident_head=bool(resident_head)), precision=precision,
                 revision=revision, layout=layout, kernels=kernels)
