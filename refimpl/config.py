"""Model hyperparameters: one frozen `Config` with the official `ModelArgs` field names.

`refimpl.formats.config_file.read_config(dir)` reads a checkpoint's Hugging Face `config.json`
through the one explicit rename table here (`HF_RENAMES`, `from_hf_dict`), or the official
`inference/config.json` as is (`from_inference_dict`). Every key must be
known; a missing key never silently takes a default (other implementations shipped exactly that
bug with `compress_rope_theta`, docs/architecture.md §19.2).

Presets: `flash()`, `pro()` and `tiny()` (small, every structural feature); docs/architecture.md §2.
Official: inference/model.py ModelArgs (M:L34-80), inference/config.json, root config.json.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from refimpl.numerics import FP4_BLOCK, FP8_BLOCK, KV_FP8_BLOCK


class ConfigError(ValueError):
    """A config file or preset that is unknown, incomplete or contradictory; `field` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Inclusive ranges of the integer fields. Each upper bound keeps a typo from allocating or looping
# without end and admits the released configurations (Flash, Pro) many times over; the reason
# for each is on its line.
FIELD_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),            # embed/head are [v, c]: 2^24 is 130x the released 129,280
    "dim": (128, 1 << 16),                 # 9x Pro's 7168 (Flash 4096); every weight has a c axis
    "moe_inter_dim": (128, 1 << 16),       # 21x Pro's 3072
    "n_layers": (1, 1024),                 # 17x Pro's 61; a per-layer state and loop each
    "n_hash_layers": (0, 1024),            # at most n_layers (checked below)
    "n_mtp_layers": (0, 1),                # the official code builds at most one MTP block
    "n_heads": (1, 4096),                  # 32x Pro's 128
    "n_routed_experts": (1, 1 << 16),      # 170x Pro's 384; one loaded weight set per expert
    "n_shared_experts": (1, 1),            # official asserts exactly one (M:L626)
    "n_activated_experts": (1, 1 << 16),   # at most n_routed_experts (checked below)
    "q_lora_rank": (128, 1 << 16),         # 43x Pro's 1536
    "head_dim": (128, 8192),               # 16x the released 512
    "rope_head_dim": (2, 4096),            # < head_dim (checked below)
    "o_groups": (1, 4096),                 # divides n_heads (checked below)
    "o_lora_rank": (1, 1 << 16),           # 64x the released 1024
    "window_size": (1, 8192),              # 64x the released 128; the ring [b, W, d] is copied
                                           # every call (1e8 rows allocated 47 GiB)
    "original_seq_len": (0, 1 << 30),      # YaRN's original context: only enters a logarithm
    "beta_fast": (1, 1 << 16),             # YaRN rotation counts (32 and 1): log(L / (2 pi beta)),
    "beta_slow": (1, 1 << 16),             # so each must be >= 1
    "index_n_heads": (1, 4096),            # 64x the released 64
    "index_head_dim": (32, 4096),          # 32x the released 128; a Hadamard transform of this size
    "index_topk": (1, 1 << 16),            # 64x Pro's 1024
    "hc_mult": (1, 64),                    # 16x the released 4; mixes grow as (2+n)*n per token
    "hc_sinkhorn_iters": (1, 1000),        # 50x the released 20; runs per token and sublayer
                                           # (1e8 iterations never finish)
    "max_seq_len": (1, 1 << 24),           # 16x the 1M-token context V4 ships (max_position_embeddings)
    "bos_token_id": (0, 1 << 24),          # inside the vocabulary (checked below)
    "eos_token_id": (0, 1 << 24),
}
MAX_COMPRESS_RATIO = 4096                  # 32x the released 128: the compressor state holds m (2m) rows
# Ranges of the real-valued fields, all of which must be finite: (lower bound, inclusive, upper bound).
# None of them sizes an array or a loop; the upper bounds keep a value from overflowing float32 (or
# bf16) where the model computes with it, and admit the released values many times over.
REAL_RANGES: dict[str, tuple[float, bool, float]] = {
    "route_scale": (0.0, False, 1e4),          # scales the routing weights (released 1.5, 2.5); 1e308 gave
                                               # Inf at the MoE output, blamed on the weights
    "swiglu_limit": (0.0, True, 1e4),          # 0 = no clamp (moe.expert); the released value is 10
    "norm_eps": (0.0, False, 1.0),             # rsqrt(mean(x^2) + eps) must not divide by zero; an
    "hc_eps": (0.0, False, 1.0),               # epsilon guards a division (Sinkhorn denominators + eps)
    "rope_theta": (1.0, False, 1e9),           # YaRN divides by log(base) (precompute_freqs_cis, M:L199-229);
    "compress_rope_theta": (1.0, False, 1e9),  # 6000x the released 160000
    "rope_factor": (1.0, True, 1e6),           # YaRN divides frequencies by factor (M:L199-229): 0 gave NaN
                                               # logits; < 1 would shorten wavelengths, not stretch them
}


@dataclass(frozen=True)
class Layer:
    """What the config says about one block (main layer `id`, or the MTP block at id n_layers): `Config.layer(i)`."""
    id: int                        # official layer_id
    compress_ratio: int            # m: 0 = window only
    overlap: bool                  # the compressor pools overlapping blocks (m == 4)
    uses_indexer: bool             # CSA: an indexer chooses the compressed entries (m == 4)


@dataclass(frozen=True)
class Config:
    """DeepSeek V4 hyperparameters (defaults: V4 Flash). Field names = the official ModelArgs names.

    Dims legend (used in every shape comment and einsum in refimpl):
      b batch            s query positions      t key/value positions   k selected kv per query
      c model width      h attention heads      d head dim              p rope dims
      g output groups    r output lora rank     n residual streams      e routed experts
      a experts / token  f expert hidden        v vocab                 m compression ratio
      q q_lora_rank      i indexer heads        j indexer head dim      x mixes (2+n)*n
      W window size      o overlap factor: 2 where m == 4, else 1 (official `coff`)
      T token rows b*s, flattened (the MoE works on rows)
      N, K rows and columns of a weight matrix [N, K] (out, in), in the format code
    Where no letter fits, a shape names its quantity (n_entries, width).
    """
    vocab_size: int = 129280                 # v
    dim: int = 4096                          # c
    moe_inter_dim: int = 2048                # f
    n_layers: int = 43                       # main blocks; the MTP block is layer n_layers
    n_hash_layers: int = 3                   # layers 0..n_hash_layers-1 route by token id
    n_mtp_layers: int = 1
    n_heads: int = 64                        # h
    n_routed_experts: int = 256              # e
    n_shared_experts: int = 1
    n_activated_experts: int = 6             # a
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024                  # q
    head_dim: int = 512                      # d  (rope dims are the last p of these)
    rope_head_dim: int = 64                  # p
    norm_eps: float = 1e-6
    o_groups: int = 8                        # g
    o_lora_rank: int = 1024                  # r
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)   # per layer (+ MTP): 0 = window only, else m
    compress_rope_theta: float = 160000.0
    original_seq_len: int = 65536            # YaRN original context; 0 = no YaRN
    rope_theta: float = 10000.0
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64                  # i
    index_head_dim: int = 128                # j
    index_topk: int = 512
    hc_mult: int = 4                         # n
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    dtype: str = "fp8"                       # FP8 e4m3 block weights
    scale_fmt: str = "ue8m0"                 # power-of-two (E8M0) scales
    expert_dtype: str = "fp4"                # routed experts: packed FP4 e2m1
    max_seq_len: int = 4096                  # a load option, not a model limit (official default M:L38)
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self):
        self.validate()

    # ---- derived facts (named predicates, each citing the official rule) ----
    @property
    def n_mix(self) -> int:
        # official: mix_hc = (2 + hc_mult) * hc_mult (M:L664): pre n, post n, comb n*n
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # official: self.softmax_scale = self.head_dim ** -0.5 (M:L464); no YaRN mscale
        return self.head_dim ** -0.5

    def compress_ratio(self, layer: int) -> int:
        # official: self.compress_ratio = args.compress_ratios[layer_id] (M:L453); MTP = layer n_layers
        return self.compress_ratios[layer]

    def uses_compressor(self, layer: int) -> bool:
        # official: a Compressor exists iff compress_ratio != 0 (M:L466-467)
        return self.compress_ratios[layer] != 0

    def uses_indexer(self, layer: int) -> bool:
        # official: an Indexer exists only where compress_ratio == 4 (M:L468-471)
        return self.compress_ratios[layer] == 4

    def uses_overlap(self, layer: int) -> bool:
        # official: Compressor.overlap = compress_ratio == 4 (M:L290)
        return self.compress_ratios[layer] == 4

    def is_hash_layer(self, layer: int) -> bool:
        # official: Gate.hash = layer_id < args.n_hash_layers (M:L556); the MTP block is never one
        return layer < self.n_hash_layers

    def rope_base(self, layer: int) -> float:
        # official: compressed layers use compress_rope_theta with YaRN, window-only layers use
        # rope_theta without YaRN (M:L475-479)
        return self.compress_rope_theta if self.uses_compressor(layer) else self.rope_theta

    def rope_original_seq_len(self, layer: int) -> int:
        # official: original_seq_len = 0 (YaRN off) on ratio-0 layers (M:L478-479)
        return self.original_seq_len if self.uses_compressor(layer) else 0

    @property
    def mtp_layer(self) -> int:
        return self.n_layers

    def layer(self, i: int) -> "Layer":
        """The facts of block i (a main layer, or the MTP block at i = n_layers) in one value."""
        return Layer(id=i, compress_ratio=self.compress_ratio(i), overlap=self.uses_overlap(i),
                     uses_indexer=self.uses_indexer(i))

    # ---- checks ----
    def validate(self) -> None:
        """Reject a field outside its domain, or contradictory / unsupported values (released configs only).

        Every message names the field. Upper bounds are there so that a typo cannot allocate
        without limit or loop for hours; each admits the released Flash and Pro values many
        times over (see FIELD_RANGES).
        """
        def need(cond: bool, msg: str, field: str | None = None):
            if not cond:
                raise ConfigError(msg, field=field)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                need(_is_int(v), f"{f.name} = {v!r}: must be an int", f.name)
            elif f.type == "float":
                need(_is_real(v) and (_is_int(v) or math.isfinite(v)), f"{f.name} = {v!r:.40}: must be a finite number",
                     f.name)
            elif f.type == "str":
                need(isinstance(v, str), f"{f.name} = {v!r}: must be a str", f.name)
            else:  # tuple[int, ...]
                need(isinstance(v, tuple) and all(_is_int(x) for x in v),
                     f"{f.name} = {v!r}: must be a tuple of ints", f.name)
        for name, (lo, hi) in FIELD_RANGES.items():
            v = getattr(self, name)
            need(lo <= v <= hi, f"{name} = {v!r}: must be between {lo} and {hi}", name)
        for name, (lo, inclusive, hi) in REAL_RANGES.items():
            v = getattr(self, name)
            need((v >= lo if inclusive else v > lo) and v <= hi,
                 f"{name} = {v!r}: must be {'>=' if inclusive else '>'} {lo:g} and <= {hi:g}", name)
        need(self.score_func == "sqrtsoftplus",
             f"score_func {self.score_func!r}: only 'sqrtsoftplus' (released V4) is supported", "score_func")
        need(self.n_shared_experts == 1, "n_shared_experts must be 1 (official asserts it, M:L626)", "n_shared_experts")
        need(self.dtype == "fp8" and self.scale_fmt == "ue8m0",
             "only dtype 'fp8' with scale_fmt 'ue8m0' is supported", "dtype")
        need(self.expert_dtype == "fp4", "only expert_dtype 'fp4' is supported", "expert_dtype")
        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
             f"{self.n_layers + self.n_mtp_layers}", "compress_ratios")
        need(all(r in (0, 4) or (4 < r <= MAX_COMPRESS_RATIO and r % 2 == 0) for r in self.compress_ratios),
             f"compress_ratios {self.compress_ratios}: each must be 0, 4 (CSA) or an even ratio > 4 (HCA) "
             f"up to {MAX_COMPRESS_RATIO}", "compress_ratios")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers out of range (0 .. n_layers)", "n_hash_layers")
        need(self.rope_head_dim < self.head_dim and self.rope_head_dim % 2 == 0,
             "rope_head_dim must be even and < head_dim", "rope_head_dim")
        # KV FP8 simulation works on blocks of 64 of the non-rope dims (M:L506, act_quant asserts N % block == 0)
        need(self.nope_head_dim % KV_FP8_BLOCK == 0,
             f"head_dim - rope_head_dim = {self.nope_head_dim} must be a multiple of {KV_FP8_BLOCK}", "head_dim")
        need(self.n_heads % self.o_groups == 0, "n_heads must be a multiple of o_groups", "o_groups")
        need(self.index_head_dim > self.rope_head_dim and self.index_head_dim % FP4_BLOCK == 0
             and (self.index_head_dim & (self.index_head_dim - 1)) == 0,
             "index_head_dim must be a power of two (Hadamard), a multiple of 32 and > rope_head_dim", "index_head_dim")
        need(self.n_activated_experts <= self.n_routed_experts,
             "n_activated_experts out of range (1 .. n_routed_experts)", "n_activated_experts")
        # YaRN ramps from beta_fast rotations (frequencies kept) down to beta_slow (interpolated), M:L213-221
        need(self.beta_slow <= self.beta_fast, f"beta_slow = {self.beta_slow} must be <= beta_fast = {self.beta_fast}",
             "beta_slow")
        for name in ("bos_token_id", "eos_token_id"):
            need(getattr(self, name) < self.vocab_size, f"{name} = {getattr(self, name)} is outside the vocabulary "
                 f"[0, {self.vocab_size})", name)
        # FP8 weights carry one scale per 128x128 block, on a ceil(N/128) x ceil(K/128) grid
        # (docs/architecture.md §16, §19.34): a row count N that is not a multiple of 128 ends in a partial block
        # (head_dim 192: wkv [192, dim], the tiny-partial preset). The input width K of every FP8 product
        # is quantized in 1x128 blocks (act_quant, K:L40-125), so it must be a multiple of 128.
        fp8_inputs = {"dim": self.dim, "q_lora_rank": self.q_lora_rank, "moe_inter_dim": self.moe_inter_dim,
                      "n_heads*head_dim/o_groups": self.n_heads * self.head_dim // self.o_groups,
                      "o_groups*o_lora_rank": self.o_groups * self.o_lora_rank}
        bad = {k: v for k, v in fp8_inputs.items() if v % FP8_BLOCK}
        need(not bad, f"the input widths of FP8 weights must be multiples of {FP8_BLOCK} (1x{FP8_BLOCK} "
                      f"activation blocks): {bad}", next(iter(bad), None))

    # ---- presets ----
    @classmethod
    def flash(cls) -> "Config":
        """DeepSeek-V4-Flash (docs/architecture.md §2)."""
        return cls()

    @classmethod
    def pro(cls) -> "Config":
        """DeepSeek-V4-Pro: same code, different configuration (docs/architecture.md §2)."""
        return cls(dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                   n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5, index_topk=1024,
                   compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0))

    @classmethod
    def tiny(cls) -> "Config":
        """Small dimensions keeping every structural feature (SWA, hash, CSA + indexer, HCA, MTP).

        Layers: 0, 1 window-only; 2 CSA (hash-routed, like Flash); 3 HCA; 4 CSA; 5 HCA; MTP window-only.
        HCA uses ratio 16 in place of 128 and the window is 32, so every length threshold of
        docs/architecture.md §20 is crossed by sequences of at most a few hundred tokens;
        index_topk 16 drops entries from 68 tokens on (query t sees (t+1)//4 CSA entries).
        """
        return cls(vocab_size=1280, dim=256, moe_inter_dim=128, n_layers=6, n_hash_layers=3,
                   n_heads=8, n_routed_experts=8, n_activated_experts=2, q_lora_rank=128,
                   head_dim=128, rope_head_dim=64, o_groups=2, o_lora_rank=128, window_size=32,
                   compress_ratios=(0, 0, 4, 16, 4, 16, 0), index_n_heads=16, index_head_dim=128,
                   index_topk=16)

    @classmethod
    def tiny_partial(cls) -> "Config":
        """tiny with head_dim 192: attn.wkv [192, 256] has a 2x2 scale grid whose second row block is a
        partial one (64 rows), the FP8 layout other loaders misread (docs/architecture.md §19.34).
        Every other FP8 width stays a multiple of 128 (n_heads*head_dim 1536, wo_a's input 768) and the
        non-rope dims (128) a multiple of the KV QDQ block (64). The golden set holds an input of it."""
        return cls.tiny().replace(head_dim=192)

    PRESETS = ("flash", "pro", "tiny", "tiny-partial")

    @classmethod
    def preset(cls, name: str) -> "Config":
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name.replace("-", "_"))()

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict:
        """The HF `config.json` of this config, keys as DeepSeek ships them (docs/architecture.md §2)."""
        d = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
             "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
             "initializer_range": 0.02, "max_position_embeddings": 1048576, "norm_topk_prob": True,
             "num_key_value_heads": 1, "tie_word_embeddings": False, "topk_method": "noaux_tc",
             "torch_dtype": "bfloat16", "transformers_version": "4.57.1", "use_cache": True,
             "quantization_config": dict(QUANTIZATION_CONFIG), "expert_dtype": self.expert_dtype,
             "rope_scaling": {"beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                              "factor": _num(self.rope_factor),
                              "original_max_position_embeddings": self.original_seq_len, "type": "yarn"}}
        for hf, ours in HF_RENAMES.items():
            v = getattr(self, ours)
            d[hf] = list(v) if isinstance(v, tuple) else _num(v) if isinstance(v, float) else v
        return dict(sorted(d.items()))


def _num(v: float):
    return int(v) if float(v).is_integer() and abs(v) >= 1 else v


# HF config.json key -> ModelArgs field (the one rename table; docs/architecture.md §2)
HF_RENAMES: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers",
    "num_hash_layers": "n_hash_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts",
    "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "q_lora_rank": "q_lora_rank",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "rms_norm_eps": "norm_eps",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "compress_ratios": "compress_ratios",
    "compress_rope_theta": "compress_rope_theta",
    "rope_theta": "rope_theta",
    "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
# rope_scaling sub-key -> ModelArgs field
HF_ROPE_RENAMES = {"original_max_position_embeddings": "original_seq_len", "factor": "rope_factor",
                   "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
# ModelArgs field -> its HF config.json key, for messages
HF_KEYS = {**{ours: hf for hf, ours in HF_RENAMES.items()},
           **{ours: f"rope_scaling.{k}" for k, ours in HF_ROPE_RENAMES.items()}}
# HF keys the official code does not read; each must hold the value V4 ships (else: contradiction)
HF_FIXED = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
            "attention_bias": False, "hidden_act": "silu", "norm_topk_prob": True,
            "num_key_value_heads": 1, "tie_word_embeddings": False, "topk_method": "noaux_tc"}
HF_IGNORED = {"attention_dropout", "initializer_range", "torch_dtype", "transformers_version",
              "use_cache", "max_position_embeddings"}
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
# keys whose absence is allowed: expert_dtype (added only in the current official revision, docs/architecture.md §18)
HF_OPTIONAL = {"expert_dtype"}


def from_hf_dict(raw: dict, where: Path | str = "config.json") -> dict:
    """Map an HF config.json dict to Config fields; unknown, missing or contradictory keys raise."""
    known = set(HF_RENAMES) | set(HF_FIXED) | HF_IGNORED | {"rope_scaling", "quantization_config"} | HF_OPTIONAL
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    missing = sorted(k for k in known - HF_OPTIONAL - HF_IGNORED if k not in raw)
    if missing:
        raise ConfigError(f"{where}: missing keys {missing} (no defaults are assumed)")
    for k, v in HF_FIXED.items():
        if raw[k] != v:
            raise ConfigError(f"{where}: {k} = {raw[k]!r}, but DeepSeek V4 has {v!r}")
    q = raw["quantization_config"]
    if q != QUANTIZATION_CONFIG:
        raise ConfigError(f"{where}: quantization_config {q!r} differs from the official {QUANTIZATION_CONFIG!r}")
    rs = raw["rope_scaling"]
    if not isinstance(rs, dict) or rs.get("type") != "yarn" or set(rs) != set(HF_ROPE_RENAMES) | {"type"}:
        raise ConfigError(f"{where}: rope_scaling must be a yarn dict with keys "
                          f"{sorted(set(HF_ROPE_RENAMES) | {'type'})}, got {rs!r}")
    out = {ours: raw[hf] for hf, ours in HF_RENAMES.items()}
    out.update({ours: rs[k] for k, ours in HF_ROPE_RENAMES.items()})
    out["expert_dtype"] = raw.get("expert_dtype", "fp4")
    return _typed(out, where)


def from_inference_dict(raw: dict, where: Path | str = "inference/config.json") -> dict:
    """Map an official inference/config.json (ModelArgs names) to Config fields."""
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - names - {"max_batch_size", "scale_dtype"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    # ModelArgs defaults that differ from V4 Flash must never apply silently (docs/architecture.md §19.2)
    required = {"vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
                "n_routed_experts", "n_activated_experts", "route_scale", "swiglu_limit",
                "compress_ratios", "compress_rope_theta", "original_seq_len", "rope_factor",
                "index_topk", "q_lora_rank", "head_dim", "o_groups", "o_lora_rank"}
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{where}: missing keys {missing} (the ModelArgs defaults differ from V4; "
                          "no defaults are assumed)")
    if raw.get("scale_dtype", "fp8") != "fp8":
        raise ConfigError(f"{where}: scale_dtype must be 'fp8' (power-of-two activation scales)")
    out = {k: v for k, v in raw.items() if k in names}
    return _typed(out, where)


def _typed(fields: dict, where) -> dict:
    """Coerce JSON values to the field types; reject wrong types with the key named."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for k, v in fields.items():
        t = types[k]
        if t == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok:                                     # (JSON files hold no NaN or Infinity: formats.files)
                try:
                    v = float(v)
                except OverflowError:
                    raise ConfigError(f"{where}: key for {k!r} is an integer too large for a float", field=k) from None
                if not math.isfinite(v):
                    raise ConfigError(f"{where}: key for {k!r} is {v!r}, not a finite number", field=k)
        elif t == "str":
            ok = isinstance(v, str)
        else:  # tuple[int, ...]
            ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            v = tuple(v) if ok else v
        if not ok:
            raise ConfigError(f"{where}: key for {k!r} has a value of the wrong type: {v!r} (expected {t})")
        out[k] = v
    return out
