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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: MoNuSeg, TNBC and WSI files (see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not found: the real datasets sit beside the repo in CI (see README)")
    return path
