"""Tests of tools/: the mutation check of mirror's rounding steps."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "mutation_check.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutation_list_matches_the_code():
    """Every mutation's source text occurs exactly once: a code change that moves a rounding step
    fails here, in the default suite, until the list in tools/mutation_check.py follows it."""
    tool = load_tool()
    assert len(tool.MUTATIONS) >= 46
    assert tool.check_sources(tool.MUTATIONS) == []
    drifted = [("x", tool.MUTATIONS[0][1], [("this text is not in the file", "")])]
    assert len(tool.check_sources(drifted)) == 1


@pytest.mark.slow
def test_every_rounding_mutation_is_caught():
    """10-30 minutes: each rounding step removed in turn makes the suite fail."""
    assert load_tool().main([]) == 0
