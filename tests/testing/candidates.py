"""Reference-shaped implementations written from the official code, independently of refimpl's spec, each
with switches that plant one field bug. With no bug switched on, each is a correct float32 implementation
(float64 inside, rounded once to float32), so the kit must pass it; with one on, the kit must find it.

The bugs (names used by test_planted_bugs.py):
    act_quant_fp8     "scale_rounded_to_nearest" (2^round(log2) instead of ceil), "per_column_scale"
                      (one scale per column block across rows)
    fp8_linear        "block_height_from_grid" (N / grid rows, as transformers' FP8 loader), "scale_grid_transposed"
    fp4_linear        "high_nibble_first"
    rms_norm          "eps_outside_sqrt"
    apply_rope        "missing_yarn", "rotate_half" (split-halves pairs), "inverse_not_conjugated"
    split_sinkhorn    "one_iteration_short"
    hc_post           "transposed_mix"
    hc_head           "rms_per_stream" (each stream normalised by its own RMS, not the flattened streams'),
                      "sinkhorn_on_pre" (pre normalised to sum 1, as if it went through hc_pre's mixing)
    hadamard          "walsh_order" (the rows of H in sequency order, as a fast Walsh-Hadamard transform
                      library may return them), "unnormalised" (no 1/sqrt(n))
    index_layout      "window_one_too_wide" (positions t-W .. t), "entry_visible_early" (an entry visible from its
                      block's first token, e < t//m + 1), "prefill_padded_to_window" (a prefill from 0 padded
                      to W as a decode step is)
    act_quant_fp4     "ties_away_from_zero" (e2m1 rounding half away from zero), "scale_rounded_to_nearest"
    sparse_attention  "sink_of_rank_0" (every tensor-parallel rank uses the first rank's sinks), "sink_in_the_max",
                      "sink_as_bf16"
    index_topk        "ties_broken_upward"
    route             "bias_weighs", "ties_broken_upward"
    expert_sum        "shared_clamp_in_initial", "symmetric_gate_clamp" (the gate clamped below too)
    mtp_input         "pairs_token_t" (the streams of t with token t, not t+1)
"""
import math

import ml_dtypes
import numpy as np


F64 = np.float64


def f32(x):
    return np.asarray(x, F64).astype(np.float32)


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def e8m0(s):
    return np.exp2(np.asarray(s).view(np.uint8).astype(F64) - 127)


# -------------------------------------------------------------------------------------- act_quant_fp8

def act_quant_fp8(inp, bug=None):
    x, block = np.asarray(inp["x"], F64), inp["block"]
    rows, k = x.shape
    xb = x.reshape(rows, k // block, block)
    amax = np.maximum(np.abs(xb).max(-1), np.float32(1e-4).astype(F64))
    if bug == "per_column_scale":
        amax = np.broadcast_to(amax.max(0, keepdims=True), amax.shape) if rows else amax
    ratio = f32(f32(amax) * np.float32(1 / 448)).astype(F64)
    e = np.round(np.log2(ratio)) if bug == "scale_rounded_to_nearest" else np.ceil(np.log2(ratio))
    s = np.exp2(e)
    q = np.clip(xb / s[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q.reshape(rows, k), s.astype(np.float32)


# -------------------------------------------------------------------------------------- products

def dequant_fp8(w, scale, bug=None):
    w = np.asarray(w).astype(F64)
    s = e8m0(scale)
    n, k = w.shape
    bh = n // s.shape[0] if bug == "block_height_from_grid" and n % s.shape[0] == 0 else 128
    if bug == "scale_grid_transposed" and s.shape[0] == s.shape[1]:
        s = s.T
    return w * np.repeat(np.repeat(s, bh, 0), 128, 1)[:n, :k]


def fp8_linear(inp, bug=None):
    w = dequant_fp8(inp["weight"], inp["scale"], bug)
    return f32(np.asarray(inp["x"], F64) @ w.T)


FP4 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def fp4_linear(inp, bug=None):
    p = np.asarray(inp["weight"]).view(np.uint8)
    lo, hi = p & 15, p >> 4
    pair = (hi, lo) if bug == "high_nibble_first" else (lo, hi)
    w = FP4[np.stack(pair, -1).reshape(p.shape[0], -1)]
    w = w * np.repeat(e8m0(inp["scale"]), 32, 1)[:, :w.shape[1]]
    return f32(np.asarray(inp["x"], F64) @ w.T)


# -------------------------------------------------------------------------------------- norms

def rms_norm(inp, bug=None):
    x, w, eps = np.asarray(inp["x"], F64), np.asarray(inp["weight"]).astype(F64), inp["eps"]
    ms = (x * x).mean(-1, keepdims=True)
    r = 1 / (np.sqrt(ms) + eps) if bug == "eps_outside_sqrt" else 1 / np.sqrt(ms + eps)
    return f32(x * r * w)


# -------------------------------------------------------------------------------------- rope

def yarn_freqs(p, base, original_seq_len, factor, beta_fast, beta_slow, bug=None):
    f = 1.0 / base ** (np.arange(0, p, 2) / p)
    if original_seq_len > 0 and bug != "missing_yarn":
        def corr(rot):
            return p * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), p - 1)
        ramp = np.clip((np.arange(p // 2) - low) / ((high - low) or 0.001), 0, 1)
        f = f / factor * ramp + f * (1 - ramp)
    return f


def apply_rope(inp, bug=None):
    x = np.asarray(inp["x"], F64)
    p = inp["rope_dim"]
    f = yarn_freqs(p, inp["base"], inp["original_seq_len"], inp["factor"], inp["beta_fast"], inp["beta_slow"], bug)
    ang = np.asarray(inp["positions"], F64)[:, None] * f[None]                    # [s, p/2]
    sign = -1.0 if inp["inverse"] and bug != "inverse_not_conjugated" else 1.0
    cos, sin = np.cos(ang), sign * np.sin(ang)
    if x.ndim == 4:
        cos, sin = cos[:, None], sin[:, None]
    r = x[..., -p:]
    if bug == "rotate_half":
        a, b = r[..., : p // 2], r[..., p // 2:]
        rot = np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
    else:
        a, b = r[..., 0::2], r[..., 1::2]
        rot = np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(r.shape)
    return f32(np.concatenate([x[..., :-p], rot], -1))


# -------------------------------------------------------------------------------------- mHC

def split_sinkhorn(inp, bug=None):
    m, sc, base, n, eps = (np.asarray(inp["mixes"], F64), np.asarray(inp["scale"], F64), np.asarray(inp["base"], F64),
                           inp["n"], inp["eps"])
    sig = lambda v: 1 / (1 + np.exp(-v))                                           # noqa: E731
    pre = sig(m[..., :n] * sc[0] + base[:n]) + eps
    post = 2 * sig(m[..., n:2 * n] * sc[1] + base[n:2 * n])
    lg = (m[..., 2 * n:] * sc[2] + base[2 * n:]).reshape(*m.shape[:-1], n, n)
    e = np.exp(lg - lg.max(-1, keepdims=True))
    comb = e / e.sum(-1, keepdims=True) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(inp["iters"] - 1 - (bug == "one_iteration_short")):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return f32(pre), f32(post), f32(comb)


def hc_post(inp, bug=None):
    x, h, post, comb = (np.asarray(inp[k], F64) for k in ("x", "residual", "post", "comb"))
    if bug == "transposed_mix":
        comb = np.swapaxes(comb, -1, -2)
    return f32(post[..., None] * x[:, :, None] + np.einsum("bsjk,bsjc->bskc", comb, h))


def hc_head(inp, bug=None):
    h, fn, sc, base = (np.asarray(inp[k], F64) for k in ("h", "fn", "scale", "base"))
    b, s, n, c = h.shape
    if bug == "rms_per_stream":
        hn = h / np.sqrt((h * h).mean(-1, keepdims=True) + inp["norm_eps"])
        mixes = hn.reshape(b, s, n * c) @ fn.T
    else:
        v = h.reshape(b, s, n * c)
        mixes = v @ fn.T / np.sqrt((v * v).mean(-1, keepdims=True) + inp["norm_eps"])
    pre = 1 / (1 + np.exp(-(mixes * sc[0] + base))) + inp["hc_eps"]
    if bug == "sinkhorn_on_pre":
        pre = pre / pre.sum(-1, keepdims=True)
    return f32(np.einsum("bsj,bsjc->bsc", pre, h))


# -------------------------------------------------------------------------------------- indexer rotation, FP4

def _walsh_sylvester(n):
    idx = np.arange(n)
    return (-1.0) ** np.array([[bin(i & j).count("1") for j in idx] for i in idx])   # H[i, j] = (-1)^popcount(i&j)


def hadamard(inp, bug=None):
    x = np.asarray(inp["x"], F64)
    n = x.shape[-1]
    h = _walsh_sylvester(n)
    if bug == "walsh_order":                     # rows sorted by their number of sign changes (sequency)
        h = h[np.argsort([np.count_nonzero(np.diff(r)) for r in h], kind="stable")]
    y = x @ h.T
    return f32(y if bug == "unnormalised" else y / math.sqrt(n))


E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6])


def act_quant_fp4(inp, bug=None):
    x = np.asarray(inp["x"], F64)
    rows, k = x.shape
    xb = x.reshape(rows, k // 32, 32)
    amax = np.maximum(np.abs(xb).max(-1), 6 * 2.0**-126)
    ratio = f32(f32(amax) * np.float32(1 / 6)).astype(F64)
    e = np.round(np.log2(ratio)) if bug == "scale_rounded_to_nearest" else np.ceil(np.log2(ratio))
    s = np.exp2(e)
    r = np.minimum(np.abs(xb / s[..., None]), 6.0)
    i = np.searchsorted(E2M1, r)                                      # E2M1[i-1] < r <= E2M1[i]
    lo, hi = np.clip(i - 1, 0, 7), np.clip(i, 0, 7)
    dlo, dhi = r - E2M1[lo], E2M1[hi] - r
    up_on_tie = (hi % 2 == 0) if bug != "ties_away_from_zero" else np.ones(r.shape, bool)   # even index wins
    pick = np.where((dhi < dlo) | ((dhi == dlo) & up_on_tie), hi, lo)
    q = np.sign(xb) * E2M1[pick]
    return q.reshape(rows, k).astype(np.float32), s.astype(np.float32)


# -------------------------------------------------------------------------------------- index layouts

def index_layout(inp, bug=None):
    start, s, w, m = inp["start_pos"], inp["s"], inp["window_size"], inp["ratio"]
    official_prefill = inp["layout"] == "official" and start == 0 and bug != "prefill_padded_to_window"
    width = min(s, w) if official_prefill else w
    span = w + 1 if bug == "window_one_too_wide" else w
    win = np.full((s, width + (span - w)), -1, np.int64)
    comp = np.full((s, (start + s) // m if m else 0), -1, np.int64)
    for i in range(s):
        t = start + i
        seen = list(range(max(0, t - span + 1), t + 1))               # oldest first
        win[i, :len(seen)] = seen
        if m:
            n = t // m + 1 if bug == "entry_visible_early" else (t + 1) // m
            n = min(n, comp.shape[1])
            comp[i, :n] = np.arange(n)
    return win, comp


# -------------------------------------------------------------------------------------- attention

def sparse_attention(inp, bug=None):
    q, kv, sink, idx = (np.asarray(inp["q"], F64), np.asarray(inp["kv"], F64), np.asarray(inp["attn_sink"], F64),
                        np.asarray(inp["topk_idxs"]))
    b, s, h, d = q.shape
    if bug == "sink_of_rank_0" and h > 1:
        sink = np.tile(sink[: h // 2], 2)                # two ranks of h/2 heads, both with rank 0's sinks
    if bug == "sink_as_bf16":
        sink = bf16(sink).astype(F64)
    o = np.zeros(q.shape)
    for bi in range(b):
        for si in range(s):
            rows = kv[bi, idx[bi, si][idx[bi, si] >= 0]]
            sc = q[bi, si] @ rows.T * inp["softmax_scale"]                          # [h, k]
            mx = sc.max(-1)
            if bug == "sink_in_the_max":
                mx = np.maximum(mx, sink)
            p = np.exp(sc - mx[:, None])
            den = p.sum(-1) + np.exp(sink - mx)
            if bug == "sink_in_the_max":
                den = p.sum(-1) + np.exp(sink - mx) * (sink > sc.max(-1)) + np.exp(sink - mx) * 0.5
            o[bi, si] = p @ rows / den[:, None]
    return f32(o)


def index_topk(inp, bug=None):
    q, keys, w = (np.asarray(inp[k], F64) for k in ("q", "keys", "weights"))
    start, m, k = inp["start_pos"], inp["ratio"], inp["index_topk"]
    b, s = q.shape[:2]
    width = min(k, (start + s) // m)
    topk = np.full((b, s, width), -1, np.int64)
    scores = np.full((b, s, keys.shape[1]), -np.inf)
    for bi in range(b):
        for si in range(s):
            v = (start + si + 1) // m
            if not v:
                continue
            sc = (np.maximum(q[bi, si] @ keys[bi, :v].T, 0) * w[bi, si][:, None]).sum(0)
            scores[bi, si, :v] = sc
            ids = np.arange(v)
            order = np.lexsort((ids if bug != "ties_broken_upward" else -ids, -sc))
            topk[bi, si, :min(k, v)] = order[:min(k, v)]
    return topk, f32(scores)


# -------------------------------------------------------------------------------------- MoE

def route(inp, bug=None):
    x, w = np.asarray(inp["x"], F64), np.asarray(inp["gate_weight"]).astype(F64)
    sc = np.sqrt(np.logaddexp(0, x @ w.T))                                          # [b, s, e]
    a = inp["n_activated_experts"]
    if inp["tid2eid"] is not None:
        ids = np.asarray(inp["tid2eid"])[np.asarray(inp["tokens"])]
        chooser = sc
    else:
        chooser = sc + inp["bias"].astype(F64)
        e = np.arange(sc.shape[-1])
        ids = np.stack([[np.lexsort((e if bug != "ties_broken_upward" else -e, -row))[:a] for row in r]
                        for r in chooser])
    wsrc = chooser if bug == "bias_weighs" else sc
    wt = np.take_along_axis(wsrc, ids, -1)
    return f32(wt / wt.sum(-1, keepdims=True) * inp["route_scale"]), ids.astype(np.int64)


def _swiglu_expert(x, w1, w2, w3, limit, weight=None, bug=None):
    g, u = x @ w1.T, x @ w3.T
    if limit > 0:
        u = np.clip(u, -limit, limit)
        g = np.clip(g, -limit, limit) if bug == "symmetric_gate_clamp" else np.minimum(g, limit)
    h = g / (1 + np.exp(-g)) * u
    if weight is not None:
        h = weight * h
    return h @ w2.T


def expert_sum(inp, bug=None):
    x, ids, wts = np.asarray(inp["x"], F64), np.asarray(inp["ids"]), np.asarray(inp["weights"], F64)
    def fp4(name, i):
        return fp4_dequant(inp[f"experts.{name}"][i], inp[f"experts.{name}.scale"][i])
    y = np.zeros(x.shape)
    for e in np.unique(ids):
        rows, slot = np.nonzero(ids == e)
        y[rows] += _swiglu_expert(x[rows], fp4("w1", e), fp4("w2", e), fp4("w3", e), inp["swiglu_limit"],
                                  wts[rows, slot][:, None], bug)
    shared = [dequant_fp8(inp[f"shared.{n}"], inp[f"shared.{n}.scale"]) for n in ("w1", "w2", "w3")]
    clamp = inp["revision"] == "current" or bug == "shared_clamp_in_initial"
    return f32(y + _swiglu_expert(x, *shared, inp["swiglu_limit"] if clamp else 0.0))


def fp4_dequant(packed, scale):
    p = np.asarray(packed).view(np.uint8)
    w = FP4[np.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)]
    return w * np.repeat(e8m0(scale), 32, 1)[:, :w.shape[1]]


# -------------------------------------------------------------------------------------- MTP

def _norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(w).astype(F64)


def mtp_input(inp, bug=None):
    h, ids = np.asarray(inp["h"], F64), np.asarray(inp["ids"])
    tok = ids[:, :-1] if bug == "pairs_token_t" else ids[:, 1:]
    e = _norm(np.asarray(inp["embed"]).astype(F64)[tok], inp["enorm"], inp["norm_eps"])       # [b, s-1, c]
    hs = _norm(h[:, :-1], inp["hnorm"], inp["norm_eps"])                                         # [b, s-1, n, c]
    ep, hp = dequant_fp8(inp["e_proj"], inp["e_proj.scale"]), dequant_fp8(inp["h_proj"], inp["h_proj.scale"])
    return f32((e @ ep.T)[:, :, None, :] + hs @ hp.T)
