"""Random-weight checkpoints in the exact official format.

`make_checkpoint(cfg, out)` writes every tensor of `weights.expected_tensors(cfg)` with its official
dtype, sharded as DeepSeek ships it (model-0000i-of-0000n.safetensors + model.safetensors.index.json),
with the HF `config.json` (= `cfg.to_hf_dict()`), `generation_config.json`, and `tokenizer.json` +
`tokenizer_config.json` from `synthetic.tokenizer.build_tiny_tokenizer` where its corpus can fill vocab_size
ids (tiny: yes; Flash's 129,280: no, a note says to copy the official files in). The directory
appears only when complete (written as `out.tmp-…`, then renamed); a failure or Ctrl-C leaves
nothing behind. An existing folder is replaced only with overwrite=True and only if it holds
nothing but the files written here (`check_output_folder`): nobody's other files are deleted.

Determinism: tensor `name` is drawn from its own generator, seeded by (seed, sha256(name)), so the
bytes depend only on the seed, the name and the shape, never on the write order. (NumPy promises
the same streams only on the same build; golden sets therefore store the sha256 of the files.)

Weight scales (chosen so that a forward pass of random weights stays O(1) through every layer):
    linear weights (FP8, FP4, BF16)  N(0, 1/fan_in) in dequantized value; FP8 via quant_fp8_weight,
                                     each 128x128 block with its own power-of-two gain (2^-2..2^2,
                                     normalised), so the block scales vary by 4 binades across the grid
    routed experts (FP4)             random e2m1 nibbles shaped like a quantized N(0, 2^2) and E8M0
                                     per-32 scales spread over 4 binades, mixed so that the dequantized
                                     variance is 1/fan_in on average (no float array is quantized)
    embed                            N(0, 1): unit-RMS token vectors
    norms                            1 + N(0, 0.02^2)
    hc_*_fn                          N(0, 1/(hc_mult·dim)): the RMS-normalized mixes are ~N(0, 1)
    hc_*_base                        pre: logit(1/hc_mult) (pre ≈ 1/n), post: 0 (post ≈ 1),
                                     comb: +2 on the diagonal (Sinkhorn keeps mostly the own stream)
    hc_*_scale                       U(0.2, 0.6)
    attn_sink ~N(0, 1); compressor ape ~N(0, 0.1^2); gate.bias ~N(0, 0.05^2);
    tid2eid                          n_activated distinct random experts per token id
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from refimpl.formats.checkpoint import (INDEX_NAME, CheckpointError, spec_nbytes, write_json,
                                        write_sharded)
from refimpl.formats.files import (FileError, check_output_path, interrupts_deferred, os_error, remove_folder,
                                   replace_folder, temporary_name, write_text)
from refimpl._version import __version__
from refimpl.config import Config, ConfigError
from refimpl.numerics import FP4_BLOCK, FP8_BLOCK, decode_fp4_e2m1
from refimpl.synthetic.quantize import quant_fp8_weight
from refimpl.formats.weights import TensorSpec, expected_tensors
from refimpl.synthetic.tokenizer import build_tiny_tokenizer, write_tokenizer_files

DEFAULT_SHARD_BYTES = 4 * 1024**3      # the official shards average 3.5 GB (46 for 160 GB)
CHUNK_ELEMENTS = 1 << 22               # large tensors are generated in row chunks of ~4M elements
FP4_CODE_STD = 2.0                     # nibbles ~ e2m1(N(0, 2^2)): amax/scale of a real 32-block is 3..6
SCALE_SPREAD = 2                       # FP8 and FP4 block scales spread over 2^-2 .. 2^2 around their mean


# ---------------------------------------------------------------- configs

def shrink(cfg: Config, *, layers: int | None = None, experts: int | None = None) -> Config:
    """cfg with fewer main layers (first `layers` ratios + the MTP entry) and/or routed experts."""
    changes = {}
    for name, v in (("layers", layers), ("experts", experts)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{name} = {v!r}: must be an int")
    if layers is not None:
        if not 1 <= layers <= cfg.n_layers:
            raise ConfigError(f"layers = {layers}: must be between 1 and n_layers = {cfg.n_layers}")
        changes.update(n_layers=layers, n_hash_layers=min(cfg.n_hash_layers, layers),
                       compress_ratios=cfg.compress_ratios[:layers] + cfg.compress_ratios[cfg.n_layers:])
    if experts is not None:
        if not 1 <= experts <= cfg.n_routed_experts:
            raise ConfigError(f"experts = {experts}: must be between 1 and n_routed_experts = "
                              f"{cfg.n_routed_experts}")
        changes.update(n_routed_experts=experts, n_activated_experts=min(cfg.n_activated_experts, experts))
    return cfg.replace(**changes)


# ---------------------------------------------------------------- tensor generators

def _rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one tensor: seeded by (seed, first 128 bits of sha256(name))."""
    words = np.frombuffer(hashlib.sha256(name.encode()).digest()[:16], np.uint32)
    return np.random.default_rng([seed, *words.tolist()])


def _normal(rng, shape, std: float, mean: float = 0.0, dtype=np.float32) -> np.ndarray:
    """N(mean, std^2) rounded to dtype, generated in row chunks (peak: one output + one chunk)."""
    out = np.empty(shape, dtype)
    rows = out.reshape(-1, shape[-1]) if len(shape) > 1 else out.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for r in range(0, rows.shape[0], step):
        x = rng.standard_normal(rows[r:r + step].shape, dtype=np.float32)
        rows[r:r + step] = (x * np.float32(std) + np.float32(mean)).astype(dtype)   # round to the stored dtype
    return out


def _block_gains(rng, shape) -> np.ndarray:
    """Per-block gains 2^r · c, r uniform in -SCALE_SPREAD..SCALE_SPREAD, c = 1/sqrt(mean of the drawn 4^r): the
    weight keeps a variance of 1/K over the whole matrix, whatever its few blocks drew."""
    r = rng.integers(-SCALE_SPREAD, SCALE_SPREAD + 1, size=shape)
    return (np.ldexp(1.0, r) / math.sqrt(np.mean(4.0 ** r))).astype(np.float32)


def _fp8_pair(rng, shape) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight [N, K] ~ N(0, 1/K)·gain quantized with 128x128 E8M0 block scales, in row chunks.

    Each 128x128 block has its own gain (_block_gains), so the block scales vary across the grid
    in both directions by 2·SCALE_SPREAD binades, as a real checkpoint's do: a loader that reads
    the grid transposed, per column, or with another block height gets other numbers.
    """
    n, k = shape
    values = np.empty((n, k), ml_dtypes.float8_e4m3fn)
    scale = np.empty((-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), ml_dtypes.float8_e8m0fnu)
    gains = np.repeat(np.repeat(_block_gains(rng, scale.shape), FP8_BLOCK, 0), FP8_BLOCK, 1)[:n, :k]
    step = max(FP8_BLOCK, CHUNK_ELEMENTS // k // FP8_BLOCK * FP8_BLOCK)   # whole 128-row blocks per chunk
    for r in range(0, n, step):
        w = rng.standard_normal((min(step, n - r), k), dtype=np.float32) * np.float32(k ** -0.5) * gains[r:r + step]
        v, s = quant_fp8_weight(w)                               # uint8 codes, uint8 E8M0
        values[r:r + step] = v.view(ml_dtypes.float8_e4m3fn)
        scale[r // FP8_BLOCK:(r + step) // FP8_BLOCK] = s.view(ml_dtypes.float8_e8m0fnu)
    return values, scale


def _fp4_byte_table() -> tuple[np.ndarray, float]:
    """65536-entry table: 16 random bits -> one byte of two e2m1 nibbles, and E[code^2]."""
    grid = decode_fp4_e2m1(np.arange(16, dtype=np.uint8)).astype(np.float64)   # nibble -> value
    cdf = lambda x: 0.5 * (1 + math.erf(x / (FP4_CODE_STD * math.sqrt(2))))    # noqa: E731
    p = np.zeros(16)
    mags = grid[:8]                                              # 0, .5, 1, 1.5, 2, 3, 4, 6
    edges = [0.0] + [(a + b) / 2 for a, b in zip(mags, mags[1:])] + [math.inf]
    for i in range(8):                                           # P(|x| rounds to mags[i]), split by sign
        mass = 2 * (cdf(edges[i + 1]) - cdf(edges[i]))
        p[i], p[i + 8] = mass / 2, mass / 2
    pb = np.outer(p, p).reshape(-1)                              # byte = lo | hi << 4: pb[hi*16 + lo]
    counts = np.floor(pb * 65536).astype(np.int64)
    counts[np.argsort(-(pb * 65536 - counts), kind="stable")[:65536 - counts.sum()]] += 1  # largest remainders
    byte = (np.arange(256) % 16) | (np.arange(256) // 16) << 4   # index hi*16+lo -> byte value
    table = np.repeat(byte, counts).astype(np.uint8)
    return table, float(np.sum(p * grid**2))


_FP4_TABLE, _FP4_CODE_VAR = _fp4_byte_table()


def _fp4_weight(rng, shape) -> np.ndarray:
    """Packed FP4 expert weight [N, K/2] int8: random bytes through the nibble table."""
    u = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    return _FP4_TABLE[u].view(np.int8)


def _fp4_scale(rng, shape) -> np.ndarray:
    """E8M0 [N, K/32]: 2^(e + r) or 2^(e + r + 1) per block, r uniform in -SCALE_SPREAD..SCALE_SPREAD (scales
    vary by several binades along both axes, as a real checkpoint's do), mixed so that the dequantized
    variance is 1/K on average (K = 32·cols)."""
    k = shape[1] * FP4_BLOCK
    spread = np.arange(-SCALE_SPREAD, SCALE_SPREAD + 1)
    target = 1.0 / k / _FP4_CODE_VAR / np.mean(4.0 ** spread)   # wanted E[scale^2] / E[4^r]
    e = math.floor(math.log2(target) / 2)                        # 4^e <= target < 4^(e+1)
    p_hi = (target / 4.0**e - 1) / 3                             # p·4^(e+1) + (1-p)·4^e = target
    hi = rng.random(shape, dtype=np.float32) < p_hi
    r = rng.integers(-SCALE_SPREAD, SCALE_SPREAD + 1, size=shape)
    return (127 + e + r + hi).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)   # biased exponent bytes


def _tid2eid(rng, vocab: int, n_experts: int, k: int) -> np.ndarray:
    """[v, a] int64: k distinct experts per token id, in row chunks."""
    out = np.empty((vocab, k), np.int64)
    step = max(1, CHUNK_ELEMENTS // n_experts)
    for r in range(0, vocab, step):
        keys = rng.random((min(step, vocab - r), n_experts), dtype=np.float32)
        out[r:r + step] = np.argsort(keys, axis=1, kind="stable")[:, :k]   # a random k-subset per row
    return out


def _hc_base(rng, n_mix: int, n: int, head: bool) -> np.ndarray:
    """hc_*_base [n_mix] (pre, post, comb) or hc_head_base [n] (pre only): stable residual streams."""
    base = np.zeros(n_mix, np.float64)
    pre = min(1.0 / n, 0.98)
    base[:n] = math.log(pre / (1 - pre))                         # sigmoid(base) = 1/n: pre averages the streams
    if not head:
        base[n:2 * n] = 0.0                                      # post = 2·sigmoid(0) = 1
        base[2 * n:] = np.eye(n).reshape(-1) * 2.0               # comb logits favour the identity
    return (base + rng.normal(0, 0.05, n_mix)).astype(np.float32)   # small noise breaks symmetry


def make_tensor(name: str, spec: TensorSpec, cfg: Config, seed: int) -> np.ndarray:
    """The synthetic value of one tensor of expected_tensors(cfg), except FP8 pairs (make_fp8_pair)."""
    rng = _rng(seed, name)
    dt, shape = spec.dtype, spec.shape
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" else parts[-1]    # "layers.0.attn.q_norm.weight" -> "q_norm"
    routed = ".ffn.experts." in name
    if dt == "F8_E4M3" or (dt == "F8_E8M0" and not routed):
        raise ValueError(f"{name}: FP8 weights and their scales are made together by make_fp8_pair")
    if dt == "I8":                                               # routed expert weight, packed FP4
        return _fp4_weight(rng, shape)
    if dt == "F8_E8M0":                                          # routed expert scale, one per 1x32 block
        return _fp4_scale(rng, shape)
    if dt == "I64":                                              # gate.tid2eid
        return _tid2eid(rng, cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts)
    if dt == "BF16":
        if leaf == "embed":                                      # unit-RMS token vectors
            return _normal(rng, shape, 1.0, dtype=ml_dtypes.bfloat16)
        if "norm" in leaf:                                       # every RMSNorm weight: ~1
            return _normal(rng, shape, 0.02, mean=1.0, dtype=ml_dtypes.bfloat16)
        # head, gate.weight, compressor wkv/wgate, indexer weights_proj: linear maps, N(0, 1/fan_in)
        return _normal(rng, shape, shape[1] ** -0.5, dtype=ml_dtypes.bfloat16)
    assert dt == "F32", (name, dt)
    if leaf.endswith("_fn"):                                     # hc_{attn,ffn,head}_fn [mixes, n·c]: mixes ~N(0, 1)
        return _normal(rng, shape, shape[1] ** -0.5)
    if leaf.endswith("_base"):
        return _hc_base(rng, shape[0], cfg.hc_mult, head=leaf == "hc_head_base")
    if leaf.endswith("_scale"):                                  # hc_*_scale: O(0.1-1) gain on the mixes
        return rng.uniform(0.2, 0.6, shape).astype(np.float32)   # float64 draw -> the stored F32
    std = {"attn_sink": 1.0, "ape": 0.1, "bias": 0.05}[leaf]     # sink logit ~N(0,1); ape, gate bias small
    return _normal(rng, shape, std)


def make_fp8_pair(base: str, shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The FP8 weight `base.weight` [N, K] and its E8M0 scale `base.scale`, from one generator."""
    return _fp8_pair(_rng(seed, base), shape)


class _Producer:
    """produce(name) for write_sharded: FP8 weight/scale pairs are made together, the partner kept."""

    def __init__(self, cfg: Config, specs: dict[str, TensorSpec], seed: int, bar=None):
        self.cfg, self.specs, self.seed, self.bar = cfg, specs, seed, bar
        self.pending: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        spec = self.specs[name]
        base, leaf = name.rsplit(".", 1) if "." in name else (name, "")
        partner = self.specs.get(f"{base}.weight")
        if name in self.pending:
            arr = self.pending.pop(name)
        elif partner is not None and partner.dtype == "F8_E4M3":      # an FP8 weight or its scale
            w, s = make_fp8_pair(base, partner.shape, self.seed)
            if leaf == "weight":
                arr, self.pending[f"{base}.scale"] = w, s
            else:
                arr, self.pending[f"{base}.weight"] = s, w
        else:
            arr = make_tensor(name, spec, self.cfg, self.seed)
        if self.bar is not None:
            self.bar.update(spec_nbytes(spec))
        return arr


# ---------------------------------------------------------------- the checkpoint directory

def _write_tokenizer(cfg: Config, out: Path) -> str | None:
    """tokenizer.json + tokenizer_config.json with exactly vocab_size ids; a note when none is written.

    The helper trains a byte-level BPE on a small built-in corpus, which yields a few thousand
    tokens: enough for tiny, not for Flash's 129,280. A tokenizer with fewer ids than the model
    would misdescribe the checkpoint, so larger vocabularies get none (copy the official one in).
    """
    try:
        tok = build_tiny_tokenizer(cfg.vocab_size)
    except ValueError as e:
        return (f"note: no tokenizer written ({e}); for a real vocabulary copy the official "
                "tokenizer.json and tokenizer_config.json into the checkpoint directory")
    write_tokenizer_files(out, tok)
    return None


MARKER = "written_by_refimpl.json"     # in every folder make_checkpoint writes: --force replaces only such a folder
WRITTEN_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", INDEX_NAME, MARKER)
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def foreign_entries(folder: Path, also: tuple[str, ...] = ()) -> list[str]:
    """The entries of folder that make_checkpoint does not write (nor `also`): what replacing it would lose."""
    return sorted(e.name for e in os.scandir(folder)
                  if not (e.is_file(follow_symlinks=False)
                          and (e.name in WRITTEN_JSON or e.name in also or SHARD_FILE.fullmatch(e.name))))


def check_output_folder(out: str | Path, *, overwrite: bool, also: tuple[str, ...] = ()) -> Path:
    """out as a checkpoint folder to write, or a one-line error with nothing touched.

    Written: a missing path (its parent must exist) or an empty folder. Replaced, with overwrite
    only: a folder holding nothing but what make_checkpoint writes (and the names in `also`), so
    that no file of anyone else's is ever deleted. Refused: a file, a symbolic link, '', any other
    folder.
    """
    out, exists = check_output_path(out, folder=True, error=CheckpointError)
    if not exists or not any(out.iterdir()):
        return out
    if not overwrite:
        raise CheckpointError(f"{out}: exists and is not an empty folder (pass overwrite=True, or --force, "
                              "to replace a checkpoint folder)")
    if not (out / MARKER).is_file():
        raise CheckpointError(f"{out}: not a checkpoint folder written by refimpl (no {MARKER}: a downloaded "
                              "checkpoint looks the same otherwise); only such a folder is replaced, nothing was changed")
    foreign = foreign_entries(out, also)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise CheckpointError(f"{out}: not a checkpoint folder written by refimpl (it holds "
                              f"{', '.join(map(repr, foreign[:3]))}{more}); only such a folder is replaced, "
                              "nothing was changed")
    return out


def make_checkpoint(cfg: Config, out_dir: str | Path, *, seed: int = 0, layers: int | None = None,
                    experts: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, progress: bool | None = None,
                    extra_files: Mapping[str, str] = {}, also: tuple[str, ...] = ()) -> Config:
    """Write a random-weight checkpoint of cfg (shrunk by layers / experts) to out_dir; returns its Config.

    out_dir must be missing or an empty folder; with overwrite, it may also be a checkpoint
    folder that refimpl wrote (check_output_folder). extra_files {name: text} are written into
    the folder too (the demo's marker), and `also` names the other files such a folder may hold.
    The folder appears only when complete; a failure or Ctrl-C leaves nothing behind.
    progress: None = a bar on a terminal only.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed = {seed!r}: must be an int >= 0")
    cfg = shrink(cfg, layers=layers, experts=experts)
    out = check_output_folder(out_dir, overwrite=overwrite, also=also + tuple(extra_files))
    specs = expected_tensors(cfg)
    tmp = temporary_name(out)
    bar, created = None, False
    try:
        with interrupts_deferred():          # tmp exists only if it will be removed on failure
            tmp.mkdir()
            created = True
        if progress is not False:
            from tqdm import tqdm
            bar = tqdm(total=sum(spec_nbytes(s) for s in specs.values()), unit="B", unit_scale=True,
                       desc=f"writing {out.name}", disable=None if progress is None else False)
        write_sharded(tmp, specs, _Producer(cfg, specs, seed, bar), max_shard_bytes=shard_bytes,
                      metadata={"format": "pt"})
        write_json(tmp / "config.json", cfg.to_hf_dict())
        write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id, "do_sample": True,
                                                    "eos_token_id": cfg.eos_token_id, "temperature": 1.0,
                                                    "top_p": 1.0})          # official generation_config.json
        note = _write_tokenizer(cfg, tmp)
        write_json(tmp / MARKER, {"written_by": "refimpl make-checkpoint (random weights, not a trained model)",
                                  "refimpl": __version__, "seed": seed, "n_layers": cfg.n_layers,
                                  "n_routed_experts": cfg.n_routed_experts})
        for name, text in extra_files.items():
            write_text(tmp / name, text)
        check_output_folder(out, overwrite=overwrite, also=also + tuple(extra_files))   # unchanged meanwhile
        replace_folder(tmp, out)
    except BaseException as e:
        if created:
            remove_folder(tmp)
        if isinstance(e, OSError):
            raise os_error(out, e, "write", CheckpointError) from None
        if isinstance(e, FileError) and str(e).startswith(str(tmp)):   # a file of tmp, removed now: name out's
            raise FileError(str(out) + str(e)[len(str(tmp)):]) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if note:
        print(note, file=sys.stderr)
    return cfg
