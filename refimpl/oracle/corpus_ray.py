"""A corpus run spread over Ray workers (the optional extra: pip install 'refimpl[ray]').

Two runners for corpus.make_corpus: `ray_runner(N)`, prompt-parallel (N workers, each with the
whole model), and `pipeline_runner(N)`, layer-pipelined (N stages, each owning a contiguous range
of layers; below). Only this module imports ray, and nothing in refimpl imports this module at
import time (the command line does for --workers or --stages), so refimpl runs without ray.

Why actors and not Ray Data or plain tasks: a worker's cost is its model, a memory map of the
checkpoint (160 GB for Flash) whose pages are read as they are used; an actor maps it once and
keeps it for every prompt it is given, where a task would map it per prompt. The driver keeps the
queue itself (one prompt in flight per worker, the next one given when a worker returns), which is
all the scheduling a corpus needs, and it alone writes the files:

- a worker returns a prompt's tensors and metadata through the object store; the driver writes
  them with the same `corpus.write_prompt` as a one-process run, so the bytes are the same;
- a worker that dies (killed, out of memory, its node lost) fails the call the driver waits on:
  its prompt goes back to the front of the queue, a new worker takes its place, and nothing of
  the prompt was written (the file appears only when the driver renames it into place). A prompt
  whose workers die RETRIES + 1 times stops the run with a CorpusError (a prompt that kills its
  worker, e.g. by memory, would otherwise kill them all); the prompts written so far are kept;
- an error of the prompt itself (a refimpl ValueError in the worker) stops the run with that
  error's message: running it again would fail again.

The checkpoint must be at the same path on every node (a shared or copied folder); the output
folder is on the driver's machine only.
"""
from __future__ import annotations

import os
from collections import deque

import ray
from ray.exceptions import RayActorError, RayError

from refimpl.formats.config_file import read_config
from refimpl.oracle.corpus import CorpusError, Job, Prompt, run_prompt, run_stage, split_layers, write_prompt
from refimpl.oracle.trace import Trace
from refimpl.sites import wants_mtp

RETRIES = 2                                  # a prompt is given to a new worker at most this many times


@ray.remote(num_cpus=1, max_restarts=0)
class CorpusWorker:
    """One worker process: the model over its memory map of the checkpoint, loaded once."""

    def __init__(self, job: Job):
        self.job = job
        self.model = job.load()

    def pid(self) -> int:
        return os.getpid()

    def run(self, prompt: Prompt):
        """-> ("ok", tensors, metadata), or ("error", message) for an error of the prompt itself."""
        try:
            tensors, meta = run_prompt(self.model, self.job, prompt)
        except ValueError as e:               # every refimpl input error: the driver reports it
            return "error", f"prompt {prompt.id}: {e}", None
        return "ok", tensors, meta


def ensure_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at address ('auto': the running one), or start a local one, once per process."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def ray_runner(workers: int, *, address: str | None = None, on_worker=None):
    """A runner for corpus.make_corpus: the pending prompts over `workers` Ray actors.

    on_worker(busy, written): called after each round of handing out prompts, with the process ids
    of the workers holding a prompt and the number of prompts written so far (the tests kill one).
    """
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise CorpusError(f"workers must be an integer >= 1, got {workers!r:.40}")

    def run(job: Job, pending: list[Prompt], out, done) -> None:
        ensure_ray(address)
        pool = [CorpusWorker.remote(job) for _ in range(min(workers, len(pending)))]
        queue, inflight, failures, retried = deque(pending), {}, {}, []
        pid_refs = [w.pid.remote() for w in pool]       # answered once a worker has loaded its model
        written = 0
        try:
            while queue or inflight:
                busy = {i for i, _ in inflight.values()}
                for i in range(len(pool)):
                    if queue and i not in busy:
                        p = queue.popleft()
                        inflight[pool[i].run.remote(p)] = (i, p)
                if on_worker is not None:
                    on_worker([ray.get(pid_refs[i]) for i, _ in inflight.values()], written)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                i, p = inflight.pop(ready[0])
                try:
                    status, tensors, meta = ray.get(ready[0])
                except RayActorError as e:         # the worker died: its prompt goes to a new worker
                    _requeue(p, e, "its worker", failures, retried, queue)
                    pool[i] = CorpusWorker.remote(job)
                    pid_refs[i] = pool[i].pid.remote()
                    continue
                if status != "ok":
                    raise CorpusError(tensors)
                write_prompt(out, p, tensors, meta)
                written += 1
                done(p, retried)
        finally:
            for w in pool:
                ray.kill(w)
    return run


# ---------------------------------------------------------------- layer-pipelined

@ray.remote(num_cpus=1, max_restarts=0)
class StageWorker:
    """One pipeline stage: the model over the checkpoint's memory map, running layers start..stop-1 only
    (so it reads only their weights' pages, and the embedding's or the head's where it is first or last)."""

    def __init__(self, job: Job, start: int, stop: int):
        self.job, self.start, self.stop = job, start, stop
        self.model = job.load()

    def pid(self) -> int:
        return os.getpid()

    def run(self, prompt: Prompt, carry):
        """carry: None (first stage), ("ok", h, sites) from the stage before, or ("error", message) passed on."""
        if carry is not None and carry[0] != "ok":
            return carry
        try:
            out = run_stage(self.model, self.job, prompt, None if carry is None else carry[1:], self.start, self.stop)
        except ValueError as e:
            return "error", f"prompt {prompt.id}: {e}", None
        return ("ok",) + tuple(out)


def pipeline_runner(stages: int, *, address: str | None = None, on_worker=None):
    """A runner for corpus.make_corpus: each prompt through `stages` Ray actors owning contiguous layer ranges.

    A prompt's streams go from stage to stage through the object store (the driver passes each stage's
    result reference to the next stage's call); up to 2 x stages prompts are in flight, so every stage
    has work while the pipeline is full. A stage that dies fails the prompts passing through it: they
    go back to the queue and the dead stage is replaced (RETRIES as in ray_runner). on_worker(pids,
    written): after each hand-out, the stages' process ids and the prompts written so far.
    """
    if not (isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1):
        raise CorpusError(f"stages must be an integer >= 1, got {stages!r:.40}")

    def run(job: Job, pending: list[Prompt], out, done) -> None:
        cfg = read_config(job.ckpt) if job.max_seq_len is None else read_config(job.ckpt, max_seq_len=job.max_seq_len)
        if wants_mtp(Trace(job.sites), cfg.mtp_layer):
            raise CorpusError("a layer pipeline runs the main layers only: sites of the MTP block "
                              f"(layers.{cfg.mtp_layer}.*, mtp.*) need the prompt-parallel run (--workers)")
        bounds = split_layers(cfg.n_layers, stages)
        ensure_ray(address)
        pool = [StageWorker.remote(job, a, b) for a, b in bounds]
        pid_refs = [w.pid.remote() for w in pool]
        queue, inflight, failures, retried, written = deque(pending), {}, {}, [], 0
        try:
            while queue or inflight:
                while queue and len(inflight) < 2 * len(pool):
                    p = queue.popleft()
                    ref = None
                    for w in pool:                       # each stage's call takes the reference of the one before
                        ref = w.run.remote(p, ref)
                    inflight[ref] = p
                if on_worker is not None:
                    on_worker(ray.get(pid_refs), written)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                p = inflight.pop(ready[0])
                try:
                    status, tensors, meta = ray.get(ready[0])
                except RayError as e:                    # a stage died on its way: again, on a new stage
                    _requeue(p, e, "a pipeline stage", failures, retried, queue)
                    for i, w in enumerate(pool):
                        if not _alive(w):
                            pool[i] = StageWorker.remote(job, *bounds[i])
                            pid_refs[i] = pool[i].pid.remote()
                    continue
                if status != "ok":
                    raise CorpusError(tensors)
                write_prompt(out, p, tensors, meta)
                written += 1
                done(p, retried)
        finally:
            for w in pool:
                ray.kill(w)
    return run


def _requeue(p, e, who: str, failures: dict, retried: list, queue) -> None:
    """A prompt whose worker (or stage) died goes back to the front of the queue, RETRIES times at most; then the
    run stops with one error, keeping every prompt file written so far."""
    failures[p.id] = failures.get(p.id, 0) + 1
    if failures[p.id] > RETRIES:
        raise CorpusError(f"prompt {p.id}: {who} died {failures[p.id]} times (the last: "
                          f"{str(e).splitlines()[0][:200]}); the prompts written so far are kept, "
                          "run the command again to continue") from None
    retried.append(p.id)
    queue.appendleft(p)


def _alive(worker) -> bool:
    """Whether an actor still answers (a dead one fails its calls at once; a busy one answers after its queue)."""
    try:
        ray.get(worker.pid.remote())
        return True
    except RayActorError:
        return False
