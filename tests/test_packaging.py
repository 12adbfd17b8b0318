"""The two ways to install agree: every package the CPU path needs is in both pyproject.toml and
environment.yml (conda), so neither can drift (issue 16: the conda route once lacked onnx, and
``--backend auto`` fell back to torch there)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: pyproject (PyPI) name -> conda-forge name where they differ
CONDA_NAMES = {"torch": "pytorch", "openslide-bin": "openslide", "matplotlib": "matplotlib-base"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = set()
    for spec in project["dependencies"]:
        runtime.add(_name(spec))
        extras = re.search(r"\[(.*?)\]", spec)
        if _name(spec) == "dask" and extras and "distributed" in extras.group(1):
            runtime.add("distributed")  # conda packages dask's extra on its own
    return runtime, {k: {_name(s) for s in v} for k, v in project["optional-dependencies"].items()}


def _environment() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        for spec in dep["pip"] if isinstance(dep, dict) else [dep]:
            if not spec.startswith("-e"):
                names.add(_name(spec))
    return names - {"python", "pip"}


def test_environment_yml_has_every_package_of_the_cpu_path():
    runtime, extras = _pyproject()
    wanted = {CONDA_NAMES.get(n, n) for n in runtime | extras["onnx"] | extras["openvino"]}
    assert wanted - _environment() == set()


def test_environment_yml_has_nothing_pyproject_does_not_name():
    runtime, extras = _pyproject()
    known = {CONDA_NAMES.get(n, n) for n in runtime.union(*extras.values())}
    assert _environment() - known == set()
