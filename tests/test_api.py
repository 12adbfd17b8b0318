"""The public Python API and the package's shape: lazy names, a docstring example that runs,
no import cycles, no oversized modules."""

from __future__ import annotations

import ast
import doctest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import wsi_nuclei

PACKAGE = Path(wsi_nuclei.__file__).parent


def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, wsi_nuclei as w; print(w.segment_slide, w.open_slide, w.SegmentConfig); "
            "assert 'torch' not in sys.modules, 'import wsi_nuclei imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for name in wsi_nuclei.__all__:
        assert getattr(wsi_nuclei, name) is not None, name
    assert set(wsi_nuclei.__all__) >= {"open_slide", "segment_slide", "segment_many", "segment_image", "evaluate_dataset",
                                       "load_model", "SegmentConfig", "ClusterConfig", "TrainConfig", "WsiNucleiError"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = wsi_nuclei.nope  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_docstring_example_runs(tmp_path, monkeypatch):
    """The package docstring's example (open the sample slide, segment it, segment an array)."""
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(wsi_nuclei, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 8 and result.failed == 0
    assert (tmp_path / "out" / "CMU-1" / "nuclei.geojson.gz").is_file()


def test_segment_image_refuses_what_is_not_rgb():
    from wsi_nuclei.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\(H, W, 3\) uint8 RGB"):
        wsi_nuclei.segment_image(np.zeros((64, 64), np.uint8), mpp=0.5)
    with pytest.raises(ConfigError, match="mpp must be > 0"):
        wsi_nuclei.segment_image(np.zeros((64, 64, 3), np.uint8), mpp=0)


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere (functions included), except under TYPE_CHECKING."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_no_import_cycles_inside_the_package():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: {m for m in _imports(p) if m in modules and m not in (name, "__init__")} for name, p in modules.items()}
    assert graph["pipeline"] >= {"batch"} and "pipeline" not in graph["batch"]  # the parser sees real imports

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(graph)) if c]
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_450_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 450}
