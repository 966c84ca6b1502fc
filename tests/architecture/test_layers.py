"""The package's import graph: every import of a project module points down the layers below (or stays inside its
own package), nothing imports in a circle, and project modules are imported at the top of a file except in the
few places listed with their reason. Read from the source with ast, so a climbing import fails here before anyone
meets the circular import it would one day cause."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Low to high. A module may import modules of its own layer's packages or of lower layers, never of higher ones.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline", "pipeline.errors", "pipeline.config_schema", "pipeline.compat", "pipeline.machine",
     "pipeline.manifest", "pipeline.registry", "pipeline.bundle"),
    ("pipeline.config",),
    ("pipeline.data",),
    ("pipeline.text", "kernels"),
    ("pipeline.diffusion",),
    ("pipeline.models",),
    ("pipeline.losses", "pipeline.eval", "pipeline.sampling"),
    ("pipeline.train",),
    ("pipeline.stages",),
    ("pipeline.precompute", "pipeline.export"),
    ("pipeline.demo", "pipeline.evaluate"),
    ("pipeline.cli", "pipeline.__main__"),
)
# Function-local imports of project modules that are there on purpose (module -> the module it imports lazily).
LAZY = {
    ("pipeline.cli.train", "pipeline.train.entry"): "start-up time: the CLI parser must not import the trainer",
    ("pipeline.cli.export", "pipeline.export"): "start-up time",
    ("pipeline.cli.sample", "pipeline.sampling.text2image"): "start-up time",
    ("pipeline.cli.demo", "pipeline.demo"): "start-up time",
    ("pipeline.cli.eval_stats", "pipeline.evaluate.stats"): "start-up time",
    ("pipeline.cli.evaluate", "pipeline.evaluate.offline"): "start-up time",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, project_only: bool = True) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of a project module in the file (of any module
    without `project_only`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.append((base, child.lineno, top))
                for alias in child.names:  # `from pipeline import manifest` imports a module too
                    found.append((f"{base}.{alias.name}", child.lineno, top))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return [(m, line, top) for m, line, top in found if not project_only or m.split(".")[0] in ("pipeline", "kernels")]


def _layer(module: str) -> int:
    best, depth = -1, -1
    for index, names in enumerate(LAYERS):
        for prefix in names:
            inside = module.startswith(prefix + ".") and prefix != "pipeline"  # the package's __init__ alone
            if (module == prefix or inside) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


MODULES = _modules()
GRAPH = {name: [(m, line, top) for m, line, top in _imports(name, path) if m in MODULES]
         for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_no_import_climbs() -> None:
    climbing = [f"{name}:{line} imports {target} ({LAYERS[_layer(target)][0]} is above {LAYERS[_layer(name)][0]})"
                for name, edges in GRAPH.items() for target, line, _ in edges if _layer(target) > _layer(name)]
    assert climbing == []


def test_project_modules_are_imported_at_the_top() -> None:
    local = [f"{name}:{line} imports {target}" for name, edges in GRAPH.items() for target, line, top in edges
             if not top and (name, target) not in LAZY]
    assert local == []
    unused = [pair for pair in LAZY if not any(t == pair[1] and not top for t, _, top in GRAPH.get(pair[0], []))]
    assert unused == []  # the list of exceptions says what is true


def test_no_import_circle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target, _, _ in GRAPH[node]:
            if target == node:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in GRAPH:
        if name not in state:
            cycle = walk(name)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("package", ["pipeline.models", "pipeline.diffusion", "kernels"])
def test_model_and_diffusion_code_is_pure(package: str) -> None:
    """DESIGN.md convention 2: models/, diffusion/ and kernels/ never import torch.distributed or deepspeed."""
    offenders = [f"{name}:{line} imports {module}" for name, path in MODULES.items() if name.startswith(package)
                 for module, line, _ in _imports(name, path, project_only=False)
                 if module.startswith(("torch.distributed", "deepspeed"))]
    assert offenders == []
