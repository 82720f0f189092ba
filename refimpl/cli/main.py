"""The `refimpl` command: thin subcommands over library functions (every one has --help)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = Path.home() / ".cache" / "refimpl" / "tiny"


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise SystemExit(f"error: --tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise SystemExit("error: --tokens is empty")
    return ids


def _chunks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --chunks must be comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise SystemExit(f"error: --chunks must be comma-separated positive integers, got {text!r}")
    return sizes


# ---------------------------------------------------------------- checkpoints

def cmd_make_checkpoint(a) -> int:
    from refimpl.config import Config
    from refimpl.synthetic.writer import make_checkpoint
    t0 = time.perf_counter()
    cfg = make_checkpoint(Config.preset(a.preset), a.out, seed=a.seed, layers=a.layers, experts=a.experts,
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
    return load(a.ckpt, precision=a.precision, revision=a.revision, max_seq_len=a.max_seq_len, layout=a.layout)


def _prompt_ids(a, model) -> list[int]:
    if getattr(a, "tokens", None):
        return _ids(a.tokens)
    from refimpl.formats.tokenizer import Tokenizer
    tok = Tokenizer.from_checkpoint(a.ckpt)
    if getattr(a, "chat", None):
        from refimpl.formats.encoding import encode_messages
        messages = _read_json(a.chat)
        text = encode_messages(messages, thinking_mode="thinking" if a.thinking else "chat")
    else:
        text = a.prompt
    return tok.encode(text)


def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: not valid JSON ({e})") from None


def cmd_trace(a) -> int:
    from refimpl.oracle.trace import run_trace
    model = _load(a)
    ids = _prompt_ids(a, model)
    patterns = tuple(a.sites.split(",")) + ("logits",) if a.sites else ("*",)   # logits always
    t0 = time.perf_counter()
    trace = run_trace(model, ids, patterns=patterns, chunks=_chunks(a.chunks))
    trace.save(a.out)
    print(f"wrote {a.out}: {len(trace.tensors)} sites, {len(ids)} tokens, precision {model.precision} "
          f"({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_generate(a) -> int:
    from refimpl.generate import SamplingParams, generate
    from refimpl.formats.tokenizer import Tokenizer
    model = _load(a)
    ids = _prompt_ids(a, model)
    tok = Tokenizer.from_checkpoint(a.ckpt) if Path(a.ckpt, "tokenizer.json").exists() else None
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p)
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
    print(f"[{len(g.tokens)} tokens; prefill {g.prefill_s * 1000:.0f} ms; decode {g.ms_per_token:.1f} ms/token"
          f"{'; stopped on EOS' if g.stopped_on_eos else ''}]", file=sys.stderr)
    return 0


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
    try:
        text = Path(a.completion).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"error: {a.completion}: no such file") from None
    msg = parse_message_from_completion_text(text, thinking_mode="thinking" if a.thinking else "chat")
    print(json.dumps(msg, ensure_ascii=False, indent=2))
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(a) -> int:
    from refimpl.cli.demo import run_demo
    return run_demo(Path(a.dir), max_new_tokens=a.max_new_tokens, precision=a.precision)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refimpl", description="NumPy reference implementation of DeepSeek V4 Flash")
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(q):
        q.add_argument("ckpt", help="checkpoint directory (config.json + safetensors)")
        q.add_argument("--precision", default="float32", choices=("float64", "float32", "mirror"))
        q.add_argument("--revision", default="current", choices=("current", "initial"),
                       help="official code revision to reproduce (docs/architecture.md §18)")
        q.add_argument("--max-seq-len", type=int, default=None, help="maximum context (default: 4096)")
        q.add_argument("--layout", default="official", choices=("official", "canonical"),
                       help="attention index layout: each call's as the official code (default), or one for every "
                            "call, so that in mirror decode and chunked prefill equal one prefill bit for bit")

    q = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official format")
    q.add_argument("preset", choices=("tiny", "flash", "pro"))
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--layers", type=int, default=None, help="keep only the first N main layers")
    q.add_argument("--experts", type=int, default=None, help="routed experts per layer")
    q.add_argument("--force", action="store_true", help="replace an existing directory")
    q.set_defaults(func=cmd_make_checkpoint)

    q = sub.add_parser("inspect", help="tensors, bytes by dtype and kind, validation against the config")
    q.add_argument("ckpt")
    q.set_defaults(func=cmd_inspect)

    q = sub.add_parser("trace", help="run a forward pass and write its named sites to a safetensors file")
    model_opts(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", help="comma-separated token ids, e.g. 0,15,27")
    g.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    q.add_argument("--sites", default=None, help="comma-separated glob patterns of sites (default: all)")
    q.add_argument("--chunks", default=None, help="prefill in chunks of these sizes, e.g. 3,2,1")
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_trace)

    q = sub.add_parser("generate", help="generate text (tokens are streamed as they are produced)")
    model_opts(q)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="raw prompt text")
    g.add_argument("--chat", help="JSON file with a list of chat messages (encoded as DeepSeek V4 does)")
    g.add_argument("--tokens", help="comma-separated prompt token ids")
    q.add_argument("--thinking", action="store_true", help="thinking mode for --chat")
    q.add_argument("--max-new-tokens", type=int, default=32)
    q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    q.add_argument("--top-p", type=float, default=1.0)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_generate)

    q = sub.add_parser("encode", help="print the prompt string of a list of chat messages (no added newline)")
    q.add_argument("messages", help="JSON file: a list of OpenAI-style messages")
    q.add_argument("--thinking", action="store_true")
    q.add_argument("--reasoning-effort", choices=("max",), default=None)
    q.add_argument("--keep-thinking", action="store_true", help="keep earlier reasoning (drop_thinking off)")
    q.set_defaults(func=cmd_encode)

    q = sub.add_parser("parse", help="parse a completion into reasoning, content and tool calls (JSON)")
    q.add_argument("completion", help="text file with the model's completion")
    q.add_argument("--thinking", action="store_true")
    q.set_defaults(func=cmd_parse)

    q = sub.add_parser("demo", help="the README's main job on the built-in tiny model")
    q.add_argument("--dir", default=str(DEFAULT_DEMO_DIR), help="where the tiny checkpoint is made or reused")
    q.add_argument("--max-new-tokens", type=int, default=8)
    q.add_argument("--precision", default="mirror", choices=("float64", "float32", "mirror"))
    q.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:            # every refimpl input error is a ValueError subclass with a clear message
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
