"""The Numba sparse-attention kernel (refimpl/kernels/attention.py) against its spec function.

mirror: bit-identical to `sparse_attention.spec` (the official block-64 online softmax). In
general one bf16 ulp could differ where a float64 sum inside one official op (a dot product of
values whose magnitudes spread over more than ~28 binades) is not exact and lands next to an fp32
rounding boundary; here q, kv and the probabilities hold bf16 values, every dot product is exact
and the block sums follow the spec's order, so the test requires identical bits.
float64: within 1e-12 relative (same math, another summation order).
float32: the kernel computes in float64 and rounds once: within an fp32 ulp of the float64 spec
(given the fp32 scale). The spec computes in float32 BLAS; its scores are off by about
u·scale·Σ|q·kv| (u = 2^-24), which exp turns into relative errors of the weights, so the bound
against it is max|kv| times (1e-5 + 2u·scale·max Σ|q·kv|) (1e-5 alone failed about one run in 30:
spread 16, scores ~700).
"""
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels.attention import sparse_attention as kernel
from refimpl.model.attention import sparse_attention

spec = sparse_attention.spec


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def make_case(seed, b, s, h, d, n, k, pad, spread=1.0):
    """Random bf16-valued q/kv, a sink, index sets with -1 padding (first entry always valid).

    spread > 1 scales rows along the positions so the running max rises from block to block."""
    rng = np.random.default_rng(seed)
    q = bf16(rng.standard_normal((b, s, h, d)) * spread)
    kv = bf16(rng.standard_normal((b, n, d)) * np.linspace(1, spread, n)[None, :, None])
    sink = rng.standard_normal(h).astype(np.float32)
    idx = rng.integers(0, n, (b, s, k))
    idx[rng.random((b, s, k)) < pad] = -1
    idx[:, :, 0] = rng.integers(0, n, (b, s))
    return q, kv, sink, idx


def compare(q, kv, sink, idx, scale, prec):
    dt = np.float64 if prec == "float64" else np.float32
    q, kv = q.astype(dt), kv.astype(dt)
    with np.errstate(over="ignore"):   # scale 1 with spread rows: exp(sink - max) may overflow to inf in both
        want, got = spec(q, kv, sink, idx, scale, prec), kernel(q, kv, sink, idx, scale, prec)
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    if prec == "mirror":
        diff = want != got
        # q, kv and the bf16 probabilities hold bf16 values, so every dot product here is exact in
        # float64 and the block sums are taken in the spec's order: no boundary case can arise,
        # the kernel must give the spec's bits
        assert not diff.any(), f"mirror: {int(diff.sum())} of {diff.size} elements differ from the spec"
    elif prec == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    else:
        # the kernel: float64 inside (with the scale rounded to fp32, as the spec's dt(scale)), rounded
        # once: within an fp32 ulp of the float64 spec. The spec: fp32 scores, each off by about
        # u·scale·Σ|q·kv| (u = 2^-24), which exp turns into relative errors of the weights (up to ~5e-4
        # of max|kv| with scores of ~700: spread 16, d 128); 400 random cases reach 1/40 of this bound
        q64, kv64 = q.astype(np.float64), kv.astype(np.float64)
        exact = spec(q64, kv64, sink, idx, float(np.float32(scale)), "float64")
        nearest = exact.astype(np.float32)                              # fp32 underflow included
        with np.errstate(invalid="ignore"):                              # inf - inf where both overflow
            off = np.where(got == nearest, 0.0, np.abs(got.astype(np.float64) - nearest) - np.spacing(np.abs(nearest)))
        assert off.max(initial=0) <= 1e-12 * np.abs(exact).max(initial=0), "float32: not float64 rounded once"
        terms = abs(scale) * np.einsum("bshd,btd->bsht", np.abs(q64), np.abs(kv64)).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=np.abs(kv).max() * (1e-5 + 2 * 2.0 ** -24 * terms))


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31), "b": st.integers(1, 2), "s": st.integers(1, 4), "h": st.sampled_from([1, 2, 4]),
    "d": st.sampled_from([8, 64, 128]), "n": st.integers(1, 300), "k": st.integers(1, 260),
    "pad": st.sampled_from([0.0, 0.3, 0.9]), "spread": st.sampled_from([1.0, 4.0, 16.0])})


@pytest.mark.parametrize("prec", ["mirror", "float64", "float32"])
@settings(deadline=None, max_examples=30)
@given(case=shapes, scale=st.sampled_from([0.125, 0.0883883, 0.0721688, 1.0]))   # 1/sqrt(64, 128, 192); 1
def test_kernel_equals_spec(prec, case, scale):
    q, kv, sink, idx = make_case(**case)
    compare(q, kv, sink, idx, scale, prec)


@pytest.mark.parametrize("prec", ["mirror", "float64"])
def test_decode_layout_long_window_several_blocks(prec):
    """A decode step: one query, window part of 200 (-1 padded at the end), then 70 compressed rows."""
    q, kv, sink, _ = make_case(3, 1, 1, 8, 64, 400, 1, 0.0, spread=6.0)
    win = np.where(np.arange(200) < 150, np.arange(200) + 10, -1)
    comp = np.concatenate([np.arange(330, 400)[::-1][:50], -np.ones(20, np.int64)])
    idx = np.concatenate([win, comp])[None, None]
    compare(q, kv, sink, idx, 0.125, prec)


def test_mirror_flash_head_dim_and_a_rising_max_give_the_spec_bits():
    """Flash's head_dim and softmax scale (not a power of two), a running max that rises block by
    block (spread): a lost fp32 rounding of a score or of the rescaled accumulator shows here."""
    q, kv, sink, idx = make_case(11, 2, 16, 8, 128, 500, 260, 0.2, spread=8.0)
    compare(q, kv, sink, idx, 0.0883883, "mirror")


def test_bad_input_is_refused_as_the_spec_does():
    q, kv, sink, idx = make_case(0, 1, 2, 2, 8, 10, 70, 0.0)
    empty = idx.copy()
    empty[0, 1] = -1
    for fn in (spec, kernel):
        with pytest.raises(ValueError, match="no entry to attend to"):
            fn(q, kv, sink, empty, 0.5, "mirror")
    first_block_empty = idx.copy()
    first_block_empty[0, 0, :64] = -1
    for fn in (spec, kernel):
        with pytest.raises(ValueError, match="first block of 64"):
            fn(q, kv, sink, first_block_empty, 0.5, "mirror")
    with pytest.raises(ValueError, match="expected q"):
        kernel(q[0], kv, sink, idx, 0.5, "mirror")
    with pytest.raises(ValueError, match="unknown precision"):
        kernel(q, kv, sink, idx, 0.5, "bf16")
    with pytest.raises(IndexError):
        kernel(q, kv, sink, idx + 10, 0.5, "float64")


SCRIPT = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_attention_kernel import make_case
    from refimpl.kernels.attention import sparse_attention as kernel
    import refimpl.kernels.threads
    refimpl.kernels.threads.SMALL_WORK = 0            # small calls too run in the parallel regions
    from refimpl.model.attention import sparse_attention
    h = hashlib.sha256()
    for s in (1, 3):                                  # s=1: a decode step (heads split across threads)
        q, kv, sink, idx = make_case(5, 1, s, 8, 16, 150, 130, 0.2, spread=3.0)
        for prec in ("mirror", "float64"):
            dt = np.float64 if prec == "float64" else np.float32
            out = kernel(q.astype(dt), kv.astype(dt), sink, idx, 0.25, prec)
            if {check_spec}:
                want = sparse_attention.spec(q.astype(dt), kv.astype(dt), sink, idx, 0.25, prec)
                assert np.array_equal(out, want) if prec == "mirror" else np.allclose(out, want, rtol=1e-12)
            h.update(out.tobytes())
    if {large}:     # thread-count test: calls long enough that two threads overlap in the prange, five
        for s, hh, n, k in ((128, 8, 2048, 1024), (1, 64, 1024, 512)):   # times each: a scratch buffer the
            q, kv, sink, idx = make_case(6, 1, s, hh, 64, n, k, 0.2, spread=3.0)   # threads share corrupts some
            for _ in range(5):                                          # calls (s=1: heads split in groups)
                h.update(kernel(q, kv, sink, idx, 0.125, "mirror").tobytes())
    print(h.hexdigest())
""")


def run_script(env_extra, check_spec=False, large=False):
    env = dict(os.environ, **env_extra)
    code = SCRIPT.format(tests=os.path.dirname(__file__), check_spec=check_spec, large=large)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_thread_count_does_not_change_results():
    """One thread and two give the same bits, on small inputs and on 128 queries x 1024 entries (and
    one query's 64 heads split in groups), each called five times: a scratch buffer shared by the
    threads of the prange fails this on every run."""
    one = run_script({"NUMBA_NUM_THREADS": "1"}, large=True)
    two = run_script({"NUMBA_NUM_THREADS": "2"}, large=True)
    assert one == two


def test_runs_with_jit_disabled():
    """The kernel's Python source (NUMBA_DISABLE_JIT=1) gives the same results as the compiled one."""
    assert run_script({"NUMBA_DISABLE_JIT": "1"}, check_spec=True) == run_script({})


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.sampled_from([1, 4]), k=st.integers(65, 260),
       pad=st.sampled_from([0.0, 0.3]), spread=st.sampled_from([1.0, 8.0]))
def test_mirror_accumulator_before_the_bf16_store_is_the_official_one(seed, h, k, pad, spread):
    """The fp32 acc / sum of every query, before the bf16 store, equals `sparse_attn_query` bit for
    bit over several blocks of 64 (the store's rounding would hide a changed rescale of acc or sum)."""
    from refimpl.kernels.attention import _mirror
    from refimpl.model.attention import sparse_attn_query
    q, kv, sink, idx = make_case(seed, 1, 3, h, 16, 300, k, pad, spread)
    scale = 0.25
    got = np.empty(q.shape, np.float32)
    _mirror(q, kv, sink, idx.astype(np.int64), np.float32(scale), got, store_bf16=False)
    for si in range(q.shape[1]):
        want = sparse_attn_query(q[0, si], kv[0], sink, idx[0, si], scale)
        assert want.dtype == np.float32
        assert np.array_equal(got[0, si], want), f"query {si}: {int((got[0, si] != want).sum())} values differ"


@pytest.mark.parametrize("name", ["block_sum", "pv", "dot"])
def test_mirror_sums_next_to_an_fp32_midpoint_are_the_specs(name):
    """The block sum of the probabilities, the P·V sum and q·kv, each built to sit next to an fp32
    rounding midpoint (tests/sparse_midpoints.py: random inputs almost never do): the fp32 acc / sum
    before the bf16 store is `sparse_attn_query`'s and the hand-worked value. A sequential block sum
    instead of NumPy's pairwise order, or an fp32 running sum, rounds the other way."""
    import sparse_midpoints                      # tests/ (not imported at the top: SCRIPT imports this file)
    from refimpl.kernels.attention import _mirror
    from refimpl.model.attention import sparse_attn_query
    q, kv, sink, idx, expected = sparse_midpoints.cases()[name]
    got = np.empty(q.shape, np.float32)
    _mirror(q, kv, sink, idx, np.float32(1.0), got, store_bf16=False)
    assert np.array_equal(got[0, 0], sparse_attn_query(q[0, 0], kv[0], sink, idx[0, 0], 1.0))
    assert {c: float(got[0, 0, 0, c]) for c in expected} == expected
    assert np.array_equal(kernel(q, kv, sink, idx, 1.0, "mirror"), spec(q, kv, sink, idx, 1.0, "mirror"))
