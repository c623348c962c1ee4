"""The layers of the repository, held: every module's imports read from its source (nothing run).

Lowest first, the package ``samlora`` is ``core -> data -> metrics -> models -> inference ->
training -> evaluation``. A package module imports only modules of its own layer or lower ones and
never a root module (the command modules, ``main.py``, the public faces ``lora.py`` and
``dataset.py``) or a benchmark; a command module never imports another command module; no modules
import each other in a circle, inside a layer included. ``python -m pytest tests/test_layers.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "samlora"
LAYERS = ("core", "data", "metrics", "models", "inference", "training", "evaluation")
COMMANDS = {"download_weights", "train", "parameter_search", "evaluate", "detect", "demo"}
FACES = {"lora", "dataset"}
ROOT_FILES = {"main.py", *(f"{name}.py" for name in COMMANDS | FACES)}


def module_name(path: Path, root: Path) -> str:
    """``samlora/data/folds.py`` -> ``samlora.data.folds``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path) -> dict[str, Path]:
    """Every module of the repository that the layers govern: the root files, the package, the benchmarks."""
    found = {module_name(p, root): p for p in root.glob("*.py")}
    for folder in (PACKAGE, "benchmarks"):
        found.update({module_name(p, root): p for p in (root / folder).rglob("*.py")})
    return found


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The repository modules that ``path`` (module ``name``) imports, anywhere in its body."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                out.add(candidate)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the repository modules it imports."""
    modules = source_modules(root)
    return {name: imported(path, name, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    """The layer index of a package module (``samlora.<layer>...``); None outside the layers."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the layers, as one readable line each."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith(PACKAGE):
                if not target.startswith(PACKAGE):
                    found.append(f"{module} imports {target}: the package never imports a root module or a benchmark")
                    continue
                here, there = layer_of(module), layer_of(target)
                if here is not None and there is not None and there > here:
                    found.append(f"{module} ({LAYERS[here]}) imports {target} ({LAYERS[there]}), a higher layer")
            elif module in COMMANDS and target in COMMANDS:
                found.append(f"command {module} imports command {target}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_repository_keeps_its_layers() -> None:
    graph = import_graph(REPO)
    assert len([m for m in graph if m.startswith(PACKAGE + ".")]) > 20, "the package was not found"
    assert violations(graph) == []


def test_the_root_holds_only_the_design_cards_files() -> None:
    assert {p.name for p in REPO.glob("*.py")} == ROOT_FILES


def test_every_package_module_sits_in_a_layer() -> None:
    strays = [m for m in import_graph(REPO) if m.startswith(PACKAGE + ".") and layer_of(m) is None]
    assert strays == []


@pytest.mark.parametrize("graph, expected", [
    ({"samlora.data.folds": {"samlora.training.trainer"}, "samlora.training.trainer": set()},
     "samlora.data.folds (data) imports samlora.training.trainer (training), a higher layer"),
    ({"samlora.models.sam": {"lora"}, "lora": set()},
     "samlora.models.sam imports lora: the package never imports a root module or a benchmark"),
    ({"evaluate": {"train"}, "train": set()}, "command evaluate imports command train"),
    ({"samlora.data.a": {"samlora.data.b"}, "samlora.data.b": {"samlora.data.a"}},
     "import cycle: samlora.data.a -> samlora.data.b -> samlora.data.a"),
])
def test_an_import_against_the_layers_is_caught(graph: dict[str, set[str]], expected: str) -> None:
    assert violations(graph) == [expected]


def test_an_upward_import_written_into_a_module_is_caught(tmp_path: Path) -> None:
    """The whole check, source to verdict, on a copy of two real modules with an import added."""
    for relative in ("samlora/__init__.py", "samlora/core/__init__.py", "samlora/training/__init__.py",
                     "samlora/core/errors.py", "samlora/training/losses.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text((REPO / relative).read_text())
    assert violations(import_graph(tmp_path)) == []
    errors = tmp_path / "samlora" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from samlora.training import losses  # noqa\n")
    assert violations(import_graph(tmp_path)) == [
        "samlora.core.errors (core) imports samlora.training.losses (training), a higher layer"]
