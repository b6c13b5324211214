"""The layout the README promises, checked on the source: the library imports no pipeline, no two modules
import each other (directly or round a longer circle), and no private name crosses a package boundary.

Read with `ast`, nothing imported: a lazy import inside a function counts like one at the top, since a
circle through a function body is still a circle in the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = "massv.pipelines"
# The one library module allowed to reach a pipeline: the CLI dispatches `massv demo` / `massv world` to them,
# by module name, inside the subcommand (importlib), so that `massv --help` stays cheap.
PIPELINE_DISPATCHERS = {"massv.cli"}


@dataclass(frozen=True)
class Import:
    importer: str  # the module holding the import statement
    module: str  # the module imported (a submodule when `from package import submodule`)
    name: str | None  # the name taken from it (`from module import name`), None for `import module`
    line: int


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the massv package."""
    modules = {}
    for path in sorted((root / "massv").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's own `__init__` belongs to that package)."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (annotations only: never run, never a circle)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(modules: dict[str, Path]) -> Iterator[Import]:
    """Every import of a massv module by a massv module, relative imports resolved."""
    for importer, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "massv":
                        yield Import(importer, alias.name, None, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package_of(importer, modules).split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if base.split(".")[0] != "massv":
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        yield Import(importer, submodule, None, node.lineno)
                    else:
                        yield Import(importer, base, alias.name, node.lineno)


def is_pipeline(module: str) -> bool:
    return module == PIPELINES or module.startswith(PIPELINES + ".")


def library_imports_of_pipelines(modules: dict[str, Path]) -> list[Import]:
    return [item for item in imports(modules) if is_pipeline(item.module) and not is_pipeline(item.importer)
            and item.importer not in PIPELINE_DISPATCHERS]


def private_imports_across_packages(modules: dict[str, Path]) -> list[Import]:
    """`from a.b import _x` where `_x` is private to a.b's package and the importer lives elsewhere (or
    `import a._b` from outside a's package)."""
    found = []
    for item in imports(modules):
        if item.module not in modules:
            continue
        private_module = any(part.startswith("_") and part != "__init__" for part in item.module.split("."))
        private_name = item.name is not None and item.name.startswith("_") and item.name != "__version__"
        if (private_module or private_name) and package_of(item.importer, modules) != package_of(item.module, modules):
            found.append(item)
    return found


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), plus self-imports."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for item in imports(modules):
        if item.module in graph:
            graph[item.importer].add(item.module)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth <= number of modules (~150)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph[node]):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def _describe(found: list[Import]) -> str:
    return "; ".join(f"{item.importer}:{item.line} imports {item.module}{'.' + item.name if item.name else ''}"
                     for item in found)


def test_the_library_imports_no_pipeline():
    found = library_imports_of_pipelines(module_files())
    assert not found, _describe(found)


def test_no_module_imports_itself_round_a_circle():
    cycles = import_cycles(module_files())
    assert not cycles, "import circles: " + " | ".join(" <-> ".join(cycle) for cycle in cycles)


def test_no_private_name_crosses_a_package_boundary():
    found = private_imports_across_packages(module_files())
    assert not found, _describe(found)


def test_the_pipelines_are_where_the_readme_says():
    modules = module_files()
    for name in ("demo", "compression_study", "world", "world_cli", "world_models", "world_models.store"):
        assert f"{PIPELINES}.{name}" in modules
    for gone in ("massv.demo", "massv.world", "massv.world_models", "massv.world_cli", "massv.compress.study"):
        assert gone not in modules


# ---- the checks themselves catch what they claim to (a fake package written to tmp_path) ----


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in {"massv/__init__.py": "", "massv/pipelines/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(tmp_path)


def test_a_lazy_library_import_of_a_pipeline_is_found(tmp_path):
    modules = _fake_package(tmp_path, {
        "massv/evaluate.py": "def f():\n    from massv.pipelines.world import write_world\n",
        "massv/cli.py": "def main():\n    from massv.pipelines import demo\n",  # the dispatcher may
        "massv/pipelines/world.py": "", "massv/pipelines/demo.py": "from massv import evaluate\n",
    })
    found = library_imports_of_pipelines(modules)
    assert [(item.importer, item.module, item.line) for item in found] == [("massv.evaluate", "massv.pipelines.world", 2)]


def test_circles_are_found_through_relative_and_lazy_imports(tmp_path):
    modules = _fake_package(tmp_path, {
        "massv/pipelines/demo.py": "def f():\n    from massv.pipelines.study import g\n",
        "massv/pipelines/study.py": "from .demo import f\n",
        "massv/train/__init__.py": "", "massv/train/a.py": "from massv.train import b\n",
        "massv/train/b.py": "import massv.config\n", "massv/config.py": "",
        "massv/card.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from massv.drafter import C\n",
        "massv/drafter.py": "def save():\n    from massv.card import render\n",  # a type-only edge back: no circle
    })
    assert import_cycles(modules) == [["massv.pipelines.demo", "massv.pipelines.study"]]


def test_private_names_may_not_leave_their_package(tmp_path):
    modules = _fake_package(tmp_path, {
        "massv/pipelines/study.py": "from massv.pipelines.demo import _final\nfrom massv.train.loop import _step\n",
        "massv/pipelines/demo.py": "_final = 1\n",
        "massv/train/__init__.py": "", "massv/train/loop.py": "_step = 1\n",
        "massv/train/phase.py": "from massv.train.loop import _step\n",  # same package: allowed
    })
    found = private_imports_across_packages(modules)
    assert [(item.importer, item.name) for item in found] == [("massv.pipelines.study", "_step")]


def main() -> None:
    modules = module_files()
    edges = sorted({(item.importer, item.module) for item in imports(modules) if item.module in modules})
    for importer, module in edges:
        print(f"{importer} -> {module}")
    print(f"{len(modules)} modules, {len(edges)} edges, circles: {import_cycles(modules) or 'none'}")


if __name__ == "__main__":
    main()
