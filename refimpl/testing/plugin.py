"""The pytest plugin of refimpl.testing (entry point `pytest11: refimpl = refimpl.testing.plugin`).

Installed with refimpl, active in every pytest run of that environment; it adds options and fixtures only
(nothing runs unless a test asks for a fixture):

    --refimpl-precision P      float64 | float32 | mirror: the precision the candidates under test claim
                               (default float32); fixture `refimpl_precision`
    --refimpl-examples N       Hypothesis examples per check_op call made through `refimpl_check` (default 50)
    --refimpl-bitwise          with mirror: require refimpl's mirror bits, not only mirror's error bound

    refimpl_ops                the records, {name: OpRecord} (refimpl.testing.OPS)
    refimpl_check              refimpl_check(impl, op, *, precision, max_examples, bitwise): check_op with the
                               command line's precision, examples and bitwise as defaults
    refimpl_tiny_checkpoint    a tiny random-weight checkpoint in the official format (seed 0), once per session
    refimpl_golden             the golden set's inputs: [GoldenCase(name, tokens, chunks, decode_from, rows, traces)]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from refimpl.config import Config
from refimpl.numerics import PRECISIONS
from refimpl.oracle.golden import GoldenInput, default_dir, read_manifest, trace_file
from refimpl.synthetic.writer import make_checkpoint
from refimpl.testing import OPS, check_op


def pytest_addoption(parser):
    group = parser.getgroup("refimpl", "refimpl.testing: property tests against the DeepSeek V4 reference")
    group.addoption("--refimpl-precision", default="float32", choices=PRECISIONS,
                    help="the precision of the implementations under test (default: float32)")
    group.addoption("--refimpl-examples", type=int, default=50,
                    help="Hypothesis examples per refimpl_check call (default: 50)")
    group.addoption("--refimpl-bitwise", action="store_true",
                    help="with --refimpl-precision mirror: require refimpl's mirror bits (up to rare boundary flips)")


@pytest.fixture(scope="session")
def refimpl_precision(request) -> str:
    return request.config.getoption("--refimpl-precision")


@pytest.fixture(scope="session")
def refimpl_ops() -> dict:
    return dict(OPS)


@pytest.fixture
def refimpl_check(request, refimpl_precision):
    """check(impl, op, *, precision=..., max_examples=..., bitwise=...): check_op with the command line's defaults."""
    examples = request.config.getoption("--refimpl-examples")
    bitwise = request.config.getoption("--refimpl-bitwise")

    def check(impl, op, *, precision=None, max_examples=None, bitwise=bitwise):
        prec = precision or refimpl_precision
        check_op(impl, op, prec, max_examples=max_examples or examples, bitwise=bitwise and prec == "mirror")
    return check


@pytest.fixture(scope="session")
def refimpl_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset written in the official checkpoint format (seed 0): `refimpl make-checkpoint tiny DIR`."""
    path = tmp_path_factory.mktemp("refimpl") / "tiny"
    make_checkpoint(Config.tiny(), path, seed=0, progress=False)
    return path


@dataclass(frozen=True)
class GoldenCase:
    """One input of the golden set: its tokens, how it is run, the positions kept, its trace per precision, and
    the checkpoint it runs on (None: the tiny one, `refimpl_tiny_checkpoint`; else a preset name, made with
    `refimpl make-checkpoint PRESET DIR --seed 0`)."""
    name: str
    tokens: tuple
    chunks: tuple | None
    decode_from: int | None
    rows: tuple
    traces: dict             # precision -> path of refimpl's trace of this input (docs/trace-format.md)
    checkpoint: str | None = None


@pytest.fixture(scope="session")
def refimpl_golden() -> list:
    folder = default_dir()
    manifest = read_manifest(folder)
    cases = []
    for d in manifest["inputs"]:
        g = GoldenInput.from_dict(d, len(manifest["tokens"]))
        cases.append(GoldenCase(g.name, tuple(manifest["tokens"][:g.length]), g.chunks, g.decode_from, g.rows,
                                {p: folder / trace_file(p, g.name) for p in g.stored(manifest["precisions"])},
                                g.checkpoint))
    return cases
