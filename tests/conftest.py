"""Shared fixtures: the real datasets in ``../shared/data`` (beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub (timm encoders) from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The ONNX export cache goes to a temporary folder, not ~/.cache (inherited by subprocesses and
# Dask workers, so one export serves the whole session).
if "WSI_NUCLEI_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="wsi-nuclei-test-cache-")
    os.environ["WSI_NUCLEI_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# matplotlib (density.png) keeps its font cache in a temporary folder too, not ~/.cache
if "MPLCONFIGDIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _mpl = tempfile.mkdtemp(prefix="wsi-nuclei-test-mpl-")
    os.environ["MPLCONFIGDIR"] = _mpl
    atexit.register(shutil.rmtree, _mpl, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: MoNuSeg, TNBC and WSI files (see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not found: the real datasets sit beside the repo in CI (see README)")
    return path


# The three disc slides of the scale-out tests and their uninterrupted in-process run, shared by
# test_cluster.py and test_slurm.py (session scope: made once).
@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> Path:
    from .slides import disc_slide

    folder = tmp_path_factory.mktemp("disc_slides")
    disc_slide(folder / "a.tif", (1024, 1280), seed=1)
    disc_slide(folder / "b.tif", (768, 768), seed=2)
    disc_slide(folder / "c.tif", (512, 1024), seed=3)
    return folder


@pytest.fixture(scope="session")
def reference(slides, tmp_path_factory) -> Path:
    """The three slides segmented uninterrupted, one after the other, without Dask, in a fresh
    process (float results depend on torch's thread count, so every run here uses 1 thread)."""
    import json
    import subprocess

    from .test_cluster import _cli as _segment_cli

    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_segment_cli(str(slides), "-o", str(out), "--workers", "0", "--max-slides", "1"), check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = json.loads((out / "run.json").read_text())["slides"]
    assert [s["status"] for s in run] == ["ok"] * 3 and all(s["nuclei"] > 300 for s in run)
    return out


@pytest.fixture(scope="session")
def bundled_run(tmp_path_factory) -> Path:
    """The bundled CMU sample slide segmented once with the defaults, in this process:
    ``<folder>/CMU-1-Small-Region/`` (read-only for the tests that share it)."""
    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.pipeline.config import SegmentConfig
    from wsi_nuclei.pipeline.segment import segment_many

    out = tmp_path_factory.mktemp("bundled_run")
    results = segment_many([SAMPLE_SLIDE], out, SegmentConfig())
    assert [r.status for r in results] == ["ok"], results
    return out
