"""The repository carries its own documents: every reference in it can be followed from it alone.

- no file points outside the repository (to the briefing folder) or to the old spec's numbering;
- every `docs/architecture.md §N` / `§N.M` reference resolves to a section heading or a
  numbered watch point of the guide;
- every official citation (`M:L496-499`, `K:L79`, ...) lies within the official file's line count,
  as recorded in the guide's §1 table;
- every picture the documents link exists;
- every single letter of a shape comment is in the dims legend of `Config`.
"""
from __future__ import annotations

import re
from pathlib import Path

from refimpl.config import Config

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "architecture.md"
SKIP_DIRS = {".git", "__pycache__", ".hypothesis", ".pytest_cache", "build", "dist"}
CODE_DIRS = ("refimpl", "tests", "benchmarks", "tools")

# written in pieces so that this file does not contain what it forbids
FORBIDDEN = ("../" + "shared", "/work/" + "shared", "spec " + "§", "pit" + "fall")

SECTION_REF = re.compile(r"§(\d+)(?:\.(\d+))?(?:-(\d+)\.(\d+))?")
CITATION = re.compile(r"\b([MKCGE]):L(\d+(?:-\d+)?(?:,\s*L\d+(?:-\d+)?)*)")


def _skipped(d: Path) -> bool:
    """Not the project's own files: VCS data, caches, build output, virtual environments."""
    return (d.name in SKIP_DIRS or d.name.endswith((".egg-info", "-cache", "_cache"))
            or (d / "pyvenv.cfg").exists())


def repo_text_files():
    todo = [ROOT]
    while todo:
        for p in sorted(todo.pop().iterdir()):
            if p.is_dir():
                if not _skipped(p):
                    todo.append(p)
                continue
            try:
                yield p, p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue                                       # binary (pictures, checkpoints)


def code_files():
    files = [ROOT / "README.md"]
    for d in CODE_DIRS:
        files += sorted((ROOT / d).rglob("*.py")) if (ROOT / d).is_dir() else []
    return files


def guide_targets() -> set[str]:
    """Section numbers ("7", "2.1") and watch-point numbers ("19.5") the guide defines."""
    text = GUIDE.read_text(encoding="utf-8")
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M)
    items = re.findall(r"^\*\*(\d+\.\d+)\*\* ", text, flags=re.M)
    return set(heads) | set(items)


def official_line_counts() -> dict[str, int]:
    """letter -> line count, from the guide's table of official files (| M | `inference/model.py` | 828 | ...)."""
    rows = re.findall(r"^\| ([MKCGE]) \| `[^`]+` \| (\d+) \|", GUIDE.read_text(encoding="utf-8"), flags=re.M)
    return {letter: int(n) for letter, n in rows}


def test_no_reference_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{n}: {word!r}"
           for p, text in repo_text_files()
           for n, line in enumerate(text.splitlines(), 1)
           for word in FORBIDDEN if word in line.lower()]
    assert not bad, "references to documents outside the repository:\n" + "\n".join(bad)


def test_guide_sections_resolve():
    targets = guide_targets()
    assert {str(i) for i in range(1, 21)} <= targets and "19.36" in targets
    bad = []
    for p in code_files() + [GUIDE]:
        text = p.read_text(encoding="utf-8")
        refs = list(SECTION_REF.finditer(text))
        if refs and p != GUIDE and "docs/architecture.md" not in text:
            bad.append(f"{p.relative_to(ROOT)}: uses § but never names docs/architecture.md")
        for m in refs:
            a, b, c, d = m.groups()
            for sec in ([f"{a}.{b}" if b else a] + ([f"{c}.{d}"] if c else [])):
                if sec not in targets:
                    line = text.count("\n", 0, m.start()) + 1
                    bad.append(f"{p.relative_to(ROOT)}:{line}: §{sec} is not a section of docs/architecture.md")
    assert not bad, "\n".join(bad)


def test_official_citations_within_the_official_files():
    counts = official_line_counts()
    assert counts == {"M": 828, "K": 536, "C": 168, "G": 155, "E": 744}
    bad, n_refs = [], 0
    for p in code_files() + [GUIDE]:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in CITATION.finditer(line):
                for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", m.group(2)):
                    n_refs += 1
                    lo, hi = int(lo), int(hi or lo)
                    if not 1 <= lo <= hi <= counts[m.group(1)]:
                        bad.append(f"{p.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert n_refs > 100 and not bad, "citations outside the official files:\n" + "\n".join(bad)


def test_linked_pictures_exist():
    links = []
    for doc in [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            links.append((doc, target))
    assert len(links) >= 2
    missing = [f"{doc.relative_to(ROOT)}: {t}" for doc, t in links if not (doc.parent / t).is_file()]
    assert not missing, "linked pictures missing:\n" + "\n".join(missing)


def legend_letters() -> set[str]:
    legend = Config.__doc__.split("Dims legend", 1)[1]
    return set(re.findall(r"(?:^|\s)([A-Za-z])(?=[ ,])", legend))


def test_every_shape_letter_is_in_the_legend():
    legend = legend_letters()
    assert {"b", "s", "c", "d", "W", "T", "o", "x"} <= legend
    bad = []
    files = sorted((ROOT / "refimpl" / "model").glob("*.py")) + [ROOT / "refimpl" / "numerics.py",
                                                                ROOT / "refimpl" / "formats" / "weights.py"]
    for p in files:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "#" not in line:
                continue
            for group in re.findall(r"\[([^\]]*)\]", line.split("#", 1)[1]):
                for letter in re.findall(r"(?<![\w.'\"])([A-Za-z])(?![\w'\"(])", group):
                    if letter not in legend:
                        bad.append(f"{p.relative_to(ROOT)}:{n}: {letter!r} in [{group}]")
    assert not bad, "shape letters missing from the dims legend:\n" + "\n".join(bad)
