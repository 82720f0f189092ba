"""The package's shape: imports point one way (no cycle), and the README's reading order is true."""
import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "refimpl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the refimpl modules it imports (at top level or inside functions)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from refimpl.x import y` imports refimpl.x.y when y is a module, else refimpl.x
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        state[u] = "done"
        stack.pop()
        return None
    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_math_reads_no_files():
    # the components import NumPy and each other, never the formats, the oracle tools or the CLI
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("refimpl.model"):
            assert not {d for d in deps if d.startswith(("refimpl.formats", "refimpl.cli", "refimpl.synthetic"))}, name


def test_readme_reading_order_names_real_modules():
    readme = (PKG.parent / "README.md").read_text()
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`([\w/]+\.py)`", section)
    assert len(named) >= 15
    for rel in named:
        assert (PKG / rel).is_file(), f"README reading order names {rel}, which does not exist"
