"""mirror's sparse attention is the official kernel's online softmax over blocks of 64 index entries.

Official: kernel.py sparse_attn_kernel (K:L276-368); docs/architecture.md §10 step 5. The kernel
walks a query's index set in blocks of 64 entries, in the given order, keeping a running max:

    sc   = fp32(q·kv_j) · fp32(scale)      (-1 entries: -inf)
    m'   = max(m, max sc);  r = exp(m - m');  p = exp(sc - m')
    sum  = fp32(sum·r) + fp32(Σp);  acc = fp32(acc·r) + fp32(bf16(p)·kv)
    finally sum += exp(sink - m);  o = bf16(acc / sum)

`kernel_ref` below is the test's own emulation: one query and one head at a time, Python scalars
rounded with np.float32, `math.exp` (the C library's, not NumPy's), `math.fsum` for the exact
sums. The tests pin refimpl to it bit for bit on index sets wider than 64 entries, and show that
each of its steps matters on these inputs (a block size other than 64, probabilities not rounded
to bf16, a fused multiply-add in the rescale, an fp32 block sum), so that removing a step fails.
"""
import math

import numpy as np
import pytest

import sparse_midpoints
from helpers import bf16
from refimpl.model.attention import sparse_attention, sparse_attn_query

F32 = np.float32


def kernel_ref(q, kv, sink, idx, scale, *, block=64, round_p=True, fma_sum=False, fma_acc=False,
               exact_block_sum=True, store_bf16=True, numpy_sink_exp=False):
    """The official kernel for one batch element, one (query, head) at a time. q [s,h,d], kv [n,d], idx [s,k].

    store_bf16=False: the fp32 result acc / sum before the kernel stores it as bf16."""
    s, h, d = q.shape
    out = np.empty((s, h, d), np.float32)
    kv64 = np.asarray(kv, np.float64)
    for si in range(s):
        for hi in range(h):
            qv = np.asarray(q[si, hi], np.float64)
            m, den, acc = F32(-np.inf), F32(0), np.zeros(d, np.float32)
            for lo in range(0, len(idx[si]), block):
                js = [int(j) for j in idx[si][lo:lo + block] if j >= 0]
                if not js:
                    continue
                sc = [F32(F32(math.fsum(qv * kv64[j])) * F32(scale)) for j in js]   # exact dot, fp32, * scale
                m_new = max(m, max(sc))
                r = F32(math.exp(F32(m - m_new)))                                   # exp(-inf) = 0 at first
                p = [F32(math.exp(F32(x - m_new))) for x in sc]
                block_sum = F32(math.fsum(p)) if exact_block_sum else F32(np.sum(np.array(p, np.float32)))
                pv_in = [bf16(x) if round_p else F32(x) for x in p]
                pv = np.array([math.fsum(float(pj) * kv64[j, c] for pj, j in zip(pv_in, js)) for c in range(d)])
                if fma_sum:                                                          # one rounding per update
                    den = F32(float(den) * float(r) + float(block_sum))
                else:
                    den = F32(F32(den * r) + block_sum)
                if fma_acc:
                    acc = (acc.astype(np.float64) * float(r) + pv).astype(np.float32)
                else:
                    acc = (acc * r + pv.astype(np.float32)).astype(np.float32)      # fp32 ops
                m = m_new
            z = F32(F32(sink[hi]) - m)
            den = F32(den + (np.exp(z) if numpy_sink_exp else F32(math.exp(z))))
            out[si, hi] = bf16(acc / den) if store_bf16 else acc / den
    return out


def differs(a, b):
    return not np.array_equal(a, b)


@pytest.fixture(scope="module")
def wide():
    """4 queries x 4 heads over 200 KV rows; index sets 150 wide laid out like a decode step:
    a window part of 100 (valid, then -1 padded), then 50 compressed rows. Queries and rows share
    a direction u whose weight in the rows grows along the positions, so every head's scores grow
    along the set and the running max rises from block to block."""
    rng = np.random.default_rng(7)
    h, d, n = 4, 64, 200
    u = rng.standard_normal(d) / 8
    q = bf16(rng.standard_normal((1, 4, h, d)) + u)
    kv = bf16(rng.standard_normal((1, n, d)) + 0.15 * np.arange(n)[:, None] * u)
    sink = rng.standard_normal(h).astype(np.float32)
    idx = np.full((1, 4, 150), -1)
    for si, valid in enumerate((100, 60, 64, 97)):                       # window entries of each query
        idx[0, si, :valid] = np.arange(valid)
        idx[0, si, 100:] = 100 + rng.permutation(100)[:50]               # compressed part, any order
    return q, kv, sink, idx, 0.125


def test_mirror_follows_the_kernel_blocks_bit_for_bit(wide):
    """The bf16 output, and the fp32 acc / sum before it, equal the emulation bit for bit."""
    q, kv, sink, idx, scale = wide
    want = kernel_ref(q[0], kv[0], sink, idx[0], scale)
    assert np.array_equal(sparse_attention(q, kv, sink, idx, scale, "mirror")[0], want)
    # every step matters on these inputs, in the bf16 output ...
    assert differs(want, kernel_ref(q[0], kv[0], sink, idx[0], scale, block=1 << 20))   # one max over the set
    assert differs(want, kernel_ref(q[0], kv[0], sink, idx[0], scale, block=32))
    assert differs(want, kernel_ref(q[0], kv[0], sink, idx[0], scale, round_p=False))
    # ... or in the fp32 value the kernel rounds to bf16 last
    want32 = kernel_ref(q[0], kv[0], sink, idx[0], scale, store_bf16=False)
    got32 = np.stack([sparse_attn_query(q[0, si], kv[0], sink, idx[0, si], scale) for si in range(4)])
    assert got32.dtype == np.float32 and np.array_equal(got32, want32)
    assert differs(want32, kernel_ref(q[0], kv[0], sink, idx[0], scale, fma_sum=True, store_bf16=False))
    assert differs(want32, kernel_ref(q[0], kv[0], sink, idx[0], scale, fma_acc=True, store_bf16=False))
    assert differs(want32, kernel_ref(q[0], kv[0], sink, idx[0], scale, exact_block_sum=False, store_bf16=False))
    # a sink above the scores (its term dominates the sum): its exp is one correctly rounded op
    big = sink + np.float32(12)
    want32 = kernel_ref(q[0], kv[0], big, idx[0], scale, store_bf16=False)
    got32 = np.stack([sparse_attn_query(q[0, si], kv[0], big, idx[0, si], scale) for si in range(4)])
    assert np.array_equal(got32, want32)
    assert differs(want32, kernel_ref(q[0], kv[0], big, idx[0], scale, numpy_sink_exp=True, store_bf16=False))


def test_mirror_depends_on_the_layout_float64_does_not(wide):
    """The same entries in another order (the compressed part moved to the front) change mirror's
    last bits, through the blocks; float64 computes one softmax over the set."""
    q, kv, sink, idx, scale = wide
    moved = np.concatenate([idx[..., 100:], idx[..., :100]], axis=-1)
    a = sparse_attention(q, kv, sink, idx, scale, "mirror")
    b = sparse_attention(q, kv, sink, moved, scale, "mirror")
    assert differs(a, b) and np.allclose(a, b, rtol=2**-6, atol=1e-3)
    q64, kv64 = q.astype(np.float64), kv.astype(np.float64)
    assert np.allclose(sparse_attention(q64, kv64, sink, idx, scale, "float64"),
                       sparse_attention(q64, kv64, sink, moved, scale, "float64"), rtol=1e-13, atol=1e-15)


def test_hand_worked_65_entries():
    """65 entries, one head, q = [1, 0], scale 1, no sink (-inf).

    Entries 0..63 (block 0): kv = [0, 1], score 0.  Entry 64 (block 1): kv = [1, 0], score 1.
    Block 0: m = 0, p = 1 (x64), sum = 64, acc = [0, 64].
    Block 1: m = 1, r = fp32(e^-1) = 0.36787945, p = 1; sum = 64r + 1 = 24.544285 (exact in fp32),
             acc = [1, 64r] (64r exact).  o = bf16([1/(64r+1), 64r/(64r+1)]) = [0.040771484, 0.9609375].
    One max over the whole set instead rounds e^-1 to bf16 (0.3671875) for the 64 entries:
    acc = [1, 23.5], o[1] = bf16(23.5 / 24.544285) = 0.95703125.
    """
    q = np.array([[[[1.0, 0.0]]]], np.float32)
    kv = np.array([[[0.0, 1.0]] * 64 + [[1.0, 0.0]]], np.float32)
    idx = np.arange(65)[None, None]
    o = sparse_attention(q, kv, np.array([-np.inf], np.float32), idx, 1.0, "mirror")
    r = F32(math.exp(-1.0))
    assert r == F32(0.36787945) and F32(64 * r) + F32(1) == F32(64 * float(r) + 1)   # both sums exact
    assert o[0, 0, 0].tolist() == [0.040771484375, 0.9609375]
    assert bf16(F32(1) / F32(64 * r + 1)) == F32(0.040771484375)
    assert bf16(F32(23.5) / F32(64 * r + 1)) == F32(0.95703125)                     # the single-max value
    # in reverse order entry 64 comes first: its max holds throughout, p = e^-1 in bf16 for the others
    o_rev = sparse_attention(q, kv, np.array([-np.inf], np.float32), idx[..., ::-1].copy(), 1.0, "mirror")
    assert o_rev[0, 0, 0, 1] == F32(0.95703125)


def test_all_minus_one_blocks_add_nothing():
    """A block of -1 entries between valid ones changes nothing (the kernel's step multiplies by exp(0) = 1
    and adds 0); trailing -1 padding neither."""
    rng = np.random.default_rng(3)
    q, kv = bf16(rng.standard_normal((1, 2, 3, 32))), bf16(rng.standard_normal((1, 90, 32)))
    sink = rng.standard_normal(3).astype(np.float32)
    base = np.broadcast_to(np.r_[np.arange(64), -np.ones(64, int), np.arange(64, 90)], (1, 2, 154))
    tight = np.broadcast_to(np.r_[np.arange(64), np.arange(64, 90)], (1, 2, 90))
    padded = np.concatenate([tight, -np.ones((1, 2, 38), int)], axis=-1)
    o = sparse_attention(q, kv, sink, tight, 0.2, "mirror")
    assert np.array_equal(sparse_attention(q, kv, sink, base, 0.2, "mirror"), o)
    assert np.array_equal(sparse_attention(q, kv, sink, padded, 0.2, "mirror"), o)


def test_a_first_block_without_entries_is_refused():
    """The kernel computes exp(-inf - (-inf)) = NaN for such a query; refimpl's layouts never make one."""
    q, kv = np.ones((1, 1, 1, 4), np.float32), np.ones((1, 70, 4), np.float32)
    idx = np.r_[-np.ones(64, int), np.arange(6)][None, None]
    with pytest.raises(ValueError, match="first block of 64"):
        sparse_attention(q, kv, np.zeros(1, np.float32), idx, 1.0, "mirror")
    with pytest.raises(ValueError, match="no entry to attend to"):
        sparse_attention(q, kv, np.zeros(1, np.float32), -np.ones((1, 1, 5), int), 1.0, "float64")
    o = sparse_attention(q.astype(np.float64), kv.astype(np.float64), np.zeros(1), idx, 1.0, "float64")
    assert np.allclose(o, 6 / (6 + math.exp(-4)), rtol=1e-15)            # float64: the plain softmax, sink 0


def test_the_midpoint_block_tells_the_sum_orders_apart():
    """tests/sparse_midpoints.py, block_sum: its 64 probabilities are what the case says, and the
    exact sum and NumPy's pairwise float64 sum round to 1 + 2^-23, a sequential float64 sum to 1."""
    p = sparse_midpoints.probabilities("block_sum")
    a, b = p[1], p[8]
    assert p[0] == 1 and b == 2.0 ** -24 - 2.0 ** -48 and 0.7 * 2.0 ** -53 < a < 2.0 ** -53
    assert np.array_equal(p, [1] + [a] * 7 + [b] + [a] * 55)
    sequential = 0.0
    for x in p:
        sequential += x
    assert F32(math.fsum(p)) == F32(np.sum(p)) == 1 + 2.0 ** -23 and F32(sequential) == 1


@pytest.mark.parametrize("name", ["block_sum", "pv", "dot"])
def test_sums_next_to_an_fp32_midpoint_are_rounded_once_from_the_exact_sum(name):
    """mirror's block sum, P·V sum and q·kv, each built to sit next to an fp32 rounding midpoint
    (tests/sparse_midpoints.py): sparse_attn_query gives the hand-worked o, and the bits of this
    file's emulation (exact sums, math.fsum). Another order or an fp32 running sum rounds the other way."""
    q, kv, sink, idx, expected = sparse_midpoints.cases()[name]
    got = sparse_attn_query(q[0, 0], kv[0], sink, idx[0, 0], 1.0)
    assert got.dtype == np.float32
    assert {c: float(got[0, c]) for c in expected} == expected
    assert np.array_equal(got[None], kernel_ref(q[0], kv[0], sink, idx[0], 1.0, store_bf16=False))
