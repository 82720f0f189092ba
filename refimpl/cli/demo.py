"""`refimpl demo`: the README's main job on the built-in tiny model.

Makes (or reuses) the tiny random-weight checkpoint with its tokenizer, encodes a chat message
with the DeepSeek V4 encoding, prefills, decodes a few tokens greedily (checking that the decoded
logits equal a one-shot prefill of the same tokens), prints them with timings, writes a trace and
says what to do next. The model runs with the canonical index layout, under which decode == prefill
holds bit for bit in mirror as in float64 (with the official layout, mirror's decode and prefill may
differ in the last bits, as the official code's do; docs/architecture.md §15).

A first run compiles the Numba kernels (about a minute on 2 cores, once per precision; docs/usage.md,
"Kernels"): the demo runs everything it will time once beforehand, saying so, with progress on a terminal.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

DEMO_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


PRECISION_NOTES = {    # one line each: what the demo's `precision` line means
    "mirror": "rounds where the official code rounds (bf16, FP8, FP4) and computes exactly in between",
    "float32": "the architecture's math in float32 (mirror rounds where the official code rounds)",
    "float64": "the architecture's math, exact (mirror rounds where the official code rounds)",
}


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
    from refimpl.formats.checkpoint import CheckpointError
    from refimpl.formats.files import FileError, check_output_path
    from refimpl.synthetic.writer import foreign_entries, make_checkpoint
    if str(path) == "":                  # Path("") is the current folder
        raise FileError("the demo's folder (--dir) is empty: give a folder name")
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
    try:
        make_checkpoint(Config.tiny(), path, seed=seed, overwrite=ours, extra_files={DEMO_MARKER: MARKER_TEXT},
                        also=(DEMO_TRACE,), progress=False)          # 0.3 s: no progress bar
    except CheckpointError:              # a folder that was missing or empty and is filled now: by whom?
        if ours or not path.is_dir() or path.is_symlink() or not any(path.iterdir()):
            raise
        if _valid_tiny(path):            # another `refimpl demo` wrote it meanwhile: reuse it
            return path, False
        raise FileError(f"{path}: another program wrote into this folder while the demo was making its checkpoint; "
                        "nothing of it was changed (choose another --dir, or empty this one)") from None
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


def run_demo(path, *, max_new_tokens: int = 8, precision: str = "mirror", kernels=None) -> int:
    from refimpl.formats.encoding import encode_messages
    from refimpl.generate import generate
    from refimpl.formats.weights import load
    from refimpl.formats.tokenizer import Tokenizer
    from refimpl.oracle.trace import run_trace

    t0 = time.perf_counter()
    path, made = ensure_tiny_checkpoint(path)
    print(f"checkpoint  {path} ({'written' if made else 'reused'}, {time.perf_counter() - t0:.2f} s): the tiny "
          "model (6 layers, random weights) and its tokenizer")
    model = load(path, precision=precision, layout="canonical", kernels=kernels)
    tok = Tokenizer.from_checkpoint(path)
    prompt = encode_messages(DEMO_MESSAGES, thinking_mode="chat")
    ids = tok.encode(prompt)
    print(f"prompt      {prompt!r} ({len(ids)} tokens)")
    print(f"precision   {precision}: {PRECISION_NOTES[precision]}")
    print("layout      canonical: every call lays out attention's index sets alike, so decode equals prefill "
          "bit for bit")
    seq = ids + [ids[i % len(ids)] for i in range(max_new_tokens - 1)]   # as long as the trace below
    prepare_kernels(model, ids, seq[:model.cfg.max_seq_len])

    g = generate(model, ids, max_new_tokens=max_new_tokens, stop_on_eos=False)
    print(f"prefill     {g.prefill_s * 1000:.0f} ms ({len(ids)} tokens)")
    if g.decode_s:
        print(f"decode      {g.ms_per_token:.1f} ms/token over {len(g.decode_s)} steps")
    print(f"tokens      {g.tokens}")
    print(f"text        {tok.decode(g.tokens)!r}   (random weights: the text is noise)")

    # decode == prefill: the same tokens in one prefill give the same logits at every position
    seq = ids + g.tokens[:-1]
    trace = run_trace(model, seq)
    full = trace.tensors["logits"]                                  # [s, v]
    greedy = [int(t) for t in full[len(ids) - 1:].argmax(-1)]
    ok = greedy == g.tokens
    print(f"check       one-shot prefill reproduces every decoded token: {'yes' if ok else 'NO'}")
    out = path / DEMO_TRACE
    trace.metadata = dict(trace.metadata, written_by="refimpl demo")
    if os.path.lexists(out) and not _demo_trace(out):               # never replace a file the demo did not write
        print(f"trace       not written: {out} exists and is not a trace the demo wrote")
        out = None
    else:
        trace.save(out)
        print(f"trace       {out}: the {len(trace.tensors)} sites (named intermediate tensors, "
              "docs/trace-format.md) of that prefill")
    print(f"total       {time.perf_counter() - t0:.1f} s")
    print(next_steps(path, out, seq, precision))
    return 0 if ok else 1


def prepare_kernels(model, ids: list[int], seq: list[int]) -> None:
    """Run once what the demo times and traces, so that a first run compiles every kernel here, saying so.

    A prefill and a decode step, then a forward pass with the MTP block as long as the trace (the
    products choose their kernel by the number of rows).
    """
    if str(model.kernels) == "numpy":
        print("kernels     numpy: the NumPy spec functions only, nothing to compile")
        return
    t = time.perf_counter()
    with Compiling(model.precision) as compiling:
        model.decode(ids[-1], model.prefill(ids[:-1])[1])
        model.forward(seq, mtp=True)
    took = time.perf_counter() - t
    if compiling.kernels:
        print(f"kernels     {model.kernels}: compiled {compiling.kernels} kernels in {took:.1f} s, into Numba's cache "
              "(the next run loads them in a second or so)")
    else:
        print(f"kernels     {model.kernels}: loaded from Numba's cache in {took:.1f} s")


class Compiling:
    """Reports Numba compiling kernels while the block runs: a line at the first compile, then on a
    terminal one line kept up to date (kernels compiled, seconds, the one compiling now)."""

    def __init__(self, precision: str, out=None):
        self.precision, self.out = precision, out or sys.stdout
        self.kernels, self.depth, self.name, self.t0 = 0, 0, "", None
        self.live = self.out.isatty()

    def __enter__(self):
        from numba.core import event
        report = self

        class Listener(event.Listener):          # numba's compile events nest: a kernel, then what it calls
            def on_start(self, ev):
                report.started(ev.data["dispatcher"].py_func.__name__)

            def on_end(self, ev):
                report.depth -= 1
        self.listening = event.install_listener("numba:compile", Listener())
        self.listening.__enter__()
        return self

    def __exit__(self, *exc):
        self.listening.__exit__(*exc)
        if self.live and self.t0 is not None:
            self.out.write("\r\033[K")                               # clear the progress line
            self.out.flush()

    def started(self, name: str) -> None:
        self.depth += 1
        if self.t0 is None:
            self.t0 = time.perf_counter()
            print(f"kernels     compiling the Numba kernels for {self.precision}: the first run only, up to about a "
                  "minute on 2 cores", file=self.out, flush=True)
        if self.depth == 1:
            self.kernels += 1
            self.name = name.lstrip("_")
        if self.live:                                                  # each nested event moves the clock on
            self.out.write(f"\r\033[K            compiling kernel {self.kernels}: {self.name} "
                           f"({time.perf_counter() - self.t0:.0f} s so far)")
            self.out.flush()


def next_steps(path: Path, trace, seq: list[int], precision: str) -> str:
    """The last lines: compare the trace with another precision's (the commands run as printed), run the tests."""
    steps = []
    if trace is not None:
        other = "float64" if precision != "float64" else "mirror"
        mine = shlex.quote(f"{other}.safetensors")
        steps += [f"compare {precision} with {other} on the same tokens, site by site (docs/compare.md):",
                  f"  refimpl trace {shlex.quote(str(path))} --tokens {','.join(map(str, seq))} --precision {other} "
                  f"--layout canonical --out {mine}",
                  f"  refimpl compare {shlex.quote(str(trace))} {mine}"]
    steps.append("run the tests:  pip install '.[test]' && python -m pytest   (README.md)")
    return "\n".join(("next        " if i == 0 else " " * 12) + step for i, step in enumerate(steps))
