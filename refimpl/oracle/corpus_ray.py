"""A corpus run spread over Ray workers, prompt-parallel (the optional extra: pip install 'refimpl[ray]').

Only this module imports ray, and nothing in refimpl imports this module at import time (the
command line does when --workers is given), so refimpl runs without ray installed.

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
from ray.exceptions import RayActorError

from refimpl.oracle.corpus import CorpusError, Job, Prompt, run_prompt, write_prompt

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
                    failures[p.id] = failures.get(p.id, 0) + 1
                    if failures[p.id] > RETRIES:
                        raise CorpusError(f"prompt {p.id}: its worker died {failures[p.id]} times (the last: "
                                          f"{str(e).splitlines()[0][:200]}); the prompts written so far are kept, "
                                          "run the command again to continue") from None
                    retried.append(p.id)
                    queue.appendleft(p)
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
