"""oracle/hints.py: each structural hint when its premise holds in the numbers, and only then.

Every hint is tested both ways on hand-built sites (the premise true: the hint, naming what it
says; the premise false: no such hint), random noise gets no structural hint at all (Hypothesis),
and compare attaches the hints to each failing site (text and JSON).
"""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file

from refimpl.oracle.compare import compare, format_report
from refimpl.oracle.hints import site_hints
from refimpl.oracle.trace import TRACE_FORMAT_VERSION

FACTS = {"window_size": 32, "compress_ratios": [0, 0, 4, 16, 4, 16, 0], "rope_head_dim": 64}
RNG = np.random.default_rng(5)
Q = RNG.standard_normal((40, 8, 128))                  # an attn.q site: [s, h, d]


def hints(a, b=Q, kind="attn.q", layer=0, **kw):
    return site_hints(kind, a, b, layer=layer, facts=kw.pop("facts", FACTS), **kw)


def one(found, text):
    """The one hint that contains text (and that there is exactly one)."""
    got = [h for h in found if text in h]
    assert len(got) == 1, found
    return got[0]


def noise(x, rel):
    return x + rel * RNG.standard_normal(x.shape)


# ---------------------------------------------------------------- a constant factor, a sign flip

def test_a_constant_factor_is_named_with_its_value():
    h = one(hints(1.277 * Q), "A = c·B over the whole site")
    assert "c = 1.277" in h and "cosine 1.000000" in h and "power-of-two" not in h
    assert "2^1: a power-of-two scale" in one(hints(2.0 * Q), "c = 2")
    assert "c = 1.277" in one(hints(noise(1.277 * Q, 1e-3)), "A = c·B")     # a little noise: still a factor


def test_no_factor_where_the_numbers_are_not_proportional():
    assert not [h for h in hints(noise(1.277 * Q, 0.2)) if "A = c·B" in h]  # noise as large as the change
    assert not [h for h in hints(Q + 0.3) if "A = c·B" in h]                # an offset is no factor


def test_a_factor_per_position_or_head():
    f = 1.0 + 0.1 * np.arange(40)[:, None, None] / 40                       # an RMSNorm epsilon: per position
    assert "one factor per position (axis 0)" in one(hints(Q * f), "A = c·B with one factor per")
    g = np.ones((1, 8, 1)); g[0, 3] = 0.5
    h = one(hints(Q * g), "A = c·B with one factor per head (axis 1)")
    assert "!= 1 at head 3 (1 of 8)" in h
    per = 0.5 + RNG.random((40, 8, 1))                                        # a per-head norm left out
    assert "(axes 0 and 1)" in one(hints(Q * per), "one factor per position and head")
    assert not [h for h in hints(noise(Q * per, 0.3)) if "factor" in h]


def test_sign_flips_whole_or_in_some_dims():
    assert one(hints(-Q), "A = -B over the whole site")
    x = Q.copy()
    x[..., 64:] *= -1                                                         # the rotary half negated
    h = one(hints(x), "sign flipped")
    assert f"{40 * 8 * 64} of {Q.size} elements" in h and "dim 64-127 (64 of 128" in h
    assert not [h for h in hints(noise(Q, 0.1)) if "sign" in h]


# ---------------------------------------------------------------- transpose, permutation, shift

def test_a_transposed_mix_is_named_with_its_axes():
    comb = RNG.random((12, 4, 4))
    h = one(hints(np.swapaxes(comb, 1, 2), comb, kind="hc_attn.comb"), "transposed")
    assert "axes 1 and 2 (stream j (from), stream k (to))" in h
    assert not hints(RNG.random((12, 4, 4)), comb, kind="hc_attn.comb")     # another matrix: no structure


def test_permutations_name_the_axis_and_the_pattern():
    h = one(hints(Q[:, [1, 0, 2, 3, 4, 5, 6, 7]]), "permuted")
    assert "head indices (axis 1)" in h and "2 of 8 indices moved (0 <- 1, 1 <- 0)" in h
    d = np.arange(128)
    assert "adjacent pairs swapped" in one(hints(Q[..., d ^ 1]), "dim indices (axis 2) permuted")
    assert "two halves swapped" in one(hints(Q[..., (d + 64) % 128]), "permuted")
    inter = np.where(d < 64, 2 * d, 2 * (d - 64) + 1)
    assert "interleaved pairs read as halves" in one(hints(Q[..., inter]), "permuted")
    assert not [h for h in hints(noise(Q[..., d ^ 1], 0.5)) if "permuted" in h]   # no longer the same values


def test_a_shift_by_one_position_or_entry():
    x = np.concatenate([RNG.standard_normal((1, 8, 128)), Q[:-1]])
    h = one(hints(x), "shifted by one along axis 0 (position)")
    assert "A's position t holds B's t - 1" in h
    s = RNG.standard_normal((20, 5))                                          # indexer scores: [s, entries]
    h = one(hints(s[:, 1:], s[:, :-1], kind="attn.indexer.scores"), "shifted")
    assert "axis 1 (compressed entry)" in h and "t + 1" in h
    assert not [h for h in hints(noise(x, 0.5)) if "shifted" in h]           # a shift drowned in noise
    # golden rows (not consecutive positions): a shift of rows is not a shift of positions
    assert not [h for h in hints(x, positions=[3 * i for i in range(40)]) if "shifted" in h]


# ---------------------------------------------------------------- where the difference starts and lives

def from_position(t0, rel=1.0):
    x = Q.copy()
    x[t0:] += rel * RNG.standard_normal(x[t0:].shape)
    return x


def test_a_difference_that_starts_at_the_window_size():
    h = one(hints(from_position(32)), "starts at position t0 = 32")
    assert "the window size W" in h and "(positions up to 31 agree)" in h
    assert "W + 1" in one(hints(from_position(33)), "t0 = 33")
    assert not hints(from_position(32), facts={})                              # no window known: no such claim
    assert not [h for h in hints(from_position(0)) if "starts" in h]           # from position 0: no boundary
    assert not [h for h in hints(from_position(20)) if "starts" in h]          # 20: no boundary of layer 0


def test_a_difference_that_starts_at_a_compression_boundary():
    h = one(hints(from_position(7), layer=2), "starts at position t0 = 7")    # layer 2: ratio 4
    assert "completes compressed entry 1 of a ratio-4 layer" in h
    assert "ratio-16" in one(hints(from_position(15), layer=3), "t0 = 15")   # layer 3: ratio 16
    assert not hints(from_position(7), layer=0)                                # layer 0 has no compressor
    # the row before t0 missing from the trace (golden rows): "starts exactly at" is not established
    rows = [0, 3, 7] + list(range(10, 47))
    assert not [h for h in hints(from_position(2), layer=2, positions=rows) if "starts" in h]


def test_a_difference_confined_to_heads_or_channels():
    x = Q.copy()
    x[:, 3] += RNG.standard_normal((40, 128))
    assert "head 3 (1 of 8; the other 7 agree)" in one(hints(x), "confined to")
    x = noise(Q, 1e-7)                                                          # float32-like noise everywhere,
    x[..., 64:] += 0.1 * RNG.standard_normal((40, 8, 64))                     # a real change in the rotary dims
    h = one(hints(x), "confined to")
    assert "dim 64-127 (64 of 128; the other 64 differ at least" in h and "within the rotary dims 64-127" in h
    assert not [h for h in hints(noise(Q, 0.1)) if "confined" in h]


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.integers(4, 12), st.integers(1, 6), st.integers(8, 64),
       st.floats(1e-8, 1.0), st.sampled_from(["attn.q", "out", "hc_attn.comb"]), st.integers(0, 6))
def test_random_noise_gets_no_structural_hint(seed, s, mid, width, rel, kind, layer):
    rng = np.random.default_rng(seed)
    shape = (s, 4, 4) if kind == "hc_attn.comb" else (s, mid, width)
    b = rng.standard_normal(shape)
    a = b + rel * rng.standard_normal(shape)
    assert hints(a, b, kind=kind, layer=layer) == []


def test_no_hint_without_a_difference_or_with_too_few_numbers():
    assert hints(Q.copy()) == []
    assert hints(np.array([[2.0]]), np.array([[1.0]]), kind="attn.indexer.scores") == []   # one number
    b = np.zeros((4, 4))
    b[:, 0] = [1.0, -2.0, 3.0, 0.5]                        # 16 numbers, 4 of them not zero: no evidence of a
    for a in (-b, 2 * b):                                  # sign or factor (channel 0 holds it all: confined)
        assert not [h for h in hints(a, b, kind="ffn.out") if "A = " in h or "sign" in h]


def test_a_difference_in_nearly_every_index_is_not_confined():
    """Channels that agree by chance (single bf16 values often do) do not make the rest a structure."""
    x = Q.copy()
    x[..., 1:] += RNG.standard_normal((40, 8, 127))       # every dim but dim 0
    assert not [h for h in hints(x) if "confined to" in h and "dim" in h]


# ---------------------------------------------------------------- in compare's report

def write(path, tensors, **meta):
    meta = {"format_version": TRACE_FORMAT_VERSION, "precision": "float32", "tokens": list(range(40)), **meta}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path),
              metadata={"refimpl": json.dumps(meta)})
    return path


def test_compare_attaches_hints_to_each_failing_site(tmp_path):
    kv = RNG.standard_normal((40, 128))
    x = Q.copy()
    x[:, 3] *= 0.5
    a = write(tmp_path / "a.st", {"embed": kv, "layers.0.attn.q": x, "layers.0.attn.kv": -kv})
    b = write(tmp_path / "b.st", {"embed": kv, "layers.0.attn.q": Q, "layers.0.attn.kv": kv}, precision="float64",
              **FACTS)
    r = compare(a, b)
    q, kvs = (next(m for m in r.sites if m["site"] == s) for s in ("layers.0.attn.q", "layers.0.attn.kv"))
    assert "one factor per head" in q["hints"][0] and "A = -B" in kvs["hints"][0]
    assert "hints" not in r.sites[0]                                  # embed agrees: no hints
    assert r.first["site"] == "layers.0.attn.q" and q["hints"][0] in r.first["hints"]
    text = format_report(r)
    assert f"  hint: {q['hints'][0]}" in text and f"  hint at layers.0.attn.kv: {kvs['hints'][0]}" in text
    assert json.loads(json.dumps(r.to_json()))["sites"][2]["hints"] == kvs["hints"]
