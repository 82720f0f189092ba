"""The whole model's gradients: the forward they differentiate is refimpl's, and they agree with finite differences.

The loss of the whole-model checks is the main head's cross-entropy plus the MTP head's, on drawn
targets, so that every parameter and site is reached. Each parameter (each site) is checked along
a drawn direction over the whole tensor: a central difference of the loss against Σ grad ⊙ U
(refimpl/grad/check.py states the tolerance). A step that changes a discrete choice (router,
indexer, clamp) is detected and a new direction drawn. The default run samples; `-m slow` checks
every parameter and every site, on a sequence long enough for the indexer to drop entries.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.grad import GradError, backward, backward_from, cross_entropy, forward, params_of, run_context
from refimpl.grad.check import NearTie, agrees, choices, directional
from refimpl.oracle.trace import Trace
from refimpl.sites import site_names


class Case:
    """One sequence, its targets, the float64 forward and the gradients of main + MTP cross-entropy."""

    def __init__(self, model, s: int, seed: int):
        rng = np.random.default_rng(seed)
        v = model.cfg.vocab_size
        self.ids = rng.integers(0, v, (1, s))
        self.targets, self.mtp_targets = rng.integers(0, v, (1, s)), rng.integers(0, v, (1, s - 1))
        self.P, self.ctx = params_of(model.weights, model.cfg), run_context(model.cfg)
        self.tape = forward(self.P, self.ids, self.ctx)
        _, d1 = cross_entropy(self.tape.logits, self.targets)
        _, d2 = cross_entropy(self.tape.mtp_logits, self.mtp_targets)
        self.params, self.sites = backward_from(self.tape, self.P, self.ctx, d1, d2)
        self.base = choices(self.tape, self.P, self.ctx)

    def loss(self, tape) -> float:
        return cross_entropy(tape.logits, self.targets)[0] + cross_entropy(tape.mtp_logits, self.mtp_targets)[0]

    def check(self, name: str, seed: int, tries: int = 3):
        """Directional check of a parameter or a "grad.<site>"; returns (fd, analytic), or None after near-ties only."""
        rng = np.random.default_rng(seed)
        for _ in range(tries):
            if name.startswith("grad."):
                u = rng.standard_normal(self.tape.sites[name[5:]].shape)
                kw, an = {"site": name[5:]}, float(np.sum(self.sites[name] * u))
            else:
                a = self.P[name]
                u = rng.standard_normal(a.shape) * (np.sqrt(np.mean(a * a)) or 1.0)
                kw, an = {"param": name}, float(np.sum(self.params[name] * u))
            try:
                return directional(self.loss, self.P, self.ids, self.ctx, direction=u, base=self.base, **kw), an
            except NearTie:
                continue
        return None


_CASES = {}


def case(tiny_model, s=24, seed=0) -> Case:
    if (s, seed) not in _CASES:
        _CASES[(s, seed)] = Case(tiny_model("float64", kernels="numpy"), s, seed)
    return _CASES[(s, seed)]


def differentiable_sites(cfg) -> list[str]:
    skip = (".indexer.", ".gate_scores", ".expert_ids")             # integer choices, or scores that only choose
    return [f"grad.{n}" for n in site_names(cfg) if not any(k in n for k in skip)]


def test_the_forward_is_refimpls_float64_forward_bit_for_bit(tiny_model):
    c = case(tiny_model)
    model = tiny_model("float64", kernels="numpy")
    trace = Trace()
    logits, mtp_logits = model.forward(c.ids[0], trace=trace, mtp=True)
    assert np.array_equal(c.tape.logits[0], logits) and np.array_equal(c.tape.mtp_logits[0], mtp_logits)
    shared = [n for n in trace.tensors if n in c.tape.sites]
    assert len(shared) == len(differentiable_sites(model.cfg))
    for name in shared:
        assert np.array_equal(c.tape.sites[name][0], trace.tensors[name]), name


def test_every_site_and_parameter_has_a_gradient(tiny_model):
    c = case(tiny_model)
    assert sorted(c.sites) == sorted(differentiable_sites(c.ctx.cfg))
    assert c.params.keys() == c.P.arrays.keys()
    for name, g in c.params.items():
        assert g.shape == c.P[name].shape and np.isfinite(g).all(), name


@given(st.data())
@settings(max_examples=4)
def test_whole_model_gradients_agree_with_finite_differences(tiny_model, data):
    """A drawn parameter and a drawn site of the tiny model per example (all of them: the slow test below)."""
    c = case(tiny_model)
    for name in (data.draw(st.sampled_from(sorted(c.params))), data.draw(st.sampled_from(sorted(c.sites)))):
        got = c.check(name, data.draw(st.integers(0, 2**32 - 1)))
        assert got is not None and agrees(*got), (name, got)


@pytest.mark.slow
@pytest.mark.parametrize("s", [24, 80])
def test_every_gradient_of_the_tiny_model_agrees_with_finite_differences(tiny_model, s):
    """s = 80: the indexer keeps 16 of 20 entries, so the gradient flows through a real selection."""
    c = case(tiny_model, s=s, seed=1)
    bad, ties = [], []
    for i, name in enumerate(sorted(c.params) + sorted(c.sites)):
        got = c.check(name, i)
        if got is None:
            ties.append(name)
        elif not agrees(*got):
            bad.append((name, got))
    assert not bad, bad[:5]
    assert len(ties) <= 2, ties


def test_what_only_chooses_gets_nothing(tiny_model):
    """The indexer's weights and the router's bias only choose: under the LM loss their gradient is exactly 0."""
    c = case(tiny_model)
    chooses = [n for n in c.params if ".indexer." in n or n.endswith("ffn.gate.bias")]
    assert len(chooses) > 10
    assert all(not c.params[n].any() for n in chooses)
    hashed = c.params["layers.0.ffn.gate.weight"]                   # a hash layer: its scores still weigh
    assert hashed.any()
    used = {int(e) for e in np.unique(c.tape.blocks[3]["ffn"]["ids"])}
    for e in range(c.ctx.cfg.n_routed_experts):
        assert c.params[f"layers.3.ffn.experts.{e}.w1.weight"].any() == (e in used)


def test_cross_entropy_hand_worked():
    logits = np.log(np.array([[[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]]))     # softmax rows (1/4, 1/2, 1/4), (1/3,)*3
    loss, d = cross_entropy(logits, np.array([[1, -1]]))
    assert loss == pytest.approx(np.log(2))
    assert np.allclose(d, [[[0.25, -0.5, 0.25], [0, 0, 0]]])
    loss, d = cross_entropy(logits, np.array([[0, 2]]))
    assert loss == pytest.approx((np.log(4) + np.log(3)) / 2)
    assert np.allclose(d[0, 1], np.array([1 / 3, 1 / 3, -2 / 3]) / 2)


def test_api_main_and_mtp_losses_separately(tiny_model):
    """backward() per head; the two losses' gradients add up to those of their sum (the Case's loss)."""
    model = tiny_model("float64", kernels="numpy")
    c = case(tiny_model)
    ids, t, t2 = c.ids[0], c.targets[0], c.mtp_targets[0]
    main, mtp = backward(model, ids, t), backward(model, ids, mtp_targets=t2)
    for name in ("layers.0.attn.wq_a.weight", "embed.weight", "head.weight", "mtp.0.e_proj.weight"):
        assert np.allclose(c.params[name], main.params[name] + mtp.params[name], rtol=1e-12, atol=1e-15), name
    assert not main.params["mtp.0.e_proj.weight"].any() and "grad.mtp.logits" not in main.sites
    assert mtp.params["layers.0.attn.wq_a.weight"].any()           # the MTP loss reaches the main model
    assert main.loss == pytest.approx(cross_entropy(c.tape.logits, c.targets)[0], rel=1e-14)
    assert main.mtp_loss is None and mtp.loss is None
    # an upstream gradient for the logits gives the same numbers as the loss that produces it
    _, d1 = cross_entropy(c.tape.logits, c.targets)
    params, sites = backward_from(c.tape, c.P, c.ctx, d1, None)
    assert np.array_equal(params["layers.2.attn.compressor.wkv.weight"], main.params["layers.2.attn.compressor.wkv.weight"])
    assert np.array_equal(sites["grad.embed"][0], main.sites["grad.embed"])
    assert main.sites["grad.embed"].shape == (ids.shape[0], model.cfg.dim)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to differentiate"),
    ({"targets": [1, 2]}, "must be 24 integers"),
    ({"targets": [5000] * 24}, "neither a token id"),
    ({"targets": [-1] * 24}, "every target is -1"),
    ({"targets": [0.5] * 24}, "must be integers"),
    ({"dlogits": np.zeros((3, 3))}, "finite real array of shape"),
    ({"dlogits": np.full((24, 1280), np.nan)}, "finite real array"),
    ({"targets": [1] * 24, "dlogits": np.zeros((24, 1280))}, "not both"),
])
def test_bad_arguments_are_refused_with_a_message(tiny_model, kwargs, message):
    model = tiny_model("float64", kernels="numpy")
    with pytest.raises(GradError, match=message):
        backward(model, list(range(24)), **kwargs)


def test_a_model_of_another_kind_is_refused():
    with pytest.raises(GradError, match="refimpl Model or a checkpoint folder"):
        backward(object(), [1, 2], [2, 3])


@st.composite
def small_configs(draw):
    """Small configurations keeping the structure: window, CSA (ratio 4, an indexer choosing top-k), HCA, hash and
    score routing, 1-3 streams, few Sinkhorn iterations, a short window and top-k that short sequences cross."""
    from refimpl.config import Config
    layers = draw(st.integers(1, 2))
    ratios = tuple(draw(st.sampled_from([0, 4, 16])) for _ in range(layers)) + (draw(st.sampled_from([0, 4])),)
    experts = draw(st.integers(2, 4))
    return Config.tiny().replace(
        n_layers=layers, compress_ratios=ratios, n_hash_layers=draw(st.integers(0, layers)),
        n_routed_experts=experts, n_activated_experts=draw(st.integers(1, 2)), window_size=draw(st.integers(2, 8)),
        index_topk=draw(st.integers(1, 3)), hc_mult=draw(st.integers(1, 3)), hc_sinkhorn_iters=draw(st.integers(1, 5)),
        n_heads=2, o_groups=draw(st.sampled_from([1, 2])), vocab_size=300, index_n_heads=2)


@given(small_configs(), st.integers(6, 20), st.integers(0, 2**32 - 1), st.data())
@settings(max_examples=2)
def test_drawn_small_models_agree_with_finite_differences(cfg, s, seed, data):
    """A drawn configuration's random checkpoint: its forward is refimpl's, and a drawn parameter and site per
    example agree with central differences (the slow run: every parameter and site of a few drawn models)."""
    check_small_model(cfg, s, seed, lambda names: [data.draw(st.sampled_from(names))])


@pytest.mark.slow
@given(small_configs(), st.integers(6, 24), st.integers(0, 2**32 - 1))
@settings(max_examples=6)
def test_drawn_small_models_every_gradient(cfg, s, seed):
    check_small_model(cfg, s, seed, lambda names: names)


def check_small_model(cfg, s, seed, pick):
    import tempfile
    from refimpl.formats.weights import load
    from refimpl.synthetic.writer import make_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(cfg, f"{tmp}/m", seed=seed % 1000)
        model = load(f"{tmp}/m", precision="float64", kernels="numpy")
        c = Case(model, s, seed)
        logits, mtp_logits = model.forward(c.ids[0], mtp=True)
        assert np.array_equal(c.tape.logits[0], logits) and np.array_equal(c.tape.mtp_logits[0], mtp_logits)
        names = pick(sorted(c.params)) + pick(sorted(c.sites))
        for i, name in enumerate(names):
            got = c.check(name, seed + i)
            assert got is None or agrees(*got), (name, got)


def test_a_step_across_a_router_tie_is_detected(tiny_model):
    """Plant a near-tie: move layer 3's bias so that a token's a-th and (a+1)-th experts are 1e-9 apart; a finite
    difference along the bias would jump across the selection, and `directional` refuses it (NearTie)."""
    c = case(tiny_model)
    cfg, name = c.ctx.cfg, "layers.3.ffn.gate.bias"
    x = c.tape.blocks[3]["ffn"]["x"][0, 0].astype(np.float64)              # token 0's MoE input
    biased = np.sqrt(np.logaddexp(0, c.P["layers.3.ffn.gate.weight"] @ x)) + c.P[name]
    order = np.argsort(-biased, kind="stable")
    inside, outside = order[cfg.n_activated_experts - 1], order[cfg.n_activated_experts]
    bias = c.P[name].copy()
    bias[outside] += biased[inside] - biased[outside] - 1e-9               # just below the last chosen one
    P = c.P.replace({name: bias})
    tape = forward(P, c.ids, c.ctx)
    assert tape.blocks[3]["ffn"]["ids"][0, 0].tolist() == c.tape.blocks[3]["ffn"]["ids"][0, 0].tolist()
    u = np.zeros_like(bias)
    u[outside] = 1.0
    with pytest.raises(NearTie, match="3.ids"):
        directional(c.loss, P, c.ids, c.ctx, param=name, direction=u, base=choices(tape, P, c.ctx))


def test_gradients_through_a_binding_clamp(tiny_model):
    """swiglu_limit 2 (the golden set's prefill-4-swiglu-limit-2): the clamp binds in routed and shared experts, and
    the gradients (subgradient 0 where it holds) still agree with finite differences away from its edges."""
    from refimpl.model.transformer import Model
    base = tiny_model("float64", kernels="numpy")
    model = Model(base.cfg.replace(swiglu_limit=2.0), base.weights, precision="float64", kernels="numpy")
    c = Case(model, 12, seed=2)
    held = {k: v for k, v in c.base.items() if k.endswith(".clamp")}
    assert any(v[1:].any() for k, v in held.items() if ".experts." in k)        # up beyond ±2 in a routed expert
    assert any(v[1:].any() for k, v in held.items() if "shared" in k)
    used = sorted({int(e) for e in np.unique(c.tape.blocks[4]["ffn"]["ids"])})
    for i, name in enumerate([f"layers.4.ffn.experts.{used[0]}.w3.weight", "layers.4.ffn.shared_experts.w1.weight",
                              "layers.4.ffn.gate.weight", "grad.layers.4.ffn.expert_weights", "grad.layers.1.out"]):
        got = c.check(name, i)
        assert got is not None and agrees(*got), (name, got)
