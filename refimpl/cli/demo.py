"""`refimpl demo`: the README's main job on the built-in tiny model.

Makes (or reuses) the tiny random-weight checkpoint with its tokenizer, encodes a chat message
with the DeepSeek V4 encoding, prefills, decodes a few tokens greedily (checking that the decoded
logits equal a one-shot prefill of the same tokens), prints them with timings, and writes a trace.
The model runs with the canonical index layout, under which decode == prefill holds bit for bit in
mirror as in float64 (with the official layout, mirror's decode and prefill may differ in the last
bits, as the official code's do; docs/architecture.md §15).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


DEMO_MARKER = "written_by_refimpl_demo.txt"      # the demo replaces only a folder holding this file
DEMO_TRACE = "demo_trace.safetensors"
MARKER_TEXT = ("This folder was written by `refimpl demo`: a tiny random-weight checkpoint. The demo reuses it,\n"
               "or rewrites it when it is no longer valid; delete the folder to remove it.\n")


def ensure_tiny_checkpoint(path: Path, *, seed: int = 0) -> tuple[Path, bool]:
    """The tiny checkpoint at path: reused if valid, else written. -> (path, made).

    Written only where nothing can be lost: a missing path (its parent folders are made), an empty
    folder, or a folder the demo wrote (it holds DEMO_MARKER and only checkpoint files) that is
    no longer a valid tiny checkpoint. A valid tiny checkpoint without the marker (written by
    `refimpl make-checkpoint tiny`) is reused as it is. Anything else (another folder, a file, a
    symbolic link) is refused with a FileError; nothing is deleted.
    """
    from refimpl.config import Config
    from refimpl.formats.files import FileError, check_output_path
    from refimpl.synthetic.writer import foreign_entries, make_checkpoint
    path, exists = check_output_path(Path(path), folder=True) if os.path.lexists(path) else (Path(path), False)
    ours = exists and (path / DEMO_MARKER).is_file() and not foreign_entries(path, (DEMO_MARKER, DEMO_TRACE))
    if exists and any(path.iterdir()):
        if _valid_tiny(path):
            return path, False
        if not ours:
            raise FileError(f"{path}: not a folder written by `refimpl demo` (no {DEMO_MARKER}, or other files "
                            "in it) nor a valid tiny checkpoint; the demo writes only into a new or empty folder "
                            "(choose another --dir, or delete this one yourself)")
    if not exists:
        path.parent.mkdir(parents=True, exist_ok=True)
    make_checkpoint(Config.tiny(), path, seed=seed, overwrite=ours, extra_files={DEMO_MARKER: MARKER_TEXT},
                    also=(DEMO_TRACE,))
    return path, True


def _demo_trace(path: Path) -> bool:
    """Whether path is a trace file an earlier `refimpl demo` wrote (its metadata says so)."""
    import json
    from refimpl.formats.checkpoint import read_header
    try:
        _, meta, _ = read_header(path)
        return path.is_file() and not path.is_symlink() and \
            json.loads(meta.get("refimpl", "{}")).get("written_by") == "refimpl demo"
    except (ValueError, OSError, AttributeError):
        return False


def _valid_tiny(path: Path) -> bool:
    """Whether path is a complete tiny checkpoint with its tokenizer (config, tensors and scales checked)."""
    from refimpl.config import Config
    from refimpl.formats.weights import validate
    if not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()
            and (path / "tokenizer_config.json").is_file()):
        return False
    try:
        from refimpl.formats.config_file import read_config
        return read_config(path) == Config.tiny() and not validate(path, Config.tiny())
    except ValueError:
        return False


def run_demo(path: Path, *, max_new_tokens: int = 8, precision: str = "mirror", kernels=None) -> int:
    from refimpl.formats.encoding import encode_messages
    from refimpl.generate import generate
    from refimpl.formats.weights import load
    from refimpl.formats.tokenizer import Tokenizer
    from refimpl.oracle.trace import run_trace

    t0 = time.perf_counter()
    path, made = ensure_tiny_checkpoint(Path(path))
    print(f"checkpoint  {path} ({'written' if made else 'reused'}, {time.perf_counter() - t0:.2f} s)")
    model = load(path, precision=precision, layout="canonical", kernels=kernels)
    tok = Tokenizer.from_checkpoint(path)
    prompt = encode_messages(DEMO_MESSAGES, thinking_mode="chat")
    ids = tok.encode(prompt)
    print(f"prompt      {prompt!r}")
    print(f"            {len(ids)} tokens, precision {precision}, layout canonical")
    if str(model.kernels) == "numpy":
        print("kernels     numpy (the spec functions only)")
    else:                                   # a first run compiles the kernels, later runs load them from the cache:
        t1 = time.perf_counter()            # a prefill and a decode step reach every kernel the timings below use
        model.decode(ids[-1], model.prefill(ids[:-1])[1])
        print(f"kernels     {model.kernels}: ready in {time.perf_counter() - t1:.1f} s (a first run compiles them "
              f"for this precision, later runs load them from Numba's cache)")

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
    out = path / DEMO_TRACE
    trace.metadata = dict(trace.metadata, written_by="refimpl demo")
    if os.path.lexists(out) and not _demo_trace(out):               # never replace a file the demo did not write
        print(f"trace       not written: {out} exists and is not a trace the demo wrote")
    else:
        trace.save(out)
        print(f"trace       {out} ({len(trace.tensors)} sites)")
    print(f"total       {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
