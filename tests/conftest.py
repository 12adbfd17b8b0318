"""Shared fixtures: the real datasets in ``../shared/data`` (beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for the Hugging Face hub (timm encoders) from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: MoNuSeg, TNBC and WSI files (see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not found: the real datasets sit beside the repo in CI (see README)")
    return path
