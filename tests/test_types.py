"""Nucleus types from the model to QuPath: classes in the GeoJSON, type columns in Parquet, counts
in summary.json; tiled == whole and resume byte-identity hold for the types too; --types off and
single-class models write the one class "Nucleus".

The typed model here is the shipped network with a type head added (its new channels drawn with a
fixed seed): meaningless types, but real ones for every part of the pipeline that carries them."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.nuclei.classes import DEFAULT_TYPES, TYPE_PROBABILITY
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_slide
from wsi_nuclei.pipeline.summary import Summary

from .slides import cmu_crop_slide

pytestmark = pytest.mark.slow
QUPATH = {t.qupath: list(t.color) for t in DEFAULT_TYPES}


@pytest.fixture(scope="module")
def typed_model(tmp_path_factory) -> Path:
    import torch

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card, save_model
    from wsi_nuclei.nuclei.classes import types_to_card
    from wsi_nuclei.training.train import _start_model, build_config

    out = tmp_path_factory.mktemp("typed") / "model"
    torch.manual_seed(0)
    net = _start_model(build_config(out, {"types": True}, init=DEFAULT_MODEL_DIR), {})
    with torch.no_grad():  # type logits that vary from nucleus to nucleus: random mixtures of the decoder's features
        head = net.segmentation_head[0]
        head.weight[3:] = torch.randn_like(head.weight[3:]) * head.weight[:3].std() * 3
        head.bias[3:] = 0
    save_model(net.eval(), replace(load_card(DEFAULT_MODEL_DIR), types=types_to_card(DEFAULT_TYPES)), out)
    return out


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    return cmu_crop_slide(tmp_path_factory.mktemp("slides") / "cmu_crop.tif", (900, 700, 768, 768))


def _features(out: Path) -> list[dict]:
    with gzip.open(out / "nuclei.geojson.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)["features"]


def _run(crop: Path, out: Path, model: Path, **kw) -> Path:
    res = segment_slide(crop, out, SegmentConfig(model_dir=str(model), tissue_mask=False, **kw))
    assert res.status == "ok", res.error
    return out


@pytest.fixture(scope="module")
def whole(crop, typed_model, tmp_path_factory) -> Path:
    return _run(crop, tmp_path_factory.mktemp("whole"), typed_model, chunk_size=1024)


def test_types_reach_geojson_parquet_and_summary(whole):
    import pyarrow.parquet as pq

    feats = _features(whole)
    assert len(feats) > 100
    names = Counter(f["properties"]["classification"]["name"] for f in feats)
    assert set(names) <= set(QUPATH) and len(names) >= 2  # several types, each a QuPath default class
    for f in feats:
        c = f["properties"]["classification"]
        assert c["color"] == QUPATH[c["name"]]
        assert 0.25 <= f["properties"]["measurements"][TYPE_PROBABILITY] <= 1.0  # the vote's winner among 4
    table = pq.read_table(whole / "nuclei.parquet").to_pandas()
    assert list(table["id"]) == [f["id"] for f in feats]
    assert list(table["type"].astype(str)) == [f["properties"]["classification"]["name"] for f in feats]
    assert np.allclose(table["type_probability"], [f["properties"]["measurements"][TYPE_PROBABILITY] for f in feats])
    summary = json.loads((whole / "summary.json").read_text())
    assert {k: v["nuclei"] for k, v in summary["types"].items() if v["nuclei"]} == dict(names)
    assert sum(v["nuclei"] for v in summary["types"].values()) == summary["nuclei"] == len(feats)
    assert summary["parameters"]["types"] is True
    assert list(summary) == Summary.keys(typed=True)  # the documented schema, in its order


def test_tiled_types_equal_whole(crop, typed_model, whole, tmp_path):
    """Chunks of 256 px give each nucleus the type of the one-chunk run (matched by outline)."""
    import shapely
    from shapely.geometry import Polygon

    tiled = _run(crop, tmp_path, typed_model, chunk_size=256, halo=64)
    ref = _features(whole)
    polys = [Polygon(f["geometry"]["coordinates"][0]) for f in ref]
    tree = shapely.STRtree(polys)
    same = total = 0
    for f in _features(tiled):
        p = Polygon(f["geometry"]["coordinates"][0])
        best = max(
            ((p.intersection(polys[j]).area / p.union(polys[j]).area, j) for j in tree.query(p, predicate="intersects")), default=(0, -1)
        )
        if best[0] > 0.5:
            total += 1
            same += ref[best[1]]["properties"]["classification"]["name"] == f["properties"]["classification"]["name"]
    assert total > 0.95 * len(ref) and same >= 0.99 * total


def test_resumed_typed_slide_is_byte_identical(crop, typed_model, whole, tmp_path):
    """Chunk files kept, outputs removed as if killed before assembly: --resume rebuilds them from
    the chunk files, byte for byte the uninterrupted run's."""
    out = _run(crop, tmp_path / "a", typed_model, chunk_size=1024, keep_chunks=True)
    for name in ("summary.json", "nuclei.geojson.gz", "nuclei.parquet"):
        (out / name).unlink()
    _run(crop, out, typed_model, chunk_size=1024, resume=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks"]["reused"] == summary["chunks"]["processed"]
    for name in ("nuclei.geojson.gz", "nuclei.parquet"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_types_off_and_single_class_models_write_one_class(crop, typed_model, whole, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR

    for out, model, kw in ((tmp_path / "off", typed_model, {"types": False}), (tmp_path / "plain", DEFAULT_MODEL_DIR, {})):
        _run(crop, out, model, chunk_size=1024, **kw)
        feats = _features(out)
        assert {f["properties"]["classification"]["name"] for f in feats} == {"Nucleus"}
        assert all(TYPE_PROBABILITY not in f["properties"]["measurements"] for f in feats)
        assert "type" not in pq.read_schema(out / "nuclei.parquet").names
        assert list(json.loads((out / "summary.json").read_text())) == Summary.keys(typed=False)
        # density.png: one map; the typed run's has a panel per type beside it (two to a row)
        one, typed = Image.open(out / "density.png").size, Image.open(whole / "density.png").size
        assert typed[0] > 1.6 * one[0] and typed[1] > 2.2 * one[1]


def test_types_option_is_checked(tmp_path):
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app

    result = CliRunner().invoke(app, ["segment", str(tmp_path / "x.svs"), "-o", str(tmp_path / "o"), "--types", "maybe"])
    assert result.exit_code == 2 and "--types must be on or off" in result.output and "Traceback" not in result.output


def test_til_density_recipe(whole, capsys):
    """docs/results.md's TIL recipe, as written: immune cells per mm² of tissue from nuclei.parquet."""
    import re

    docs = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "Immune cells" in b]
    assert len(blocks) == 1
    scope: dict = {}
    exec(blocks[0].replace('"OUT/slide/', f'"{whole}/'), scope)
    summary = json.loads((whole / "summary.json").read_text())
    feats = [f["properties"] for f in _features(whole)]
    expected = sum(p["classification"]["name"] == "Immune cells" and p["measurements"][TYPE_PROBABILITY] >= 0.5 for p in feats)
    assert len(scope["tils"]) == expected <= summary["types"]["Immune cells"]["nuclei"]
    assert scope["tissue_mm2"] == summary["tissue_mm2"]
    assert "TILs per mm² of tissue" in capsys.readouterr().out


def test_evaluate_prints_detection_and_per_type_f1(typed_model, shared_data):
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app
    from wsi_nuclei.training.evaluate import evaluate_dataset

    report = evaluate_dataset("consep-test", shared_data / "consep", model_dir=typed_model, limit=1, backend="torch")
    t = report["types"]
    assert set(t) >= {"f_d", "f_c_other", "f_c_inflammatory", "f_c_epithelial", "f_c_spindle"} and 0 < t["f_d"] <= 1
    assert t["pairing_radius_um"] == 3.0 and t["paired"] > 0
    out = CliRunner().invoke(app, ["evaluate", str(shared_data / "consep"), "--dataset", "consep-test", "--limit", "1",
                                   "--model", str(typed_model), "--backend", "torch"])
    assert out.exit_code == 0 and "F_d" in out.stdout and "f_c_epithelial" in out.stdout


def test_anndata_export_has_the_type(whole, tmp_path):
    pytest.importorskip("anndata")
    from wsi_nuclei.outputs.h5ad import nuclei_anndata

    adata = nuclei_anndata(whole / "nuclei.parquet")
    assert "type" in adata.obs and set(adata.obs["type"].cat.categories) <= set(QUPATH)
    assert "type_probability" in adata.var_names and "type" not in adata.var_names
    feats = {f["id"]: f["properties"]["classification"]["name"] for f in _features(whole)}
    assert all(feats[i] == t for i, t in zip(adata.obs_names, adata.obs["type"]))


def test_overlay_and_report_show_the_types(whole, tmp_path):
    import shutil

    from PIL import Image

    from wsi_nuclei.outputs.report import write_report

    overlay = np.asarray(Image.open(whole / "overlay.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(overlay, axis=0).tolist()}
    assert sum(tuple(t.color) in colours for t in DEFAULT_TYPES) >= 2  # outlines in the types' colours (and the legend)
    shutil.copytree(whole, tmp_path / "out" / "crop")
    html = write_report(tmp_path / "out").read_text()
    summary = json.loads((whole / "summary.json").read_text())
    for name, v in summary["types"].items():
        assert f"<th>{name} per mm²</th>" in html
        assert f'data-sort="{v["per_mm2"]}"' in html


def test_typed_slide_with_its_tissue_mask(crop, typed_model, tmp_path):
    """The default run (tissue mask on): the overlay gets the tissue outline and the legend."""
    from PIL import Image

    res = segment_slide(crop, tmp_path, SegmentConfig(model_dir=str(typed_model), chunk_size=1024))
    assert res.status == "ok", res.error
    overlay = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(overlay, axis=0).tolist()}
    assert (0, 0, 255) in colours and all(tuple(t.color) in colours for t in DEFAULT_TYPES)  # tissue outline, legend
