"""nuclei.parquet (issue 17): the GeoJSON's nuclei as a GeoParquet table, row for row, streamed one
row group per chunk; a run killed while writing it and resumed writes the same bytes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.pipeline.segment import WORK_DIR, SegmentConfig, segment_many

from .slides import disc_slide

OPTS = {"chunk_size": 256, "halo": 32, "context": 64}
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64", "--workers", "0", "--quiet", "--threads", "1"]


def _nuclei(seed: int, origin: tuple[int, int] = (0, 0), chunk: int = 0) -> list:
    """Nuclei of a synthetic label window (discs), with all seven pipeline measurements."""
    from skimage.draw import disk

    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons

    rng = np.random.default_rng(seed)
    lab = np.zeros((200, 200), np.int64)
    k = 0
    for cy in range(12, 200, 25):
        for cx in range(12, 200, 25):
            k += 1
            rr, cc = disk((cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)), rng.uniform(3, 9), shape=lab.shape)
            lab[rr, cc] = chunk * 65536 + k
    prob = rng.random(lab.shape).astype(np.float32)
    rgb = rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
    return label_polygons(lab, PolygonFrame(origin[0], origin[1], 2.0, 0.25, 7.0, 3.0), prob, rgb)


def _shapely(table):  # noqa: ANN001, ANN202
    import shapely

    counts = np.diff(table.offsets)
    return shapely.polygons(shapely.linearrings(table.xy, indices=np.repeat(np.arange(len(table)), counts)))


def test_wkb_centroids_and_boxes_equal_shapely():
    import shapely

    from wsi_nuclei.nuclei.table import NucleusTable
    from wsi_nuclei.outputs.parquet import wkb_polygons

    table = NucleusTable.from_nuclei(_nuclei(1))
    geoms = _shapely(table)
    assert len(table) > 50
    assert wkb_polygons(table.offsets, table.xy).to_pylist() == list(shapely.to_wkb(geoms, byte_order=1))
    assert np.allclose(table.centroids(), shapely.get_coordinates(shapely.centroid(geoms)), rtol=0, atol=1e-9)
    assert np.array_equal(table.bounds(), shapely.bounds(geoms))


def test_a_table_without_some_labels():
    from wsi_nuclei.nuclei.table import NucleusTable

    nuclei = _nuclei(2)
    table = NucleusTable.from_nuclei(nuclei)
    gone = table.labels[[0, 5, 6]]
    rest, removed = table.without(gone)
    assert removed == 3
    again = NucleusTable.from_nuclei([n for n in nuclei if n.label not in set(gone.tolist())])
    for a, b in zip(rest.arrays().values(), again.arrays().values()):
        assert np.array_equal(a, b)
    assert table.without([10**9]) == (table, 0)


def test_column_names_keep_the_units():
    from wsi_nuclei.nuclei.table import PIPELINE_MEASUREMENTS
    from wsi_nuclei.outputs.parquet import column_name

    assert [column_name(n) for n in PIPELINE_MEASUREMENTS] == [
        "area_um2", "perimeter_um", "circularity", "solidity", "eccentricity", "nucleus_probability", "hematoxylin_od_mean"]


def _geojson_features(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return json.loads(fh.read())["features"]


def _same_nuclei(parquet: Path, features: list[dict]) -> None:
    """``parquet`` read by GeoPandas holds ``features``, row for row: id, outline, measurements."""
    import geopandas
    import pyarrow.parquet as pq
    import shapely

    from wsi_nuclei.outputs.parquet import column_name

    gdf = geopandas.read_parquet(parquet)
    assert gdf.crs is None and len(gdf) == len(features)
    assert list(gdf["id"]) == [f["id"] for f in features]
    coords = [np.asarray(f["geometry"]["coordinates"][0]) for f in features]
    got = [shapely.get_coordinates(g) for g in gdf.geometry.values]
    assert all(np.array_equal(a, b) for a, b in zip(got, coords))  # bit for bit
    names = list(features[0]["properties"]["measurements"]) if features else []
    for name in names:
        assert np.array_equal(gdf[column_name(name)].to_numpy(), [f["properties"]["measurements"][name] for f in features]), name
    assert np.allclose(gdf["centroid_x"], gdf.geometry.centroid.x, atol=1e-9) and np.allclose(
        gdf["centroid_y"], gdf.geometry.centroid.y, atol=1e-9
    )
    schema = pq.read_schema(parquet)
    bbox = pq.read_table(parquet, columns=["bbox"]).column("bbox").combine_chunks()
    assert np.array_equal(
        np.column_stack([bbox.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")]), gdf.geometry.bounds.to_numpy()
    )
    geo = json.loads(schema.metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"].startswith("1.1") and geo["primary_column"] == "geometry" and column["encoding"] == "WKB"
    assert "crs" in column and column["crs"] is None  # pixels: an undefined CRS, not longitude/latitude
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    for name in names:
        field = schema.field(column_name(name))
        assert field.metadata[b"qupath_name"].decode() == name


def test_the_table_holds_the_geojsons_nuclei_row_for_row(tmp_path):
    import pyarrow.parquet as pq

    from wsi_nuclei.nuclei.table import NucleusTable
    from wsi_nuclei.outputs.geojson import GeoJSONWriter, encode_nuclei
    from wsi_nuclei.outputs.parquet import ParquetWriter

    key = "x.tif:100x100"
    chunks = [_nuclei(3, (0, 0), 0), [], _nuclei(4, (200, 0), 2)]
    with GeoJSONWriter(tmp_path / "n.geojson") as gj, ParquetWriter(tmp_path / "n.parquet", key, {"slide": "x.tif"}) as pw:
        for index, nuclei in enumerate(chunks):
            blobs = encode_nuclei(nuclei, key)
            gj.write_encoded(b",\n".join(blobs), len(blobs))
            pw.write(NucleusTable.from_nuclei(nuclei), index)
    _same_nuclei(tmp_path / "n.parquet", _geojson_features(tmp_path / "n.geojson"))
    meta = pq.ParquetFile(tmp_path / "n.parquet").metadata
    assert meta.num_row_groups == 2 and pw.row_groups == 2  # one per chunk with nuclei
    assert [meta.row_group(i).num_rows for i in range(2)] == [len(chunks[0]), len(chunks[2])]
    table = pq.read_table(tmp_path / "n.parquet", columns=["label", "chunk"])
    assert np.array_equal(table.column("chunk").to_numpy(), table.column("label").to_numpy() >> 16)
    assert json.loads(pq.read_schema(tmp_path / "n.parquet").metadata[b"wsi_nuclei"]) == {"slide": "x.tif"}


def test_an_empty_file_has_every_column_and_a_failed_one_is_not_left(tmp_path):
    import geopandas
    import pyarrow.parquet as pq

    from wsi_nuclei.nuclei.table import PIPELINE_MEASUREMENTS, NucleusTable
    from wsi_nuclei.outputs.parquet import ParquetWriter, column_name

    with ParquetWriter(tmp_path / "empty.parquet", "k"):
        pass
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    assert {column_name(n) for n in PIPELINE_MEASUREMENTS} <= set(geopandas.read_parquet(tmp_path / "empty.parquet").columns)
    with pytest.raises(RuntimeError):
        with ParquetWriter(tmp_path / "failed.parquet", "k") as w:
            w.write(NucleusTable.from_nuclei(_nuclei(5)), 0)
            raise RuntimeError("disk gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet"]


# the slide pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return disc_slide(tmp_path_factory.mktemp("slides") / "s.tif", (512, 512), seed=31)


@pytest.fixture(scope="module")
def run(slide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, keep_chunks=True))
    assert res.status == "ok" and res.nuclei > 100
    return out / "s"


def test_a_slides_parquet_is_its_geojson_as_a_table(run):
    import pyarrow.parquet as pq
    import zarr

    features = _geojson_features(run / "nuclei.geojson.gz")
    _same_nuclei(run / "nuclei.parquet", features)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outputs"]["parquet"] == "nuclei.parquet" and summary["outputs"]["density"] == "density.png"
    assert summary["output_bytes"]["nuclei.parquet"] == (run / "nuclei.parquet").stat().st_size
    table = pq.read_table(run / "nuclei.parquet", columns=["label", "chunk"])
    labels = np.asarray(zarr.open_group(run / "mask.zarr", mode="r")["labels/0"][:])
    assert set(table.column("label").to_numpy().tolist()) <= set(np.unique(labels).tolist()) - {0}
    assert np.array_equal(table.column("chunk").to_numpy(), table.column("label").to_numpy() >> 16)
    meta = pq.ParquetFile(run / "nuclei.parquet").metadata
    assert meta.num_row_groups == len(set(table.column("chunk").to_pylist()))
    record = json.loads(meta.schema.to_arrow_schema().metadata[b"wsi_nuclei"])
    assert record["level0_mpp"] == summary["slide_info"]["level0_mpp"] and record["model"] == summary["model"]


def test_changing_formats_under_resume_reassembles_without_recomputing(slide, run, tmp_path):
    import shutil

    out = tmp_path / "out"
    folder = out / "s"
    shutil.copytree(run, folder)  # finished outputs and the chunk files (--keep-chunks)
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, formats=("geojson",), resume=True, keep_chunks=True))
    assert res.status == "ok" and res.extra["chunks_computed"] == 0 and res.extra["chunks_reused"] > 0
    assert not (folder / "nuclei.parquet").exists()  # the file of the earlier formats is not left to look current
    assert "parquet" not in json.loads((folder / "summary.json").read_text())["outputs"]
    assert (folder / "nuclei.geojson.gz").read_bytes() == (run / "nuclei.geojson.gz").read_bytes()
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, formats=("parquet",), resume=True))
    assert res.status == "ok" and res.extra["chunks_computed"] == 0
    assert (folder / "nuclei.parquet").read_bytes() == (run / "nuclei.parquet").read_bytes()
    assert not (folder / "nuclei.geojson.gz").exists()


@pytest.mark.parametrize("text", ["", "csv", "geojson,geojson", "geojson;parquet"])
def test_bad_formats_are_one_line(text):
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app

    result = CliRunner().invoke(app, ["segment", "x.tif", "-o", "out", "--formats", text])
    assert result.exit_code == 2 and "--formats" in result.output and "Traceback" not in result.output
    assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1


_KILL_IN_WRITER = """
import os, signal, sys
from wsi_nuclei.outputs import parquet
real = parquet.ParquetWriter.write
calls = []
def write(self, table, chunk):
    real(self, table, chunk)
    calls.append(chunk)
    if len(calls) == 2:  # the second row group is written: kill -9, mid-file
        os.kill(os.getpid(), signal.SIGKILL)
parquet.ParquetWriter.write = write
from wsi_nuclei.cli.main import main
sys.argv = ["wsi-nuclei", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_run_killed_while_writing_the_parquet_file_resumes_to_the_same_bytes(slide, run, tmp_path):
    """A CLI run is killed (SIGKILL) while it writes nuclei.parquet, after its second row group;
    ``--resume`` then writes the same bytes as the uninterrupted run ``run``. Byte-identical, not
    only equal as tables: assembly replays the chunk files in chunk order and the writer is
    deterministic (no time stamps; the footer names the pyarrow version, the same in both runs),
    so the file is a function of the chunk files; comparing bytes also covers the metadata and
    the row groups. The killed run starts from ``run``'s chunk files (as a run killed after its
    last chunk would), so assembly is all it does before the kill."""
    import shutil

    import pyarrow.parquet as pq

    out = tmp_path / "out"
    folder = out / "s"
    shutil.copytree(run / WORK_DIR, folder / WORK_DIR)  # the chunks, finished; no outputs yet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_IN_WRITER, "segment", str(slide), "-o", str(out), "--resume", *FLAGS], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not (folder / "nuclei.parquet").exists() and not (folder / "summary.json").exists()
    assert [p for p in folder.iterdir() if p.name.startswith("nuclei.parquet.")], "the kill did not land while the file was written"
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "ok" and res.extra["chunks_computed"] == 0  # every chunk file reused
    assert (folder / "nuclei.parquet").read_bytes() == (run / "nuclei.parquet").read_bytes()
    assert pq.read_table(folder / "nuclei.parquet").equals(pq.read_table(run / "nuclei.parquet"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in run.iterdir() if p.name != WORK_DIR)  # no leftovers
    assert not (folder / WORK_DIR).exists()


# AnnData: a thin layer over the table -------------------------------------------------------------

def test_export_anndata_is_the_table_with_measurements_in_x(run, tmp_path):
    anndata = pytest.importorskip("anndata", reason="anndata is in the [dev] and [anndata] extras")
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app
    from wsi_nuclei.nuclei.table import PIPELINE_MEASUREMENTS
    from wsi_nuclei.outputs.parquet import column_name

    result = CliRunner().invoke(app, ["export", "anndata", str(run), "-o", str(tmp_path / "n.h5ad")])
    assert result.exit_code == 0, result.output
    adata = anndata.read_h5ad(tmp_path / "n.h5ad")
    table = pq.read_table(run / "nuclei.parquet")
    names = [column_name(n) for n in PIPELINE_MEASUREMENTS]
    assert list(adata.var_names) == names and list(adata.var["qupath_name"]) == list(PIPELINE_MEASUREMENTS)
    assert list(adata.obs_names) == table.column("id").to_pylist()
    assert np.array_equal(adata.X, np.column_stack([table.column(n).to_numpy() for n in names]).astype(np.float32))
    assert np.array_equal(
        adata.obsm["spatial"], np.column_stack([table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()])
    )
    assert np.array_equal(adata.obs["label"].to_numpy(), table.column("label").to_numpy())
    summary = json.loads((run / "summary.json").read_text())
    assert adata.uns["wsi_nuclei"]["level0_mpp"] == summary["slide_info"]["level0_mpp"]
    again = CliRunner().invoke(app, ["export", "anndata", str(run), "-o", str(tmp_path / "n.h5ad")])
    assert again.exit_code == 0, again.output  # an export of ours is replaced by the next
    # a user's own AnnData under that name is never replaced (it was, before)
    theirs = tmp_path / "analysis.h5ad"
    anndata.AnnData(np.ones((2, 2), np.float32)).write_h5ad(theirs)
    before = theirs.read_bytes()
    refused = CliRunner().invoke(app, ["export", "anndata", str(run), "-o", str(theirs)])
    assert refused.exit_code != 0 and "not written by wsi-nuclei export anndata" in refused.output and "Traceback" not in refused.output
    assert theirs.read_bytes() == before


def test_export_anndata_errors_are_one_line(run, tmp_path, monkeypatch):
    import builtins

    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app

    def one_line(args: list[str], *words: str) -> None:
        result = CliRunner().invoke(app, ["export", "anndata", *args])
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
        assert all(w in lines[0] for w in words), lines[0]

    one_line([str(tmp_path / "nowhere")], "not found")
    (tmp_path / "empty").mkdir()
    one_line([str(tmp_path / "empty")], "no nuclei.parquet", "--formats")
    (tmp_path / "bad" / "nuclei.parquet").parent.mkdir()
    (tmp_path / "bad" / "nuclei.parquet").write_bytes(b"PAR1 not really")
    one_line([str(tmp_path / "bad")], "not a readable nuclei.parquet")
    before = (run / "nuclei.parquet").read_bytes()
    one_line([str(run), "-o", str(run / "nuclei.parquet")], "-o must name a .h5ad file")  # the source itself
    one_line([str(run), "-o", str(tmp_path / "empty")], "-o must name a .h5ad file", "nuclei.h5ad")  # a folder
    assert (run / "nuclei.parquet").read_bytes() == before
    real_import = builtins.__import__

    def no_anndata(name, *args, **kwargs):  # noqa: ANN001, ANN202
        if name == "anndata":
            raise ImportError("No module named 'anndata'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_anndata)
    one_line([str(run), "-o", str(tmp_path / "x.h5ad")], "pip install 'wsi-nuclei[anndata]'")


def test_the_docs_recipes_run_as_written(run):
    """docs/results.md's GeoPandas, DuckDB and AnnData recipes, on a slide's outputs."""
    import re

    import shapely

    docs = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", docs, re.S) if "OUT/slide/nuclei.parquet" in b]
    blocks = [b for b in blocks if "Immune cells" not in b]  # the TIL recipe needs a typed model: tests/test_types.py
    assert len(blocks) == 3
    features = _geojson_features(run / "nuclei.geojson.gz")
    scope: dict = {}
    for block in blocks:
        if "import duckdb" in block:
            pytest.importorskip("duckdb", reason="duckdb is in the [dev] extra")
        exec(block.replace('"OUT/slide/', f'"{run}/').replace("'OUT/slide/", f"'{run}/"), scope)
    nuclei, adata = scope["nuclei"], scope["adata"]
    assert len(nuclei) == len(features) == adata.n_obs > 0
    box = nuclei.geometry.intersects(shapely.box(200, 200, 400, 400))
    assert 0 < len(scope["region"]) == box.sum() < len(nuclei)
    assert len(scope["big"]) == sum(f["properties"]["measurements"]["Area µm^2"] > 50 for f in features)
    inside = ((nuclei.bounds.minx >= 200) & (nuclei.bounds.maxx < 400) & (nuclei.nucleus_probability > 0.9)).sum()
    assert scope["counts"][0] == inside > 0
    assert np.array_equal(adata.obsm["spatial"], nuclei[["centroid_x", "centroid_y"]].to_numpy())
