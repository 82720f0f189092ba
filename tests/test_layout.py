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


# The floors of the package, lowest first (the README's map). A module imports only from its own floor
# or below, at top level or inside a function; one floor's modules import each other without a cycle.
# ops.py names the kernel modules as "module:function" strings and imports one only when a selection
# asks for it: a registry looked up by name, not an import (tests/test_ops.py).
FLOORS = (
    ("refimpl._version", "refimpl.numerics", "refimpl.ops", "refimpl.config"),
    ("refimpl.sites", "refimpl.context"),
    ("refimpl.model",),
    ("refimpl.kernels", "refimpl.cuda"),
    ("refimpl.formats",),
    ("refimpl.grad",),               # the backward: differentiates the model's float64 forward; takes a checkpoint
    ("refimpl.synthetic", "refimpl.generate"),
    ("refimpl.oracle",),
    ("refimpl.testing",),                       # the property-testing kit: above everything it offers, below the CLI
    ("refimpl.cli", "refimpl"),
)


def floor_of(module: str) -> int:
    best = None
    for i, names in enumerate(FLOORS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is on no floor of FLOORS; add it"
    return best[0]


def upward_imports(graph) -> list[str]:
    return [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]


def test_every_import_points_to_the_same_floor_or_below():
    upward = upward_imports(import_graph())
    assert not upward, "\n".join(upward)


def test_only_the_command_line_imports_inside_functions():
    """A function-level import hides an arrow from a reader (and can hide a cycle); only the CLI has them, so that
    `refimpl --help` starts without importing NumPy's and Numba's heavy modules."""
    hidden = []
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        if name.startswith("refimpl.cli"):
            continue
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                hidden += [f"{name}:{node.lineno} imports {m}" for m in mods if m.startswith("refimpl")]
    assert not hidden, "\n".join(hidden)


def test_the_floor_check_finds_an_upward_import():
    assert upward_imports({"refimpl.model.moe": {"refimpl.oracle.replay", "refimpl.sites"}}) == \
        ["refimpl.model.moe (floor 2) imports refimpl.oracle.replay (floor 7)"]
    assert floor_of("refimpl.model.attention") < floor_of("refimpl.oracle.trace")
    assert floor_of("refimpl.sites") < floor_of("refimpl.model.block") < floor_of("refimpl.formats.weights")
    assert floor_of("refimpl") == floor_of("refimpl.cli.main")


def test_the_spec_imports_only_numpy_the_ground_floor_and_itself():
    # the components import NumPy, the floors below and each other, never the formats, the oracle tools or the CLI
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("refimpl.model"):
            assert all(floor_of(d) <= floor_of(name) for d in deps), (name, deps)
            assert not {d for d in deps if d.startswith(("refimpl.formats", "refimpl.oracle", "refimpl.cli",
                                                         "refimpl.synthetic", "refimpl.kernels"))}, name


def test_readme_map_names_the_floors_in_order():
    readme = (PKG.parent / "README.md").read_text()
    section = readme.split("## Map", 1)[1].split("\n## ", 1)[0] if "## Map" in readme else \
        readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    order = [section.find(name) for name in ("numerics.py", "sites.py", "model/", "kernels/", "formats/", "grad/",
                                             "oracle/", "cli/")]
    assert all(i >= 0 for i in order), order
    assert order == sorted(order), "the README's map lists the floors out of order"


def test_readme_reading_order_names_real_modules():
    readme = (PKG.parent / "README.md").read_text()
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`([\w/]+\.py)`", section)
    assert len(named) >= 15
    for rel in named:
        assert (PKG / rel).is_file(), f"README reading order names {rel}, which does not exist"
