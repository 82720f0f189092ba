"""The bug zoo: faults other DeepSeek V4 implementations shipped, as test-only injectable mutations.

Each fault is a faithful emulation of a field bug (docs/architecture.md §19 names them): while its
context manager is active, refimpl's model functions (or Config methods) are monkeypatched so that
refimpl computes what the faulty implementation would. Nothing here is reachable from the `refimpl`
package: this module lives in the tests, and `test_bugzoo.py` checks that the package cannot
import it.

    with inject("sink_in_max"):
        trace = run_trace(model, tokens)          # the faulty implementation's numbers

Registry entry: name -> Fault(description, the golden input that exposes it, the site where
`compare` must first see it (and the position / entry there), the function that applies it to a
pytest MonkeyPatch). Faults on inline code are made by mutating the source of the refimpl function
(`mutated`: the exact text replaced must occur, so a refactor of the model fails loudly here rather
than silently testing nothing).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import refimpl.model.attention as attention_mod
import refimpl.model.compressor as compressor_mod
import refimpl.model.indexer as indexer_mod
import refimpl.model.linear as linear_mod
import refimpl.model.moe as moe_mod
import refimpl.model.norm as norm_mod
import refimpl.model.rope as rope_mod
from refimpl.config import Config
from refimpl.model.compressor import CompressorState
from refimpl.numerics import FP8_BLOCK, bf16, decode_ue8m0, work_dtype


@dataclass(frozen=True)
class Fault:
    """One field bug: what it is, where it must show, and how to inject it."""
    description: str
    input: str                     # the golden input (manifest name) that exposes it
    site: str                      # the first site out of tolerance against the golden trace
    row: int                       # there: the position (per-position sites) or entry (compressed_kv)
    apply: Callable                # apply(monkeypatch): inject the fault
    config: tuple = ()             # config keys the faulty implementation gets wrong: (Config field, value) pairs
    rounding_only: bool = False    # the same math, other roundings: no fault at all in float32 or float64
    float_at: tuple | None = None  # (site, row) where a float32 run first shows it, when not `site`, `row`


# ---------------------------------------------------------------- helpers

def mutated(func, replacements: list[tuple[str, str]], extra_globals: dict | None = None):
    """func recompiled from its source with each (old, new) text replaced (old must occur exactly once).

    The new function runs in a copy of func's module globals (plus extra_globals), so the module
    itself is untouched until the caller monkeypatches the name where it is looked up. A swappable
    spec function (refimpl/ops.py) is recompiled without its decorator: the fault replaces the
    operation whatever kernels are selected.
    """
    func = getattr(func, "spec", func)                        # a swappable operation: its spec function
    src = textwrap.dedent(inspect.getsource(func))
    src = re.sub(r"^@swappable\n", "", src, flags=re.M)
    for old, new in replacements:
        if src.count(old) != 1:
            raise AssertionError(f"bug zoo: {func.__module__}.{func.__name__} no longer contains {old!r} exactly "
                                 f"once; update the fault to the new code")
        src = src.replace(old, new)
    ns = dict(func.__globals__)
    ns.update(extra_globals or {})
    exec(compile(src, f"<bugzoo: mutated {func.__module__}.{func.__name__}>", "exec"), ns)
    return ns[func.__name__]


def patch_everywhere(mp, original, replacement) -> None:
    """Monkeypatch every refimpl module attribute bound to `original` (names imported with `from ... import`)."""
    hit = False
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("refimpl") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                mp.setattr(mod, attr, replacement)
                hit = True
    assert hit, f"bug zoo: {original!r} is bound nowhere in refimpl"


class _ScaledConfig:
    """A view of a Config with another softmax_scale (every other attribute from the real one)."""

    def __init__(self, cfg, softmax_scale: float):
        self._cfg, self.softmax_scale = cfg, softmax_scale

    def __getattr__(self, name):
        return getattr(self._cfg, name)


# ---------------------------------------------------------------- the faults

def _wrong_rope_base(mp):
    # compress_rope_theta lost in config normalisation: compressed layers get rope_theta (10000), still with YaRN
    mp.setattr(Config, "rope_base", lambda self, layer: self.rope_theta)


def _missing_yarn(mp):
    # compressed layers built without YaRN (original_seq_len 0 everywhere)
    mp.setattr(Config, "rope_original_seq_len", lambda self, layer: 0)


def _unrotated_compressed_keys(mp):
    # the main compressor's entries never RoPE'd (the indexer's keys still are)
    f = mutated(compressor_mod.compress,
                [("e = apply_rope(e, layer_rope_table(positions, ctx.cfg, layer.id, prec), prec)", "pass")])
    mp.setattr(attention_mod, "compress", f)


def _entries_rotated_at_pool_index(mp):
    # compressed entry i rotated at position i instead of its block's first token m·i
    f = mutated(compressor_mod.compress, [("positions = (first_block + np.arange(n_full)) * m",
                                           "positions = first_block + np.arange(n_full)")])
    mp.setattr(attention_mod, "compress", f)


def _output_derotation_missing(mp):
    # the attention output goes to wo_a still rotated (no inverse RoPE at the query position)
    real = attention_mod._attend_out                    # steps 5 and 6 of a chunk of queries
    patch_everywhere(mp, real, mutated(real, [("o = apply_rope(o, table, prec, inverse=True)", "pass")]))


def _overlap_lost_in_decode(mp):
    # decode (one token per call): the previous block's half is taken from an empty slice, so an entry
    # completed in decode pools only its own block's m positions (as if it had no previous block)
    real = compressor_mod.compress

    def compress(x, start_pos, state, w, layer, ctx, **kw):
        if layer.overlap and x.shape[1] == 1 and start_pos > 0:
            m = layer.compress_ratio
            kv, score = state.kv.copy(), state.score.copy()
            kv[:, :m], score[:, :m] = 0, -np.inf                       # the empty previous half: padding
            entries, new = real(x, start_pos, CompressorState(kv=kv, score=score), w, layer, ctx, **kw)
            if entries.shape[1] == 0:                                  # nothing pooled: the state keeps its
                new.kv[:, :m], new.score[:, :m] = state.kv[:, :m], state.score[:, :m]   # true previous block
            return entries, new
        return real(x, start_pos, state, w, layer, ctx, **kw)
    mp.setattr(attention_mod, "compress", compress)
    mp.setattr(indexer_mod, "compress", compress)


def _indexer_key_not_rotated(mp):
    # the `rotate` flag stored but never read: index keys FP4-QDQ'd without the Hadamard rotation
    f = mutated(compressor_mod.compress, [("bf16(hadamard(e, prec), prec)", "bf16(e, prec)")])
    mp.setattr(indexer_mod, "compress", f)


def _shared_clamp_missing(mp):
    # current revision, but the shared expert's SwiGLU without the clamp (routed experts keep it)
    real = moe_mod.expert

    def expert(x, w, prec, *, swiglu_limit, weights=None):
        return real(x, w, prec, swiglu_limit=0.0 if weights is None else swiglu_limit, weights=weights)
    mp.setattr(moe_mod, "expert", expert)


YARN_MSCALE = 0.1 * math.log(16.0) + 1.0       # 0.1·ln(rope_factor) + 1 = 1.277 (V3's yarn_get_mscale)


def _mscale_in_softmax_scale(mp):
    # the YaRN magnitude correction folded into the softmax scale of every compressed layer (~1.277x logits)
    real = attention_mod.attention

    def attention(x, start_pos, state, w, layer, ctx):
        if layer.compress_ratio:
            mscale = 0.1 * math.log(ctx.cfg.rope_factor) + 1.0
            ctx = copy.copy(ctx)                                       # the run context with a scaled config view
            object.__setattr__(ctx, "cfg", _ScaledConfig(ctx.cfg, ctx.cfg.softmax_scale * mscale))
        return real(x, start_pos, state, w, layer, ctx)
    patch_everywhere(mp, real, attention)


def _q_norm_missing(mp):
    # no weightless per-head RMS norm of q after wq_b
    mp.setattr(attention_mod, "head_rms_norm", lambda q, *, eps, prec: q.astype(work_dtype(prec)))


def _halves_rope():
    """apply_rope with the split-halves ("rotate_half") layout: pair (x[i], x[i + p/2]) instead of (x[2i], x[2i+1])."""
    return mutated(rope_mod.apply_rope, [
        ("pairs = x[..., -2 * half:].reshape(*x.shape[:-1], half, 2)",
         "pairs = np.stack([x[..., -2 * half:-half], x[..., -half:]], axis=-1)"),
        ("bf16(rotated.reshape(*x.shape[:-1], 2 * half), prec)",
         "bf16(np.swapaxes(rotated, -1, -2).reshape(*x.shape[:-1], 2 * half), prec)")])


def _rope_halves(mp):
    # non-interleaved RoPE at every site
    patch_everywhere(mp, rope_mod.apply_rope, _halves_rope())


def _indexer_rope_halves(mp):
    # split-halves RoPE in the indexer only (queries and keys), carried over from V3.2
    halves = _halves_rope()
    mp.setattr(indexer_mod, "apply_rope", halves)
    mp.setattr(indexer_mod, "compress", mutated(compressor_mod.compress, [], {"apply_rope": halves}))


def _visibility_t_over_m(mp):
    # compressed entry i visible to query t iff m(i+1) <= t instead of <= t+1: t//m entries, not (t+1)//m
    mp.setattr(attention_mod, "compressed_indices",
               mutated(attention_mod.compressed_indices, [("(t + 1) // ratio", "t // ratio")]))
    mp.setattr(indexer_mod, "index_topk", mutated(indexer_mod.index_topk, [
        ("visible = (start_pos + si + 1) // ratio", "visible = (start_pos + si) // ratio")]))
    mp.setattr(attention_mod, "indexer", mutated(indexer_mod.indexer, [("((t + 1) // m)", "(t // m)")]))


def _sink_in_max(mp):
    # the sink logit taken into the softmax's running max (the kernel starts its max at the sink)
    mp.setattr(attention_mod, "sparse_attn_query", mutated(attention_mod.sparse_attn_query, [
        ("m = np.full(h, -np.inf, np.float32)", "m = sink.astype(np.float32)")]))


def cpu_bf16_rsqrt(v: np.ndarray, prec: str) -> np.ndarray:
    """PyTorch CPU's bf16 rsqrt as it behaves: sqrt rounded to bf16, then its reciprocal (rsqrt(1.59375) = 0.7890625)."""
    root = bf16(np.sqrt(np.asarray(v, np.float64)), prec)
    return bf16(1.0 / np.asarray(root, np.float64), prec).astype(work_dtype(prec))


def _rsqrt_not_correctly_rounded(mp):
    # the q norm's bf16 rsqrt of PyTorch's CPU kernel, not one correctly rounded op
    f = mutated(norm_mod.head_rms_norm, [("rsqrt(bf16(mean + dt(eps), prec), prec)",
                                          "cpu_bf16_rsqrt(bf16(mean + dt(eps), prec), prec)")],
                {"cpu_bf16_rsqrt": cpu_bf16_rsqrt})
    mp.setattr(attention_mod, "head_rms_norm", f)


def _fp8_grid_read_column_major(mp):
    # the FP8 scale grid [ceil(N/128), ceil(K/128)] read in column-major order (a transposed grid, for square ones)
    real = linear_mod.dequant_fp8_weight

    def dequant(values, scale, *, block=128):
        s = np.asarray(scale).view(np.uint8)
        return real(values, np.ascontiguousarray(s.T).reshape(s.shape), block=block)
    mp.setattr(linear_mod, "dequant_fp8_weight", dequant)


def _fp8_one_scale_row(mp):
    # every 128-row block of an FP8 weight takes the first block row's scales (one scale per column block)
    real = linear_mod.dequant_fp8_weight

    def dequant(values, scale, *, block=128):
        s = np.asarray(scale).view(np.uint8)
        return real(values, np.repeat(s[:1], s.shape[0], axis=0), block=block)
    mp.setattr(linear_mod, "dequant_fp8_weight", dequant)


def _fp8_rows_read_with(row_block):
    """A loader fault that gives weight row o of an FP8 matrix [N, K] the scales of grid row row_block(N, R)[o]
    (R = the grid's rows) instead of o // 128: a fault of partial blocks, the same reading where N = 128·R."""
    real = linear_mod.dequant_fp8_weight

    def dequant(values, scale, *, block=FP8_BLOCK):
        w = real(values, scale, block=block)                              # the right weight, float32
        s = decode_ue8m0(np.asarray(scale).view(np.uint8))
        n, k = w.shape
        right = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:n, :k]
        wrong = np.repeat(s[row_block(n, s.shape[0], block)], block, axis=1)[:, :k]
        return (w / right * wrong).astype(w.dtype)                        # exact: powers of two
    return dequant


def _fp8_block_height_from_grid(mp):
    # transformers 5.24 (§19.34): the block height taken as N // grid rows (96 for wkv [192, K]), so rows
    # 96-127 take the next (partial) block's scale
    f = _fp8_rows_read_with(lambda n, r, block: np.minimum(np.arange(n) // (n // r), r - 1))
    mp.setattr(linear_mod, "dequant_fp8_weight", f)


def _fp8_scales_cropped_at_the_end(mp):
    # the per-row scales (each grid row repeated 128 times) cropped to N rows from the end, not the start: the
    # partial block read as the first one, so rows 64-127 of a [192, K] matrix take the next block's scale
    f = _fp8_rows_read_with(lambda n, r, block: np.repeat(np.arange(r), block)[-n:])
    mp.setattr(linear_mod, "dequant_fp8_weight", f)


def _fp4_one_scale_row(mp):
    # every row of a routed expert's FP4 weight takes row 0's 1x32 scales
    real = linear_mod.dequant_fp4_weight

    def dequant(packed, scale):
        s = np.asarray(scale).view(np.uint8)
        return real(packed, np.repeat(s[:1], s.shape[0], axis=0))
    mp.setattr(linear_mod, "dequant_fp4_weight", dequant)


def _nothing(mp):
    pass                                         # a fault of config values only (Fault.config)


def _sink_missing(mp):
    # the attention sink left out of the softmax denominator (a plain softmax over the index set)
    mp.setattr(attention_mod, "sparse_attention", mutated(attention_mod.sparse_attention, [
        ("denom = p.sum(axis=-1, keepdims=True) + np.exp(sink[:, None] - mx)", "denom = p.sum(axis=-1, keepdims=True)"),
        ("sparse_attn_query(q[bi, si], kv[bi], sink, idx, softmax_scale)",
         "sparse_attn_query(q[bi, si], kv[bi], np.full_like(sink, -np.inf), idx, softmax_scale)")]))


def _window_off_by_one(mp):
    # the window starts one position early (t-W .. t-1 with width W): from t = W a query no longer sees itself
    mp.setattr(attention_mod, "window_indices", mutated(attention_mod.window_indices, [
        ("pos = np.maximum(t - window + 1, 0)", "pos = np.maximum(t - window, 0)")]))


def _grouped_output_interleaved(mp):
    # the grouped output projection takes heads gi, gi+g, ... into group gi (official: h/g contiguous heads each)
    real = attention_mod.grouped_wo_a
    d = Config.tiny().head_dim                            # the bug zoo runs the tiny model

    def grouped(o, wo_a, groups, prec):                   # o [b, s, g, (h/g)*d]
        b, s, g, gd = o.shape
        heads = o.reshape(b, s, -1, d)                                 # [b, s, h, d]
        regrouped = np.stack([heads[:, :, gi::g] for gi in range(g)], axis=2).reshape(b, s, g, gd)
        return real(np.ascontiguousarray(regrouped), wo_a, groups, prec)
    mp.setattr(attention_mod, "grouped_wo_a", grouped)


def _routing_axis(mp):
    # the routing weights normalised over the positions of the call instead of over the chosen experts
    mp.setattr(moe_mod, "route", mutated(moe_mod.route, [
        ("weights = weights / reduce_sum(weights, -1, prec, keepdims=True)",
         "weights = weights / reduce_sum(weights, 1, prec, keepdims=True)")]))


def _hash_table_by_position(mp):
    # hash layers look their expert ids up by the token's position instead of its id
    mp.setattr(moe_mod, "route", mutated(moe_mod.route, [
        ("ids = np.asarray(w.tid2eid[tokens], dtype=np.int64)",
         "ids = np.asarray(w.tid2eid[start_pos + np.arange(tokens.shape[-1])][None], dtype=np.int64)")]))


def _router_bias_weighs(mp):
    # the router bias also weighs: the routing weights taken from the biased scores
    mp.setattr(moe_mod, "route", mutated(moe_mod.route, [
        ("weights = np.take_along_axis(scores, ids, axis=-1)",
         "weights = np.take_along_axis(scores + (w.bias.astype(dt) if w.bias is not None else 0), ids, axis=-1)")]))


def _mhc_mix_transposed(mp):
    # the post-mix applies comb transposed: new stream k = Σ_j comb[k, j] · h[j]
    from refimpl.model import hyperconn as hc_mod
    real = hc_mod.hc_post

    def hc_post(x, residual, post, comb, ctx):
        return real(x, residual, post, np.swapaxes(comb, -1, -2), ctx)
    patch_everywhere(mp, real, hc_post)


def _indexer_scale_wrong(mp):
    # the indexer's head weights scaled by head_dim^-0.5 only (the n_heads^-0.5 factor dropped)
    mp.setattr(attention_mod, "indexer", mutated(indexer_mod.indexer, [
        ("weights * dt(hd ** -0.5 * n_heads ** -0.5)", "weights * dt(hd ** -0.5)")]))


def _fp4_nibble_order(mp):
    # FP4 bytes unpacked high nibble first (the checkpoint packs element 2j in bits 0-3)
    real = linear_mod.dequant_fp4_weight

    def dequant(packed, scale):
        p = np.asarray(packed).view(np.uint8)
        return real(((p & 0x0F) << 4) | (p >> 4), scale)
    mp.setattr(linear_mod, "dequant_fp4_weight", dequant)


def _mtp_pairing(mp):
    # the MTP block pairs the streams of position t with token t (not t+1)
    from refimpl.model import transformer as tf_mod
    mp.setattr(tf_mod, "mtp_input", mutated(tf_mod.mtp_input, [("nxt = ids[:, 1 + lo:1 + hi]", "nxt = ids[:, lo:hi]")]))
    mp.setattr(tf_mod, "mtp", mutated(tf_mod.mtp, [("nxt = ids[:, 1:]", "nxt = ids[:, :-1]")]))


FAULTS: dict[str, Fault] = {
    "wrong_rope_base_compressed": Fault(
        "compressed layers use rope_theta 10000 (with YaRN) instead of compress_rope_theta (§19.2)",
        "prefill-3", "layers.2.attn.q", 2, _wrong_rope_base),
    "missing_yarn_compressed": Fault(
        "compressed layers use compress_rope_theta without YaRN (§19.2)",
        "prefill-3", "layers.2.attn.q", 2, _missing_yarn),
    "unrotated_compressed_keys": Fault(
        "main compressed entries never RoPE'd (§19.3); entry 0 sits at position 0, the identity",
        "prefill-15", "layers.2.attn.compressed_kv", 1, _unrotated_compressed_keys),
    "entries_rotated_at_pool_index": Fault(
        "compressed entry i rotated at position i, not m·i (§19.3); entry 0 is the same either way",
        "prefill-15", "layers.2.attn.compressed_kv", 1, _entries_rotated_at_pool_index),
    "output_derotation_missing": Fault(
        "attention output not de-rotated at the query position before wo_a (§19.4)",
        "prefill-3", "layers.0.attn.out", 2, _output_derotation_missing),
    "overlap_lost_in_decode": Fault(
        "ratio-4 overlap lost in decode: an entry completed by a decode step pools 4 positions, not 8 (§19.13)",
        "decode-29-to-80", "layers.2.attn.compressed_kv", 7, _overlap_lost_in_decode),
    "indexer_key_not_rotated": Fault(
        "indexer keys not Hadamard-rotated, queries are (§19.8)",
        "prefill-4", "layers.2.attn.indexer.scores", 3, _indexer_key_not_rotated),
    "shared_clamp_missing": Fault(
        "shared expert without the SwiGLU clamp in the current revision (§19.18)",
        "prefill-4-swiglu-limit-2", "layers.0.ffn.out", 0, _shared_clamp_missing),
    "mscale_in_softmax_scale": Fault(
        "YaRN mscale (1.277) folded into the softmax scale of compressed layers (§19.2)",
        "prefill-1", "layers.2.attn.out", 0, _mscale_in_softmax_scale),
    "q_norm_missing": Fault(
        "weightless per-head q RMS norm missing (§19.5)",
        "prefill-1", "layers.0.attn.q", 0, _q_norm_missing),
    "rope_halves": Fault(
        "split-halves (rotate_half) RoPE instead of adjacent pairs, every site (§19.1)",
        "prefill-3", "layers.0.attn.q", 2, _rope_halves),
    "indexer_rope_halves": Fault(
        "split-halves RoPE in the indexer only, carried over from V3.2 (§19.1)",
        "prefill-4", "layers.2.attn.indexer.scores", 3, _indexer_rope_halves),
    "visibility_t_over_m": Fault(
        "compressed entries visible from t//m instead of (t+1)//m (§19.10)",
        "prefill-4", "layers.2.attn.indexer.scores", 3, _visibility_t_over_m),
    "sink_in_max": Fault(
        "attention sink inside the softmax's running max (§19.9): same math, other roundings",
        "prefill-1", "layers.1.attn.out", 0, _sink_in_max, rounding_only=True),   # layer 0's happen to agree
    "fp8_scale_grid_column_major": Fault(
        "FP8 block-scale grid read column-major, i.e. transposed (a loader bug; §16); wq_a, wq_b and wkv have a "
        "grid of one row or column, which reads the same, so the first weight it changes is wo_a",
        "prefill-1", "layers.0.attn.out", 0, _fp8_grid_read_column_major),
    "fp8_one_scale_row": Fault(
        "every 128-row block of an FP8 weight scaled by the first block row's scales (a loader bug; §16); wq_b's "
        "block rows are its heads, and the per-head q norm cancels a power-of-two factor exactly, so wo_a shows it",
        "prefill-1", "layers.0.attn.out", 0, _fp8_one_scale_row,
        float_at=("layers.0.attn.q", 0)),   # in float32 the q norm's eps keeps a trace of the factor: 46x the noise
    "fp8_block_height_from_grid": Fault(
        "FP8 block height taken from the scale grid (N // grid rows: 96 for wkv [192, 256]), not the fixed 128: "
        "rows 96-127 take the next block's scale (transformers 5.24; §19.34); only a partial block shows it",
        "tiny-partial-prefill-5", "layers.0.attn.kv", 0, _fp8_block_height_from_grid),
    "fp8_scales_cropped_at_the_end": Fault(
        "FP8 per-row scales cropped from the end of the repeated grid (the partial block read first): rows "
        "64-127 of wkv [192, 256] take the next block's scale (§19.34); only a partial block shows it",
        "tiny-partial-prefill-5", "layers.0.attn.kv", 0, _fp8_scales_cropped_at_the_end),
    "fp4_one_scale_row": Fault(
        "every row of an FP4 expert weight scaled by row 0's 1x32 scales (a loader bug; §16)",
        "prefill-1", "layers.0.ffn.out", 0, _fp4_one_scale_row),
    "rsqrt_not_correctly_rounded": Fault(
        "the q norm's bf16 rsqrt as PyTorch's CPU kernel rounds it (§19.5)",
        "prefill-1", "layers.1.attn.q", 0, _rsqrt_not_correctly_rounded, rounding_only=True),   # layer 0's q norms
    "yarn_factor_wrong": Fault(                                                           # hit no such value
        "YaRN factor 40 (V3's) instead of 16 in the compressed layers' RoPE (§19.2)",
        "prefill-3", "layers.2.attn.q", 2, _nothing, config=(("rope_factor", 40.0),)),
    "norm_eps_1e-5": Fault(
        "RMSNorm epsilon 1e-5 instead of the config's 1e-6 (every norm, the mHC mix norm first)",
        "prefill-1", "layers.0.hc_attn.pre", 0, _nothing, config=(("norm_eps", 1e-5),)),
    "sinkhorn_iters_wrong": Fault(
        "Sinkhorn-Knopp of the mHC mix run 10 times instead of hc_sinkhorn_iters = 20 (§8)",
        "prefill-1", "layers.0.hc_attn.comb", 0, _nothing, config=(("hc_sinkhorn_iters", 10),)),
    "sink_missing": Fault(
        "attention sink left out of the softmax denominator (§19.9)",
        "prefill-1", "layers.0.attn.out", 0, _sink_missing),
    "window_off_by_one": Fault(
        "sliding window t-W .. t-1 instead of t-W+1 .. t: from position W a query misses itself (§15)",
        "prefill-33", "layers.0.attn.out", 32, _window_off_by_one),
    "grouped_output_interleaved": Fault(
        "grouped output projection with heads interleaved across groups instead of contiguous (§9)",
        "prefill-1", "layers.0.attn.out", 0, _grouped_output_interleaved),
    "routing_axis": Fault(
        "routing weights normalised over the positions instead of the chosen experts (§11)",
        "prefill-3", "layers.0.ffn.expert_weights", 2, _routing_axis),
    "hash_table_by_position": Fault(
        "hash layers' tid2eid looked up by position instead of token id (§11)",
        "prefill-3", "layers.0.ffn.expert_ids", 2, _hash_table_by_position),
    "router_bias_weighs": Fault(
        "router bias added to the routing weights too (it only chooses) (§11)",
        "prefill-1", "layers.3.ffn.expert_weights", 0, _router_bias_weighs),
    "mhc_mix_transposed": Fault(
        "mHC post-mix with comb transposed: stream k = Σ_j comb[k, j] h[j] (§8); layer 0's attention mix sees n equal "
        "copies of the embedding, which comb and its transpose (both doubly stochastic) mix alike: the FFN mix after it "
        "(layers.0.out) is the first that changes a number",
        "prefill-1", "layers.0.out", 0, _mhc_mix_transposed),
    "indexer_scale_wrong": Fault(
        "indexer head weights scaled by head_dim^-0.5 only, n_heads^-0.5 dropped (§10)",
        "prefill-4", "layers.2.attn.indexer.scores", 3, _indexer_scale_wrong),
    "fp4_nibble_order": Fault(
        "FP4 bytes unpacked high nibble first (a loader bug; §16)",
        "prefill-1", "layers.0.ffn.out", 0, _fp4_nibble_order),
    "mtp_pairing": Fault(
        "MTP block pairs the streams of position t with token t instead of t+1 (§14)",
        "prefill-80", "layers.6.hc_attn.pre", 0, _mtp_pairing),
}


def faulted_model(model, name: str):
    """model, or the same weights under the fault's wrong config values (a fault with `config`)."""
    from refimpl.model.transformer import Model
    fault = FAULTS[name]
    if not fault.config:
        return model
    return Model(model.cfg.replace(**dict(fault.config)), model.weights, precision=model.precision,
                 revision=model.revision, layout=model.layout, kernels=model.kernels)


@contextlib.contextmanager
def inject(name: str):
    """Run the body with fault `name` injected (undone on exit, also on error)."""
    fault = FAULTS[name]
    with pytest.MonkeyPatch.context() as mp:
        fault.apply(mp)
        yield fault
