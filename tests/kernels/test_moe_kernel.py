"""The MoE expert-sum kernel (refimpl/kernels/moe.py) against model.moe.expert_sum, and the whole
tiny model with this helper's kernels against the NumPy spec path.

expert_sum: the kernel runs the spec's steps with the product kernels (tests/kernels/test_linear_kernel.py
gives their agreement), so in mirror the result is bit-identical unless a product hit an fp32
rounding boundary, which did not happen on these inputs; float64 within 1e-12 relative of the
output's scale; float32 within the float32 product bound carried through SwiGLU (1e-5 relative).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl
from packed_weights import fp4_matrix, fp8_matrix
from refimpl.config import Config
from refimpl.kernels import moe as K
from refimpl.model.moe import ExpertWeights, GateWeights, MoEWeights, expert_sum
from refimpl.numerics import round_bf16
from refimpl.oracle.trace import Trace

TINY = Config.tiny()
MINE = "numpy,quantized_linear=numba,fp32_linear=numba,bf16_linear=numba,grouped_wo_a=numba,expert_sum=numba"


def _moe_weights(rng, n_experts: int, c: int, f: int) -> MoEWeights:
    def ew(mk):
        return ExpertWeights(w1=mk(rng, f, c), w2=mk(rng, c, f), w3=mk(rng, f, c))
    gate = GateWeights(weight=np.zeros((n_experts, c), ml_dtypes.bfloat16), bias=None, tid2eid=None)
    return MoEWeights(gate=gate, experts=tuple(ew(fp4_matrix) for _ in range(n_experts)), shared=ew(fp8_matrix))


def _routed_tokens(rng, prec, tokens, e=5, a=2, c=256, f=128):
    """-> (weights of e experts, bf16 rows [tokens, c] (float64 in float64 mode), a distinct expert ids per row)."""
    w = _moe_weights(rng, e, c, f)
    flat = round_bf16(rng.standard_normal((tokens, c)))
    if prec == "float64":
        flat = flat.astype(np.float64)
    ids = np.stack([rng.choice(e, a, replace=False) for _ in range(tokens)]).astype(np.int64)
    return w, flat, ids


@settings(max_examples=12)
@given(seed=st.integers(0, 2**32 - 1), prec=st.sampled_from(["mirror", "float64", "float32"]),
       tokens=st.integers(1, 9), revision=st.sampled_from(["current", "initial"]))
def test_expert_sum_matches_spec(seed, prec, tokens, revision):
    rng = np.random.default_rng(seed)
    w, flat, ids = _routed_tokens(rng, prec, tokens)
    weights = rng.random(ids.shape).astype(flat.dtype)
    ky = K.expert_sum(flat, ids, weights, w, TINY, prec, revision)
    sy = expert_sum.spec(flat, ids, weights, w, TINY, prec, revision)
    assert ky.dtype == sy.dtype and ky.shape == sy.shape == flat.shape
    scale = np.abs(sy).max()
    if prec == "mirror":
        assert np.array_equal(ky, sy)
    elif prec == "float64":
        assert np.abs(ky - sy).max() <= 1e-12 * scale
    else:
        assert np.abs(ky - sy).max() <= 1e-5 * scale


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), a=st.integers(3, 6), prec=st.sampled_from(["mirror", "mirror", "float32"]))
def test_expert_sum_adds_three_to_six_experts_as_the_spec(seed, a, prec):
    """Flash routes each token to 6 experts: with 3-6 and routing weights spread over 2^28 (expert
    outputs further apart than fp32's 24 bits) the order of the fp32 additions shows (ascending id,
    docs/architecture.md §19.31); with the tiny model's 2 it cannot (0 + a + b commutes). Bit for bit."""
    rng = np.random.default_rng(seed)
    e, c, f, T = 8, 256, 128, 12
    w = _moe_weights(rng, e, c, f)
    flat = round_bf16(rng.standard_normal((T, c)))
    ids = np.stack([rng.choice(e, a, replace=False) for _ in range(T)]).astype(np.int64)
    weights = (2.0 ** rng.uniform(-26, 2, (T, a))).astype(np.float32)
    ky = K.expert_sum(flat, ids, weights, w, TINY, prec, "current")
    sy = expert_sum.spec(flat, ids, weights, w, TINY, prec, "current")
    if prec == "mirror":
        assert np.array_equal(ky, sy)
    else:
        assert np.abs(ky - sy).max() <= 1e-5 * np.abs(sy).max()


class _Constant:
    """A stand-in expert whose output is `value` in every element."""
    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("task_min", [None, 0])          # the experts one after another / as pool tasks
@pytest.mark.parametrize("prec", ["mirror", "float32", "float64"])
def test_expert_sum_adds_routed_experts_in_ascending_id_hand_worked(monkeypatch, prec, task_min):
    """Experts stubbed to constant outputs, so that only the accumulation is left: token 0 routed to
    [2, 3, 1] (outputs 2^-24, 2^-24, 1), token 1 to [1, 3, 2], shared expert 0. In fp32 and ascending
    id (((0 + 1) + 2^-24) + 2^-24) + 0 = 1 (ties, to even); in descending id or slot order 2^-24 + 2^-24
    comes first and the sum is 1 + 2^-23, as the exact (float64) sum."""
    monkeypatch.setattr(K, "_expert", lambda xq, w, prec, limit, weights: np.full(
        xq.shape, w.value, np.float64 if prec == "float64" else np.float32))
    if task_min is not None:
        monkeypatch.setattr(K, "EXPERT_TASK_MIN", task_min)
    w = MoEWeights(gate=None, experts=tuple(_Constant(v) for v in (0.0, 1.0, 2.0 ** -24, 2.0 ** -24)),
                   shared=_Constant(0.0))
    ids = np.array([[2, 3, 1], [1, 3, 2]], np.int64)
    flat = np.ones((2, 128), np.float64 if prec == "float64" else np.float32)
    y = K.expert_sum(flat, ids, np.ones(ids.shape, flat.dtype), w, TINY, prec, "current")
    assert y.dtype == flat.dtype and np.all(y == (1.0 + 2.0 ** -23 if prec == "float64" else 1.0))


@pytest.mark.parametrize("tokens", [7, 48])
@pytest.mark.parametrize("prec", ["mirror", "float64", "float32"])
def test_experts_as_pool_tasks_are_the_experts_in_turn_bit_for_bit(monkeypatch, prec, tokens):
    """Each routed expert as one task of the BLAS pool (EXPERT_TASK_MIN 0: every expert; its products' panels
    then run on the task's own thread, Numba products serial) gives the bits of the experts taken in turn
    in every mode, and mirror's are the spec's: 7 tokens take the Numba products, 48 (about 20 rows per
    expert) the BLAS paths, here nested in the tasks. Routing weights spread over 2^28 make the order of
    the fp32 additions show."""
    rng = np.random.default_rng(tokens)
    w, flat, ids = _routed_tokens(rng, prec, tokens)
    weights = (2.0 ** rng.uniform(-26, 2, ids.shape)).astype(flat.dtype)
    in_turn = K.expert_sum(flat, ids, weights, w, TINY, prec, "current")
    monkeypatch.setattr(K, "EXPERT_TASK_MIN", 0)
    tasks = K.expert_sum(flat, ids, weights, w, TINY, prec, "current")
    assert tasks.dtype == in_turn.dtype and np.array_equal(tasks, in_turn)
    if prec == "mirror":
        assert np.array_equal(tasks, expert_sum.spec(flat, ids, weights, w, TINY, prec, "current"))


def test_a_failing_expert_task_raises_and_leaves_the_pool_usable(monkeypatch):
    """An error inside one expert's task is raised by expert_sum (the other tasks finished or dropped), and the
    next call runs normally."""
    rng = np.random.default_rng(1)
    w = _moe_weights(rng, 4, 256, 128)
    flat = round_bf16(rng.standard_normal((20, 256)))
    ids = np.stack([rng.choice(4, 2, replace=False) for _ in range(20)]).astype(np.int64)
    weights = np.ones(ids.shape, np.float32)
    monkeypatch.setattr(K, "EXPERT_TASK_MIN", 0)
    good = K.expert_sum(flat, ids, weights, w, TINY, "mirror", "current")
    real = K._expert

    def flaky(xq, ew, *args):
        if ew is w.experts[2]:
            raise ValueError("expert 2 failed")
        return real(xq, ew, *args)
    monkeypatch.setattr(K, "_expert", flaky)
    with pytest.raises(ValueError, match="expert 2 failed"):
        K.expert_sum(flat, ids, weights, w, TINY, "mirror", "current")
    monkeypatch.setattr(K, "_expert", real)
    assert np.array_equal(K.expert_sum(flat, ids, weights, w, TINY, "mirror", "current"), good)


def test_expert_sum_refuses_mismatched_routing():
    rng = np.random.default_rng(0)
    w = _moe_weights(rng, 2, 128, 128)
    with pytest.raises(ValueError, match="do not match"):
        K.expert_sum(np.zeros((3, 128), np.float32), np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32),
                     w, TINY, "mirror", "current")


@pytest.mark.parametrize("prec", ["mirror", "float64"])
def test_tiny_model_with_these_kernels_matches_the_spec(tiny_ckpt, prec):
    """Logits and every trace site of a 24-token forward (prefill + MTP), kernels vs spec."""
    tokens = np.random.default_rng(5).integers(2, TINY.vocab_size, 24)
    runs = {}
    for kernels in ("numpy", MINE):
        model = refimpl.load(tiny_ckpt, precision=prec, kernels=kernels)
        trace = Trace()
        logits = model.forward(tokens, trace=trace)
        runs[kernels] = (logits, trace.tensors)
    (ls, ts), (lk, tk) = runs["numpy"], runs[MINE]
    assert ts.keys() == tk.keys() and len(ts) > 100
    for name in ts:
        a, b = ts[name], tk[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if prec == "mirror" or a.dtype.kind != "f":
            assert np.array_equal(a, b), name                     # no boundary case on these inputs
        else:                                                      # -inf where an entry is hidden (indexer scores)
            fin = np.isfinite(a)
            assert np.array_equal(fin, np.isfinite(b)) and np.array_equal(a[~fin], b[~fin]), name
            assert np.abs(a[fin] - b[fin]).max(initial=0) <= 1e-12 * np.abs(a[fin]).max(initial=1e-300), name
    if prec == "mirror":
        assert np.array_equal(ls, lk)
    else:
        assert np.abs(ls - lk).max() <= 1e-12 * np.abs(ls).max()


@pytest.mark.parametrize("weights", [False, True])
def test_replay_with_these_kernels_matches_the_spec(tiny_ckpt, weights):
    """Forced routing (oracle/replay.py) from a spec trace: the kernel path replays to the spec's bits (mirror)."""
    from refimpl.oracle.replay import Replay
    from refimpl.oracle.trace import run_trace
    tokens = np.random.default_rng(6).integers(2, TINY.vocab_size, 20)
    spec_model = refimpl.load(tiny_ckpt, precision="mirror")
    ref = run_trace(spec_model, tokens)
    runs = [run_trace(m, tokens, replay=Replay.from_tensors(ref.tensors, weights=weights, tokens=tokens))
            for m in (spec_model, refimpl.load(tiny_ckpt, precision="mirror", kernels=MINE))]
    assert runs[0].tensors.keys() == runs[1].tensors.keys()
    for name, a in runs[0].tensors.items():
        assert np.array_equal(a, runs[1].tensors[name]), name


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), a=st.integers(1, 6), prec=st.sampled_from(["mirror", "float64", "float32"]),
       revision=st.sampled_from(["current", "initial"]), parallel=st.booleans())
def test_one_token_path_is_the_general_path_bit_for_bit(seed, a, prec, revision, parallel):
    """A decode step's expert_sum (w1/w3 of every selected expert in one matvec_many call, w2 in another,
    SwiGLU on all rows at once) gives the bits of the expert-by-expert path, with routing weights spread
    over 2^28 so that the order of the fp32 additions shows; in mirror also the spec's."""
    import refimpl.kernels.linear as KL
    rng = np.random.default_rng(seed)
    e, c, f = 8, 256, 128
    w = _moe_weights(rng, e, c, f)
    flat = round_bf16(rng.standard_normal((1, c)))
    if prec == "float64":
        flat = flat.astype(np.float64)
    ids = rng.choice(e, a, replace=False)[None].astype(np.int64)
    weights = (2.0 ** rng.uniform(-26, 2, (1, a))).astype(flat.dtype)
    before = KL.PARALLEL_MIN
    KL.PARALLEL_MIN = 0 if parallel else before
    try:
        taken = K._one_token(K._rows(K.act_fp8(flat, prec), c, "t"), ids[0], weights[0], w, TINY, prec, revision)
        ky = K.expert_sum(flat, ids, weights, w, TINY, prec, revision)
    finally:
        KL.PARALLEL_MIN = before
    general = K._one_token
    try:
        K._one_token = lambda *args: None
        gy = K.expert_sum(flat, ids, weights, w, TINY, prec, revision)
    finally:
        K._one_token = general
    assert taken is not None and np.array_equal(taken, ky)
    assert ky.dtype == gy.dtype and np.array_equal(ky.view(np.uint8), gy.view(np.uint8))
    if prec == "mirror":
        assert np.array_equal(ky, expert_sum.spec(flat, ids, weights, w, TINY, prec, revision))


def test_one_token_path_leaves_repeated_ids_and_nan_codes_to_the_general_path():
    rng = np.random.default_rng(4)
    w = _moe_weights(rng, 4, 128, 128)
    flat = round_bf16(rng.standard_normal((1, 128)))
    xq = K._rows(K.act_fp8(flat, "mirror"), 128, "t")
    assert K._one_token(xq, np.zeros(0, np.int64), np.zeros(0, np.float32), w, TINY, "mirror", "current") is None
    ids, weights = np.array([[2, 2]], np.int64), np.ones((1, 2), np.float32)
    assert K._one_token(xq, ids[0], weights[0], w, TINY, "mirror", "current") is None
    assert np.array_equal(K.expert_sum(flat, ids, weights, w, TINY, "mirror", "current"),
                          expert_sum.spec(flat, ids, weights, w, TINY, "mirror", "current"))
    sv = np.array(w.shared.w2.values)
    sv.view(np.uint8)[3, 5] = 0x7F                                 # an e4m3fn NaN code in the shared expert
    shared = ExpertWeights(w1=w.shared.w1, w2=type(w.shared.w2)(sv, w.shared.w2.scale), w3=w.shared.w3)
    wn = MoEWeights(gate=w.gate, experts=w.experts, shared=shared)
    ids = np.array([[3, 0]], np.int64)
    assert K._one_token(xq, ids[0], weights[0], wn, TINY, "mirror", "current") is None
    ky = K.expert_sum(flat, ids, weights, wn, TINY, "mirror", "current")
    sy = expert_sum.spec(flat, ids, weights, wn, TINY, "mirror", "current")
    assert np.isnan(sy).any() and np.array_equal(np.isnan(ky), np.isnan(sy)) and np.array_equal(ky[~np.isnan(sy)], sy[~np.isnan(sy)])
