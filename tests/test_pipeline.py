"""The slide pipeline end to end: positions in level-0 px, GeoJSON for QuPath, bad inputs in a batch."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.errors import SlideError
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many, segment_slide

from .slides import disc_image, write_pyramid

runner = CliRunner()


def _features(out: Path) -> list[dict]:
    path = out / "nuclei.geojson.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)["features"]


@pytest.mark.slow
def test_synthetic_discs_found_at_their_level0_positions(tmp_path):
    """Discs at known level-0 positions in a 0.25 µm/px slide, read from level 1 (0.5 µm/px)."""
    rng = np.random.default_rng(1)
    centres = [(float(x), float(y)) for x in range(150, 1900, 140) for y in range(150, 1900, 140)]
    centres = [(x + rng.uniform(-20, 20), y + rng.uniform(-20, 20)) for x, y in centres]
    img = disc_image((2048, 2048), centres, radius=18)
    slide = write_pyramid(tmp_path / "discs.tif", img, mpp=0.25, levels=3)
    res = segment_slide(slide, tmp_path / "out", SegmentConfig(chunk_size=512))
    assert res.status == "ok"
    feats = _features(tmp_path / "out")
    from shapely.geometry import Polygon

    found = np.array([Polygon(f["geometry"]["coordinates"][0]).centroid.coords[0] for f in feats])
    assert len(found) >= 0.9 * len(centres)
    d = np.sqrt(((found[:, None, :] - np.array(centres)[None]) ** 2).sum(-1))
    nearest = d.min(axis=0)
    hit = nearest[nearest < 20]
    assert len(hit) >= 0.9 * len(centres)
    assert hit.max() <= 2.0  # one working pixel = 2 level-0 pixels


def test_polygon_bounds_shift():
    """QuPath crops to openslide bounds: coordinates shift by -bounds exactly (or stay raw)."""
    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons

    labels = np.zeros((40, 40), np.int64)
    labels[10:20, 12:25] = 1
    raw = label_polygons(labels, PolygonFrame(100, 200, 2.0, 0.25))[0]
    shifted = label_polygons(labels, PolygonFrame(100, 200, 2.0, 0.25, 1000.0, 500.0))[0]
    a, b = np.array(raw.ring), np.array(shifted.ring)
    assert np.allclose(a - b, [1000.0, 500.0])
    # pixel-centre frame: column 12 of a window at x=100, 2 level-0 px per working px
    assert a[:, 0].min() == pytest.approx((100 + 12 - 0.5 + 0.5) * 2.0, abs=1.01)


@pytest.mark.slow
def test_geojson_is_qupath_importable_and_outputs_complete(bundled_run):
    out = bundled_run
    d = out / "CMU-1-Small-Region"
    assert {p.name for p in d.iterdir()} >= {"mask.zarr", "nuclei.geojson.gz", "summary.json", "overlay.png"}
    summary = json.loads((d / "summary.json").read_text())
    assert 1000 < summary["nuclei"] < 20000 and summary["tissue_mm2"] > 0.1
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card

    card = load_card(DEFAULT_MODEL_DIR)  # options left unset are recorded with the card's values, as they ran
    assert summary["parameters"]["context"] == card.context_px == summary["tiling"]["context"]
    assert summary["parameters"]["tta"] == card.tta
    run = json.loads((out / "run.json").read_text())
    assert run["slides"][0]["status"] == "ok"

    import geojson as gj
    from shapely.geometry import Polygon, box

    text = gzip.decompress((d / "nuclei.geojson.gz").read_bytes()).decode("utf-8")
    coll = gj.loads(text)
    assert coll["type"] == "FeatureCollection" and len(coll["features"]) == summary["nuclei"]
    slide_box = box(0, 0, 2220, 2967)
    for f in json.loads(text)["features"]:
        uuid.UUID(f["id"])
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3
        assert all(isinstance(v, float) and np.isfinite(v) for v in props["measurements"].values())
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and len(ring) >= 4 and ring[0] == ring[-1]
        poly = Polygon(ring)
        assert poly.is_valid and poly.area > 0 and slide_box.contains(poly)
    # OME-NGFF metadata on both pyramids
    import zarr

    root = zarr.open_group(str(d / "mask.zarr"), mode="r")
    for name in ("probability", "labels"):
        ms = root[name].attrs["multiscales"][0]
        assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
        assert len(ms["datasets"]) >= 2
    assert "image-label" in root["labels"].attrs
    assert root.attrs["wsi_nuclei"]["working_mpp"] == 0.5
    # ids are unique and the labels hold exactly the exported nuclei
    ids = np.unique(np.asarray(root["labels"]["0"][:]))
    assert len(ids) - 1 == summary["nuclei"]


@pytest.mark.slow
def test_tcga_slide_needs_mpp(shared_data, tmp_path):
    slide = shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError, match="pass --mpp"):
        segment_slide(slide, tmp_path / "a", SegmentConfig())
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "b"), "--workers", "0", "--quiet"])
    assert result.exit_code == 1 and "pass --mpp" in result.output
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "c"), "--mpp", "0.25", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c" / "tcga-cr-7395-01a-01-ts1" / "summary.json").read_text())
    assert summary["nuclei"] > 50 and summary["slide_info"]["level0_mpp"] == 0.25


def test_info_command(shared_data):
    result = runner.invoke(app, ["info", str(shared_data / "wsi" / "CMU-1-Small-Region.svs")])
    assert result.exit_code == 0
    assert "0.499" in result.output and "aperio" in result.output and "2220 x 2967" in result.output


def test_bad_inputs_are_reported_and_the_batch_goes_on(shared_data, tmp_path):
    fixtures = shared_data / "wsi" / "openslide-python-fixtures"
    empty = tmp_path / "empty"
    empty.mkdir()
    results = segment_many([tmp_path / "missing.svs", empty, fixtures / "unopenable.tiff"], tmp_path / "out", SegmentConfig())
    status = {Path(r.slide).name: (r.status, r.reason) for r in results}
    assert status["missing.svs"][0] == "failed" and "not found" in status["missing.svs"][1]
    assert status["empty"][0] == "failed" and ".svs" in status["empty"][1]
    # OpenSlide refuses it; tiffslide opens it and then cannot decode it: either way one clear line
    reason = status["unopenable.tiff"][1]
    assert status["unopenable.tiff"][0] == "failed" and "unopenable.tiff" in reason
    assert ("cannot open" in reason or "cannot read" in reason) and "\n" not in reason
    assert json.loads((tmp_path / "out" / "run.json").read_text())["slides"][2]["status"] == "failed"


def test_folder_search_follows_symlinked_folders_once(tmp_path):
    """Slides staged through symlinked folders are found (each real folder searched once, so a
    link back up the tree does not loop); the work folders of earlier runs are never searched."""
    from wsi_nuclei.pipeline.segment import WORK_DIR, find_slides

    real = tmp_path / "scratch" / "batch1"
    real.mkdir(parents=True)
    (real / "a.svs").write_bytes(b"x")
    top = tmp_path / "slides"
    (top / "local").mkdir(parents=True)
    (top / "local" / "b.tif").write_bytes(b"x")
    (top / "staged").symlink_to(real, target_is_directory=True)
    (top / "local" / "up").symlink_to(top, target_is_directory=True)  # a loop
    (top / "local" / WORK_DIR).mkdir()
    (top / "local" / WORK_DIR / "c.tif").write_bytes(b"x")
    found, bad = find_slides([top])
    assert [p.relative_to(top).as_posix() for p in found] == ["local/b.tif", "staged/a.svs"] and bad == []
