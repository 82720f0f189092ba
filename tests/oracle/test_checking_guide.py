"""docs/checking.md as a user follows it: its script runs as written (without refimpl), its commands give
the output it quotes, and every report it quotes is what compare says today (regenerated here).

To update the quoted reports after a deliberate change of compare: `python tests/oracle/guide_reports.py --write`.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import guide_reports
from refimpl.oracle.golden import default_dir

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "checking.md"
TEXT = GUIDE.read_text(encoding="utf-8")


def block_after(marker: str) -> str:
    """The fenced block that follows `<!-- marker -->` in the guide."""
    m = re.search(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)\n```", TEXT, flags=re.S)
    assert m, f"docs/checking.md has no block after <!-- {marker} -->"
    return m.group(1)


def in_order(quoted: str, output: str) -> None:
    """Every line of a quoted block (but '...') is a line of output, in the same order."""
    lines, at = output.splitlines(), 0
    for want in quoted.splitlines():
        if want == "...":
            continue
        assert want in lines[at:], f"quoted line not in the output (after line {at}):\n{want}\n---\n{output}"
        at = lines.index(want, at) + 1


def bash_block(heading: str) -> list[str]:
    """The command lines of the first bash block after a heading of the guide."""
    part = TEXT[TEXT.index(heading):]
    body = re.search(r"```bash\n(.*?)\n```", part, flags=re.S).group(1)
    return [line.split("  #")[0].rstrip() for line in body.splitlines() if line.strip()]


def test_the_script_imports_nothing_but_numpy_and_safetensors():
    tree = ast.parse(block_after("run: write_trace.py"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"json", "struct", "sys", "pathlib", "numpy", "safetensors"}


def test_the_script_and_the_compare_command_run_as_written(tiny_ckpt, tmp_path):
    """Step 3 of the guide, its bash lines run in a shell: the script writes the trace, compare passes it
    with --partial and prints the lines the guide quotes."""
    (tmp_path / "write_trace.py").write_text(block_after("run: write_trace.py") + "\n")
    (tmp_path / "ck").symlink_to(tiny_ckpt)                  # `refimpl make-checkpoint tiny ck --seed 0` (step 1)
    script = "\n".join([f'G="{default_dir()}"', *bash_block("## 3. Compare it")])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (tmp_path / "mine.safetensors").is_file(), r.stdout + r.stderr
    in_order(block_after("checked: embed-only"), r.stdout)


def test_every_quoted_report_has_its_example():
    quoted = set(re.findall(r"<!-- checked: ([\w-]+) -->", TEXT))
    assert quoted == set(guide_reports.EXAMPLES) | {"embed-only"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guide")


@pytest.mark.parametrize("name", sorted(guide_reports.EXAMPLES))
def test_each_quoted_report_is_what_compare_says(name, out_dir):
    assert guide_reports.tail(guide_reports.report(name, out_dir)) == block_after(f"checked: {name}")
