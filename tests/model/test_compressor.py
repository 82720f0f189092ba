"""Tests of refimpl.model.compressor (docs/architecture.md §8, §15, §19.3, §19.12-19.14).

The reference for the pooling is a direct NumPy computation written from docs/architecture.md §8, token by
token, independent of the implementation's block reshapes.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.context import RunContext
from refimpl import numerics as nx
from refimpl.model.compressor import CompressorState, CompressorWeights, compress
from refimpl.config import Config

TINY = Config.tiny()
CSA, HCA = 2, 3                       # tiny layers: 2 = ratio 4 (overlap), 3 = ratio 16
D = 128                               # entry width (main head_dim, also the indexer head dim)
C_IN = 16                             # input width: compress only needs x @ wᵀ, any width works
P = TINY.rope_head_dim


def make_weights(rng, m, d=D, c_in=C_IN, ape_scale=0.5):
    coff = 2 if m == 4 else 1
    return CompressorWeights(wkv=rng.standard_normal((coff * d, c_in)) / 4,
                             wgate=rng.standard_normal((coff * d, c_in)),
                             ape=rng.standard_normal((m, coff * d)) * ape_scale,
                             norm=1 + 0.1 * rng.standard_normal(d))


def yarn_freqs():
    """Base 160000 + YaRN frequencies of the compressed layers: low 15, high 25 (docs/architecture.md §6)."""
    f = 160000.0 ** (-np.arange(0, P, 2) / P)
    ramp = np.clip((np.arange(P // 2) - 15) / 10, 0, 1)
    return f / 16 * ramp + f * (1 - ramp)


def finish(e, pos, w, eps=1e-6):
    """RMSNorm with weight, then interleaved RoPE of the last p dims at position pos (float64)."""
    y = e / np.sqrt(np.mean(e * e) + eps) * w.norm
    ang = pos * yarn_freqs()
    a, b = y[-P::2].copy(), y[-P + 1::2].copy()
    y = y.copy()
    y[-P::2] = a * np.cos(ang) - b * np.sin(ang)
    y[-P + 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return y


def direct_entries(x, w, m, d=D):
    """Entries of one sequence x [s, c_in] from scratch, by the per-channel formulas of docs/architecture.md §8."""
    kv = x @ w.wkv.T                                             # [s, c·d]
    score = x @ w.wgate.T + w.ape[np.arange(len(x)) % m]         # ape by in-block position
    out = []
    for i in range(len(x) // m):
        cur = slice(m * i, m * i + m)
        e = np.empty(d)
        for ch in range(d):
            if m == 4:                                           # overlap: prev block [0:d], current [d:2d]
                if i == 0:
                    s_, v_ = score[cur, d + ch], kv[cur, d + ch]   # previous part is padding (weight 0)
                else:
                    prev = slice(m * i - m, m * i)
                    s_ = np.concatenate([score[prev, ch], score[cur, d + ch]])
                    v_ = np.concatenate([kv[prev, ch], kv[cur, d + ch]])
            else:
                s_, v_ = score[cur, ch], kv[cur, ch]
            p = np.exp(s_ - s_.max())
            e[ch] = np.sum(p / p.sum() * v_)
        out.append(finish(e, m * i, w))                          # RoPE at the block's first token
    return np.array(out).reshape(-1, d)


def run(x, w, m, *, layer, prec="float64", rotate=False, revision="current", start_pos=0, state=None, d=D):
    b = x.shape[0]
    state = CompressorState.empty(b, TINY, layer, head_dim=d, prec=prec) if state is None else state
    return compress(x, start_pos, state, w, TINY.layer(layer), RunContext(TINY, prec, revision=revision), head_dim=d, rotate=rotate)


# ------------------------------------------------------------------------------------------------
# hand-worked

def test_overlap_two_blocks_against_direct_formula():
    """Overlap (m=4): e_0 uses only block 0 channels d:2d; e_1 softmaxes 8 positions [0:d of block 0, d:2d of block 1]."""
    rng = np.random.default_rng(0)
    w = make_weights(rng, 4)
    x = rng.standard_normal((1, 8, C_IN))
    e, state = run(x, w, 4, layer=CSA)
    assert e.shape == (1, 2, D)
    assert np.allclose(e[0], direct_entries(x[0], w, 4), rtol=1e-11, atol=1e-12)
    # docs/architecture.md §19.3: entry 1 is rotated at position 4 (its block's first token), not at its pool index 1
    pooled = _pool_entry1(x[0], w)
    assert np.allclose(e[0, 1], finish(pooled, 4, w), rtol=1e-11, atol=1e-12)
    assert not np.allclose(e[0, 1], finish(pooled, 1, w), rtol=1e-3)
    # state after 8 tokens: previous block = block 1 (rows 0..3), nothing pending (rows 4..7 empty)
    kv = x[0] @ w.wkv.T
    assert np.allclose(state.kv[0, :4], kv[4:8], rtol=1e-15)
    assert np.array_equal(state.kv[0, 4:], np.zeros((4, 2 * D)))
    assert np.all(np.isneginf(state.score[0, 4:]))


def _pool_entry1(x, w):
    """The pooled (pre-norm) entry 1 of the m=4 example, vectorised over channels."""
    d, kv = D, x @ w.wkv.T
    score = x @ w.wgate.T + w.ape[np.arange(len(x)) % 4]
    s_ = np.concatenate([score[0:4, :d], score[4:8, d:]])        # [8, d]
    v_ = np.concatenate([kv[0:4, :d], kv[4:8, d:]])
    p = np.exp(s_ - s_.max(0))
    return np.sum(p / p.sum(0) * v_, axis=0)


def test_overlap_previous_block_contributes_only_channels_0_d():
    """In entry i, block i-1 contributes channels [0:d] only; its [d:2d] half is ignored.

    docs/architecture.md §19.13.
    """
    rng = np.random.default_rng(1)
    w = make_weights(rng, 4)
    x = rng.standard_normal((1, 8, C_IN))
    whole, _ = run(x, w, 4, layer=CSA)
    _, state = run(x[:, :4], w, 4, layer=CSA)                    # state rows 0..3 = block 0
    kv, score = state.kv.copy(), state.score.copy()
    kv[:, :4, D:] = 1e3 * rng.standard_normal((1, 4, D))         # junk in the unused half
    score[:, :4, D:] = 1e3 * rng.standard_normal((1, 4, D))
    e1, _ = run(x[:, 4:], w, 4, layer=CSA, start_pos=4, state=CompressorState(kv=kv, score=score))
    assert np.array_equal(e1, whole[:, 1:])
    kv2 = state.kv.copy()
    kv2[:, :4, :D] += 1.0                                        # the used half does matter
    e1b, _ = run(x[:, 4:], w, 4, layer=CSA, start_pos=4, state=CompressorState(kv=kv2, score=state.score))
    assert not np.allclose(e1b, whole[:, 1:])


def test_ape_added_to_scores_by_in_block_position():
    """Ape is added to the SCORES, row = in-block position (both halves); a huge row selects that token.

    docs/architecture.md §19.13.
    """
    rng = np.random.default_rng(2)
    for m, layer in ((4, CSA), (16, HCA)):
        w = make_weights(rng, m, ape_scale=0.0)
        ape = np.zeros_like(w.ape)
        if m == 4:
            ape[m - 2, D:] = 1e4            # current-block half: in-block position 2 wins
            ape[1, :D] = 2e4                # previous-block half: in-block position 1 wins (and beats 1e4)
        else:
            ape[m - 2] = 1e4
        w = CompressorWeights(wkv=w.wkv, wgate=w.wgate, ape=ape, norm=w.norm)
        x = rng.standard_normal((1, 2 * m, C_IN))
        e, _ = run(x, w, m, layer=layer)
        kv = x[0] @ w.wkv.T
        if m == 4:
            want = [kv[2, D:],              # entry 0: only block 0, its token 2 (channels d:2d)
                    kv[1, :D]]              # entry 1: block 0's token 1 (channels 0:d) outweighs block 1's token 6
        else:
            want = [kv[m - 2], kv[2 * m - 2]]
        for i in range(2):
            assert np.allclose(e[0, i], finish(want[i], m * i, w), rtol=1e-9, atol=1e-10), (m, i)
        assert np.allclose(e[0], direct_entries(x[0], w, m), rtol=1e-9, atol=1e-10)


def test_non_overlap_ratio16_against_direct_formula():
    """Non-overlap (m=16): softmax over the block per channel; RoPE at 16·i."""
    rng = np.random.default_rng(3)
    w = make_weights(rng, 16)
    x = rng.standard_normal((1, 40, C_IN))
    e, state = run(x, w, 16, layer=HCA)
    assert e.shape == (1, 2, D)
    assert np.allclose(e[0], direct_entries(x[0], w, 16), rtol=1e-11, atol=1e-12)
    kv = x[0] @ w.wkv.T
    assert np.allclose(state.kv[0, :8], kv[32:40], rtol=1e-15)   # 8 pending tokens
    assert np.all(np.isneginf(state.score[0, 8:]))


@pytest.mark.parametrize("m,layer", [(4, CSA), (16, HCA)])
def test_shorter_than_ratio_emits_nothing(m, layer):
    """docs/architecture.md §19.12: fewer than m tokens: no entry (width 0), the tokens wait in the state."""
    rng = np.random.default_rng(4)
    w = make_weights(rng, m)
    e, st_ = run(rng.standard_normal((2, m - 1, C_IN)), w, m, layer=layer)
    assert e.shape == (2, 0, D)
    off = m if m == 4 else 0
    assert np.all(np.isfinite(st_.score[:, off:off + m - 1])) and np.all(np.isneginf(st_.score[:, off + m - 1:]))


def test_mirror_main_entries_fp8_qdq_nonrope_dims_current_revision_only():
    """Main entries get FP8 QDQ (block 64) on dims 0:d-p in the current revision, identity in the initial.

    docs/architecture.md §19.7.
    """
    rng = np.random.default_rng(5)
    w = make_weights(rng, 4)
    x = nx.round_bf16(rng.standard_normal((1, 12, C_IN)))
    cur, _ = run(x, w, 4, layer=CSA, prec="mirror", revision="current")
    ini, _ = run(x, w, 4, layer=CSA, prec="mirror", revision="initial")
    assert np.array_equal(cur[..., -P:], ini[..., -P:])          # rope dims never quantized
    assert np.array_equal(cur[..., :-P], nx.qdq_fp8_values(ini[..., :-P], block=64))
    assert not np.array_equal(cur, ini)
    assert np.array_equal(ini, nx.round_bf16(ini))               # bf16 values
    exact = direct_entries(x[0].astype(np.float64), w, 4)
    assert np.allclose(ini[0], exact, rtol=0.02, atol=0.02)


def test_mirror_indexer_entries_hadamard_then_fp4():
    """docs/architecture.md §19.8: the indexer's keys are FP4-QDQ(bf16(Hadamard(e))) of the plain entries."""
    rng = np.random.default_rng(6)
    w = make_weights(rng, 4)
    x = nx.round_bf16(rng.standard_normal((1, 8, C_IN)))
    plain, _ = run(x, w, 4, layer=CSA, prec="mirror", revision="initial")
    keys, _ = run(x, w, 4, layer=CSA, prec="mirror", rotate=True)
    assert np.array_equal(keys, nx.qdq_fp4_values(nx.round_bf16(nx.hadamard(plain, prec="float32")), block=32))
    # float64: the key is exactly the Hadamard rotation of the entry (no FP4)
    x64 = x.astype(np.float64)
    p64, _ = run(x64, w, 4, layer=CSA)
    k64, _ = run(x64, w, 4, layer=CSA, rotate=True)
    assert np.allclose(k64, nx.hadamard(p64, prec="float32"), rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# properties: chunking

def chunks_st(max_len):
    return st.lists(st.integers(1, 12), min_size=1, max_size=8).filter(lambda c: sum(c) <= max_len)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), sizes=chunks_st(48),
       kind=st.sampled_from([(4, CSA, False), (16, HCA, False), (4, CSA, True)]),
       prec=st.sampled_from(["float64", "mirror"]))
def test_any_chunking_equals_one_call(seed, sizes, kind, prec):
    """Splitting the tokens into calls gives the same entries and the same final state (bit-exact).

    docs/architecture.md §8, §15.
    """
    m, layer, rotate = kind
    rng = np.random.default_rng(seed)
    w = make_weights(rng, m)
    x = rng.standard_normal((2, sum(sizes), C_IN))
    x = nx.round_bf16(x) if prec == "mirror" else x
    whole, st_whole = run(x, w, m, layer=layer, prec=prec, rotate=rotate)
    parts, state, pos = [], None, 0
    for n in sizes:
        e, state = run(x[:, pos:pos + n], w, m, layer=layer, prec=prec, rotate=rotate, start_pos=pos, state=state)
        assert e.shape[1] == (pos + n) // m - pos // m
        parts.append(e)
        pos += n
    assert np.array_equal(np.concatenate(parts, axis=1), whole)
    assert np.array_equal(state.kv, st_whole.kv) and np.array_equal(state.score, st_whole.score)
    if prec == "float64" and not rotate and sum(sizes) >= m:
        assert np.allclose(whole[1], direct_entries(x[1], w, m), rtol=1e-10, atol=1e-11)


def test_decode_after_prefill_keeps_overlap():
    """Prefill 6 tokens then one token at a time to 12: entries 1, 2 still pool 8 positions.

    docs/architecture.md §19.13.
    """
    rng = np.random.default_rng(7)
    w = make_weights(rng, 4)
    x = rng.standard_normal((1, 12, C_IN))
    e, state = run(x[:, :6], w, 4, layer=CSA)
    got = [e]
    for p in range(6, 12):
        e, state = run(x[:, p:p + 1], w, 4, layer=CSA, start_pos=p, state=state)
        got.append(e)
    got = np.concatenate(got, axis=1)
    assert got.shape == (1, 3, D)
    assert np.allclose(got[0], direct_entries(x[0], w, 4), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("m,layer", [(4, CSA), (16, HCA)])
def test_first_entry_at_exactly_ratio_tokens_by_decode(m, layer):
    """A prefill of m-1 tokens then one decode step yields entry 0 = an m-token prefill's.

    docs/architecture.md §19.12.
    """
    rng = np.random.default_rng(8)
    w = make_weights(rng, m)
    x = rng.standard_normal((1, m, C_IN))
    e0, state = run(x[:, :m - 1], w, m, layer=layer)
    assert e0.shape[1] == 0
    e1, state = run(x[:, m - 1:], w, m, layer=layer, start_pos=m - 1, state=state)
    whole, st_whole = run(x, w, m, layer=layer)
    assert e1.shape == (1, 1, D) and np.array_equal(e1, whole)
    assert np.array_equal(state.kv, st_whole.kv) and np.array_equal(state.score, st_whole.score)


def test_fresh_state_is_zero_kv_and_minus_inf_score():
    """docs/architecture.md §19.29: a new sequence starts from kv 0 / score -inf (nothing of an earlier sequence)."""
    s = CompressorState.empty(3, TINY, CSA, head_dim=D, prec="float64")
    assert s.kv.shape == (3, 8, 2 * D) and not s.kv.any() and np.all(np.isneginf(s.score))
    s = CompressorState.empty(1, TINY, HCA, head_dim=D, prec="mirror")
    assert s.kv.shape == (1, 16, D) and s.kv.dtype == np.float32
