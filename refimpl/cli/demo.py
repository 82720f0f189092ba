"""`refimpl demo`: the README's main job on the built-in tiny model.

Makes (or reuses) the tiny random-weight checkpoint with its tokenizer, encodes a chat message
with the DeepSeek V4 encoding, prefills, decodes a few tokens greedily (checking that the decoded
logits equal a one-shot prefill of the same tokens), prints them with timings, and writes a trace.
The model runs with the canonical index layout, under which decode == prefill holds bit for bit in
mirror as in float64 (with the official layout, mirror's decode and prefill may differ in the last
bits, as the official code's do; docs/architecture.md §15).
"""
from __future__ import annotations

import time
from pathlib import Path

DEMO_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def ensure_tiny_checkpoint(path: Path, *, seed: int = 0) -> tuple[Path, bool]:
    """The tiny checkpoint at path: reused if it is a valid tiny checkpoint, else written. -> (path, made)."""
    from refimpl.config import Config
    from refimpl.synthetic.writer import make_checkpoint
    from refimpl.formats.weights import validate
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        try:
            if Config.from_checkpoint(path) == Config.tiny() and not validate(path, Config.tiny()):
                return path, False
        except ValueError:
            pass
    make_checkpoint(Config.tiny(), path, seed=seed, overwrite=True)
    return path, True


def run_demo(path: Path, *, max_new_tokens: int = 8, precision: str = "mirror") -> int:
    from refimpl.formats.encoding import encode_messages
    from refimpl.generate import generate
    from refimpl.formats.weights import load
    from refimpl.formats.tokenizer import Tokenizer
    from refimpl.oracle.trace import run_trace

    t0 = time.perf_counter()
    path, made = ensure_tiny_checkpoint(Path(path))
    print(f"checkpoint  {path} ({'written' if made else 'reused'}, {time.perf_counter() - t0:.2f} s)")
    model = load(path, precision=precision, layout="canonical")
    tok = Tokenizer.from_checkpoint(path)
    prompt = encode_messages(DEMO_MESSAGES, thinking_mode="chat")
    ids = tok.encode(prompt)
    print(f"prompt      {prompt!r}")
    print(f"            {len(ids)} tokens, precision {precision}, layout canonical")

    g = generate(model, ids, max_new_tokens=max_new_tokens, stop_on_eos=False)
    print(f"prefill     {g.prefill_s * 1000:.0f} ms ({len(ids)} tokens)")
    print(f"decode      {g.ms_per_token:.1f} ms/token over {len(g.decode_s)} steps")
    print(f"tokens      {g.tokens}")
    print(f"text        {tok.decode(g.tokens)!r}   (random weights: the text is noise)")

    # decode == prefill: the same tokens in one prefill give the same logits at every position
    seq = ids + g.tokens
    trace = run_trace(model, seq[:-1], patterns=("embed", "layers.*.out", "layers.*.attn.indexer.topk",
                                                   "final.x", "logits"))
    full = trace.tensors["logits"]                                  # [s, v]
    greedy = [int(t) for t in full[len(ids) - 1:].argmax(-1)]
    ok = greedy == g.tokens
    print(f"check       one-shot prefill reproduces every decoded token: {'yes' if ok else 'NO'}")
    out = path / "demo_trace.safetensors"
    trace.save(out)
    print(f"trace       {out} ({len(trace.tensors)} sites)")
    print(f"total       {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
