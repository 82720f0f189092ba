"""Generation: a sampling loop over Model.prefill / Model.decode. The random generator is an argument.

Samplers (all on the fp32 logits of the last position):
    greedy       argmax (the lowest id wins a tie)
    gumbel       the official sampler: argmax(softmax(logits / T) / Exp(1))  (Gumbel-max trick,
                 official generate.py `sample`, G:L19-24); the same distribution as multinomial
    multinomial  inverse-CDF draw from softmax(logits / T), optionally restricted to the top-p nucleus
temperature 0 means greedy. top_p < 1 keeps the smallest set of most likely tokens whose
probability reaches top_p (ties in probability: the lower id first) and uses `multinomial`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SAMPLERS = ("gumbel", "multinomial")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    sampler: str = "gumbel"           # used when temperature > 0 and top_p == 1

    def __post_init__(self):
        if not (_is_real(self.temperature) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: choose one of {SAMPLERS}")


def _is_real(v) -> bool:
    """An int or float (NumPy's included), not a bool, a str or None."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) in float64. logits [v] -> [v]."""
    z = np.asarray(logits, dtype=np.float64) / max(temperature, 1e-5)   # official: max(T, 1e-5)
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from the logits of one position. logits [v] -> int."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                         f"{type(rng).__name__}")
    if params.temperature == 0:
        return int(np.argmax(logits))
    p = probabilities(logits, params.temperature)                       # [v]
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")                           # most likely first, ties: lower id
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        return _inverse_cdf(q / q.sum(), rng)
    if params.sampler == "gumbel":
        return int(np.argmax(p / rng.exponential(1.0, size=p.shape)))  # official: probs / Exp(1), argmax
    return _inverse_cdf(p, rng)


def _inverse_cdf(p: np.ndarray, rng: np.random.Generator) -> int:
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


@dataclass
class Generation:
    """The result of one generate() call."""
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)       # new tokens (EOS included if it was drawn)
    stopped_on_eos: bool = False
    stopped_at_max_seq_len: bool = False                  # fewer tokens than asked: prompt + tokens fill the context
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)   # seconds per decode step
    state: object = field(default=None, repr=False)

    @property
    def ms_per_token(self) -> float:
        return 1000 * float(np.mean(self.decode_s)) if self.decode_s else float("nan")


def generate(model, prompt: list[int], *, max_new_tokens: int, params: SamplingParams = SamplingParams(),
             seed: int | None = 0, eos_id: int | None = None, stop_on_eos: bool = True,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Prefill the prompt, then sample up to max_new_tokens tokens one decode step at a time.

    The prompt and the new tokens together fit the model's max_seq_len: generation stops there
    (`stopped_at_max_seq_len`), and a prompt longer than max_seq_len is refused.
    """
    if not all(hasattr(model, name) for name in ("cfg", "prefill", "decode")):   # a Model, or one that acts alike
        raise ValueError(f"model must be a refimpl Model (refimpl.load(CKPT)), got {type(model).__name__}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
    if eos_id is not None and not _is_int(eos_id):
        raise ValueError(f"eos_id must be None or an int, got {eos_id!r}")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(stop_on_eos, (bool, np.bool_)):
        raise ValueError(f"stop_on_eos must be True or False, got {stop_on_eos!r:.60}")
    if on_token is not None and not callable(on_token):
        raise ValueError(f"on_token must be None or a function of one token id, got {type(on_token).__name__}")
    if not isinstance(prompt, (list, tuple, range, np.ndarray)):   # a dict or a set is no sequence of ids
        raise ValueError(f"prompt must be a list, tuple or 1-D array of integer token ids, got "
                         f"{type(prompt).__name__} {prompt!r:.60}")
    items = list(prompt) if not isinstance(prompt, np.ndarray) or prompt.ndim == 1 else [prompt]
    bad = [t for t in items if not _is_int(t)]
    if bad:                                                 # never "0152" -> [0, 1, 5, 2], [1.7] -> [1]
        raise ValueError(f"prompt must be a sequence of integer token ids, got {bad[0]!r:.60}")
    prompt = [int(t) for t in items]                        # exact: each is an integer already
    if not prompt:
        raise ValueError("empty prompt: at least one token is needed")
    cfg = model.cfg
    outside = [t for t in prompt if not 0 <= t < cfg.vocab_size]   # checked here too: max_new_tokens=0 runs nothing
    if outside:
        raise ValueError(f"token id {outside[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if len(prompt) > cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds max_seq_len={cfg.max_seq_len}")
    limited = len(prompt) + max_new_tokens > cfg.max_seq_len
    if limited:
        max_new_tokens = cfg.max_seq_len - len(prompt)      # the context ends here (a load option)
    eos_id = cfg.eos_token_id if eos_id is None else eos_id
    rng = np.random.default_rng(seed)
    out = Generation(prompt=prompt, stopped_at_max_seq_len=limited)
    if max_new_tokens == 0:
        return out
    t0 = time.perf_counter()
    logits, state = model.prefill(np.asarray(prompt))
    out.prefill_s = time.perf_counter() - t0
    last = logits[-1]
    for step in range(max_new_tokens):
        tok = sample(last, params, rng)
        out.tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if stop_on_eos and tok == eos_id:
            out.stopped_on_eos, out.stopped_at_max_seq_len = True, False
            break
        if step == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        last, state = model.decode(tok, state)
        out.decode_s.append(time.perf_counter() - t0)
    out.state = state
    return out
