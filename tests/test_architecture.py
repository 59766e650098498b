"""The package's shape: no import circles, and packages import only downward (docs/architecture.md).

The graph is read from the source (ast), every import counted, lazy ones inside functions too: a
late import hides a circle from Python but not from a reader."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ce_ray"

# Bottom to top: a module may import from its own layer and the layers below, never above.
LAYERS = [
    {"errors", "fsutil", "config", "cluster", "tracking"},  # the ground floor: shared services
    {"core"},  # pure torch: masks and fills, model, losses, step, metrics, classical fills
    {"data"},  # photos -> shards -> crops -> streams
    {"train"},  # loop, drivers, checkpoints, the run's MLflow side
    {"infer"},  # resolver, planner, batch, serve, export, pyfunc, shipped model
    {"evaluate"},  # tiles and photos protocols
    {"tune"},  # sweeps
    {"cli", "demo", "__init__"},  # entry points
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ce_ray module `path` imports, resolved to module names (a package's name for its
    __init__, or package.module for `from ce_ray.pkg import module`)."""
    modules = {module_name(p) for p in PKG.rglob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "ce_ray"
            and node.level == 0
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ce_ray"}
    return {m for m in out if m in modules} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, layer in enumerate(LAYERS):
        if key in layer:
            return i
    raise AssertionError(
        f"{module} is in no layer of tests/test_architecture.py: place it in docs/architecture.md and LAYERS"
    )


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m == "ce_ray":
                continue  # the package's __init__ (its version) is a leaf
            if colour.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if colour.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(g):
        if colour.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_only_run_downward():
    bad = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in graph().items()
        for d in deps
        if d != "ce_ray" and layer_of(d) > layer_of(m)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", ["core"])
def test_the_core_imports_no_ray_mlflow_or_files(pkg):
    """The pure-torch core: nothing from Ray, MLflow, or the file-writing helpers."""
    for p in (PKG / pkg).glob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] in ("ray", "mlflow") for n in names), p.name
        assert "ce_ray.fsutil" not in names and "ce_ray.tracking" not in names, p.name
