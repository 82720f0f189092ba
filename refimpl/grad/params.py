"""The model's parameters as float64 arrays, named by their checkpoint tensors: what the gradients are of.

    Params.arrays["layers.0.attn.wq_a.weight"]   [q, c] float64: the dequantized FP8 matrix (values x scales)
    Params.arrays["layers.0.ffn.experts.3.w2.weight"]   [c, f]: the dequantized FP4 matrix
    Params.arrays["layers.0.hc_attn_fn"], ["embed.weight"], ...   every other float tensor, upcast exactly

A quantized matrix is one parameter under its `.weight` name (its `.scale` has no entry): the
gradient is taken with respect to the float64 matrix the forward multiplies by, as a training
stack's master weight. Integer tensors (the hash layers' `tid2eid`) are kept apart in
`Params.tables`: they choose, they have no gradient.

The spec's functions take the weight dataclasses of refimpl/model/; `Dense` stands where they take an
`Fp8Matrix` or `Fp4Matrix` (its `dequantize()` returns the float64 matrix), and `block_weights` &c.
rebuild those dataclasses from a Params, so the forward of refimpl/grad/ is the spec's own code on
these arrays (with the spec's weights it is bit-identical to refimpl's float64 forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refimpl.config import Config
from refimpl.model.attention import AttentionWeights
from refimpl.model.block import BlockWeights
from refimpl.model.compressor import CompressorWeights
from refimpl.model.hyperconn import HyperConnWeights
from refimpl.model.indexer import IndexerWeights
from refimpl.model.linear import Fp4Matrix, Fp8Matrix
from refimpl.model.moe import ExpertWeights, GateWeights, MoEWeights
from refimpl.model.transformer import ModelWeights


@dataclass(frozen=True)
class Dense:
    """A float64 matrix where the spec takes an Fp8Matrix / Fp4Matrix. [out, in]"""
    w: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def dequantize(self) -> np.ndarray:
        return self.w


@dataclass(frozen=True)
class Params:
    """Every float parameter of a model as float64 (checkpoint names), and the integer routing tables."""
    cfg: Config
    arrays: dict[str, np.ndarray]
    tables: dict[str, np.ndarray] = field(default_factory=dict)   # "layers.{i}.ffn.gate.tid2eid": [v, a] int64

    def replace(self, changes: dict[str, np.ndarray]) -> "Params":
        """These parameters with some arrays replaced (a finite-difference step)."""
        unknown = sorted(set(changes) - set(self.arrays))
        if unknown:
            raise KeyError(f"no parameter named {unknown[0]!r}")
        return Params(self.cfg, {**self.arrays, **changes}, self.tables)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)            # bf16 / f32 -> f64 is exact


def _matrix(out: dict, name: str, m) -> None:
    out[f"{name}.weight"] = _f64(m.dequantize() if isinstance(m, (Fp8Matrix, Fp4Matrix, Dense)) else m)


def _hyperconn(out: dict, prefix: str, w: HyperConnWeights) -> None:
    out[f"{prefix}_fn"], out[f"{prefix}_base"], out[f"{prefix}_scale"] = _f64(w.fn), _f64(w.base), _f64(w.scale)


def _compressor(out: dict, p: str, w: CompressorWeights) -> None:
    _matrix(out, f"{p}wkv", w.wkv)
    _matrix(out, f"{p}wgate", w.wgate)
    out[f"{p}ape"] = _f64(w.ape)
    out[f"{p}norm.weight"] = _f64(w.norm)


def _block(out: dict, tables: dict, p: str, w: BlockWeights) -> None:
    _hyperconn(out, f"{p}hc_attn", w.hc_attn)
    out[f"{p}attn_norm.weight"] = _f64(w.attn_norm)
    a = w.attn
    for name in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b"):
        _matrix(out, f"{p}attn.{name}", getattr(a, name))
    out[f"{p}attn.q_norm.weight"], out[f"{p}attn.kv_norm.weight"] = _f64(a.q_norm), _f64(a.kv_norm)
    out[f"{p}attn.attn_sink"] = _f64(a.attn_sink)
    if a.compressor is not None:
        _compressor(out, f"{p}attn.compressor.", a.compressor)
    if a.indexer is not None:
        _matrix(out, f"{p}attn.indexer.wq_b", a.indexer.wq_b)
        _matrix(out, f"{p}attn.indexer.weights_proj", a.indexer.weights_proj)
        _compressor(out, f"{p}attn.indexer.compressor.", a.indexer.compressor)
    _hyperconn(out, f"{p}hc_ffn", w.hc_ffn)
    out[f"{p}ffn_norm.weight"] = _f64(w.ffn_norm)
    g = w.ffn.gate
    _matrix(out, f"{p}ffn.gate", g.weight)
    if g.bias is not None:
        out[f"{p}ffn.gate.bias"] = _f64(g.bias)
    if g.tid2eid is not None:
        tables[f"{p}ffn.gate.tid2eid"] = np.asarray(g.tid2eid, np.int64)
    for e, ex in enumerate(w.ffn.experts):
        for name in ("w1", "w2", "w3"):
            _matrix(out, f"{p}ffn.experts.{e}.{name}", getattr(ex, name))
    for name in ("w1", "w2", "w3"):
        _matrix(out, f"{p}ffn.shared_experts.{name}", getattr(w.ffn.shared, name))


def params_of(weights: ModelWeights, cfg: Config) -> Params:
    """The float64 parameters of a model's weights (every FP8/FP4 matrix dequantized once)."""
    out: dict[str, np.ndarray] = {"embed.weight": _f64(weights.embed)}
    tables: dict[str, np.ndarray] = {}
    for i, w in enumerate(weights.layers):
        _block(out, tables, f"layers.{i}.", w)
    if weights.mtp is not None:
        m, p = weights.mtp, "mtp.0."
        _block(out, tables, p, m.block)
        _matrix(out, f"{p}e_proj", m.e_proj)
        _matrix(out, f"{p}h_proj", m.h_proj)
        out[f"{p}enorm.weight"], out[f"{p}hnorm.weight"] = _f64(m.enorm), _f64(m.hnorm)
        out[f"{p}norm.weight"] = _f64(m.norm)
        _hyperconn(out, f"{p}hc_head", m.hc_head)
    out["norm.weight"] = _f64(weights.norm)
    _hyperconn(out, "hc_head", weights.hc_head)
    out["head.weight"] = _f64(weights.head)
    return Params(cfg, out, tables)


def block_prefix(cfg: Config, layer: int) -> str:
    """Checkpoint prefix of block `layer`: "layers.{i}." or, for the MTP block (layer n_layers), "mtp.0."."""
    return "mtp.0." if layer == cfg.n_layers else f"layers.{layer}."


def hyperconn_weights(P: Params, prefix: str) -> HyperConnWeights:
    """prefix: "layers.{i}.hc_attn", "layers.{i}.hc_ffn", "hc_head" or "mtp.0.hc_head"."""
    return HyperConnWeights(fn=P[f"{prefix}_fn"], base=P[f"{prefix}_base"], scale=P[f"{prefix}_scale"])


def compressor_weights(P: Params, p: str) -> CompressorWeights:
    return CompressorWeights(wkv=P[f"{p}wkv.weight"], wgate=P[f"{p}wgate.weight"], ape=P[f"{p}ape"],
                             norm=P[f"{p}norm.weight"])


def attention_weights(P: Params, p: str, cfg: Config, layer: int) -> AttentionWeights:
    a = f"{p}attn."
    indexer = None
    if cfg.uses_indexer(layer):
        indexer = IndexerWeights(wq_b=Dense(P[f"{a}indexer.wq_b.weight"]),
                                 weights_proj=P[f"{a}indexer.weights_proj.weight"],
                                 compressor=compressor_weights(P, f"{a}indexer.compressor."))
    return AttentionWeights(
        wq_a=Dense(P[f"{a}wq_a.weight"]), q_norm=P[f"{a}q_norm.weight"], wq_b=Dense(P[f"{a}wq_b.weight"]),
        wkv=Dense(P[f"{a}wkv.weight"]), kv_norm=P[f"{a}kv_norm.weight"], wo_a=Dense(P[f"{a}wo_a.weight"]),
        wo_b=Dense(P[f"{a}wo_b.weight"]), attn_sink=P[f"{a}attn_sink"],
        compressor=compressor_weights(P, f"{a}compressor.") if cfg.uses_compressor(layer) else None,
        indexer=indexer)


def expert_weights(P: Params, p: str) -> ExpertWeights:
    """p: "layers.{i}.ffn.experts.{e}." or "layers.{i}.ffn.shared_experts."."""
    return ExpertWeights(w1=Dense(P[f"{p}w1.weight"]), w2=Dense(P[f"{p}w2.weight"]), w3=Dense(P[f"{p}w3.weight"]))


def moe_weights(P: Params, p: str, cfg: Config) -> MoEWeights:
    g = f"{p}ffn.gate."
    gate = GateWeights(weight=P[f"{g}weight"], bias=P.arrays.get(f"{g}bias"), tid2eid=P.tables.get(f"{g}tid2eid"))
    return MoEWeights(gate=gate,
                      experts=tuple(expert_weights(P, f"{p}ffn.experts.{e}.") for e in range(cfg.n_routed_experts)),
                      shared=expert_weights(P, f"{p}ffn.shared_experts."))
