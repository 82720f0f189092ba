"""Corpora on Ray (oracle/corpus_ray.py), prompt-parallel and layer-pipelined: the same bytes as one process,
and a killed worker or stage loses nothing.

Skipped without the extra (pip install 'refimpl[ray]'); .ci/run installs it. One local Ray cluster
of two worker CPUs serves every test of the session (its start-up is most of the time here).
"""
import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install 'refimpl[ray]'")

from refimpl.oracle.corpus import CorpusError, Job, make_corpus, read_manifest  # noqa: E402
from refimpl.oracle.corpus_ray import RETRIES, pipeline_runner, ray_runner  # noqa: E402

from test_corpus import files_of, random_corpus  # noqa: E402  (tests/oracle/test_corpus.py)


@pytest.fixture(scope="session")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def job(ckpt, **kw):
    return Job(str(ckpt), kernels="numpy", **kw)


@pytest.mark.parametrize("precision", ["mirror", "float64"])
def test_two_workers_and_two_stages_write_the_same_bytes_as_one_process(local_ray, tiny_ckpt, tmp_path, precision):
    corpus = random_corpus(tmp_path / "c.jsonl", n=4, seed=3)
    sites = ("layers.[0-5].out", "final.x") if precision == "float64" else ()   # sites of both stages travel too
    make_corpus(tiny_ckpt, corpus, tmp_path / "one", job=job(tiny_ckpt, precision=precision, sites=sites))
    for name, runner in (("workers", ray_runner(2)), ("stages", pipeline_runner(2))):
        states = []
        make_corpus(tiny_ckpt, corpus, tmp_path / name, job=job(tiny_ckpt, precision=precision, sites=sites),
                    runner=runner, progress=states.append)
        assert files_of(tmp_path / name) == files_of(tmp_path / "one"), name      # prompt files and manifest alike
        assert states[-1].done == 4 and not states[-1].retried


def test_a_killed_worker_loses_nothing(local_ray, tiny_ckpt, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=4, seed=4)
    make_corpus(tiny_ckpt, corpus, tmp_path / "one", job=job(tiny_ckpt))
    killed = []

    def kill_one_busy_worker(busy, written):                 # once a prompt is written: SIGKILL a worker mid-prompt
        if written >= 1 and not killed and busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])
    states = []
    make_corpus(tiny_ckpt, corpus, tmp_path / "two", job=job(tiny_ckpt), runner=ray_runner(2, on_worker=kill_one_busy_worker),
                progress=states.append)
    assert killed and states[-1].retried                      # its prompt went to a new worker
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_a_killed_pipeline_stage_loses_nothing(local_ray, tiny_ckpt, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=4, seed=4)
    make_corpus(tiny_ckpt, corpus, tmp_path / "one", job=job(tiny_ckpt))
    killed = []

    def kill_the_last_stage(pids, written):                  # prompts are in flight in both stages by then
        if written >= 1 and not killed:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
    states = []
    make_corpus(tiny_ckpt, corpus, tmp_path / "two", job=job(tiny_ckpt),
                runner=pipeline_runner(2, on_worker=kill_the_last_stage), progress=states.append)
    assert killed and states[-1].retried
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


def test_a_pipeline_refuses_sites_of_the_mtp_block(local_ray, tiny_ckpt, tmp_path):
    with pytest.raises(CorpusError, match="MTP block"):
        make_corpus(tiny_ckpt, random_corpus(tmp_path / "c.jsonl", n=1), tmp_path / "out",
                    job=job(tiny_ckpt, sites=("layers.*.out",)), runner=pipeline_runner(2))


def test_a_prompt_whose_workers_keep_dying_stops_the_run_keeping_what_was_written(local_ray, tiny_ckpt, tmp_path):
    corpus = random_corpus(tmp_path / "c.jsonl", n=3, seed=5)
    deaths = []

    def kill_after_the_first(busy, written):                  # the first prompt is written; then every worker dies
        if written >= 1:
            for pid in busy:
                os.kill(pid, signal.SIGKILL)
                deaths.append(pid)
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=f"its worker died {RETRIES + 1} times"):
        make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt), runner=ray_runner(1, on_worker=kill_after_the_first))
    assert len(deaths) == RETRIES + 1
    assert [p.name for p in (out / "prompts").iterdir()] == ["p0.safetensors"]    # whole files only
    assert read_manifest(out)["complete"] is False
    make_corpus(tiny_ckpt, corpus, out, job=job(tiny_ckpt), runner=ray_runner(1))  # and the run continues
    assert read_manifest(out)["complete"] is True


@pytest.mark.slow
def test_flash_dimension_corpus_on_two_workers_is_the_one_process_corpus(local_ray, tmp_path):
    """16 prompts on a 2-layer checkpoint of Flash dimensions (8 routed experts): 2 workers in mirror and float64,
    2 pipeline stages in mirror."""
    from refimpl.config import Config
    from refimpl.synthetic.writer import make_checkpoint
    ckpt = tmp_path / "flash2"
    make_checkpoint(Config.flash(), ckpt, seed=0, layers=2, experts=8, progress=False)
    corpus = random_corpus(tmp_path / "c.jsonl", n=16, seed=6, longest=9, vocab=Config.flash().vocab_size)
    for precision in ("mirror", "float64"):
        one, two = tmp_path / f"one-{precision}", tmp_path / f"two-{precision}"
        make_corpus(ckpt, corpus, one, job=Job(str(ckpt), precision=precision))
        make_corpus(ckpt, corpus, two, job=Job(str(ckpt), precision=precision), runner=ray_runner(2))
        assert files_of(two) == files_of(one)
        assert len(read_manifest(two)["files"]) == 16
    staged = tmp_path / "stages-mirror"                    # layer-pipelined: one layer per stage
    make_corpus(ckpt, corpus, staged, job=Job(str(ckpt), precision="mirror"), runner=pipeline_runner(2))
    assert files_of(staged) == files_of(tmp_path / "one-mirror")
