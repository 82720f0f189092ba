"""The `refimpl` command: thin subcommands over library functions (every one has --help).

Exit codes (README "Files and exit codes"): 0 success; 1 a refused input or a failed check (every
refimpl error is a ValueError subclass, and OS errors: one line `error: ...` on stderr); 2 a usage
error (argparse: an unknown option, a malformed flag value; one line too); 130 Ctrl-C and 143
SIGTERM, with no traceback and nothing half-written (outputs go through `formats.files`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_DEMO_DIR = Path.home() / ".cache" / "refimpl" / "tiny"
MAX_CHAT_BYTES = 8 << 20          # --chat / encode: a 1M-token context is about 4 MB of text
MAX_COMPLETION_BYTES = 8 << 20    # parse


class Terminated(BaseException):
    """SIGTERM, raised where the program stands so that temporaries are removed on the way out."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other error of the command."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number(text: str, *, integer: bool = False) -> int | float | None:
    """The one parser of every numeric flag: a number in ASCII decimal (an int if integer, else a finite
    float), else None. int() and float() alone also take '1_0' and non-ASCII digits, float() 'nan' and 'inf'."""
    text = text.strip()
    if not (_INTEGER if integer else _DECIMAL).fullmatch(text):
        return None
    if integer:
        return int(text)
    v = float(text)
    return v if math.isfinite(v) else None         # '1e999' overflows to inf


def _ids(text: str) -> list[int]:
    """--tokens: comma-separated integers (argparse type)."""
    parts = [_number(t, integer=True) for t in text.split(",")]
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give comma-separated token ids, e.g. 0,15,27")
    if None in parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text[:100]!r}")
    return parts


def _chunks(text: str) -> list[int]:
    """--chunks: comma-separated positive integers (argparse type)."""
    sizes = [_number(t, integer=True) for t in text.split(",")]
    if None in sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text[:100]!r}")
    return sizes


def _patterns(text: str) -> tuple[str, ...]:
    """--sites: comma-separated glob patterns, none of them empty (argparse type)."""
    parts = tuple(text.split(","))
    if not all(parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated site patterns, none empty (e.g. "
                                         f"'layers.*.attn.q,logits'), got {text[:100]!r}")
    return parts


def _path(text: str) -> str:
    """A file or folder argument: not empty (Path('') is the current folder, taken silently)."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def _at_least(lo: int):
    """argparse type: an integer >= lo."""
    def parse(text: str) -> int:
        n = _number(text, integer=True)
        if n is None or n < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text[:100]!r}")
        return n
    return parse


def _temperature(text: str) -> float:
    """--temperature: a finite number >= 0 (argparse reports a bad value as a usage error, exit 2)."""
    v = _number(text)
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite decimal number >= 0 (0 = greedy), got {text[:100]!r}")
    return v


def _top_p(text: str) -> float:
    """--top-p: a decimal number in (0, 1]."""
    v = _number(text)
    if v is None or not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a decimal number in (0, 1], got {text[:100]!r}")
    return v


def _rtol(text: str) -> float:
    v = _number(text)
    if v is None or not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text[:40]!r}")
    return float(v)


def _folder(text: str) -> str:
    """--dir: a folder name (argparse type: '' would be taken as the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a folder")
    return text


def _kernels(text: str):
    """--kernels or $REFIMPL_KERNELS: a kernel selection (argparse type). One it cannot make (malformed, or a
    backend this machine cannot run) is a usage error, exit 2, from either source."""
    from refimpl.ops import KernelError, parse_kernels
    import refimpl.model.transformer  # noqa: F401  (registers the swappable operations)
    try:
        return parse_kernels(text)
    except KernelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _max_seq_len(text: str) -> int:
    """--max-seq-len: an integer in the range Config allows (argparse type: the flag is named)."""
    from refimpl.config import FIELD_RANGES
    lo, hi = FIELD_RANGES["max_seq_len"]
    n = _at_least(lo)(text)
    if n > hi:
        raise argparse.ArgumentTypeError(f"must be an integer between {lo} and {hi}, got {text[:100]!r}")
    return n


# ---------------------------------------------------------------- checkpoints

def cmd_make_checkpoint(a) -> int:
    from refimpl.config import Config
    from refimpl.synthetic.writer import make_checkpoint
    base = Config.preset(a.preset)
    for flag, v, most in (("--layers", a.layers, base.n_layers), ("--experts", a.experts, base.n_routed_experts)):
        if v is not None and v > most:                       # a malformed flag value: a usage error
            return _fail(f"argument {flag}: {v} is more than the {most} of preset {a.preset}", 2)
    t0 = time.perf_counter()
    cfg = make_checkpoint(base, a.out, seed=a.seed, layers=a.layers, experts=a.experts,
                          overwrite=a.force)
    print(f"wrote {a.out}: preset {a.preset}, {cfg.n_layers} layers, {cfg.n_routed_experts} experts, "
          f"seed {a.seed} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_inspect(a) -> int:
    from refimpl.formats.inspect import format_summary, summarize
    s = summarize(a.ckpt)
    print(format_summary(s))
    return 0 if s["ok"] else 1


# ---------------------------------------------------------------- model runs

def _load(a):
    from refimpl.formats.weights import load
    return load(a.ckpt, precision=a.precision, revision=a.revision, max_seq_len=a.max_seq_len, layout=a.layout,
                kernels=a.kernels)


def _prompt_ids(a) -> list[int]:
    """The prompt's token ids from --tokens, --prompt or --chat; long text is refused before tokenizing."""
    if a.tokens is not None:
        return a.tokens
    from refimpl.config import Config
    from refimpl.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_checkpoint(a.ckpt)
    if getattr(a, "chat", None) is not None:
        from refimpl.formats.encoding import encode_messages
        messages = _read_json(a.chat)
        text = encode_messages(messages, thinking_mode="thinking" if a.thinking else "chat")
    else:
        text = a.prompt
    from refimpl.formats.config_file import read_config
    max_seq_len = a.max_seq_len or read_config(a.ckpt).max_seq_len
    return tok.encode(text, max_tokens=max_seq_len)


def _read_json(path: str):
    from refimpl.formats.files import read_json
    return read_json(path, limit=MAX_CHAT_BYTES, what="a chat JSON file")


def _check_out(a) -> None:
    """--out must be a new or regular file and none of the checkpoint's own files (checked before the run)."""
    from refimpl.formats.files import FileError, check_output_path
    from refimpl.formats.weights import checkpoint_files
    out, exists = check_output_path(a.out)
    if exists and any(os.path.samefile(out, f) for f in checkpoint_files(a.ckpt)):
        raise FileError(f"{out}: is a file of the checkpoint {a.ckpt}; give another --out")


def cmd_trace(a) -> int:
    from refimpl.formats.weights import check_checkpoint_folder
    from refimpl.oracle.trace import run_trace
    for flag, given in (("--replay-weights", a.replay_weights), ("--replay-hash-ids", a.replay_hash_ids)):
        if given and a.replay is None:            # a flag that qualifies another: usage
            return _fail(f"argument {flag}: needs --replay TRACE", 2)
    if a.grad is not None or a.targets is not None:
        return _grad_trace(a)
    a.precision = a.precision or "float32"
    check_checkpoint_folder(a.ckpt)
    _check_out(a)
    ids = _prompt_ids(a)
    replay = None
    if a.replay is not None:
        from refimpl.oracle.replay import Replay
        replay = Replay.load(a.replay, weights=a.replay_weights, hash_layers=a.replay_hash_ids)
    model = _load(a)
    patterns = a.sites + ("logits",) if a.sites is not None else ("*",)      # logits always
    t0 = time.perf_counter()
    trace = run_trace(model, ids, patterns=patterns, chunks=a.chunks, decode_from=a.decode_from, replay=replay)
    trace.save(a.out)
    from refimpl.oracle.compare import describe_replay
    how = (f", prefill {a.decode_from} + {len(ids) - a.decode_from} decode steps" if a.decode_from else "") + \
          (f", replayed {describe_replay(trace.metadata['replay'])}" if replay else "")
    print(f"wrote {a.out}: {len(trace.tensors)} sites, {len(ids)} tokens, precision {model.precision}{how} "
          f"({time.perf_counter() - t0:.2f} s)")
    return 0


def _grad_trace(a) -> int:
    """trace --grad: the gradients of one head's loss, written as a gradient trace (float64 always)."""
    from refimpl.formats.weights import check_checkpoint_folder
    from refimpl.oracle.gradients import run_grad_trace, save_grad_trace
    if a.grad is None:
        return _fail("argument --targets: needs --grad main|mtp", 2)
    for flag, given in (("--chunks", a.chunks), ("--decode-from", a.decode_from), ("--replay", a.replay)):
        if given is not None:
            return _fail(f"argument {flag}: not with --grad (the backward differentiates one forward pass from "
                         "position 0)", 2)
    if a.precision not in (None, "float64"):
        return _fail(f"argument --precision: --grad runs in float64 only, not {a.precision}", 2)
    a.precision = "float64"
    check_checkpoint_folder(a.ckpt)
    _check_out(a)
    ids = _prompt_ids(a)
    model = _load(a)
    t0 = time.perf_counter()
    tensors, meta = run_grad_trace(model, ids, head=a.grad, targets=a.targets,
                                   patterns=a.sites if a.sites is not None else ("*",))
    save_grad_trace(a.out, tensors, meta)
    print(f"wrote {a.out}: {len(tensors)} gradients of the {a.grad} head's loss {meta['loss']:.6g}, {len(ids)} "
          f"tokens, float64 ({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_generate(a) -> int:
    from refimpl.generate import SamplingParams, generate
    from refimpl.formats.tokenizer import Tokenizer
    from refimpl.formats.weights import check_checkpoint_folder
    if a.thinking and a.chat is None:                                     # a usage error, before any loading
        return _fail("argument --thinking: applies to --chat only (the chat encoding's thinking mode); "
                     "--prompt and --tokens are used exactly as given", 2)
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p)
    check_checkpoint_folder(a.ckpt)
    ids = _prompt_ids(a)
    tok = Tokenizer.from_checkpoint(a.ckpt) if Path(a.ckpt, "tokenizer.json").exists() else None
    if tok is not None:                           # every id the model can generate has text: checked before the run
        from refimpl.formats.config_file import read_config
        tok.check_vocab(read_config(a.ckpt).vocab_size)
    model = _load(a)
    tty = sys.stderr.isatty()
    print(f"[prompt: {len(ids)} tokens; prefill ...]", file=sys.stderr, flush=True) if tty else None

    new: list[int] = []
    shown = [""]

    def show(t: int) -> None:                     # stream each token as it is produced
        new.append(t)
        if tok is None:
            sys.stdout.write(f"{t} ")
        else:                                     # decode the whole completion; print what is new,
            text = tok.decode(new)                # holding back a partial UTF-8 character
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown[0]):])
                shown[0] = text
        sys.stdout.flush()

    g = generate(model, ids, max_new_tokens=a.max_new_tokens, params=params, seed=a.seed, on_token=show)
    sys.stdout.write("\n")
    print(f"[{_generation_summary(g, model.cfg.max_seq_len)}]", file=sys.stderr)
    return 0


def _generation_summary(g, max_seq_len: int) -> str:
    """`N tokens; prefill .. ms; decode .. ms/token; why it stopped` (only the parts that happened)."""
    parts = [f"{len(g.tokens)} tokens"]
    if g.tokens:
        parts.append(f"prefill {g.prefill_s * 1000:.0f} ms")
    if g.decode_s:
        parts.append(f"decode {g.ms_per_token:.1f} ms/token")
    if g.stopped_on_eos:
        parts.append("stopped on EOS")
    if g.stopped_at_max_seq_len:
        parts.append(f"stopped at max_seq_len={max_seq_len}: the prompt ({len(g.prompt)} tokens) and the new tokens "
                     "fill the context (--max-seq-len N sets it)")
    return "; ".join(parts)


# ---------------------------------------------------------------- comparing traces

def cmd_compare(a) -> int:
    """Exit 0 within tolerance, 1 out of tolerance or traces that cannot be compared, 2 usage."""
    if Path(a.a).is_dir() and Path(a.b).is_dir():         # two corpus folders (refimpl golden make)
        return cmd_compare_corpora(a)
    if a.top_n is not None:
        return _fail("argument --top-n: applies to corpus folders only", 2)
    from refimpl.oracle.gradients import is_gradient_trace
    if is_gradient_trace(a.a) or is_gradient_trace(a.b):
        return _compare_gradients(a)
    if a.rtol is not None:
        return _fail("argument --rtol: for gradient traces only (forward traces use --profile)", 2)
    from refimpl.oracle.compare import (CompareError, PlotUsageError, check_plot_path, compare, format_report,
                                        load_profiles, plot_report)
    if a.profile != "auto" and a.profile not in load_profiles():
        print(f"error: unknown profile {a.profile!r}; profiles: auto, {', '.join(load_profiles())}", file=sys.stderr)
        return 2
    if a.plot is not None:                       # checked before comparing: a bad name fails at once
        try:
            check_plot_path(a.plot, (a.a, a.b))
        except PlotUsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'refimpl[plot]'", file=sys.stderr)
            return 1
    try:
        noise = {"auto": "auto", "off": None}.get(a.noise, a.noise)
        report = compare(a.a, a.b, profile=a.profile, partial=a.partial, noise=noise)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(format_report(report))
    if a.plot is not None:
        plot_report(report, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0 if report.ok else 1


def _compare_gradients(a) -> int:
    """compare on two gradient traces (docs/gradients.md): the first gradient out of tolerance, backward order."""
    from refimpl.oracle.gradients import compare_gradients, format_grad_report
    for flag, given in (("--plot", a.plot is not None), ("--partial", a.partial), ("--profile", a.profile != "auto"),
                        ("--noise", a.noise != "auto")):
        if given:
            return _fail(f"argument {flag}: not for gradient traces", 2)
    report = compare_gradients(a.a, a.b, **({} if a.rtol is None else {"rtol": a.rtol}))
    print(json.dumps(report.to_json(), indent=1) if a.json else format_grad_report(report))
    return 0 if report.ok else 1


def cmd_compare_corpora(a) -> int:
    """Corpus A (candidate) against corpus B (reference): KL, top-1, the first greedy split (docs/corpora.md)."""
    from refimpl.oracle.corpus_compare import (CORPUS_PROFILES, compare_corpora, format_report, plot_report,
                                               report_json)
    from refimpl.oracle.compare import PlotUsageError, check_plot_path
    for flag, given in (("--partial", a.partial), ("--noise", a.noise != "auto"), ("--rtol", a.rtol is not None)):
        if given:
            return _fail(f"argument {flag}: applies to trace files, not corpus folders", 2)
    if a.profile != "auto" and a.profile not in CORPUS_PROFILES:
        return _fail(f"unknown corpus profile {a.profile!r}; profiles: auto, {', '.join(CORPUS_PROFILES)}", 2)
    if a.plot is not None:
        try:
            check_plot_path(a.plot, ())
        except PlotUsageError as e:
            return _fail(str(e), 2)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plot needs matplotlib: pip install 'refimpl[plot]'", 1)
    report = compare_corpora(a.a, a.b, profile=a.profile, top_n=a.top_n or 5)
    print(report_json(report) if a.json else format_report(report))
    if a.plot is not None:
        plot_report(report, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0 if report.ok else 1


# ---------------------------------------------------------------- chat encoding

def cmd_encode(a) -> int:
    from refimpl.formats.encoding import encode_messages
    messages = _read_json(a.messages)
    text = encode_messages(messages, thinking_mode="thinking" if a.thinking else "chat",
                           drop_thinking=not a.keep_thinking, reasoning_effort=a.reasoning_effort)
    sys.stdout.write(text)                        # exactly the prompt string, no added newline
    return 0


def cmd_parse(a) -> int:
    from refimpl.formats.encoding import parse_message_from_completion_text
    from refimpl.formats.files import read_text
    text = read_text(a.completion, limit=MAX_COMPLETION_BYTES, what="a completion text file")
    msg = parse_message_from_completion_text(text, thinking_mode="thinking" if a.thinking else "chat")
    print(json.dumps(msg, ensure_ascii=False, indent=2))
    return 0


# ---------------------------------------------------------------- golden sets

def cmd_golden_verify(a) -> int:
    from refimpl.oracle.golden import verify
    t0 = time.perf_counter()
    ran = []

    def progress(line: str) -> None:              # one line per stored trace checked
        ran.append(line)
        print(line, flush=True)
    failures = verify(a.dir, precisions=a.precision, inputs=a.input, ckpt=a.ckpt, kernels=a.kernels,
                      progress=progress)
    for f in failures:
        print(f"FAIL {f}")
    print(f"golden verify: {'FAILED, ' + str(len(failures)) + ' case(s)' if failures else 'passed'} "
          f"({len(ran)} trace(s) checked, {time.perf_counter() - t0:.1f} s)")
    return 1 if failures else 0


def cmd_golden_make(a) -> int:
    from refimpl.oracle.corpus import Job, make_corpus
    runner = None
    if a.workers is not None and a.stages is not None:
        return _fail("argument --stages: not with --workers (prompt-parallel or layer-pipelined, one of them)", 2)
    if a.workers is not None or a.stages is not None or a.ray_address is not None:
        try:
            from refimpl.oracle.corpus_ray import pipeline_runner, ray_runner
        except ImportError:
            return _fail("--workers, --stages and --ray-address need Ray: pip install 'refimpl[ray]'", 1)
        runner = (pipeline_runner(a.stages, address=a.ray_address) if a.stages is not None else
                  ray_runner(a.workers or 2, address=a.ray_address))
    job = Job(a.ckpt, precision=a.precision, revision=a.revision, layout=a.layout, kernels=a.kernels, keep=a.keep,
              top_k=a.top_k, sites=a.sites or (), max_seq_len=a.max_seq_len)
    tty = sys.stderr.isatty()

    def progress(state) -> None:                  # one line, rewritten in place on a terminal
        if tty:
            print(f"\r{state.line()}   ", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    manifest = make_corpus(a.ckpt, a.corpus, a.out, job=job, runner=runner, progress=progress)
    if tty:
        print(file=sys.stderr)
    print(f"wrote {a.out}: {len(manifest['files'])} prompts, {manifest['corpus']['tokens']} tokens, precision "
          f"{a.precision}, keep {a.keep} ({time.perf_counter() - t0:.1f} s)")
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(a) -> int:
    from refimpl.cli.demo import run_demo
    return run_demo(a.dir, max_new_tokens=a.max_new_tokens, precision=a.precision, kernels=a.kernels)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="refimpl", description="NumPy reference implementation of DeepSeek V4 Flash")
    sub = p.add_subparsers(dest="command", required=True)

    def kernels_opt(q):
        q.add_argument("--kernels", type=_kernels, default=None,
                       help="numba (the Numba kernels; the default, or $REFIMPL_KERNELS), numpy (the readable spec "
                            "functions), or per operation, e.g. numba,sparse_attention=numpy (refimpl/ops.py)")

    def model_opts(q, precision="float32"):
        q.add_argument("ckpt", help="checkpoint directory (config.json + safetensors)")
        q.add_argument("--precision", default=precision, choices=("float64", "float32", "mirror"),
                       help=f"float64, float32, or mirror (the official code's roundings, bit for bit; "
                            f"docs/usage.md). Default: {precision}")
        q.add_argument("--revision", default="current", choices=("current", "initial"),
                       help="official code revision to reproduce (docs/architecture.md §18)")
        q.add_argument("--max-seq-len", type=_max_seq_len, default=None, help="maximum context (default: 4096)")
        q.add_argument("--layout", default="official", choices=("official", "canonical"),
                       help="attention index layout: each call's as the official code (default), or one for every "
                            "call, so that in mirror decode and chunked prefill equal one prefill bit for bit")
        kernels_opt(q)

    q = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official format")
    q.add_argument("preset", choices=("tiny", "tiny-partial", "flash", "pro"))
    q.add_argument("out")
    q.add_argument("--seed", type=_at_least(0), default=0)
    q.add_argument("--layers", type=_at_least(1), default=None, help="keep only the first N main layers")
    q.add_argument("--experts", type=_at_least(1), default=None, help="routed experts per layer")
    q.add_argument("--force", action="store_true",
                   help="replace an existing checkpoint folder written by refimpl (never any other folder)")
    q.set_defaults(func=cmd_make_checkpoint)

    q = sub.add_parser("inspect", help="tensors, bytes by dtype and kind, validation against the config")
    q.add_argument("ckpt")
    q.set_defaults(func=cmd_inspect)

    q = sub.add_parser("trace", help="run a forward pass and write its named sites to a safetensors file")
    model_opts(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", type=_ids, help="comma-separated token ids, e.g. 0,15,27")
    g.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    q.add_argument("--sites", type=_patterns, default=None,
                   help="comma-separated glob patterns of sites (default: all)")
    c = q.add_mutually_exclusive_group()
    c.add_argument("--chunks", type=_chunks, default=None, help="prefill in chunks of these sizes, e.g. 3,2,1")
    c.add_argument("--decode-from", type=_at_least(1), default=None, metavar="K",
                   help="prefill the first K tokens, then decode the rest one step at a time (the decode path)")
    q.add_argument("--replay", type=_path, default=None, metavar="TRACE",
                   help="force expert ids and indexer top-k sets from this trace (docs/replay.md)")
    q.add_argument("--replay-weights", action="store_true", help="with --replay: force the expert weights too")
    q.add_argument("--replay-hash-ids", action="store_true",
                   help="with --replay: force the hash layers' expert ids too (by default their tid2eid table is tested)")
    q.add_argument("--grad", choices=("main", "mtp"), default=None,
                   help="write the gradients of this head's next-token loss instead (float64; docs/gradients.md)")
    q.add_argument("--targets", type=_ids, default=None,
                   help="with --grad: the token each position predicts, -1 = left out (default: the next tokens); "
                        "write --targets=-1,... when the first is -1")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_trace, precision=None)

    q = sub.add_parser("compare", help="compare two traces site by site, or two corpus folders by KL",
                       description="Compare trace A (candidate) with trace B (reference) in data-flow order, or "
                                   "corpus folder A with corpus folder B prompt by prompt (KL, top-1; "
                                   "docs/corpora.md). "
                                   "Exit 0 within the profile's tolerance, 1 out of tolerance or traces that "
                                   "cannot be compared (different tokens, config or chunking; a shape mismatch), "
                                   "2 usage. Profiles: refimpl/oracle/profiles.toml (docs/compare.md).")
    q.add_argument("a", help="trace A (the implementation under test)")
    q.add_argument("b", help="trace B (the reference; relative errors divide by its values)")
    q.add_argument("--profile", default="auto",
                   help="tolerance profile: auto (default; chosen from the two traces' precisions), "
                        "float32-vs-float64, mirror-vs-mirror, mirror-vs-float64, bf16-engine-vs-mirror, "
                        "or another name in refimpl/oracle/profiles.toml")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--plot", metavar="PNG", default=None, help="write a plot of the error by layer and site kind")
    q.add_argument("--partial", action="store_true",
                   help="A records only some sites (one layer, no logits): check those, list the rest as not compared")
    q.add_argument("--noise", default="auto", metavar="auto|off|TRACE",
                   help="the noise model's companion: refimpl's own trace of the same input at A's precision "
                        "(refimpl trace ... --precision P); auto (default): the golden set's, when B is a golden "
                        "trace; off: the profile only (docs/compare.md, 'The noise model')")
    q.add_argument("--rtol", type=_rtol, default=None,
                   help="gradient traces only: max|A-B| <= RTOL * max|B| per gradient (default 1e-9; docs/gradients.md)")
    q.add_argument("--top-n", type=_at_least(1), default=None, metavar="N",
                   help="corpus folders: at the first greedy split, whether each side's token is in the other's "
                        "top N (default 5)")
    q.set_defaults(func=cmd_compare)

    q = sub.add_parser("generate", help="generate text (tokens are streamed as they are produced)")
    model_opts(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="raw prompt text")
    g.add_argument("--chat", help="JSON file with a list of chat messages (encoded as DeepSeek V4 does; "
                                  "at most 8 MiB)")
    g.add_argument("--tokens", type=_ids, help="comma-separated prompt token ids")
    q.add_argument("--thinking", action="store_true", help="thinking mode for --chat")
    q.add_argument("--max-new-tokens", type=_at_least(0), default=32)
    q.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default); finite, >= 0")
    q.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus mass, 0 < P <= 1 (default 1)")
    q.add_argument("--seed", type=_at_least(0), default=0)
    q.set_defaults(func=cmd_generate)

    q = sub.add_parser("encode", help="print the prompt string of a list of chat messages (no added newline)")
    q.add_argument("messages", help="JSON file: a list of OpenAI-style messages (at most 8 MiB)")
    q.add_argument("--thinking", action="store_true")
    q.add_argument("--reasoning-effort", choices=("max",), default=None)
    q.add_argument("--keep-thinking", action="store_true", help="keep earlier reasoning (drop_thinking off)")
    q.set_defaults(func=cmd_encode)

    q = sub.add_parser("parse", help="parse a completion into reasoning, content and tool calls (JSON)")
    q.add_argument("completion", help="text file with the model's completion (UTF-8, at most 8 MiB)")
    q.add_argument("--thinking", action="store_true")
    q.set_defaults(func=cmd_parse)

    q = sub.add_parser("golden", help="golden sets: verify that this refimpl reproduces golden/")
    gs = q.add_subparsers(dest="golden_command", required=True)
    v = gs.add_parser("verify", help="re-make the tiny checkpoint, check its bytes, re-run every golden input")
    v.add_argument("dir", nargs="?", type=_path, default=None,
                   help="the golden folder (default: the one installed with refimpl, the repository's golden/)")
    v.add_argument("--precision", action="append", choices=("float64", "float32", "mirror"),
                   help="only this precision (repeatable)")
    v.add_argument("--input", action="append", help="only this input, e.g. prefill-80, or golden gradient trace, e.g. grad-mtp-prefill-17 (repeatable)")
    v.add_argument("--ckpt", type=_path, default=None,
                   help="for a set made with tools/make_golden.py --ckpt: the checkpoint folder (default: the path "
                        "in its manifest)")
    kernels_opt(v)
    v.set_defaults(func=cmd_golden_verify)
    m = gs.add_parser("make", help="a corpus: reference outputs of a checkpoint on your prompts (docs/corpora.md)",
                      description="Run every prompt of a JSON Lines corpus through the checkpoint (teacher-forced, "
                                  "one forward pass each) and write one file per prompt and a manifest into OUT. "
                                  "Resumable: run it again to continue where it stopped (docs/corpora.md).")
    model_opts(m, precision="mirror")
    m.add_argument("corpus", type=_path, help="JSON Lines: one {\"id\", \"tokens\" | \"text\" | \"messages\"} per line")
    m.add_argument("out", type=_path, help="the output folder (new, empty, or a run of the same corpus to continue)")
    m.add_argument("--keep", choices=("logits", "top-k"), default="logits",
                   help="logits: every row whole (default); top-k: the K largest logits and the log-sum-exp per row")
    m.add_argument("--top-k", type=_at_least(1), default=20, metavar="K", help="with --keep top-k (default 20)")
    m.add_argument("--sites", type=_patterns, default=None, help="other trace sites to keep, e.g. 'layers.*.out'")
    m.add_argument("--workers", type=_at_least(1), default=None,
                   help="run on N Ray workers (pip install 'refimpl[ray]'); default: this process")
    m.add_argument("--stages", type=_at_least(1), default=None, metavar="N",
                   help="run on Ray as a pipeline of N stages, each owning a contiguous range of layers (for "
                        "machines whose memory holds only part of the checkpoint)")
    m.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to use (auto: the running one; default: start a local one)")
    m.set_defaults(func=cmd_golden_make)

    q = sub.add_parser("demo", help="the README's main job on the built-in tiny model")
    q.add_argument("--dir", type=_folder, default=str(DEFAULT_DEMO_DIR),
                   help="where the tiny checkpoint is made or reused (a new or empty folder, or one the demo wrote)")
    q.add_argument("--max-new-tokens", type=_at_least(1), default=8)
    q.add_argument("--precision", default="mirror", choices=("float64", "float32", "mirror"),
                   help="float64, float32, or mirror (default: mirror)")
    kernels_opt(q)
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:            # --help (0) or a usage error (2), already printed in one line
        return e.code if isinstance(e.code, int) else 2
    if sys.stdout is None:             # started with stdout closed (`refimpl encode x >&-`): nowhere to print
        return _fail("standard output is closed: the command has nowhere to write its output", 1)
    if getattr(args, "kernels", False) is None and os.environ.get("REFIMPL_KERNELS"):
        try:                           # the same rule as --kernels: checked now, a usage error
            args.kernels = _kernels(os.environ["REFIMPL_KERNELS"])
        except argparse.ArgumentTypeError as e:
            return _fail(f"the environment variable REFIMPL_KERNELS: {e}", 2)
    restore = _sigterm_raises()
    unguard = _guard_mapped_files(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Terminated:
        return _fail("terminated", 143)
    except BrokenPipeError:            # `refimpl ... | head`: the reader left; stop quietly
        _silence_stdout()
        return 0
    except ValueError as e:            # every refimpl input error is a ValueError subclass with a clear message
        return _fail(str(e), 1)
    except OSError as e:               # the few the library does not word itself
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), 1)
    except MemoryError:
        return _fail("out of memory", 1)
    finally:
        unguard()
        restore()


def _fail(message: str, code: int) -> int:
    """Print `error: message` on one line (newlines escaped, at most 2000 characters); -> code."""
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    line = line if len(line) <= 2000 else line[:2000] + " ..."
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def _sigterm_raises():
    """Make SIGTERM raise Terminated (so that temporaries are removed); -> a function restoring the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_terminated(signum, frame):
        raise Terminated()
    old = signal.signal(signal.SIGTERM, raise_terminated)
    return lambda: signal.signal(signal.SIGTERM, old)


def _guard_mapped_files(args):
    """For the commands that read memory-mapped weights (inspect maps the routing tables): a file truncated
    meanwhile ends the process with one line naming it, exit 1, not SIGBUS (formats/sigbus.py);
    -> a function putting the old handler back."""
    if args.func not in (cmd_inspect, cmd_trace, cmd_generate, cmd_golden_verify, cmd_golden_make, cmd_demo):
        return lambda: None
    from refimpl.formats.sigbus import install
    return install()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout replaced (tests) or already closed
        pass


if __name__ == "__main__":
    sys.exit(main())
