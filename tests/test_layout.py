"""The package layout's rules, checked by parsing the sources: no import cycles between
modules (module-level imports), no module importing another module's private names,
and kernels that know nothing of the formats."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jsparse", "pallas_kernels")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_imports(tree: ast.Module):
    """(imported module, names) of the module-level import statements."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(a.name for a in node.names)


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, tree in MODULES.items():
        for module, names in _top_level_imports(tree):
            targets = [f"{module}.{n}" for n in names] if names else [module]
            for target in targets:
                dep = _resolve(target)
                # A package's __init__ importing its own submodules is not a cycle.
                if dep and dep != name and not dep.startswith(name + "."):
                    graph[name].add(dep)
    return graph


def test_no_import_cycles():
    graph = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_private_names_of_another():
    offenders = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if _resolve(node.module) is None:
                    continue  # not ours
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{name}: from {node.module} import {alias.name}")
                # A private module is private to its package.
                parts = node.module.split(".")
                for i, part in enumerate(parts):
                    if part.startswith("_") and not name.startswith(".".join(parts[:i]) + "."):
                        offenders.append(f"{name}: from {node.module} import ...")
    assert not offenders, "\n".join(offenders)


def test_kernels_do_not_import_the_library():
    for name, tree in MODULES.items():
        if name.startswith("pallas_kernels"):
            for module, _ in _top_level_imports(tree):
                assert not module.startswith("jsparse"), f"{name} imports {module}"


def test_the_layout_has_one_folder_per_format():
    formats = {p.name for p in (ROOT / "jsparse" / "formats").iterdir() if p.is_dir()}
    assert {"bcsr", "nm", "monarch", "lowrank"} <= formats - {"__pycache__"}
    for fmt in formats - {"__pycache__"}:
        assert (ROOT / "jsparse" / "formats" / fmt / "matrix.py").exists(), fmt
