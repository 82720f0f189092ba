"""Hugging Face transformers' DeepSeek V4 as a peer: its trace, in refimpl's site names, and a comparison.

A real other implementation checked end to end. transformers (5.24) ships `DeepseekV4ForCausalLM`
(`transformers/models/deepseek_v4/modeling_deepseek_v4.py`). This tool loads an official-format
checkpoint directory (as `refimpl make-checkpoint` writes it: config.json, FP8/FP4 safetensors
shards, tokenizer) with transformers' OWN loader, runs one prefill in float32 on the CPU, and
records refimpl's trace sites through hooks, so that `refimpl compare` (or `compare` below) can
hold it against a refimpl trace of the same checkpoint and tokens.

    python tools/trace_transformers.py trace CKPT --tokens 0,15,27 --out hf.safetensors
    python tools/trace_transformers.py compare hf.safetensors ref.safetensors
    python tools/trace_transformers.py check CKPT --tokens 0,15,27      # both traces + weights + table
    python tools/trace_transformers.py decode CKPT --tokens ... --prefill 1,5   # the cache path, logits
    python tools/trace_transformers.py make-partial OUT                  # head_dim 192: partial FP8 blocks

Measured results, and the commands that reproduce them: docs/peers-transformers.md. In short:
on tiny every site but the MTP block's agrees with refimpl's float32 trace within 2.4e-6 relative; with a partial
FP8 block transformers misreads the block boundary (docs/architecture.md §19.34) and the first
divergent site is layers.0.attn.kv.

Needs the optional `peers` extra (`pip install '.[peers]'`: torch CPU, transformers, accelerate);
refimpl itself never imports torch.

Loading (what transformers does with the official format, checked here tensor by tensor):
  - config: transformers' `DeepseekV4Config` cannot read the config.json DeepSeek ships as is
    (its strict dataclass refuses `"swiglu_limit": 10`, an int, and its legacy
    `compress_ratios` table knows only the ratios 0, 4 and 128, not tiny's 16). So `hf_config`
    builds the DeepseekV4Config from refimpl's validated `Config`, field by field (HF_CONFIG).
  - weights: `from_pretrained` reads the shards directly: its DeepSeek V4 rename table maps the
    official names (`layers.0.attn.wq_a.weight`, `.scale`, `ffn.experts.3.w1`, ...) to its
    modules, and its FP8 quantizer (quantization_config quant_method "fp8", ue8m0) dequantizes
    every FP8 e4m3 weight with its E8M0 block scales and every packed FP4 expert weight with its
    1x32 scales (on a CPU it always dequantizes). `check_weights` compares every dequantized
    parameter with refimpl's exact dequantization of the same official tensor.
  - transformers does not build the MTP block (`num_nextn_predict_layers`: "not instantiated
    here"); its weights are skipped on load, and the `mtp.*` sites and layer n_layers are absent.

Sites and layouts (refimpl's names, shapes and dtypes; batch element 0; one prefill, no cache):
  embed                       embed_tokens output                              [s, c]
  layers.i.hc_attn.pre        recomputed in a hook on attn_hc (see _hc_probe)   [s, n]
  layers.i.hc_attn.post/.comb attn_hc outputs post, comb; comb[j, k] is the weight of old stream j
                              in new stream k in both (transformers mixes with comb.T @ h)
  layers.i.attn.q             the query given to the attention function, after q_b_norm and RoPE;
                              transformers holds [b, h, s, d], transposed here to [s, h, d]
  layers.i.attn.kv            the first s key rows given to the attention function (this call's
                              K=V head after kv_norm and RoPE): [s, d]
  layers.i.attn.compressed_kv the key rows after them (the compressor's entries): [s//m, d]
  layers.i.attn.indexer.scores  the indexer scorer's output [s, s//4], with -inf where an entry
                              is not visible ((t+1)//4 <= e), as transformers masks it before top-k
  layers.i.attn.indexer.topk  the indexer's output [s, k] int32, -1 padded (same layout: torch.topk
                              is sorted by descending score, the invisible entries come last)
  layers.i.attn.out           self_attn output (after o_b_proj)                 [s, c]
  layers.i.hc_attn.out        the streams after the attention sublayer's post-mix: ffn_hc's input
                              (a pre-hook)                                      [s, n, c]
  layers.i.hc_ffn.*           as hc_attn, on ffn_hc
  layers.i.ffn.gate_scores    score-routed layers: the biased scores the router's top-k ranks,
                              score_fn(logits) + e_score_correction_bias, recomputed from the
                              router's logits output and checked (see _gate_scores)  [s, e]
  layers.i.ffn.expert_ids / .expert_weights  the router's (indices, weights); transformers' top-k
                              is unsorted (`sorted=False`), so the pairs are put in refimpl's order:
                              descending biased score, ties by lower id (hash layers: tid2eid order)
  layers.i.ffn.out            mlp output (routed + shared)                      [s, c]
  layers.i.out                decoder layer output                              [s, n, c]
  final.x                     model.norm output (after hc_head)                 [s, c]
  logits                      lm_head output                                    [s, v]
The attention function is transformers' own `eager_attention_forward`, registered under another
name so that its inputs can be recorded (RoPE is not a module in transformers, so no module
hook sees the rotated query); it computes exactly what the eager default computes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from refimpl._version import __version__ as REFIMPL_VERSION  # noqa: E402
from refimpl.config import Config, ConfigError  # noqa: E402
from refimpl.formats.config_file import read_config  # noqa: E402
from refimpl.oracle.trace import Trace, site_names  # noqa: E402

PROBE = "refimpl_probe"          # the name transformers' eager attention is registered under here
INT_SITES = (".indexer.topk", ".expert_ids")


class PeerError(ValueError):
    """A checkpoint, trace or option this tool cannot work with; the message says why."""


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise PeerError(f"this tool needs torch and transformers ({e}); install them with "
                        "pip install '.[peers]'") from None
    return torch, transformers


# ---------------------------------------------------------------- partial FP8 blocks

def partial_config() -> Config:
    """refimpl's tiny-partial preset (tiny with head_dim 192): wkv [192, 256] has a 2-row scale grid, the
    second block half full; every other FP8 width stays a multiple of 128, so refimpl runs it in every mode."""
    return Config.tiny_partial()


def load_config(ckpt: Path) -> Config:
    """The checkpoint's Config (refimpl reads FP8 row counts with a partial 128-block, docs/architecture.md §19.34)."""
    return read_config(ckpt)


# ---------------------------------------------------------------- the transformers model

# DeepseekV4Config field <- refimpl Config field (ModelArgs names); the rest is derived in hf_config
HF_CONFIG = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "head_dim": "head_dim",
    "q_lora_rank": "q_lora_rank", "num_experts_per_tok": "n_activated_experts",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "scoring_func": "score_func", "routed_scaling_factor": "route_scale", "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "swiglu_limit": "swiglu_limit",
    "sliding_window": "window_size", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim", "index_topk": "index_topk",
    "num_nextn_predict_layers": "n_mtp_layers", "rms_norm_eps": "norm_eps",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}


def hf_config(cfg: Config, quantization_config: dict):
    """transformers' DeepseekV4Config for cfg (every value from refimpl's validated Config)."""
    _, transformers = _torch()
    ratios = cfg.compress_ratios[:cfg.n_layers]                     # the MTP entry is not a layer there
    hca = sorted({r for r in ratios if r > 4})
    if len(hca) > 1:
        raise PeerError(f"transformers has one HCA ratio per model; this config uses {hca}")
    kinds = {0: "sliding_attention", 4: "compressed_sparse_attention"}
    kw = {hf: getattr(cfg, ours) for hf, ours in HF_CONFIG.items()}
    kw.update(
        num_key_value_heads=1,
        swiglu_limit=float(cfg.swiglu_limit), routed_scaling_factor=float(cfg.route_scale),
        rope_theta=float(cfg.rope_theta), compress_rope_theta=float(cfg.compress_rope_theta),
        layer_types=[kinds.get(r, "heavily_compressed_attention") for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.n_layers)],
        partial_rotary_factor=cfg.rope_head_dim / cfg.head_dim,
        # YaRN on the compressed layers only (transformers' "compress" rope; "main" has none)
        rope_parameters={"rope_type": "yarn", "factor": float(cfg.rope_factor),
                         "original_max_position_embeddings": cfg.original_seq_len,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        quantization_config=dict(quantization_config),
        tie_word_embeddings=False, use_cache=False,
    )
    hc = transformers.DeepseekV4Config(**kw)
    if hc.qk_rope_head_dim != cfg.rope_head_dim:
        raise PeerError(f"transformers derives {hc.qk_rope_head_dim} RoPE dims from head_dim {cfg.head_dim}, "
                        f"the checkpoint has {cfg.rope_head_dim}")
    return hc


def _register_probe():
    """Register transformers' eager attention under PROBE, recording its inputs when asked."""
    torch, transformers = _torch()
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

    def probe(module, query, key, value, attention_mask, **kwargs):
        rec = getattr(module, "_refimpl_record", None)
        if rec is not None:
            rec(query, key)
        return mdl.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register(PROBE, probe)
    # and the mask eager attention gets: for an attention name without a registered mask function
    # transformers builds NO mask at all (masking_utils: "custom attention ... we don't need a mask")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionMaskInterface.register(PROBE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def load_transformers(ckpt: Path, cfg: Config):
    """DeepseekV4ForCausalLM over the checkpoint directory, float32, eval mode, probe attention."""
    torch, transformers = _torch()
    try:
        import accelerate  # noqa: F401  (transformers' FP8 quantizer refuses to load without it)
    except ImportError:
        raise PeerError("transformers' FP8 loader needs accelerate; install it with pip install '.[peers]'") from None
    raw = json.loads((ckpt / "config.json").read_text())
    _register_probe()
    hc = hf_config(cfg, raw["quantization_config"])
    transformers.utils.logging.set_verbosity_error()                 # "no GPU: dequantizing" is expected
    transformers.utils.logging.disable_progress_bar()
    model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        str(ckpt), config=hc, dtype=torch.float32, attn_implementation=PROBE, output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith("mtp."))
    mismatched = info.get("mismatched_keys", [])
    if missing or unexpected or mismatched:
        raise PeerError(f"transformers did not load the checkpoint cleanly: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}, mismatched {list(mismatched)[:5]}")
    return model.eval()


# ---------------------------------------------------------------- weights, against refimpl's

def expected_parameters(cfg: Config) -> dict[str, tuple[str, ...]]:
    """transformers parameter -> the official tensor(s) it is made of (the rename table, written out)."""
    out = {"model.embed_tokens.weight": ("embed.weight",), "lm_head.weight": ("head.weight",),
           "model.norm.weight": ("norm.weight",), "model.hc_head.hc_fn": ("hc_head_fn",),
           "model.hc_head.hc_base": ("hc_head_base",), "model.hc_head.hc_scale": ("hc_head_scale",)}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        a, oa = f"{p}self_attn.", f"{o}attn."
        pairs = {"sinks": "attn_sink", "q_a_proj.weight": "wq_a", "q_a_norm.weight": "q_norm.weight",
                 "q_b_proj.weight": "wq_b", "kv_proj.weight": "wkv", "kv_norm.weight": "kv_norm.weight",
                 "o_a_proj.weight": "wo_a", "o_b_proj.weight": "wo_b"}
        if cfg.uses_compressor(i):
            pairs.update({"compressor.kv_proj.weight": "compressor.wkv.weight",
                          "compressor.gate_proj.weight": "compressor.wgate.weight",
                          "compressor.position_bias": "compressor.ape",
                          "compressor.kv_norm.weight": "compressor.norm.weight"})
        if cfg.uses_indexer(i):
            pairs.update({"compressor.indexer.q_b_proj.weight": "indexer.wq_b",
                          "compressor.indexer.scorer.weights_proj.weight": "indexer.weights_proj.weight",
                          "compressor.indexer.kv_proj.weight": "indexer.compressor.wkv.weight",
                          "compressor.indexer.gate_proj.weight": "indexer.compressor.wgate.weight",
                          "compressor.indexer.position_bias": "indexer.compressor.ape",
                          "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight"})
        out.update({a + k: (oa + v,) for k, v in pairs.items()})
        f, of = f"{p}mlp.", f"{o}ffn."
        out[f"{f}gate.weight"] = (f"{of}gate.weight",)
        if cfg.is_hash_layer(i):
            out[f"{f}gate.tid2eid"] = (f"{of}gate.tid2eid",)
        else:
            out[f"{f}gate.e_score_correction_bias"] = (f"{of}gate.bias",)
        e = range(cfg.n_routed_experts)
        # gate_up_proj [e, 2f, c] = per expert cat(w1, w3) along rows; down_proj [e, c, f] = w2
        out[f"{f}experts.gate_up_proj"] = tuple(f"{of}experts.{x}.{w}" for x in e for w in ("w1", "w3"))
        out[f"{f}experts.down_proj"] = tuple(f"{of}experts.{x}.w2" for x in e)
        for hf, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            out[f"{f}shared_experts.{hf}.weight"] = (f"{of}shared_experts.{ours}",)
        out[f"{p}input_layernorm.weight"] = (f"{o}attn_norm.weight",)
        out[f"{p}post_attention_layernorm.weight"] = (f"{o}ffn_norm.weight",)
        for sub in ("attn", "ffn"):
            for leaf in ("fn", "base", "scale"):
                out[f"{p}{sub}_hc.{leaf}"] = (f"{o}hc_{sub}_{leaf}",)
    return out


def _official_value(source, name: str) -> np.ndarray:
    """The exact float64 value of an official tensor (FP8/FP4 dequantized as the format defines it)."""
    from refimpl.numerics import dequant_fp4_weight, dequant_fp8_weight
    if f"{name}.weight" in source:                          # a quantized matrix: weight + scale
        w, s = source.get(f"{name}.weight"), source.get(f"{name}.scale")
        return (dequant_fp4_weight(w, s) if np.asarray(w).dtype == np.int8 else dequant_fp8_weight(w, s)).astype(np.float64)
    v = np.asarray(source.get(name))
    return v.astype(np.int64) if v.dtype.kind in "iu" else v.astype(np.float64)


def _row_runs(rows: np.ndarray) -> str:
    """Sorted row indices as runs: [96, 97, ..., 127, 300] -> '96-127, 300'."""
    runs, start = [], None
    for k, r in enumerate(rows):
        if start is None:
            start = r
        if k + 1 == len(rows) or rows[k + 1] != r + 1:
            runs.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ", ".join(runs)


def check_weights(model, ckpt: Path, cfg: Config) -> list[tuple[str, str, float, int, str]]:
    """Every transformers parameter against refimpl's dequantization of its official tensor(s).

    -> [(parameter, official tensor, max |difference|, differing elements, differing rows)] for
    the ones that differ (an empty list: transformers holds exactly the weights the format defines).
    """
    from refimpl.formats.checkpoint import TensorSource
    source = TensorSource(ckpt)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    want = expected_parameters(cfg)
    extra = sorted(set(params) - set(want) - {n for n in params if n.endswith("inv_freq")})
    if extra:
        raise PeerError(f"transformers has parameters this tool does not map: {extra[:5]}")
    bad = []
    for hf, names in want.items():
        got = params[hf].detach().double().numpy() if params[hf].dtype.is_floating_point else params[hf].numpy()
        parts = [_official_value(source, n) for n in names]
        if hf.endswith("experts.gate_up_proj"):
            ref = np.stack([np.concatenate(parts[k:k + 2], axis=0) for k in range(0, len(parts), 2)])
        elif hf.endswith("experts.down_proj"):
            ref = np.stack(parts)
        else:
            ref = parts[0]
        if got.shape != ref.shape:
            bad.append((hf, names[0], float("inf"), -1, f"shape {got.shape} vs {ref.shape}"))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        if (diff > 0).any():
            rows = np.nonzero((diff > 0).reshape(-1, diff.shape[-1]).any(axis=1))[0] if diff.ndim == 2 else None
            bad.append((hf, names[0] if len(names) == 1 else f"{names[0]} ...", float(diff.max()),
                        int((diff > 0).sum()), "" if rows is None else f"rows {_row_runs(rows)}"))
    return bad


# ---------------------------------------------------------------- the trace

def _hc_probe(module, hidden, collapsed):
    """pre of an mHC module, which transformers consumes inside DeepseekV4HyperConnection.forward.

    Recomputed with transformers' own expression and the module's own parameters, then checked:
    Σ_j pre_j · h_j must reproduce the module's `collapsed` output bit for bit, so the recorded
    pre is the one transformers used.
    """
    torch, _ = _torch()
    b, s, n, c = hidden.shape
    flattened = module.input_norm(hidden.view(b, s, -1).float())
    mixes = torch.nn.functional.linear(flattened, module.fn.float())
    pre_w = mixes.split([n, n, n * n], dim=-1)[0]
    pre = torch.sigmoid(pre_w * module.scale.unbind(0)[0] + module.base.split([n, n, n * n])[0]) + module.hc_eps
    again = (pre.unsqueeze(-1) * hidden).sum(dim=2).to(hidden.dtype)
    if not torch.equal(again, collapsed):
        raise PeerError("the recomputed mHC pre weights do not reproduce transformers' collapsed input; "
                        "this transformers version computes hc_pre differently (update _hc_probe)")
    return pre


def _gate_scores(router, logits, indices):
    """The biased router scores a score-routed layer's top-k ranks, which transformers computes inline.

    Recomputed with transformers' own expression (`score_fn(logits) + e_score_correction_bias`) from
    the router's logits output, then checked: the same top-k over them must choose the router's own
    experts, so the recorded scores are the ones transformers ranked.
    """
    torch, _ = _torch()
    biased = router.score_fn(logits) + router.e_score_correction_bias
    again = torch.topk(biased, indices.shape[-1], dim=-1, sorted=False).indices
    if not torch.equal(torch.sort(again, dim=-1).values, torch.sort(indices, dim=-1).values):
        raise PeerError("the recomputed router scores do not choose transformers' experts; this "
                        "transformers version ranks experts differently (update _gate_scores)")
    return biased


def _expert_order(router, logits, weights, indices, hashed: bool):
    """(ids, weights) in refimpl's order: descending biased score, ties by the lower id; hash: as given."""
    torch, _ = _torch()
    if hashed:
        return indices, weights
    biased = router.score_fn(logits) + router.e_score_correction_bias       # what transformers' top-k ranked
    key = biased.gather(1, indices)                                           # [T, a]
    # a stable sort on the id first, then a stable descending sort on the score: ties keep the lower id
    by_id = torch.argsort(indices, dim=1, stable=True)
    ids, key, w = (t.gather(1, by_id) for t in (indices, key, weights))
    order = torch.argsort(-key, dim=1, stable=True)
    return ids.gather(1, order), w.gather(1, order)


def trace_transformers(model, cfg: Config, ids: np.ndarray) -> Trace:
    """Run one prefill of ids [s] through the transformers model; -> a Trace in refimpl's site names."""
    torch, _ = _torch()
    ids = np.asarray(ids, dtype=np.int64)
    s = len(ids)
    tensors: dict[str, np.ndarray] = {}
    handles = []

    def put(name, x):
        tensors[name] = np.ascontiguousarray(x.detach().numpy() if hasattr(x, "detach") else x)

    def hook(module, fn):                                              # fn(module, args, output)
        handles.append(module.register_forward_hook(fn))

    def pre_hook(module, fn):                                          # fn(module, args), before forward
        handles.append(module.register_forward_pre_hook(fn))

    inner = model.model
    hook(inner.embed_tokens, lambda m, a, out: put("embed", out[0]))
    for i, layer in enumerate(inner.layers):
        L = f"layers.{i}."
        for sub, mod in (("hc_attn", layer.attn_hc), ("hc_ffn", layer.ffn_hc)):
            def hc(m, a, out, L=L, sub=sub):
                post, comb, collapsed = out
                put(f"{L}{sub}.pre", _hc_probe(m, a[0], collapsed)[0])
                put(f"{L}{sub}.post", post[0])
                put(f"{L}{sub}.comb", comb[0])                         # [s, j, k], as refimpl's
            hook(mod, hc)
        # the streams after the attention sublayer's post-mix are what the MoE sublayer's mHC takes in
        pre_hook(layer.ffn_hc, lambda m, a, L=L: put(f"{L}hc_attn.out", a[0][0]))
        attn = layer.self_attn

        def record(query, key, L=L, attn=attn):
            put(f"{L}attn.q", query[0].transpose(0, 1))                # [h, s, d] -> [s, h, d]
            put(f"{L}attn.kv", key[0, 0, :s])                          # this call's K=V rows
            if attn.compressor is not None:
                put(f"{L}attn.compressed_kv", key[0, 0, s:])           # the compressed entries after them
        attn._refimpl_record = record
        hook(attn, lambda m, a, out, L=L: put(f"{L}attn.out", out[0][0]))
        if cfg.uses_indexer(i):
            idx = attn.compressor.indexer
            m_ratio = idx.compress_rate

            def scores(m, a, out, L=L, m_ratio=m_ratio):
                sc = out[0].clone()                                    # [s, T] unmasked
                t = torch.arange(s)[:, None]
                sc[torch.arange(sc.shape[1])[None, :] >= (t + 1) // m_ratio] = float("-inf")
                put(f"{L}attn.indexer.scores", sc)
            hook(idx.scorer, scores)
            hook(idx, lambda m, a, out, L=L: put(f"{L}attn.indexer.topk", out[0].to(torch.int32)))
        gate = layer.mlp.gate

        def route(m, a, out, L=L, hashed=cfg.is_hash_layer(i)):
            logits, weights, indices = out
            if not hashed:
                put(f"{L}ffn.gate_scores", _gate_scores(m, logits, indices).reshape(s, -1))
            ids_, w = _expert_order(m, logits, weights, indices, hashed)
            put(f"{L}ffn.expert_ids", ids_.reshape(s, -1).to(torch.int32))
            put(f"{L}ffn.expert_weights", w.reshape(s, -1))
        hook(gate, route)
        hook(layer.mlp, lambda m, a, out, L=L: put(f"{L}ffn.out", out[0]))
        hook(layer, lambda m, a, out, L=L: put(f"{L}out", out[0]))
    hook(inner.norm, lambda m, a, out: put("final.x", out[0]))
    hook(model.lm_head, lambda m, a, out: put("logits", out[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for layer in inner.layers:
            layer.self_attn._refimpl_record = None
    trace = Trace()
    order = [n for n in site_names(cfg) if n in tensors]
    trace.tensors = {n: tensors[n] for n in order}
    return trace


def peer_metadata(cfg: Config, ids) -> dict:
    """The metadata refimpl's traces carry (docs/trace-format.md), for this peer run."""
    torch, transformers = _torch()
    from refimpl.model.state import config_id
    from refimpl.oracle.trace import TRACE_FORMAT_VERSION
    return {"format_version": TRACE_FORMAT_VERSION, "n_layers": cfg.n_layers, "decode_from": None,
            "refimpl": REFIMPL_VERSION, "config_id": config_id(cfg), "precision": "float32",
            "revision": "current", "tokens": [int(t) for t in ids], "chunks": [len(ids)],
            "implementation": f"transformers {transformers.__version__} DeepseekV4ForCausalLM, "
                              f"torch {torch.__version__}, float32, CPU"}


# ---------------------------------------------------------------- a small comparison

def data_flow_order(names) -> list[str]:
    """Site names in the order a forward pass records them (a safetensors file lists them sorted).

    embed, the layers in order (each in SITES order), final.x, logits, then the MTP block: when
    mtp.* sites are present, the highest layer index is the MTP block (layer n_layers).
    """
    from refimpl.sites import SITES
    names = list(names)
    layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
    mtp_layer = max(layers) if layers and any(n.startswith("mtp.") for n in names) else None

    def key(n):
        if n.startswith("layers."):
            i = int(n.split(".")[1])
            pattern = n.replace(f"layers.{i}.", "layers.{i}.", 1)
            rank = SITES.index(pattern) if pattern in SITES else len(SITES)
            return (3, 0, rank) if i == mtp_layer else (1, i, rank)
        rank = SITES.index(n) if n in SITES else len(SITES)
        return ((0 if n == "embed" else 4 if n.startswith("mtp.") else 2), 0, rank)
    return sorted(names, key=key)


def compare_traces(a: dict, b: dict, meta_a: dict | None = None, meta_b: dict | None = None) -> list[dict]:
    """Per site present in both (in data-flow order): max abs, max rel (max|a-b| / max|b|), cosine.

    Integer sites: the fraction of rows whose set of ids differs. -inf entries (indexer scores)
    must sit at the same places; the error is taken over the finite ones.
    """
    if meta_a and meta_b:
        if meta_a.get("config_id") != meta_b.get("config_id"):
            raise PeerError(f"the traces are of different models (config id {meta_a.get('config_id')} vs "
                            f"{meta_b.get('config_id')})")
        ta, tb = meta_a.get("tokens") or [], meta_b.get("tokens") or []
        if ta != tb:
            at = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            raise PeerError(f"the traces are of different token ids ({len(ta)} vs {len(tb)} tokens, "
                            f"first difference at position {at})")
    rows = []
    for name in data_flow_order(n for n in b if n in a):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape:
            rows.append({"site": name, "shape": list(y.shape), "error": f"shape {list(x.shape)} vs {list(y.shape)}"})
            continue
        if name.endswith(INT_SITES):
            xs, ys = np.sort(x.reshape(x.shape[0], -1), 1), np.sort(y.reshape(y.shape[0], -1), 1)
            differ = int((xs != ys).any(axis=1).sum())
            rows.append({"site": name, "shape": list(y.shape), "rows_differ": differ, "rows": int(y.shape[0])})
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        fin = np.isfinite(y)
        same_mask = bool((np.isfinite(x) == fin).all())
        d = np.abs(x[fin] - y[fin])
        scale = np.abs(y[fin]).max() if d.size else 0.0
        xv, yv = x[fin], y[fin]
        cos = float(xv @ yv / (np.linalg.norm(xv) * np.linalg.norm(yv))) if d.size else 1.0
        rows.append({"site": name, "shape": list(y.shape), "max_abs": float(d.max()) if d.size else 0.0,
                     "max_rel": float(d.max() / scale) if scale else 0.0, "cosine": cos,
                     **({} if same_mask else {"error": "-inf entries at other places"})})
    return rows


def first_divergent(rows: list[dict], rel_tol: float) -> dict | None:
    """The first site (data-flow order) beyond rel_tol, with a differing id set, or an error."""
    for r in rows:
        if "error" in r or r.get("rows_differ") or r.get("max_rel", 0.0) > rel_tol:
            return r
    return None


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = ("site", "shape", "max abs", "max rel", "cosine")
    lines = []
    for r in rows:
        shape = "×".join(str(v) for v in r["shape"])
        if "rows_differ" in r:
            cells = (r["site"], shape, f"{r['rows_differ']}/{r['rows']} rows differ", "", "")
        elif "max_abs" not in r:
            cells = (r["site"], shape, r["error"], "", "")
        else:
            cells = (r["site"], shape, f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", f"{r['cosine']:.9f}"
                     + (f" ({r['error']})" if "error" in r else ""))
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(cells)) + " |"
                for cells in lines]
        return "\n".join(out)
    w = [max(len(head[k]), *(len(c[k]) for c in lines)) for k in range(len(head))]
    return "\n".join("  ".join(c[k].ljust(w[k]) for k in range(len(head))).rstrip() for c in [head] + lines)


def read_trace(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "numpy") as f:
        meta = json.loads((f.metadata() or {}).get("refimpl", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


# ---------------------------------------------------------------- command line

def _tokens(a, cfg: Config) -> np.ndarray:
    """--tokens ids, or --prompt text through the checkpoint's tokenizer.json (as `refimpl trace` reads it)."""
    if a.prompt is not None:
        from refimpl.formats.tokenizer import Tokenizer
        ids = np.array(Tokenizer.from_checkpoint(a.ckpt).encode(a.prompt), dtype=np.int64)
    else:
        try:
            ids = np.array([int(t) for t in a.tokens.split(",")], dtype=np.int64)
        except ValueError:
            raise PeerError(f"--tokens must be comma-separated integers, got {a.tokens!r}") from None
    if ids.size == 0 or ((ids < 0) | (ids >= cfg.vocab_size)).any():
        raise PeerError(f"token ids must be a non-empty list inside the vocabulary [0, {cfg.vocab_size})")
    return ids


def _load_refimpl(ckpt: Path, cfg: Config, precision: str):
    from refimpl.formats.checkpoint import TensorSource
    from refimpl.formats.weights import check_checkpoint, load_model_weights
    from refimpl.model.transformer import Model
    source = TensorSource(ckpt)
    check_checkpoint(source, cfg)
    return Model(cfg, load_model_weights(source, cfg), precision=precision)


def _open(a):
    """The command's checkpoint, its Config, the prompt's ids and transformers' model (threads set)."""
    torch, _ = _torch()
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt)
    cfg = load_config(ckpt)
    ids = _tokens(a, cfg)
    return ckpt, cfg, ids, load_transformers(ckpt, cfg)


def cmd_trace(a) -> int:
    ckpt, cfg, ids, model = _open(a)
    t0 = time.perf_counter()
    trace = trace_transformers(model, cfg, ids)
    trace.save(a.out, peer_metadata(cfg, ids))
    print(f"wrote {a.out}: {len(trace.tensors)} sites, {len(ids)} tokens, transformers float32 "
          f"({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_compare(a) -> int:
    ta, ma = read_trace(Path(a.a))
    tb, mb = read_trace(Path(a.b))
    rows = compare_traces(ta, tb, ma, mb)
    print(format_table(rows, a.markdown))
    first = first_divergent(rows, a.rel_tol)
    print(f"\nfirst site beyond max rel {a.rel_tol:g}: {first['site'] if first else 'none'}")
    return 1 if first else 0


def cmd_check(a) -> int:
    """Both traces of one checkpoint, the weight check and the table."""
    from refimpl.oracle.trace import run_trace
    ckpt, cfg, ids, model = _open(a)
    bad = check_weights(model, ckpt, cfg)
    print(f"weights: {len(expected_parameters(cfg))} transformers parameters checked against the official tensors; "
          + ("all equal" if not bad else f"{len(bad)} differ:"))
    for hf, name, mx, n, rows in bad:
        print(f"  {hf} ({name}): max |difference| {mx:.3g} in {n} elements, {rows}")
    peer = trace_transformers(model, cfg, ids)
    ref = run_trace(_load_refimpl(ckpt, cfg, a.precision), ids)
    if a.save_dir:
        out = Path(a.save_dir)
        out.mkdir(parents=True, exist_ok=True)
        peer.save(out / "transformers.safetensors", peer_metadata(cfg, ids))
        ref.save(out / f"refimpl-{a.precision}.safetensors")
    rows = compare_traces(peer.tensors, ref.tensors)
    print(format_table(rows, a.markdown))
    first = first_divergent(rows, a.rel_tol)
    print(f"\nfirst site beyond max rel {a.rel_tol:g}: {first['site'] if first else 'none'}")
    missing = data_flow_order(n for n in ref.tensors if n not in peer.tensors)
    print(f"sites refimpl traces that transformers does not have: {', '.join(missing) or 'none'}")
    return 1 if first or bad else 0


def make_partial_checkpoint(out: Path, seed: int = 0) -> list[str]:
    """Write partial_config()'s checkpoint; every partial row block's scales made to differ from the block above.

    The writer gives each 128x128 block its own gain (scales spread over 4 binades), so the two
    row blocks of a [192, K] matrix usually have different scales, but in about one column block
    of five they draw the same, and there a reader that puts the block boundary at row 96 instead
    of 128 would go unnoticed. Where the last (partial) row block's E8M0 byte equals the one above
    it, it is raised by one (its rows doubled, an exact change; lowered by one at the top of the
    range), so that rows 96-127 decode differently under the two readings in every column block.
    -> the scale tensors changed.
    """
    from refimpl.formats.checkpoint import TensorSource
    from refimpl.formats.weights import expected_tensors
    from refimpl.numerics import FP8_BLOCK
    from refimpl.synthetic.writer import make_checkpoint
    cfg = make_checkpoint(partial_config(), out, seed=seed, progress=False)
    source = TensorSource(out)
    changed = []
    for name, spec in expected_tensors(cfg).items():
        if spec.dtype != "F8_E4M3" or spec.shape[0] % FP8_BLOCK == 0:
            continue
        scale = name.removesuffix(".weight") + ".scale"
        f = source.files[source.file_of(scale).name]
        info = f.tensors[scale]
        rows, cols = info.shape
        if rows < 2:
            raise PeerError(f"{scale}: a matrix of one partial row block has no block boundary to misread")
        with open(f.path, "r+b") as fh:
            at = f.data_start + info.begin + (rows - 2) * cols      # the last two rows of the scale grid
            fh.seek(at)
            above, last = np.frombuffer(fh.read(2 * cols), np.uint8).reshape(2, cols).astype(np.int64)
            same = last == above
            if not same.any():
                continue
            last = np.where(same, np.where(last >= 254, last - 1, last + 1), last)   # 255 is E8M0's NaN
            fh.seek(at + cols)
            fh.write(last.astype(np.uint8).tobytes())
        changed.append(scale)
    return changed


def decode_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [s, v] from transformers' cache path: one prefill of `prefill` tokens, then one token per call."""
    torch, transformers = _torch()
    if not 1 <= prefill <= len(ids):
        raise PeerError(f"--prefill {prefill}: must be between 1 and the number of tokens ({len(ids)})")
    x = torch.from_numpy(np.asarray(ids, dtype=np.int64))[None]
    with torch.no_grad():
        out = model(input_ids=x[:, :prefill], cache=transformers.DynamicCache(config=model.config), use_cache=True)
        logits = [out.logits[0]]
        for t in range(prefill, x.shape[1]):
            out = model(input_ids=x[:, t:t + 1], cache=out.cache, use_cache=True)
            logits.append(out.logits[0])
    return torch.cat(logits).numpy()


def cmd_decode(a) -> int:
    """transformers' prefill + decode logits against refimpl's one-pass logits, position by position."""
    ckpt, cfg, ids, model = _open(a)
    ref = _load_refimpl(ckpt, cfg, a.precision).forward(ids).astype(np.float64)     # [s, v]
    worst, first = 0.0, None
    for k in a.prefill:
        got = decode_logits(model, ids, k).astype(np.float64)
        rel = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)                 # per position
        beyond = np.nonzero(rel > a.rel_tol)[0]
        print(f"prefill {k}, then {len(ids) - k} decode steps: logits max rel {rel.max():.2e} "
              f"(position {int(rel.argmax())}); first position beyond {a.rel_tol:g}: "
              f"{int(beyond[0]) if beyond.size else 'none'}")
        worst = max(worst, float(rel.max()))
        first = first if first is not None or not beyond.size else int(beyond[0])
    return 1 if first is not None else 0


def cmd_make_partial(a) -> int:
    changed = make_partial_checkpoint(Path(a.out), a.seed)
    cfg = partial_config()
    print(f"wrote {a.out}: tiny with head_dim {cfg.head_dim}; attn.wkv is [{cfg.head_dim}, {cfg.dim}] with a "
          f"2-row scale grid; {len(changed)} matrices had a partial block scale equal to the one above "
          "it, raised (or lowered) one binade so that every partial block's scales differ")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace_transformers.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("ckpt", help="checkpoint directory (config.json + safetensors)")
        g = q.add_mutually_exclusive_group(required=True)
        g.add_argument("--tokens", help="comma-separated token ids, e.g. 0,15,27")
        g.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
        q.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")

    q = sub.add_parser("trace", help="write transformers' trace of a checkpoint")
    common(q)
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_trace)
    q = sub.add_parser("compare", help="per-site errors of trace A against trace B (the reference)")
    q.add_argument("a")
    q.add_argument("b")
    q.add_argument("--rel-tol", type=float, default=1e-5)
    q.add_argument("--markdown", action="store_true")
    q.set_defaults(func=cmd_compare)
    q = sub.add_parser("check", help="weights, transformers' trace and refimpl's, and the table")
    common(q)
    q.add_argument("--precision", default="float32", choices=("float32", "float64"),
                   help="refimpl's precision mode (default float32)")
    q.add_argument("--save-dir", help="also write both traces there (transformers.safetensors, "
                   "refimpl-PRECISION.safetensors)")
    q.add_argument("--rel-tol", type=float, default=1e-5)
    q.add_argument("--markdown", action="store_true")
    q.set_defaults(func=cmd_check)
    q = sub.add_parser("decode", help="transformers' cache path (prefill K, then one token per call) "
                       "against refimpl's one-pass logits")
    common(q)
    q.add_argument("--prefill", type=lambda t: [int(v) for v in t.split(",")], default=[1],
                   help="comma-separated prefill lengths, e.g. 1,5,9 (default 1)")
    q.add_argument("--precision", default="float32", choices=("float32", "float64"))
    q.add_argument("--rel-tol", type=float, default=1e-5)
    q.set_defaults(func=cmd_decode)
    q = sub.add_parser("make-partial", help="write tiny with head_dim 192 (partial FP8 blocks)")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_make_partial)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (PeerError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
