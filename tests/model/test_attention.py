"""Tests of refimpl.model.attention: window and compressed index sets, sparse attention with sink, the layer state.

docs/architecture.md §10, §15, watch points §19.9-19.12. Index-set literals are drawn as
0/1 rows over absolute positions (Gemma style): row = query position, column = key position.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.context import RunContext
from refimpl import numerics as nx
from refimpl.model.attention import compressed_indices, sparse_attention, window_indices
from refimpl.config import Config
from refimpl.oracle.trace import Trace

TINY = Config.tiny()


def drawn_window(start_pos, s, window):
    """Window index sets as 0/1 strings over absolute positions 0 .. start_pos+s-1."""
    idx, n_prev = window_indices(start_pos, s, window)
    first = start_pos - n_prev
    rows = []
    for r in idx:
        seen = np.zeros(start_pos + s, int)
        seen[r[r >= 0] + first] = 1
        rows.append("".join(map(str, seen)))
    return rows


def drawn_entries(idx, n):
    rows = []
    for r in idx:
        seen = np.zeros(n, int)
        seen[r[r >= 0]] = 1
        rows.append("".join(map(str, seen)))
    return rows


# ------------------------------------------------------------------------------------------------
# window index sets (docs/architecture.md §10 step 3) (W = 4 for readability)

def test_window_prefill_literal():
    """Window, prefill: query t sees max(0, t-W+1) .. t; indices are rows of this call's KV, -1 padded."""
    idx, n_prev = window_indices(0, 6, 4)
    assert n_prev == 0
    assert idx.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 1, 2, -1],
                            [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert drawn_window(0, 6, 4) == ["100000",
                                     "110000",
                                     "111000",
                                     "111100",
                                     "011110",
                                     "001111"]
    assert window_indices(0, 2, 4)[0].tolist() == [[0, -1], [0, 1]]        # width min(S, W)


def test_window_mid_sequence_chunk_literal():
    """Window, generalised: a chunk from start_pos uses the W-1 previous rows (from the ring) then its own."""
    idx, n_prev = window_indices(5, 3, 4)
    assert n_prev == 3 and idx.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert drawn_window(5, 3, 4) == ["00111100",
                                     "00011110",
                                     "00001111"]
    idx, n_prev = window_indices(2, 3, 4)                                   # window not full yet
    assert n_prev == 2 and idx.tolist() == [[0, 1, 2, -1], [0, 1, 2, 3], [1, 2, 3, 4]]
    assert drawn_window(2, 3, 4) == ["11100",
                                     "11110",
                                     "01111"]


def test_window_decode_literal():
    """Window, decode: the current token and the previous <= W-1 tokens."""
    assert drawn_window(1, 1, 4) == ["11"]
    assert drawn_window(3, 1, 4) == ["1111"]
    assert drawn_window(9, 1, 4) == ["0000001111"]
    idx, n_prev = window_indices(9, 1, 4)
    assert n_prev == 3 and idx.tolist() == [[0, 1, 2, 3]]


@settings(max_examples=60)
@given(start=st.integers(0, 200), s=st.integers(1, 40), window=st.integers(1, 40),
       layout=st.sampled_from(["official", "canonical"]))
def test_window_sets_property(start, s, window, layout):
    """Window: every query t sees exactly positions max(0, t-W+1) .. t, in position order, then -1s up to
    the layout's width (official: min(s, W) for a prefill from 0, else W; canonical: W)."""
    idx, n_prev = window_indices(start, s, window, layout)
    width = min(s, window) if layout == "official" and start == 0 else window
    assert idx.shape == (s, width) and n_prev == min(start, window - 1)
    first = start - n_prev
    for i, r in enumerate(idx):
        t = start + i
        pos = (r[r >= 0] + first).tolist()
        assert pos == list(range(max(0, t - window + 1), t + 1))
        assert np.all(r[len(pos):] == -1)
        assert r.max() < n_prev + s


# ------------------------------------------------------------------------------------------------
# compressed visibility (docs/architecture.md §19.10)

def test_compressed_indices_literal_ratio4():
    """docs/architecture.md §19.10: entry i visible to query t iff 4(i+1) <= t+1 ((t+1)//m, not t//m)."""
    idx = compressed_indices(0, 10, 4)
    assert idx.shape == (10, 2)
    assert drawn_entries(idx, 2) == ["00", "00", "00",
                                     "10", "10", "10", "10",
                                     "11", "11", "11"]
    assert idx[3].tolist() == [0, -1] and idx[9].tolist() == [0, 1]
    # mid-sequence chunk (t = 5 .. 10) and decode steps
    assert drawn_entries(compressed_indices(5, 6, 4), 2) == ["10", "10", "11", "11", "11", "11"]
    assert compressed_indices(6, 1, 4).tolist() == [[0]]
    assert compressed_indices(7, 1, 4).tolist() == [[0, 1]]                 # completed at this very step
    assert compressed_indices(0, 3, 4).shape == (3, 0)                       # docs/architecture.md §19.12: width 0


def test_compressed_indices_literal_ratio16():
    """HCA visibility (tiny m = 16): entry 0 from t = 15, entry 1 from t = 31."""
    idx = compressed_indices(0, 33, 16)
    assert idx.shape == (33, 2)
    assert drawn_entries(idx, 2) == ["00"] * 15 + ["10"] * 16 + ["11"] * 2


@settings(max_examples=60)
@given(start=st.integers(0, 300), s=st.integers(1, 40), m=st.sampled_from([2, 4, 8, 16, 128]))
def test_compressed_visibility_property(start, s, m):
    """docs/architecture.md §19.10: compressed entry i visible to query t iff m(i+1) <= t+1; width (start+s)//m."""
    idx = compressed_indices(start, s, m)
    assert idx.shape == (s, (start + s) // m)
    for r, t in enumerate(range(start, start + s)):
        for i in range(idx.shape[1]):
            assert (idx[r, i] == i) == (m * (i + 1) <= t + 1)
            assert idx[r, i] in (i, -1)


# ------------------------------------------------------------------------------------------------
# sparse attention with sink (docs/architecture.md §10 step 5)

def dense_sink_attention(q, kv, sink, idx, scale):
    """o[t,h] = Σ_j e^(s_j-M) kv_j / (Σ_j e^(s_j-M) + e^(sink_h-M)), M = max_j s_j (float64, direct)."""
    b, s, h, d = q.shape
    o = np.zeros((b, s, h, d))
    for bi in range(b):
        for si in range(s):
            rows = kv[bi, [j for j in idx[bi, si] if j >= 0]]
            for hi in range(h):
                sc = scale * (rows @ q[bi, si, hi])
                M = sc.max()
                p = np.exp(sc - M)
                o[bi, si, hi] = (p @ rows) / (p.sum() + np.exp(sink[hi] - M))
    return o


def test_sparse_attention_hand_worked():
    """Sink attention: q·kv scores ln2, (skipped), ln2 -> p = [1, 1], sink 0 adds e^(0-ln2) = 1/2 to the denominator."""
    q = np.array([[[[np.log(2), 0.0]]]])                       # [b, s, h, d] = [1, 1, 1, 2]
    kv = np.array([[[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]]])       # row 1 is not selected
    o = sparse_attention(q, kv, np.array([0.0]), np.array([[[0, 2, -1]]]), 1.0, "float64")
    assert np.allclose(o, [[[[0.8, 0.4]]]], rtol=1e-15)         # ([1,0] + [1,1]) / 2.5
    # the sink is not in the max: a huge sink only grows the denominator
    o = sparse_attention(q, kv, np.array([np.log(2) + np.log(8)]), np.array([[[0, 2]]]), 1.0, "float64")
    assert np.allclose(o, [[[[2 / 10, 1 / 10]]]], rtol=1e-14)   # denominator 2 + 8


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), s=st.integers(1, 5), h=st.integers(1, 4), n=st.integers(1, 12),
       k=st.integers(1, 12), scale=st.floats(0.05, 2.0))
def test_sparse_attention_matches_direct_formula(seed, s, h, n, k, scale):
    """Sink attention: the gathered, -1 padded index set; sink in the denominator only; float64 exact math."""
    rng = np.random.default_rng(seed)
    q, kv = rng.standard_normal((2, s, h, 8)), rng.standard_normal((2, n, 8))
    sink = rng.standard_normal(h) * 2
    idx = rng.integers(-1, n, (2, s, k))
    idx[..., 0] = rng.integers(0, n, (2, s))                   # at least one real row per query
    o = sparse_attention(q, kv, sink, idx, scale, "float64")
    assert np.allclose(o, dense_sink_attention(q, kv, sink, idx, scale), rtol=1e-12, atol=1e-13)
    # the order of the index set does not matter (a set, not a sequence)
    perm = rng.permuted(idx, axis=-1)
    assert np.allclose(sparse_attention(q, kv, sink, perm, scale, "float64"), o, rtol=1e-12, atol=1e-13)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), s=st.integers(1, 10), h=st.integers(1, 4))
def test_sink_minus_inf_is_plain_softmax_attention(seed, s, h):
    """docs/architecture.md §19.9: a sink of -inf adds e^-inf = 0: plain causal softmax attention."""
    rng = np.random.default_rng(seed)
    q, kv = rng.standard_normal((1, s, h, 16)), rng.standard_normal((1, s, 16))
    t = np.arange(s)
    idx = np.where(t[None, :] <= t[:, None], t[None, :], -1)[None]     # every causal position
    o = sparse_attention(q, kv, np.full(h, -np.inf), idx, 0.25, "float64")
    sc = 0.25 * np.einsum("shd,td->sht", q[0], kv[0])
    sc = np.where(t[None, None, :] <= t[:, None, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    want = np.einsum("sht,td->shd", p / p.sum(-1, keepdims=True), kv[0])
    assert np.allclose(o[0], want, rtol=1e-12, atol=1e-13)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), s=st.integers(1, 10), h=st.integers(1, 4))
def test_sparse_over_all_causal_positions_equals_dense_causal_with_sink(seed, s, h):
    """Sink attention: sparse attention over every causal position == dense masked attention with a sink logit."""
    rng = np.random.default_rng(seed)
    q, kv = rng.standard_normal((1, s, h, 16)), rng.standard_normal((1, s, 16))
    sink = rng.standard_normal(h)
    t = np.arange(s)
    idx = np.where(t[None, :] <= t[:, None], t[None, :], -1)[None]
    o = sparse_attention(q, kv, sink, idx, 0.25, "float64")
    sc = 0.25 * np.einsum("shd,td->sht", q[0], kv[0])
    sc = np.where(t[None, None, :] <= t[:, None, None], sc, -np.inf)
    M = sc.max(-1, keepdims=True)
    p = np.exp(sc - M)
    want = np.einsum("sht,td->shd", p, kv[0]) / (p.sum(-1, keepdims=True) + np.exp(sink[None, :, None] - M))
    assert np.allclose(o[0], want, rtol=1e-12, atol=1e-13)


def test_sparse_attention_mirror_bf16_output_close_to_exact():
    """Sink attention: bf16 probabilities for P·V, fp32 denominator, bf16 output (mirror)."""
    rng = np.random.default_rng(5)
    q = nx.round_bf16(rng.standard_normal((1, 4, 8, 128)))
    kv = nx.round_bf16(rng.standard_normal((1, 20, 128)))
    sink = rng.standard_normal(8).astype(np.float32)
    idx = np.stack([rng.permutation(20)[:12] for _ in range(4)])[None]
    o = sparse_attention(q, kv, sink, idx, 128 ** -0.5, "mirror")
    assert o.dtype == np.float32 and np.array_equal(o, nx.round_bf16(o))
    exact = dense_sink_attention(q.astype(np.float64), kv.astype(np.float64), sink, idx, 128 ** -0.5)
    assert np.allclose(o, exact, rtol=2**-6, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# the layer inside the tiny model

def test_window_layer_sees_exactly_w_tokens(tiny_model):
    """docs/architecture.md §19.11: layer 0 (window only) at query t depends on tokens t-31 .. t, not on t-32."""
    model = tiny_model("float64")
    toks = np.random.default_rng(3).integers(0, TINY.vocab_size, 40)
    def out(tokens):
        t = Trace(("layers.0.attn.out",))
        model.forward(tokens, trace=t)
        return t.tensors["layers.0.attn.out"]
    base = out(toks)
    outside = toks.copy()
    outside[39 - 32] = (outside[39 - 32] + 1) % TINY.vocab_size       # 32 before the last query
    inside = toks.copy()
    inside[39 - 31] = (inside[39 - 31] + 1) % TINY.vocab_size         # 31 before: still in the window
    assert np.array_equal(out(outside)[39], base[39])
    assert not np.array_equal(out(outside)[38], base[38])              # ... but in the window of t = 38
    assert not np.array_equal(out(inside)[39], base[39])


@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_state_ring_and_compressed_entries_after_prefill(tiny_model, prec):
    """docs/architecture.md §15: ring row = position mod W holds the last W kv rows; compressed = every entry made."""
    model = tiny_model(prec)
    toks = np.random.default_rng(4).integers(0, TINY.vocab_size, 45)
    t = Trace(("layers.*.attn.kv", "layers.*.attn.compressed_kv"))
    _, state = model.prefill(toks, trace=t)
    W = TINY.window_size
    for layer in range(TINY.n_layers):
        ls = state.layers[layer]
        kv = t.tensors[f"layers.{layer}.attn.kv"]
        for p in range(45 - W, 45):
            assert np.array_equal(ls.window[0, p % W], kv[p])
        m = TINY.compress_ratio(layer)
        if m:
            assert ls.compressed.shape == (1, 45 // m, TINY.head_dim)
            assert np.array_equal(ls.compressed[0], t.tensors[f"layers.{layer}.attn.compressed_kv"])
        else:
            assert ls.compressed is None and ls.compressor is None
        assert (ls.indexer is not None) == (m == 4)


def test_mirror_window_kv_fp8_qdq_on_nonrope_dims_current_only(tiny_model):
    """Window KV dims 0:d-p are FP8-QDQ'd (block 64) in the current revision, not in the initial.

    docs/architecture.md §19.7.
    """
    toks = np.random.default_rng(6).integers(0, TINY.vocab_size, 12)
    nope = TINY.head_dim - TINY.rope_head_dim
    kvs = {}
    for rev in ("current", "initial"):
        t = Trace(("layers.*.attn.kv",))
        tiny_model("mirror", rev).forward(toks, trace=t)
        kvs[rev] = t.tensors
    for layer in range(TINY.n_layers):
        cur, ini = kvs["current"][f"layers.{layer}.attn.kv"], kvs["initial"][f"layers.{layer}.attn.kv"]
        assert np.array_equal(cur, nx.round_bf16(cur)) and np.array_equal(ini, nx.round_bf16(ini))
        assert np.array_equal(nx.qdq_fp8_values(cur[:, :nope], block=64), cur[:, :nope])   # on the FP8 grid
        assert not np.array_equal(nx.qdq_fp8_values(ini[:, :nope], block=64), ini[:, :nope])
    # layer 0 sees the same input in both revisions: the rope dims agree, the others are the QDQ of them
    cur, ini = kvs["current"]["layers.0.attn.kv"], kvs["initial"]["layers.0.attn.kv"]
    assert np.array_equal(cur[:, nope:], ini[:, nope:])
    assert np.array_equal(cur[:, :nope], nx.qdq_fp8_values(ini[:, :nope], block=64))


def direct_attention_layer(x, w, cfg, layer, entries, selected=None):
    """One attention layer from the formulas of docs/architecture.md §10 (steps 1-6), float64, dense over the visible rows.

    x [s, c]; entries [n, d] the layer's compressed entries, or None (window only); selected [s, k]
    the indexer's entry ids per query (CSA, -1 padded), else every visible entry (HCA).
    """
    s = len(x)
    h, d, p, W, eps = cfg.n_heads, cfg.head_dim, cfg.rope_head_dim, cfg.window_size, cfg.norm_eps
    m = cfg.compress_ratio(layer)
    deq = lambda mat: mat.dequantize().astype(np.float64)
    rms = lambda v, wt: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * wt
    if m == 0:
        f = 10000.0 ** (-np.arange(0, p, 2) / p)                 # base 10000, no YaRN
    else:
        f = 160000.0 ** (-np.arange(0, p, 2) / p)
        ramp = np.clip((np.arange(p // 2) - 15) / 10, 0, 1)
        f = f / 16 * ramp + f * (1 - ramp)

    def rot(v, pos, sign=1.0):                                   # interleaved pairs of the last p dims
        v = v.copy()
        ang = sign * np.asarray(pos, np.float64).reshape(-1, *([1] * (v.ndim - 1)))[..., :1] * f
        a, b = v[..., -p::2].copy(), v[..., -p + 1::2].copy()
        v[..., -p::2] = a * np.cos(ang) - b * np.sin(ang)
        v[..., -p + 1::2] = a * np.sin(ang) + b * np.cos(ang)
        return v

    t = np.arange(s)
    qr = rms(x @ deq(w.wq_a).T, w.q_norm.astype(np.float64))
    q = (qr @ deq(w.wq_b).T).reshape(s, h, d)
    q = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + eps)     # weightless per-head norm (step 1)
    q = rot(q, t)
    kv = rot(rms(x @ deq(w.wkv).T, w.kv_norm.astype(np.float64)), t)
    sink = w.attn_sink.astype(np.float64)
    o = np.zeros((s, h, d))
    for i in range(s):
        keys = kv[max(0, i - W + 1):i + 1]
        if m and selected is not None:
            sel = selected[i][selected[i] >= 0]
            assert np.all(sel < (i + 1) // m)                    # causal selection
            keys = np.concatenate([keys, entries[sel]])
        elif m:
            keys = np.concatenate([keys, entries[:(i + 1) // m]])
        sc = (q[i] @ keys.T) * d ** -0.5                         # [h, k]
        M = sc.max(-1, keepdims=True)
        pr = np.exp(sc - M)
        o[i] = (pr @ keys) / (pr.sum(-1, keepdims=True) + np.exp(sink[:, None] - M))
    o = rot(o, t, -1.0)                                          # de-rotation by the query position (step 6)
    g = cfg.o_groups
    wo_a = deq(w.wo_a).reshape(g, cfg.o_lora_rank, -1)
    og = o.reshape(s, g, -1)
    u = np.einsum("sgk,grk->sgr", og, wo_a)
    return u.reshape(s, -1) @ deq(w.wo_b).T


@pytest.mark.parametrize("layer,n", [(0, 40), (3, 40), (2, 80)])
def test_attention_layer_matches_direct_dense_formula(tiny_model, layer, n):
    """docs/architecture.md §10, §19.3-19.5, §19.11, §19.35: window (0), HCA (3) and CSA (2, with the indexer's own
    selection of 16 of up to 20 entries) layers == the dense formula over the same rows, float64."""
    from refimpl.model.attention import AttentionState, attention
    from refimpl.model.compressor import CompressorState, compress
    model = tiny_model("float64")
    w = model.weights.layers[layer].attn
    x = np.random.default_rng(layer).standard_normal((1, n, TINY.dim))
    t = Trace(("layers.*.attn.indexer.topk",))
    out, _ = attention(x, 0, AttentionState.empty(TINY, layer, 1, "float64"), w, TINY.layer(layer), RunContext(TINY, "float64", trace=t))
    entries, selected = None, None
    m = TINY.compress_ratio(layer)
    if m:
        entries, _ = compress(x, 0, CompressorState.empty(1, TINY, layer, head_dim=TINY.head_dim, prec="float64"), w.compressor, TINY.layer(layer), RunContext(TINY, "float64"), head_dim=TINY.head_dim, rotate=False)
        entries = entries[0]
        assert entries.shape[0] == n // m
    if m == 4:
        selected = t.tensors[f"layers.{layer}.attn.indexer.topk"]
        assert selected.shape == (n, TINY.index_topk) and np.all(selected[-1] >= 0)
    want = direct_attention_layer(x[0], w, TINY, layer, entries, selected)
    assert np.allclose(out[0], want, rtol=1e-9, atol=1e-11)
