"""The command line: instant --help, the demo command on the bundled image, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app

runner = CliRunner()
DEMO_IMAGE = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "cmu1_crop_x900_y720.png"


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from wsi_nuclei.cli.main import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "wsi_nuclei.cli.main", "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - t0 < 10
    for command in ("train", "evaluate", "segment-image"):
        assert command in out.stdout


def test_segment_image_demo(tmp_path):
    result = runner.invoke(app, ["segment-image", str(DEMO_IMAGE), "--mpp", "0.499", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    labels = np.asarray(Image.open(tmp_path / "cmu1_crop_x900_y720_labels.png"))
    overlay = np.asarray(Image.open(tmp_path / "cmu1_crop_x900_y720_overlay.png"))
    summary = json.loads((tmp_path / "cmu1_crop_x900_y720_summary.json").read_text())
    assert labels.shape == overlay.shape[:2] == (640, 640)
    # A 320 µm square of epidermis and dermis holds hundreds of nuclei, each of a plausible size.
    assert 150 < summary["nuclei"] == int(labels.max()) < 2000
    areas = np.bincount(labels.ravel())[1:]
    median_um2 = float(np.median(areas[areas > 0])) * 0.499**2
    assert 10 < median_um2 < 120


def test_segment_image_never_replaces_files_it_did_not_write(tmp_path):
    """A user's own <name>_labels.png (e.g. annotation masks) in -o is kept: that image fails with
    one line naming the file and --overwrite, the others go on; a rerun over its own outputs
    replaces them; --overwrite replaces anything."""
    from PIL import Image as PILImage

    other = tmp_path / "other.png"
    PILImage.open(DEMO_IMAGE).crop((0, 0, 256, 256)).save(other)
    out = tmp_path / "o"
    out.mkdir()
    mask = out / "cmu1_crop_x900_y720_labels.png"
    PILImage.fromarray(np.full((8, 8), 7, np.uint16)).save(mask)
    before = mask.read_bytes()
    result = runner.invoke(app, ["segment-image", str(DEMO_IMAGE), str(other), "--mpp", "0.499", "-o", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cmu1_crop_x900_y720_labels.png: exists and was not written by wsi-nuclei" in errors[0]
    assert "--overwrite" in errors[0]
    assert mask.read_bytes() == before and not (out / "cmu1_crop_x900_y720_summary.json").exists()
    assert (out / "other_summary.json").exists()  # the next image went on
    again = runner.invoke(app, ["segment-image", str(other), "--mpp", "0.499", "-o", str(out)])
    assert again.exit_code == 0, again.output  # its own outputs: replaced
    forced = runner.invoke(app, ["segment-image", str(DEMO_IMAGE), "--mpp", "0.499", "-o", str(out), "--overwrite"])
    assert forced.exit_code == 0 and mask.read_bytes() != before


def test_segment_image_errors(tmp_path):
    result = runner.invoke(app, ["segment-image", str(tmp_path / "missing.png"), "--mpp", "0.5", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "missing.png: file not found" in result.output
    result = runner.invoke(app, ["segment-image", str(DEMO_IMAGE), "--mpp", "0", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--mpp must be > 0" in result.output
    result = runner.invoke(app, ["segment-image", str(DEMO_IMAGE), "--mpp", "0.5", "--device", "tpu", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown device" in result.output


def test_segment_size_options_are_one_line_errors(tmp_path):
    for value, text in (("lots", "--forward-memory 'lots' is not a size"), ("0GB", "--forward-memory must be > 0")):
        result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--forward-memory", value, "--workers", "0"])
        assert result.exit_code == 2 and text in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--batch-size", "0", "--workers", "0"])
    assert result.exit_code == 2 and "--batch-size must be > 0" in result.output


def test_segment_help_is_short_and_help_all_lists_every_option(tmp_path):
    """segment --help shows at most 25 options; the expert and SLURM ones are hidden, not gone:
    --help-all lists them and they still work under their old spellings."""
    import re

    short = runner.invoke(app, ["segment", "--help"], terminal_width=200)
    full = runner.invoke(app, ["segment", "--help-all"], terminal_width=200)
    assert short.exit_code == 0 and full.exit_code == 0
    opts = lambda text: set(re.findall(r"(?m)^│\s+(?:\*\s+)?(--[a-z0-9-]+)", text))  # noqa: E731
    assert len(opts(short.stdout)) <= 25
    hidden = {"--halo", "--forward-memory", "--batch-size", "--walltime", "--queue", "--account", "--job-extra", "--max-jobs"}
    assert not hidden & opts(short.stdout) and hidden <= opts(full.stdout)
    result = runner.invoke(app, ["segment", str(tmp_path / "x.svs"), "-o", str(tmp_path / "o"), "--halo", "33"])
    assert result.exit_code == 2 and "--halo" in result.output and "multiple of 32" in result.output
