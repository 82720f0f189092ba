"""The whole model: embed → n streams → blocks → hc_head → norm → logits, and the MTP block.

    h = embed[tokens] repeated into n streams           [b, s, n, c]
    h = block_i(h)  for i = 0 .. n_layers-1                             (block.py)
    x = norm(hc_head(h));  logits = x @ headᵀ (fp32)     [b, s, v]      for EVERY position
(docs/architecture.md §13). MTP (docs/architecture.md §14): position t pairs the main model's
final streams h_t with the embedding of token t+1 and predicts token t+2 (the DeepSeek-V3
convention: the MTP module sees the hidden state of t and the next token, and predicts one token
further). The official generate.py never runs the MTP block, so the code fixes no pairing; this
one is the published V3 design.

`Model.prefill(tokens, state)` runs tokens from any position (`state.pos`), `Model.decode(token,
state)` one token; both return `(logits, new_state)`. `Model.forward(tokens)` is a prefill from an
empty state. Any split of a sequence into chunks gives the same logits and state as one prefill
in float64 and float32 (within tolerance) and in mirror with layout="canonical"; with the official
layout mirror follows the official call types (docs/architecture.md §15).
Official: model.py Transformer (M:L770-810), MTPBlock (M:L739-767), ParallelHead (M:L704-736).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refimpl.config import Config, ConfigError
from refimpl.context import RunContext
from refimpl.model import chunks
from refimpl.model.attention import AttentionState
from refimpl.model.block import BlockWeights, block
from refimpl.model.state import State, StateError, config_id, weights_id
from refimpl.model.hyperconn import HyperConnWeights, hc_head
from refimpl.model.linear import Fp8Matrix, fp32_linear, quantized_linear
from refimpl.model.norm import rms_norm
from refimpl.numerics import bf16, storage_dtype, work_dtype
from refimpl.sites import Recording, record, wants_mtp
from refimpl.ops import parse_kernels, use_kernels


class InputError(ValueError):
    """Token ids or lengths the model cannot take, or an argument of the wrong kind (a trace, the weights)."""


@dataclass(frozen=True)
class MTPWeights:
    """The multi-token-prediction block (mtp.0.*); shares embed and head with the main model."""
    block: BlockWeights
    e_proj: Fp8Matrix          # [c, c] FP8   mtp.0.e_proj
    h_proj: Fp8Matrix          # [c, c] FP8   mtp.0.h_proj
    enorm: np.ndarray          # [c] bf16     mtp.0.enorm.weight
    hnorm: np.ndarray          # [c] bf16     mtp.0.hnorm.weight
    norm: np.ndarray           # [c] bf16     mtp.0.norm.weight
    hc_head: HyperConnWeights  # mtp.0.hc_head_fn / _base / _scale


@dataclass(frozen=True)
class ModelWeights:
    """Every weight of the model, as memory-mapped checkpoint views (nothing dequantized yet)."""
    embed: np.ndarray                  # [v, c] bf16   embed.weight
    layers: tuple[BlockWeights, ...]   # layers.{i}.*
    norm: np.ndarray                   # [c] bf16      norm.weight
    hc_head: HyperConnWeights          # hc_head_fn [n, n*c] / hc_head_base [n] / hc_head_scale [1]
    head: np.ndarray                   # [v, c] bf16   head.weight (used as fp32)
    mtp: MTPWeights | None


def fingerprint(w: ModelWeights) -> str:
    """weights_id of a few small tensors of every checkpoint: a state made over other weights is refused.

    The final norm and hc_head, the first and last rows of embed and head, and each layer's
    attention sinks and mHC bias: a few hundred KB on Flash, read once when the model is made.
    """
    arrays = {"norm": w.norm, "hc_head.fn": w.hc_head.fn, "hc_head.base": w.hc_head.base,
              "hc_head.scale": w.hc_head.scale, "embed.first": w.embed[0], "embed.last": w.embed[-1],
              "head.first": w.head[0], "head.last": w.head[-1]}
    for i, layer in enumerate(w.layers):
        arrays[f"layers.{i}.attn_sink"] = layer.attn.attn_sink
        arrays[f"layers.{i}.hc_attn.base"] = layer.hc_attn.base
    return weights_id(arrays)


def head_logits(h: np.ndarray, hc: HyperConnWeights, norm: np.ndarray, head: np.ndarray, site: str, ctx) -> np.ndarray:
    """Streams to logits at every position. h [b,s,n,c] -> [b,s,v] fp32 (float64 in float64 mode)."""
    return head_product(head_input(h, hc, norm, site, ctx), head, ctx)


def head_input(h: np.ndarray, hc: HyperConnWeights, norm: np.ndarray, site: str, ctx) -> np.ndarray:
    """The head's input: hc_head mixes the streams, then the final norm. h [b,s,n,c] -> x [b,s,c] (in chunks of
    positions, chunks.py)."""
    b, s, n, c = h.shape
    part, finish = chunks.chunked(ctx)
    x = [rms_norm(hc_head(h[:, lo:hi], hc, part), norm, eps=ctx.cfg.norm_eps, prec=ctx.prec)   # [b, rows, c]
         for lo, hi in chunks.spans(s, n * c * 8)]
    finish()
    x = x[0] if len(x) == 1 else np.concatenate(x, axis=1)                                  # [b, s, c]
    record(ctx, site, x)
    return x


def head_product(x: np.ndarray, head: np.ndarray, ctx) -> np.ndarray:
    """x [b,s,c] @ headᵀ -> logits [b,s,v]: in spans of at most chunks.HEAD_ROWS positions, each against the
    vocabulary in slices (chunks.py: a slice's float64 product and its fp32 rounding held for one slice at a
    time; each span reads the head's weight once)."""
    b, s, _ = x.shape
    logits = None
    for lo, hi in chunks.spans(s, most=chunks.HEAD_ROWS):
        for v0, v1 in chunks.columns(head.shape[0], b * (hi - lo) * 12):
            y = fp32_linear(x[:, lo:hi], head[v0:v1], ctx.prec)   # official: F.linear(x.float(), head fp32)
            if logits is None:
                logits = np.empty((b, s, head.shape[0]), y.dtype)
            logits[:, lo:hi, v0:v1] = y
    return logits


def mtp_input(h: np.ndarray, ids: np.ndarray, embed: np.ndarray, e_proj: Fp8Matrix, h_proj: Fp8Matrix,
              enorm: np.ndarray, hnorm: np.ndarray, *, norm_eps: float, prec: str) -> np.ndarray:
    """The MTP block's input: position t pairs streams h_t with token t+1. h [b,s,n,c], ids [b,s] -> [b,s-1,n,c]."""
    dt = work_dtype(prec)
    b, s, n, c = h.shape
    out = np.empty((b, s - 1, n, c), dt)
    for lo, hi in chunks.spans(s - 1, n * c * 8):                       # row-wise: in chunks of positions (chunks.py)
        nxt = ids[:, 1 + lo:1 + hi]                                     # [b, rows] token t+1
        e = rms_norm(np.asarray(embed[nxt]).astype(dt), enorm, eps=norm_eps, prec=prec)
        hs = rms_norm(h[:, lo:hi], hnorm, eps=norm_eps, prec=prec)      # [b, rows, n, c] streams of t, per stream
        out[:, lo:hi] = bf16(quantized_linear(e, e_proj, prec)[:, :, None, :] + quantized_linear(hs, h_proj, prec), prec)
    return out


def mtp(h: np.ndarray, ids: np.ndarray, w: ModelWeights, ctx) -> np.ndarray:
    """The MTP block: position t pairs streams h_t with token t+1, predicting t+2. h [b,s,n,c], ids [b,s] -> [b,s-1,v]."""
    cfg, prec, m = ctx.cfg, ctx.prec, w.mtp
    b, s = ids.shape
    if s < 2:
        return np.zeros((b, 0, cfg.vocab_size), ctx.dtype)
    nxt = ids[:, 1:]                                                    # [b, s-1] token t+1
    x = mtp_input(h, ids, w.embed, m.e_proj, m.h_proj, m.enorm, m.hnorm, norm_eps=cfg.norm_eps, prec=prec)
    layer = ctx.layers[cfg.mtp_layer]
    state = AttentionState.empty(cfg, layer.id, b, prec)
    x, _ = block(x, nxt, 0, state, m.block, layer, ctx)
    logits = head_logits(x, m.hc_head, m.norm, w.head, "mtp.final.x", ctx)
    record(ctx, "mtp.logits", logits)
    return logits


class Model:
    """DeepSeek V4 over a checkpoint, in one precision mode, official revision and index layout.

    layout "official" (default) lays out each call's index sets as the official code does (prefill
    from position 0: window part min(s, W) wide; decode: W wide), so mirror reproduces both the
    official prefill and the official decode, which differ in the last bits when an index set
    spans more than one block of 64; "canonical" uses the decode layout for every call, so that in
    mirror decode == prefill == any chunking bit for bit. float64 and float32 do not depend on
    the layout (docs/architecture.md §15).
    """

    def __init__(self, cfg, weights: ModelWeights, *, precision: str = "float32", revision: str = "current",
                 layout: str = "official", kernels: str | None = None):
        if not isinstance(cfg, Config):
            raise ConfigError(f"Model needs a refimpl Config, got {type(cfg).__name__}")
        if not isinstance(weights, ModelWeights):
            raise InputError(f"Model needs ModelWeights (refimpl.load makes them from a checkpoint), got "
                             f"{type(weights).__name__}")
        # every option checked once, here (context.py); kernels: which implementation runs each swappable operation
        self.ctx = RunContext(cfg, precision, revision, layout, parse_kernels(kernels))
        self.cfg, self.weights = cfg, weights
        self.config_id = config_id(cfg)          # identifies the traces of this model's config
        self.weights_id = fingerprint(weights)   # with config_id, the states of this model

    precision = property(lambda self: self.ctx.prec)
    revision = property(lambda self: self.ctx.revision)
    layout = property(lambda self: self.ctx.layout)
    kernels = property(lambda self: self.ctx.kernels)

    # ---- public API ----
    def new_state(self, batch: int = 1) -> State:
        """An empty state (position 0) for `batch` sequences."""
        return State.empty(self.cfg, batch, self.precision, self.revision, self.layout, weights_id=self.weights_id)

    def forward(self, tokens, *, trace=None, mtp: bool = False):
        """Logits for every position. tokens [s] -> [s, v]  (or [b, s] -> [b, s, v]); with mtp, also MTP logits."""
        if not isinstance(mtp, (bool, np.bool_)):
            raise InputError(f"mtp must be True or False, got {mtp!r:.60}")
        ids, single = self._as_batch(tokens)
        logits, h, _ = self._run(ids, self.new_state(ids.shape[0]), trace)
        mtp_logits = None
        if (mtp or (trace is not None and wants_mtp(trace, self.cfg.mtp_layer))) and self.weights.mtp is not None:
            mtp_logits = self.mtp_forward(h, ids, trace)
        if single:
            logits = logits[0]
            mtp_logits = None if mtp_logits is None else mtp_logits[0]
        return (logits, mtp_logits) if mtp else logits

    def prefill(self, tokens, state: State | None = None, *, trace=None):
        """Run tokens from state.pos on (any chunk). -> (logits [s, v] or [b, s, v], new state)."""
        ids, single = self._as_batch(tokens)
        state = self.new_state(ids.shape[0]) if state is None else state
        logits, _, new_state = self._run(ids, state, trace, streams=False)
        return (logits[0] if single else logits), new_state

    def decode(self, token, state: State, *, trace=None):
        """One token per sequence. token int or [b] -> (logits [v] or [b, v], new state)."""
        if state is None:                        # prefill takes None as a fresh state; a decode step follows one
            raise StateError("decode needs the state of the sequence (from prefill or decode; model.new_state() "
                             "for an empty one)")
        ids = token_ids(token)
        single = ids.ndim == 0
        logits, new_state = self.prefill(ids.reshape(-1, 1), state, trace=trace)
        return (logits[0, -1] if single else logits[:, -1]), new_state

    def check_tokens(self, tokens) -> np.ndarray:
        """tokens as the model takes them: int64 ids [s] or [b, s] inside the vocabulary (InputError if not)."""
        ids, single = self._as_batch(tokens)
        return ids[0] if single else ids

    # ---- the forward pass ----
    def _run(self, ids: np.ndarray, state: State, trace, *, streams: bool = True):
        """ids [b, s] from state.pos -> (logits [b, s, v], final streams [b, s, n, c] (None without `streams`),
        new state)."""
        ctx = self.ctx.running(_check_trace(trace))
        with use_kernels(ctx.kernels):
            return self._forward(ids, state, ctx, streams=streams)

    def forward_layers(self, tokens, h: np.ndarray | None = None, *, start: int = 0, stop: int | None = None,
                       trace=None) -> np.ndarray:
        """Main layers start..stop-1 of a forward pass from position 0: one stage of a layer pipeline.

        tokens [s] or [b, s]; h: the streams the layers before `start` made, [b, s, n, c] (None where
        start is 0: the embedding). -> the streams after layer stop-1 [b, s, n, c], or where stop is
        n_layers the logits [b, s, v]. Stages chained over 0..n_layers give forward()'s logits bit for bit.
        """
        ids, _ = self._as_batch(tokens)
        stop = self.cfg.n_layers if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.cfg.n_layers):
            raise InputError(f"layers {start}..{stop}: need 0 <= start < stop <= n_layers = {self.cfg.n_layers}")
        want = (ids.shape[0], ids.shape[1], self.cfg.hc_mult, self.cfg.dim)
        if (h is None) != (start == 0) or (h is not None and (h.shape != want or h.dtype != self.ctx.dtype)):
            raise InputError(f"layers from {start}: h must be {'None' if start == 0 else f'the streams {want} {self.ctx.dtype}'}"
                             f" (the previous stage's output), got {None if h is None else (h.shape, h.dtype)}")
        ctx = self.ctx.running(_check_trace(trace))
        state = self.new_state(ids.shape[0])
        self._check_state(state, ids)
        w = self.weights
        with use_kernels(ctx.kernels):
            h = self._embed(ids, ctx) if start == 0 else h
            for i in range(start, stop):
                h, _ = block(h, ids, 0, state.layers[i], w.layers[i], ctx.layers[i], ctx)
            if stop < self.cfg.n_layers:
                return h
            logits = head_logits(h, w.hc_head, w.norm, w.head, "final.x", ctx)   # [b, s, v]
            record(ctx, "logits", logits)
            return logits

    def _embed(self, ids: np.ndarray, ctx) -> np.ndarray:
        """ids [b, s] -> the n identical streams of their embeddings [b, s, n, c]."""
        h = np.asarray(self.weights.embed[ids]).astype(ctx.dtype)          # [b, s, c] bf16 rows, exact upcast
        record(ctx, "embed", h)
        return np.repeat(h[:, :, None, :], self.cfg.hc_mult, axis=2)        # [b, s, n, c] identical streams

    def _forward(self, ids: np.ndarray, state: State, ctx, *, streams: bool = True):
        cfg, w = self.cfg, self.weights
        self._check_state(state, ids)
        b, s = ids.shape
        h = self._embed(ids, ctx)                                           # [b, s, n, c]
        layers = []
        for i in range(cfg.n_layers):           # without a trace (none holds a view of h) a block writes over h
            h, ls = block(h, ids, state.pos, state.layers[i], w.layers[i], ctx.layers[i], ctx,
                          overwrite=ctx.trace is None)
            layers.append(ls)
        x = head_input(h, w.hc_head, w.norm, "final.x", ctx)                 # [b, s, c]
        if not streams:            # prefill returns no streams: the head's product runs without them
            h = None
        logits = head_product(x, w.head, ctx)                               # [b, s, v]
        record(ctx, "logits", logits)
        new_state = State(pos=state.pos + s, layers=tuple(layers), batch=b, precision=ctx.prec, revision=ctx.revision,
                          config_id=state.config_id, weights_id=state.weights_id, layout=ctx.layout)
        return logits, h, new_state

    def mtp_forward(self, h: np.ndarray, ids: np.ndarray, trace=None) -> np.ndarray:
        """MTP logits: position t uses streams h_t and token t+1, predicting t+2. h [b,s,n,c] -> [b, s-1, v]."""
        ctx = self.ctx.running(_check_trace(trace))
        with use_kernels(ctx.kernels):
            return mtp(h, ids, self.weights, ctx)

    # ---- input checks: bad input raises a ValueError subclass naming the problem ----
    def _as_batch(self, tokens) -> tuple[np.ndarray, bool]:
        ids = token_ids(tokens)
        if ids.ndim not in (1, 2):
            raise InputError(f"tokens must be [s] or [b, s], got shape {ids.shape}")
        single = ids.ndim == 1
        ids = ids.reshape(1, -1) if single else ids
        if ids.size == 0:
            raise InputError("empty input: at least one token is needed")
        bad = (ids < 0) | (ids >= self.cfg.vocab_size)
        if bad.any():
            where = tuple(int(v) for v in np.argwhere(bad)[0])
            raise InputError(f"token id {int(ids[where])} at {where} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return ids, single

    def _check_state(self, state: State, ids: np.ndarray) -> None:
        if not isinstance(state, State):
            raise StateError(f"expected a refimpl State, got {type(state).__name__}")
        if state.config_id != self.config_id:
            raise StateError("this state belongs to a model with another configuration")
        if state.weights_id != self.weights_id:
            raise StateError(f"this state belongs to a model with other weights (weights fingerprint "
                             f"{state.weights_id!r:.20}, this model's {self.weights_id!r}): another checkpoint")
        if (state.precision, state.revision, state.layout) != (self.precision, self.revision, self.layout):
            raise StateError(f"this state was made in precision {state.precision!r} / revision {state.revision!r} / "
                             f"layout {state.layout!r}, the model runs {self.precision!r} / {self.revision!r} / "
                             f"{self.layout!r}")
        if state.batch != ids.shape[0]:
            raise StateError(f"the state holds {state.batch} sequences, the input {ids.shape[0]}")
        check_state_layers(state, self.cfg)
        end = state.pos + ids.shape[1]
        if end > self.cfg.max_seq_len:
            raise InputError(f"sequence of {end} tokens exceeds the configured maximum context "
                             f"max_seq_len={self.cfg.max_seq_len} (a load option: load(..., max_seq_len=N))")


def _check_trace(trace):
    """trace as a run takes it: None or a sites.Recording (refimpl.Trace is one); InputError otherwise."""
    if trace is not None and not isinstance(trace, Recording):
        raise InputError(f"trace must be None or a Recording (refimpl.Trace, refimpl.sites.Recording), got "
                         f"{type(trace).__name__}")
    return trace


def token_ids(tokens) -> np.ndarray:
    """Token ids as an int64 array, refusing anything that is not an integer (no silent coercion).

    A str, floats (even 2.0), bools and None are refused: `[1.7, 15.2]` must not run as `[1, 15]`,
    nor `"0152"` as `[0, 1, 5, 2]`. Range checks against the vocabulary are the caller's.
    """
    if isinstance(tokens, np.ndarray):
        if not np.issubdtype(tokens.dtype, np.integer):      # bool is not an integer dtype in NumPy
            raise InputError(f"token ids must be integers, got an array of dtype {tokens.dtype}")
        if tokens.dtype == np.uint64 and tokens.size and tokens.max() > np.iinfo(np.int64).max:
            raise InputError(f"token id {int(tokens.max())} is outside the vocabulary")
        return tokens.astype(np.int64)                      # exact: every other integer dtype fits
    if isinstance(tokens, (str, bytes)):
        raise InputError(f"token ids must be integers, got a {type(tokens).__name__} ({tokens[:20]!r})")
    if _is_token(tokens):
        return _int64(tokens)
    try:
        arr = np.asarray(tokens, dtype=object)                # nested lists; ragged ones raise
    except ValueError:
        raise InputError("token ids must be [s] or [b, s] integers; got rows of different lengths") from None
    flat = arr.reshape(-1)
    for x in flat:
        if not _is_token(x):
            raise InputError(f"token ids must be integers, got {x!r} ({type(x).__name__})")
    out = np.empty(arr.shape, np.int64)
    out.reshape(-1)[:] = [_int64(x) for x in flat]
    return out


def _is_token(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int64(x) -> np.int64:
    if not -2**63 <= int(x) < 2**63:
        raise InputError(f"token id {int(x)} is outside the vocabulary")
    return np.int64(x)


def check_state_layers(state: State, cfg) -> None:
    """A State whose arrays agree with its position, batch and the config (e.g. after an edit); StateError if not."""
    if len(state.layers) != cfg.n_layers:
        raise StateError(f"the state has {len(state.layers)} layers, the model {cfg.n_layers}")
    b, W, d = state.batch, cfg.window_size, cfg.head_dim
    for i, ls in enumerate(state.layers):
        m = cfg.compress_ratio(i)
        want = {"window": (ls.window, (b, W, d)),
                "compressed": (ls.compressed, (b, state.pos // m, d) if m else None),
                "index keys": (None if ls.indexer is None else ls.indexer.keys,
                               (b, state.pos // m, cfg.index_head_dim) if cfg.uses_indexer(i) else None)}
        for what, (arr, shape) in want.items():
            got = None if arr is None else getattr(arr, "shape", "?")
            if got != shape:
                raise StateError(f"layer {i}: {what} of shape {got} does not fit a state at position {state.pos} "
                                 f"with {b} sequence(s) (expected {shape}); was the state edited?")
            if arr is not None and getattr(arr, "dtype", None) != np.dtype(storage_dtype(state.precision)):
                raise StateError(f"layer {i}: {what} of dtype {getattr(arr, 'dtype', '?')} does not fit a "
                                 f"{state.precision} state (expected {np.dtype(storage_dtype(state.precision))}); "
                                 "was the state edited?")
