"""The public Python API and the package's shape: lazy names, a docstring example that runs,
no import cycles, no oversized modules."""

from __future__ import annotations

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
