"""Golden corpora: reference outputs of a checkpoint on a set of prompts, written resumably.

A golden set (golden.py) is a fixed set of threshold inputs of the tiny model; a corpus is any
prompt set on any checkpoint (the real one included), made with `refimpl golden make`:

    refimpl golden make CKPT PROMPTS.jsonl OUT [--precision P] [--keep logits|top-k] [--workers N]

The prompt file is JSON Lines, one prompt per line, in one of three forms (docs/corpora.md):

    {"id": "p1", "tokens": [0, 15, 27]}                      token ids, used as given
    {"id": "p2", "text": "The capital of France"}            text, tokenized as is (no BOS added)
    {"id": "p3", "messages": [...], "thinking": false}       chat messages, encoded as DeepSeek V4 does
                                                             (formats/encoding.py, BOS included), tokenized
("id" is optional: line-N, N the line number). The output folder holds

    manifest.json                   what was run: refimpl version and commit, library versions, the
                                    checkpoint's config and the SHA-256 of its config and index files,
                                    precision, what is kept, the corpus hash, the prompts; and, once
                                    every prompt is written, the SHA-256 of every prompt file
    prompts/{id}.safetensors        one per prompt, a trace file (docs/trace-format.md): its metadata
                                    names the prompt, its tokens and the run; its tensors are

keep "logits" (default): `logits` [s, v], teacher-forced, at every position (float64 in float64,
else float32). keep "top-k": the compact form, for vocabularies too wide to keep whole rows
(Flash: 517 KB per position): `logits.top_k.values` [s, k] and `logits.top_k.ids` [s, k] int32,
the k largest logits of each row in descending order (ties: the lower id first), and
`logits.logsumexp` [s] float64, so that log p(id) = value - logsumexp exactly for the kept ids
and 1 - Σ p is the mass of the rest. `sites` adds other sites of the trace (e.g. 'layers.*.out').

Resumable: each prompt file is written atomically (a temporary name, renamed when complete), so a
file that exists is whole. A run on an existing folder checks that its manifest is this run's
(same corpus, checkpoint, precision and kept sites; else CorpusError naming the difference) and
skips the prompts already written. Every file's bytes depend on the inputs only (no time, host or
worker count), so a run in one process and a run spread over workers (corpus_ray.py) write the
same bytes.
"""
from __future__ import annotations

import fnmatch
import hashlib
from importlib import metadata
import json
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from refimpl._version import __version__
from refimpl.formats.checkpoint import SafetensorsFile
from refimpl.formats.config_file import read_config
from refimpl.formats.encoding import encode_messages
from refimpl.formats.files import check_output_path, parse_json, read_text, write_text
from refimpl.formats.tokenizer import Tokenizer
from refimpl.formats.weights import check_checkpoint_folder, load
from refimpl.oracle.golden import sha256_file
from refimpl.oracle.trace import Trace, run_trace, trace_metadata
from refimpl.sites import site_names

FORMAT = "refimpl-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts"
KEEPS = ("logits", "top-k")
PRECISIONS = ("float64", "float32", "mirror")
MAX_CORPUS_BYTES = 1 << 30                    # 1 GiB of JSON Lines: a corpus of about 250M tokens of text
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # a prompt id: its file name
LIBRARIES = ("numpy", "numba", "ml_dtypes", "safetensors", "tokenizers")


class CorpusError(ValueError):
    """A prompt corpus, an output folder or a corpus run that cannot be used as asked."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a corpus: its id (a file name) and its token ids."""
    id: str
    tokens: tuple[int, ...]


# ---------------------------------------------------------------- reading a corpus

def read_corpus(path, ckpt, max_seq_len: int | None = None) -> list[Prompt]:
    """The prompts of a JSON Lines file, tokenized with the checkpoint's tokenizer where given as text.

    Every line is checked before anything runs: malformed JSON, an unknown form, a duplicate id, a
    token id outside the vocabulary or a prompt longer than the context is a CorpusError naming
    the line. An empty corpus is refused. max_seq_len: the context the run loads with (default: the config's).
    """
    # a regular file only: a rerun continues the run by reading the corpus again and checking its hash,
    # which a pipe (`<(...)`) cannot give twice, and a FIFO with no writer would wait for ever
    text = read_text(path, limit=MAX_CORPUS_BYTES, what="a prompt corpus (JSON Lines, a regular file)",
                     regular=True, error=CorpusError)
    cfg = read_config(ckpt) if max_seq_len is None else read_config(ckpt, max_seq_len=max_seq_len)
    tokenizer = None
    prompts, seen = [], {}
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            entry = parse_json(line)
        except (ValueError, RecursionError) as e:
            raise CorpusError(f"{where}: not a JSON object ({str(e)[:200]})") from None
        if not isinstance(entry, dict):
            raise CorpusError(f"{where}: a prompt is a JSON object, got {type(entry).__name__}")
        forms = [k for k in ("tokens", "text", "messages") if k in entry]
        unknown = sorted(set(entry) - {"id", "tokens", "text", "messages", "thinking"})
        if len(forms) != 1 or unknown:
            raise CorpusError(f"{where}: a prompt has an optional 'id' and exactly one of 'tokens', 'text', "
                              f"'messages' (with 'thinking' for messages); got keys {sorted(entry)}")
        pid = entry.get("id", f"line-{n}")
        if not (isinstance(pid, str) and NAME.fullmatch(pid)):
            raise CorpusError(f"{where}: 'id' must be a file name of letters, digits, '.', '_' and '-' (at most 128), "
                              f"got {pid!r:.80}")
        if pid in seen:
            raise CorpusError(f"{where}: id {pid!r} is already the id of line {seen[pid]}")
        if "thinking" in entry and not ("messages" in entry and isinstance(entry["thinking"], bool)):
            raise CorpusError(f"{where}: 'thinking' (true or false) goes with 'messages' only")
        if "tokens" in entry:
            ids = entry["tokens"]
            if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise CorpusError(f"{where}: 'tokens' must be a list of integers")
        else:
            if tokenizer is None:
                try:
                    tokenizer = Tokenizer.from_checkpoint(ckpt)
                except ValueError as e:
                    raise CorpusError(f"{where}: text needs the checkpoint's tokenizer: {e}") from None
            if "text" in entry:
                if not isinstance(entry["text"], str):
                    raise CorpusError(f"{where}: 'text' must be a string")
                prompt = entry["text"]
            else:
                try:
                    prompt = encode_messages(entry["messages"],
                                             thinking_mode="thinking" if entry.get("thinking") else "chat")
                except ValueError as e:
                    raise CorpusError(f"{where}: {e}") from None
            try:
                ids = tokenizer.encode(prompt, max_tokens=cfg.max_seq_len)
            except ValueError as e:
                raise CorpusError(f"{where}: {e}") from None
        if not ids:
            raise CorpusError(f"{where}: the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise CorpusError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        if len(ids) > cfg.max_seq_len:
            raise CorpusError(f"{where}: {len(ids)} tokens exceed the context max_seq_len={cfg.max_seq_len}")
        seen[pid] = n
        prompts.append(Prompt(pid, tuple(ids)))
    if not prompts:
        raise CorpusError(f"{path}: the corpus holds no prompt (one JSON object per line)")
    return prompts


def corpus_hash(prompts: list[Prompt]) -> str:
    """SHA-256 of the prompts as run (ids and token ids, in order): the same tokens from text or ids hash alike."""
    text = json.dumps([[p.id, list(p.tokens)] for p in prompts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- one prompt

@dataclass(frozen=True)
class Job:
    """What a corpus run computes for each prompt: the checkpoint, how the model runs, what is kept.

    Small and picklable: a Ray worker receives it and loads its own model (`Job.load`).
    """
    ckpt: str
    precision: str = "mirror"
    revision: str = "current"
    layout: str = "official"
    kernels: str | None = None
    keep: str = "logits"
    top_k: int = 20
    sites: tuple[str, ...] = ()
    max_seq_len: int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CorpusError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r:.40}")
        if self.keep not in KEEPS:
            raise CorpusError(f"keep must be one of {', '.join(KEEPS)}, got {self.keep!r:.40}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 1):
            raise CorpusError(f"top_k must be an integer >= 1, got {self.top_k!r:.40}")
        if "logits" in self.sites:
            raise CorpusError("sites: 'logits' is always kept (as `keep` says); list the other sites")

    def load(self):
        return load(self.ckpt, precision=self.precision, revision=self.revision, layout=self.layout,
                    kernels=self.kernels, max_seq_len=self.max_seq_len)

    def settings(self) -> dict:
        """The settings that decide the bytes of a prompt file (the manifest's `run`)."""
        return {"precision": self.precision, "revision": self.revision, "layout": self.layout, "keep": self.keep,
                "top_k": self.top_k if self.keep == "top-k" else None, "sites": list(self.sites)}


def top_k_form(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The compact form of logits [s, v]: the k largest per row (descending; ties: lower id first) and the log-sum-exp."""
    k = min(k, logits.shape[-1])
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]              # [s, k] stable: lower id first on ties
    values = np.take_along_axis(logits, ids, axis=-1)                      # [s, k] exact copies
    x = logits.astype(np.float64)                                          # exact upcast
    top = x.max(axis=-1, keepdims=True)                                    # [s, 1]
    lse = top[:, 0] + np.log(np.sum(np.exp(x - top), axis=-1))             # [s] float64, fixed order (NumPy's sum)
    return {"logits.top_k.values": np.ascontiguousarray(values), "logits.top_k.ids": ids.astype(np.int32),
            "logits.logsumexp": lse}


def run_prompt(model, job: Job, prompt: Prompt) -> tuple[dict[str, np.ndarray], dict]:
    """Teacher-forced run of one prompt -> (tensors, metadata) of its prompt file (one forward pass)."""
    trace = run_trace(model, list(prompt.tokens), patterns=job.sites + ("logits",))
    return prompt_file(model, job, prompt, dict(trace.tensors))


def prompt_file(model, job: Job, prompt: Prompt, tensors: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The recorded sites of one prompt's run -> (tensors, metadata) of its file (the compact form where asked)."""
    tensors = dict(tensors)
    if job.keep == "top-k":
        tensors.update(top_k_form(tensors.pop("logits"), job.top_k))
    meta = dict(trace_metadata(model, prompt.tokens, None), prompt=prompt.id, keep=job.keep,
                top_k=job.top_k if job.keep == "top-k" else None)
    return tensors, meta


def split_layers(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges [start, stop) of a pipeline of `stages` (sizes differ by at most one, the first larger)."""
    if not 1 <= stages <= n_layers:
        raise CorpusError(f"a pipeline of {stages} stages over {n_layers} layers: give 1 to {n_layers} stages")
    q, r = divmod(n_layers, stages)
    bounds = np.cumsum([0] + [q + (i < r) for i in range(stages)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def run_stage(model, job: Job, prompt: Prompt, carry, start: int, stop: int):
    """Layers start..stop-1 of one prompt's forward pass (a pipeline stage); carry: None at the first stage,
    else the previous stage's (streams, recorded sites). -> (streams, sites), or at the last stage the
    (tensors, metadata) of the prompt file, the same as run_prompt's."""
    h, tensors = (None, {}) if carry is None else carry
    trace = Trace(job.sites + ("logits",))
    out = model.forward_layers(list(prompt.tokens), h, start=start, stop=stop, trace=trace)
    tensors = {**tensors, **trace.tensors}
    if stop < model.cfg.n_layers:
        return out, tensors
    return prompt_file(model, job, prompt, tensors)


def prompt_path(out, prompt_id: str) -> Path:
    return Path(out) / PROMPTS / f"{prompt_id}.safetensors"


def write_prompt(out, prompt: Prompt, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    """Write one prompt file atomically (its bytes depend on tensors and meta only)."""
    path = prompt_path(out, prompt.id)
    t = Trace(("*",))
    t.tensors = tensors
    t.save(path, meta)
    return path


def prompt_done(out, prompt: Prompt) -> bool:
    """Whether prompt's file exists, whole, for these tokens (files are renamed into place only when complete)."""
    path = prompt_path(out, prompt.id)
    if not path.exists():
        return False
    try:
        meta = json.loads(SafetensorsFile(path).metadata.get("refimpl", "{}"))
    except ValueError as e:
        raise CorpusError(f"{path}: not a prompt file of refimpl ({e}); remove it to run the prompt again") from None
    if meta.get("tokens") != list(prompt.tokens) or meta.get("prompt") != prompt.id:
        raise CorpusError(f"{path}: holds another prompt's run than the corpus's {prompt.id!r}; "
                          "remove it to run the prompt again")
    return True


# ---------------------------------------------------------------- the manifest

def library_versions() -> dict:
    """The versions of Python and of the libraries whose numbers or bytes a corpus depends on."""
    return {"python": platform.python_version(), **{name: metadata.version(name) for name in LIBRARIES}}


def refimpl_commit() -> str:
    """The git commit of the refimpl source in use ("+uncommitted" if refimpl/ has changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "refimpl"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_manifest(job: Job, prompts: list[Prompt], corpus_file) -> dict:
    """The manifest of a corpus run (before its files are listed); every value depends on the inputs only."""
    ckpt = Path(job.ckpt)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "generated_by": {"tool": "refimpl golden make", "refimpl": __version__, "commit": refimpl_commit(),
                         **library_versions()},
        "checkpoint": {"path": str(ckpt.resolve()),
                       "sha256": {f: sha256_file(ckpt / f) for f in ("config.json", "model.safetensors.index.json")
                                  if (ckpt / f).is_file()}},
        "config": read_config(ckpt).to_hf_dict(),
        "run": job.settings(),
        "corpus": {"file": Path(corpus_file).name, "sha256": corpus_hash(prompts),
                   "file_sha256": sha256_file(corpus_file),
                   "tokens": sum(len(p.tokens) for p in prompts)},
        "prompts": [{"id": p.id, "tokens": len(p.tokens)} for p in prompts],
        "complete": False,
        "files": {},
    }


# the manifest keys that must agree for a run to continue in an existing folder, and what each means
IDENTITY = {"config": "checkpoint config", "run": "precision, revision, layout or kept sites",
            "corpus.sha256": "corpus (its prompts' ids and tokens)", "checkpoint.sha256": "checkpoint (its config or index file)"}


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    try:
        manifest = parse_json(read_text(path, limit=1 << 28, what="a corpus manifest", error=CorpusError))
    except (ValueError, RecursionError) as e:
        raise CorpusError(f"{path}: not a corpus manifest ({str(e)[:200]})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and manifest.get("format_version") == FORMAT_VERSION):
        raise CorpusError(f"{path}: not a manifest of a refimpl corpus (format {FORMAT} {FORMAT_VERSION})")
    return manifest


def prepare_folder(out, manifest: dict) -> bool:
    """Make out (or check that it holds this very run, to continue it); -> whether it existed.

    A folder holding anything but a corpus run is refused, never emptied; so is a corpus folder of
    another corpus, checkpoint, precision or kept sites (CorpusError naming which).
    """
    out, exists = check_output_path(out, folder=True, error=CorpusError)
    if exists:
        entries = {p.name for p in out.iterdir()}
        if entries and MANIFEST not in entries:
            raise CorpusError(f"{out}: exists and is not a corpus folder (no {MANIFEST}); give a new or empty folder")
        if entries:
            old = read_manifest(out)
            for key, what in IDENTITY.items():
                if _get(old, key) != _get(manifest, key):
                    raise CorpusError(f"{out}: holds a corpus run with another {what} ({key}: there "
                                      f"{json.dumps(_get(old, key))[:120]}, here {json.dumps(_get(manifest, key))[:120]}); "
                                      "give another folder, or remove this one to start again")
            stray = entries - {MANIFEST, PROMPTS}
            if stray:
                raise CorpusError(f"{out}: holds files a corpus folder does not ({', '.join(sorted(stray)[:3])})")
    else:
        out.mkdir()
    (out / PROMPTS).mkdir(exist_ok=True)
    write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return exists


def finish_manifest(out, manifest: dict, prompts: list[Prompt]) -> dict:
    """List every prompt file's SHA-256 in the manifest and mark the run complete."""
    files = {f"{PROMPTS}/{p.id}.safetensors": sha256_file(prompt_path(out, p.id)) for p in prompts}
    manifest = dict(manifest, complete=True, files=files)
    write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------- the run

@dataclass
class Progress:
    """Where a run stands (given to the progress callback after each prompt is written)."""
    done: int                                  # prompts written, this run and earlier ones
    total: int
    tokens: int = 0                            # tokens run in this run
    seconds: float = 0.0                       # since this run started
    left_tokens: int = 0                       # tokens of the prompts still to run
    skipped: int = 0                           # prompts found written by an earlier run
    retried: list[str] = field(default_factory=list)   # prompts given to another worker after a worker failed

    def line(self) -> str:
        """`corpus: 5/16 prompts, 1280 tokens, 35.2 tokens/s, ETA 0:00:12` (hours:minutes:seconds)."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        left = round(self.left_tokens / rate) if rate > 0 else None
        eta = "?" if left is None else f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        more = f", {self.skipped} already written" if self.skipped else ""
        more += f", {len(self.retried)} retried" if self.retried else ""
        return (f"corpus: {self.done}/{self.total} prompts, {self.tokens} tokens, {rate:.1f} tokens/s, "
                f"ETA {eta}{more}")


def run_local(job: Job, pending: list[Prompt], out, progress: Callable[[Prompt], None]) -> None:
    """Run the pending prompts in this process, one model, one prompt file each."""
    model = job.load()
    for p in pending:
        tensors, meta = run_prompt(model, job, p)
        write_prompt(out, p, tensors, meta)
        progress(p)


def make_corpus(ckpt, corpus, out, *, job: Job | None = None, runner=None,
                progress: Callable[[Progress], None] | None = None) -> dict:
    """Run every prompt of the corpus file not yet written in out; -> the final manifest.

    job: the settings (default: Job(ckpt), mirror, full logits). runner(job, pending, out, done):
    who runs the pending prompts, calling done(prompt) after writing each (default `run_local`;
    corpus_ray.ray_runner(workers) spreads them over Ray workers). progress: called with a
    Progress after each prompt.
    """
    check_checkpoint_folder(ckpt)
    job = job or Job(str(ckpt))
    if Path(job.ckpt) != Path(ckpt):
        raise CorpusError(f"the job's checkpoint {job.ckpt} is not {ckpt}")
    known = site_names(read_config(ckpt))
    unmatched = [p for p in job.sites if not any(fnmatch.fnmatchcase(n, p) for n in known)]
    if unmatched:                                    # refused before the folder is made (a typo keeps nothing)
        raise CorpusError(f"sites {unmatched} match no site of this model (e.g. 'layers.0.attn.q', 'layers.*.out'; "
                          "docs/trace-format.md lists them)")
    prompts = read_corpus(corpus, ckpt, job.max_seq_len)
    manifest = make_manifest(job, prompts, corpus)
    prepare_folder(out, manifest)
    pending = [p for p in prompts if not prompt_done(out, p)]
    state = Progress(done=len(prompts) - len(pending), total=len(prompts), skipped=len(prompts) - len(pending),
                     left_tokens=sum(len(p.tokens) for p in pending))
    t0 = time.perf_counter()

    def done(p: Prompt, retried: list[str] | None = None) -> None:
        state.done += 1
        state.tokens += len(p.tokens)
        state.left_tokens -= len(p.tokens)
        state.seconds = time.perf_counter() - t0
        state.retried = list(retried or state.retried)
        if progress is not None:
            progress(state)
    if pending:
        (runner or run_local)(job, pending, out, done)
    missing = [p.id for p in prompts if not prompt_path(out, p.id).is_file()]
    if missing:                                      # a runner that returned early: never a complete manifest
        raise CorpusError(f"{out}: {len(missing)} prompt(s) were not written ({', '.join(missing[:3])}); "
                          "run the command again to continue")
    return finish_manifest(out, manifest, prompts)

