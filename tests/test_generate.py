"""Generation: samplers, seeding, stopping, and agreement with a one-shot forward."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refimpl.generate import SamplingParams, generate, probabilities, sample


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = np.array([0.0, 2.0, 2.0, -1.0], np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)) == 1


@pytest.mark.parametrize("sampler", ["gumbel", "multinomial"])
def test_sampler_matches_softmax_distribution(sampler):
    """Gumbel-max (official G:L19-24) and inverse-CDF draw from softmax(logits / T)."""
    logits = np.array([1.0, 0.0, -1.0, 2.0])
    params = SamplingParams(temperature=0.7, sampler=sampler)
    rng = np.random.default_rng(123)
    n = 20000
    counts = np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=4)
    p = probabilities(logits, 0.7)
    # 5-sigma binomial bound per token
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.7)       # nucleus = {0, 1}
    rng = np.random.default_rng(0)
    drawn = {sample(logits, params, rng) for _ in range(500)}
    assert drawn == {0, 1}


@given(st.floats(-1, 2), st.floats(0.01, 1.5))
def test_bad_sampling_params_are_rejected(t, p):
    if t < 0:
        with pytest.raises(ValueError):
            SamplingParams(temperature=t)
    elif p > 1:
        with pytest.raises(ValueError):
            SamplingParams(top_p=p)
    else:
        SamplingParams(temperature=t, top_p=p)


class _Scripted:
    """A model stub whose logits make a chosen token most likely after each step."""

    def __init__(self, script, vocab=8, eos=1, max_seq_len=100):
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len, eos_token_id=eos, vocab_size=vocab)
        self.script, self.vocab = list(script), vocab

    def _logits(self, step):
        z = np.zeros(self.vocab, np.float32)
        z[self.script[min(step, len(self.script) - 1)]] = 10
        return z

    def prefill(self, tokens):
        return np.stack([self._logits(0)] * len(tokens)), 1

    def decode(self, token, state):
        return self._logits(state), state + 1


def test_stops_on_eos_and_streams_each_token():
    seen = []
    g = generate(_Scripted([5, 6, 1, 7]), [0, 3], max_new_tokens=10, on_token=seen.append)
    assert g.tokens == [5, 6, 1] and g.stopped_on_eos and seen == g.tokens


@pytest.mark.parametrize("max_new_tokens", [0, 1])
def test_ids_outside_the_vocabulary_are_refused_even_with_nothing_to_generate(max_new_tokens):
    with pytest.raises(ValueError, match=r"token id 8 is outside the vocabulary \[0, 8\)"):
        generate(_Scripted([5]), [0, 8], max_new_tokens=max_new_tokens)


def test_max_new_tokens_and_context_limit():
    assert generate(_Scripted([5]), [0], max_new_tokens=4, stop_on_eos=False).tokens == [5] * 4
    assert len(generate(_Scripted([5], max_seq_len=6), [0, 2, 3], max_new_tokens=10).tokens) == 3
    with pytest.raises(ValueError):
        generate(_Scripted([5]), [], max_new_tokens=1)


def test_greedy_generation_equals_one_shot_forward(tiny_model):
    """Each greedy token is the argmax of a one-shot forward over the tokens before it (mirror, canonical layout)."""
    model = tiny_model("mirror", layout="canonical")
    prompt = [0, 17, 256, 900, 31]
    g = generate(model, prompt, max_new_tokens=6, stop_on_eos=False)
    logits = model.forward(np.asarray(prompt + g.tokens[:-1]))
    assert [int(t) for t in logits[len(prompt) - 1:].argmax(-1)] == g.tokens


def test_seeded_sampling_is_reproducible(tiny_model):
    model = tiny_model("float32")
    params = SamplingParams(temperature=1.0)
    a = generate(model, [0, 5, 9], max_new_tokens=5, params=params, seed=7, stop_on_eos=False).tokens
    b = generate(model, [0, 5, 9], max_new_tokens=5, params=params, seed=7, stop_on_eos=False).tokens
    assert a == b


@pytest.mark.parametrize("prompt", [[1.7, 15.2], "0152", [0, True], 5, None, np.array([1.0, 2.0])])
def test_non_integer_prompt_is_refused_not_coerced(prompt):
    with pytest.raises(ValueError, match="integer token ids"):
        generate(_Scripted([5]), prompt, max_new_tokens=1)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 2.5}, {"max_new_tokens": True}, {"max_new_tokens": "3"},
                                    {"max_new_tokens": 1, "seed": 1.5}, {"max_new_tokens": 1, "seed": -1},
                                    {"max_new_tokens": 1, "seed": True}, {"max_new_tokens": 1, "params": 0.5}])
def test_non_integer_counts_and_seeds_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(k for k in kwargs if k != "max_new_tokens"), "max_new_tokens")):
        generate(_Scripted([5]), [0, 3], **kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": "0.7"}, {"temperature": None}, {"temperature": True},
                                    {"temperature": float("inf")}, {"top_p": "1"}, {"top_p": None}])
def test_non_numeric_or_out_of_range_sampling_params_are_clear_errors(kwargs):
    """A ValueError naming the parameter, never a TypeError from a comparison."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt", [{0: 1}, {0, 3}, {"a": 1}.keys(), iter([0, 3])])
def test_a_prompt_that_is_no_sequence_is_refused(prompt):
    """A dict's keys (or a set, an iterator) are not the prompt: refused, not run as [0]."""
    with pytest.raises(ValueError, match="prompt must be a list, tuple or 1-D array"):
        generate(_Scripted([5]), prompt, max_new_tokens=1)
    assert generate(_Scripted([5]), range(2), max_new_tokens=1).prompt == [0, 1]


@pytest.mark.parametrize("call, words", [
    (lambda: generate(None, [0], max_new_tokens=1), "model must be a refimpl Model"),
    (lambda: generate("ckpt", [0], max_new_tokens=1), "got str"),
    (lambda: generate(_Scripted([5]), [0], max_new_tokens=1, on_token=5), "on_token must be None or a function"),
    (lambda: generate(_Scripted([5]), [0], max_new_tokens=1, stop_on_eos="no"), "stop_on_eos must be True or False"),
    (lambda: sample(np.zeros(4), None, np.random.default_rng(0)), "params must be a SamplingParams"),
    (lambda: sample(np.zeros(4), SamplingParams(temperature=1.0), None), "rng must be a numpy.random.Generator"),
])
def test_arguments_of_the_wrong_kind_are_value_errors(call, words):
    """Misuse is a ValueError naming the argument, never an AttributeError or a TypeError from deep inside."""
    with pytest.raises(ValueError, match=words):
        call()


def test_generation_says_it_stopped_at_max_seq_len():
    """Fewer tokens than asked because the context is full: said, not silent; a full prompt gives 0 tokens."""
    g = generate(_Scripted([5], max_seq_len=6), [0, 2, 3], max_new_tokens=10)
    assert g.tokens == [5, 5, 5] and g.stopped_at_max_seq_len and not g.stopped_on_eos
    full = generate(_Scripted([5], max_seq_len=3), [0, 2, 3], max_new_tokens=4)
    assert full.tokens == [] and full.stopped_at_max_seq_len
    exact = generate(_Scripted([5], max_seq_len=6), [0, 2, 3], max_new_tokens=3)
    assert exact.tokens == [5, 5, 5] and not exact.stopped_at_max_seq_len      # all that was asked for
    eos = generate(_Scripted([5, 1], max_seq_len=5), [0, 2, 3], max_new_tokens=4)
    assert eos.tokens == [5, 1] and eos.stopped_on_eos and not eos.stopped_at_max_seq_len
    with pytest.raises(ValueError, match="exceeds max_seq_len=2"):
        generate(_Scripted([5], max_seq_len=2), [0, 2, 3], max_new_tokens=1)
    assert "state" not in repr(g)                          # the result prints as tokens, not as every cached array
