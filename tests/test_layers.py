"""The package's layers point one way, and its import graph has no circle.

    cli (and the package root: the Python API)
      -> recipes (finetune, continual), demo, interpolate
        -> methods, eval, report
          -> data, models, loss, checkpoint, rundir, progress, merging
            -> config, registry, files, errors

A module may import its own layer and the layers below it, never one above, lazily or not (every
``import`` statement in the file counts, wherever it is). A new upward import fails this test
with the importing file, its line and both layers; docs/ARCHITECTURE.md explains where code goes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "forgetless"

LAYERS = [  # lowest first; a module belongs to the first entry that is it or its package
    ("base", ["forgetless.errors", "forgetless.registry", "forgetless.files", "forgetless.config", "forgetless.support", "forgetless.sharding", "forgetless.zero"]),
    ("data and models", ["forgetless.data", "forgetless.models", "forgetless.loss", "forgetless.checkpoint", "forgetless.rundir", "forgetless.progress",
                         "forgetless.merging"]),
    ("methods, eval, report", ["forgetless.methods", "forgetless.eval", "forgetless.report"]),
    ("recipes", ["forgetless.recipes", "forgetless.demo", "forgetless.interpolate"]),
    ("cli", ["forgetless.cli", "forgetless.__main__", "forgetless"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix != "forgetless" and (module == prefix or module.startswith(prefix + ".")):
                return rank
    assert module == "forgetless", f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return len(LAYERS) - 1


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported forgetless module, line) for every import statement of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules] or [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("forgetless") and name != module:
                found.append((name, node.lineno))
    return found


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    upward = []
    for module, path in sorted(modules.items()):
        for target, line in _imports(module, path, modules):
            if target == "forgetless" and module.startswith("forgetless."):
                continue  # `from forgetless import __version__`: the root package is always loaded first
            if module.startswith(target + ".") and modules[target].name == "__init__.py":
                continue  # a package's own __init__ (its public names)
            if _layer(target) > _layer(module):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
                )
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    modules = _modules()
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in _imports(module, path, modules):
            if target == "forgetless" or (module.startswith(target + ".") and modules[target].name == "__init__.py"):
                continue
            edges[module].add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str]:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t] if t in path else [m, t]
            if t not in state:
                found = visit(t, path + [t])
                if found:
                    return found
        state[m] = 2
        return []

    for m in sorted(modules):
        if m not in state:
            circle = visit(m, [m])
            assert not circle, "import circle: " + " -> ".join(circle)


def test_layers_name_every_module():
    for module in _modules():
        _layer(module)
