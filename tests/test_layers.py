"""The package's layers: each folder imports only from the folders below it (type-only and
function-level imports included), and no module outgrows its room."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_nuclei"
#: Lowest first; a folder may import its own modules and those of lower floors only.
FLOORS = {"": 0, "slides": 1, "nuclei": 1, "cluster": 1, "model": 2, "outputs": 2, "pipeline": 3, "training": 3, "api": 4, "cli": 5}
TOP_MODULES = {"errors", "atomic", "_version"}  # floor 0; api.py and __init__.py are the face (floor 4)


def _folder(module: str) -> str:
    """'wsi_nuclei.model.infer' -> 'model'; top-level modules -> '' or 'api'."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("api", "__init__"):
        return "api"
    if parts[0] in TOP_MODULES:
        return ""
    return parts[0]


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[str, int]]:
    rel = path.relative_to(package.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out += [(n, node.lineno) for n in names if n.startswith("wsi_nuclei")]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("wsi_nuclei")]
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _here(path: Path, package: Path) -> str:
    if path.parent == package:
        return "api" if path.stem in ("api", "__init__") else ""
    return path.relative_to(package).parts[0]


def _violations(package: Path) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        here = _here(path, package)
        for target, line in _imports(path, package):
            there = _folder(target if target.count(".") else target + ".__init__")
            if there != here and FLOORS[there] >= FLOORS[here]:
                bad.append(f"{path.relative_to(package)}:{line} ({here}) imports {target} ({there})")
    return bad


def test_folders_import_only_lower_floors():
    bad = _violations(PACKAGE)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    """Module-level graph over every import (lazy and type-only too): no cycle inside a folder either."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module(path)] = {t for t, _ in _imports(path, PACKAGE) if t != "wsi_nuclei"}
    # the parser sees real imports (lazy ones too): the batch front end uses the batch loop, not back
    assert "wsi_nuclei.pipeline.batch" in graph["wsi_nuclei.pipeline.segment"]
    assert "wsi_nuclei.pipeline.segment" not in graph["wsi_nuclei.pipeline.batch"]
    face = {"wsi_nuclei", "wsi_nuclei.api"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt in face or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else nxt)
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(FLOORS) - {"", "api"}


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long


def test_the_checker_sees_a_violation(tmp_path):
    """The rule can fail: a lazy import of a higher floor inside a function, and a type-only one, are found."""
    pkg = tmp_path / "wsi_nuclei"
    (pkg / "slides").mkdir(parents=True)
    (pkg / "model").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "slides" / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("from ..errors import x\n")
    (pkg / "slides" / "reader.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ..errors import E\nif TYPE_CHECKING:\n    from ..model.network import M\n"
        "def f():\n    from ..pipeline import config\n")
    bad = _violations(pkg)
    assert len(bad) == 2 and "model.network" in bad[0] and "pipeline" in bad[1]
