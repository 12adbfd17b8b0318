"""Bad input and faults: one test (or test case) per kind of fault.

Every failure gives one line naming the file and the fix; the other slides of a batch complete;
the exit code is non-zero only at the end; OUT/run.json records every slide as ok / failed /
skipped with the reason; no partial file is left under a final name.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.pipeline.segment import WORK_DIR, SegmentConfig, segment_many

from .slides import disc_image, disc_slide, disk_fills_at_second_write, write_pyramid

runner = CliRunner()
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64"]
OPTS = {"chunk_size": 256, "halo": 32, "context": 64}


def _one_line_errors(output: str) -> list[str]:
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in output
    return lines


@pytest.fixture(scope="module")
def batch(shared_data, tmp_path_factory) -> dict:
    """One CLI batch over every kind of bad input plus two good slides."""
    src = tmp_path_factory.mktemp("inputs")
    fixtures = shared_data / "wsi" / "openslide-python-fixtures"
    disc_slide(src / "good.tif", (512, 512), seed=5)
    empty = src / "empty_folder"
    empty.mkdir()
    shutil.copy(fixtures / "unopenable.tiff", src / "unopenable.tiff")
    shutil.copy(fixtures / "unreadable.svs", src / "unreadable.svs")
    data = (shared_data / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    (src / "truncated.svs").write_bytes(data[: len(data) // 2])
    (src / "text.svs").write_text("this is not a slide\n")
    Image.fromarray(disc_image((64, 64), [(32, 32)], 8)).save(src / "picture.png")
    os.rename(src / "picture.png", src / "png.svs")
    write_pyramid(src / "glass.tif", np.full((600, 700, 3), 244, np.uint8), 0.5)  # no tissue
    disc_slide(src / "small.tif", (200, 150), seed=6)  # smaller than one chunk
    disc_slide(src / "narrow.tif", (24, 900), seed=7)  # narrower than the halo
    out = tmp_path_factory.mktemp("batch_out")
    inputs = [src / "missing.svs", empty, *(src / n for n in ("unopenable.tiff", "unreadable.svs", "truncated.svs", "text.svs",
                                                               "png.svs", "glass.tif", "small.tif", "narrow.tif", "good.tif"))]
    result = runner.invoke(app, ["segment", *map(str, inputs), "-o", str(out), "--workers", "0", "--quiet", *FLAGS])
    run = json.loads((out / "run.json").read_text())
    status = {Path(s["slide"]).name: s for s in run["slides"]}
    return {"result": result, "status": status, "out": out, "src": src}


def test_batch_exit_code_and_run_json(batch):
    result = batch["result"]
    assert result.exit_code == 1  # failures reported at the end, after the good slides finished
    errors = _one_line_errors(result.output)
    failed = [s for s in batch["status"].values() if s["status"] == "failed"]
    assert len(errors) == len(failed) == 7
    assert batch["status"]["good.tif"]["status"] == "ok" and batch["status"]["good.tif"]["nuclei"] > 100
    assert (batch["out"] / "good" / "nuclei.geojson.gz").exists()


@pytest.mark.parametrize("name, words", [
    ("missing.svs", ["missing.svs", "file not found", "check the path"]),                         # 1
    ("empty_folder", ["empty_folder", "no slides", ".svs", ".ndpi"]),                             # 2
    ("unopenable.tiff", ["unopenable.tiff"]),                                                       # 3
    ("unreadable.svs", ["unreadable.svs", "cannot read region", "x=", "level"]),                  # 4
    ("truncated.svs", ["truncated.svs", "truncated or damaged"]),                                                       # 5
    ("text.svs", ["text.svs", "cannot open as a slide"]),                                         # 6
    ("png.svs", ["png.svs", "segment-image"]),                                                                   # 6
])
def test_bad_slide_is_one_clear_line(batch, name, words):
    entry = batch["status"][name]
    assert entry["status"] == "failed"
    reason = entry["reason"]
    assert "\n" not in reason and len(reason) < 400
    for w in words:
        assert w in reason, (w, reason)
    assert any(name in line for line in _one_line_errors(batch["result"].output))


def test_no_tissue_gives_an_empty_valid_collection(batch):  # 8
    entry = batch["status"]["glass.tif"]
    assert entry["status"] == "ok" and entry["nuclei"] == 0
    with gzip.open(batch["out"] / "glass" / "nuclei.geojson.gz", "rt") as fh:
        assert json.load(fh) == {"type": "FeatureCollection", "features": []}
    summary = json.loads((batch["out"] / "glass" / "summary.json").read_text())
    assert summary["nuclei"] == 0 and summary["chunks"]["processed"] == 0


@pytest.mark.parametrize("name", ["small.tif", "narrow.tif"])
def test_tiny_slides(batch, name):  # 9
    entry = batch["status"][name]
    assert entry["status"] == "ok" and entry["nuclei"] > 0
    summary = json.loads((batch["out"] / name[:-4] / "summary.json").read_text())
    with gzip.open(batch["out"] / name[:-4] / "nuclei.geojson.gz", "rt") as fh:
        feats = json.load(fh)["features"]
    w, h = summary["slide_info"]["dimensions"]
    for f in feats:
        xy = np.asarray(f["geometry"]["coordinates"][0])
        assert xy[:, 0].min() >= -1 and xy[:, 0].max() <= w + 1 and xy[:, 1].min() >= -1 and xy[:, 1].max() <= h + 1


def test_existing_outputs_need_resume_or_overwrite(batch):  # 12
    good = batch["src"] / "good.tif"
    again = runner.invoke(app, ["segment", str(good), "-o", str(batch["out"]), "--workers", "0", "--quiet", *FLAGS])
    assert again.exit_code == 1 and "--resume" in again.output and "--overwrite" in again.output
    skip = runner.invoke(app, ["segment", str(good), "-o", str(batch["out"]), "--workers", "0", "--quiet", "--resume", *FLAGS])
    assert skip.exit_code == 0
    run = json.loads((batch["out"] / "run.json").read_text())
    assert run["slides"][0]["status"] == "skipped" and "earlier run" in run["slides"][0]["reason"]


def test_corrupt_tile_fails_its_slide_naming_the_region_and_the_batch_goes_on(tmp_path):  # 4, 17
    """A slide that opens and has a readable thumbnail but a corrupt level-0 tile in its tissue."""
    import tifffile

    img = np.full((4096, 4096, 3), 244, np.uint8)
    img[1024:1536, 1024:1536] = disc_image((512, 512), [(x, y) for y in range(16, 512, 32) for x in range(16, 512, 32)], 7, seed=15)
    bad = write_pyramid(tmp_path / "bad.tif", img, 0.5, levels=3)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        k = 5 * 16 + 5  # tile (row 5, col 5) of 256 px: inside the tissue patch
        offset = page.dataoffsets[k]
    with open(bad, "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(b"\xff\x00garbage" * 20)
    good = disc_slide(tmp_path / "good.tif", (256, 256), seed=16)
    results = segment_many([bad, good], tmp_path / "out", SegmentConfig(**OPTS))
    assert results[1].status == "ok"
    r = results[0]
    # the tile and the chunk are named (OpenSlide's generic TIFF reader, through libtiff, would
    # decode this tile as grey: each tile is decoded strictly once more)
    assert r.status == "failed" and "bad.tif" in r.reason and "tile 85 of level 0" in r.reason and "damaged" in r.reason
    assert "[chunk" in r.reason
    assert "\n" not in r.reason and not (tmp_path / "out" / "bad" / "nuclei.geojson.gz").exists()


# pixel formats ------------------------------------------------------------------------------------

def _tiff(path: Path, img: np.ndarray, mpp: float = 0.5, **kw) -> Path:
    import tifffile

    tifffile.imwrite(path, img, tile=(256, 256), resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
    return path


@pytest.mark.parametrize("kind", ["rgba", "grey", "rgb16"])
def test_unusual_pixel_formats(tmp_path, kind):
    rgb = disc_image((320, 320), [(x, y) for y in range(20, 320, 40) for x in range(20, 320, 40)], 7, seed=3)
    if kind == "rgba":
        path = _tiff(tmp_path / "rgba.tif", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), photometric="rgb", extrasamples=[2])
    elif kind == "grey":
        path = _tiff(tmp_path / "grey.tif", rgb.mean(axis=2).astype(np.uint8), photometric="minisblack")
    else:
        path = _tiff(tmp_path / "rgb16.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    results = segment_many([path], tmp_path / "out", SegmentConfig(**OPTS))
    r = results[0]
    if kind == "grey":  # readable, but not H&E: one clear line instead of a silent "0 nuclei"
        assert r.status == "failed" and path.name in r.reason and "greyscale" in r.reason and "\n" not in r.reason
    else:
        assert r.status == "ok" and r.nuclei >= 40, r.reason


@pytest.mark.parametrize("kind", ["rgba", "grey", "rgb16"])
def test_segment_image_pixel_formats(tmp_path, kind):
    rgb = disc_image((128, 128), [(40, 40), (90, 90)], 8, seed=4)
    if kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "x.png")
    elif kind == "grey":
        Image.fromarray(rgb.mean(axis=2).astype(np.uint8)).save(tmp_path / "x.png")
    else:
        import tifffile

        tifffile.imwrite(tmp_path / "x.tif", rgb.astype(np.uint16) * 257)
    image = next(tmp_path.glob("x.*"))
    result = runner.invoke(app, ["segment-image", str(image), "--mpp", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "x_labels.png").exists()


# unwritable and full output folders ---------------------------------------------------------------

def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    slide = disc_slide(tmp_path / "s.tif", (256, 256), seed=8)
    result = runner.invoke(app, ["segment", str(slide), "-o", str(blocker / "out"), "--workers", "0", "--quiet", *FLAGS])
    assert result.exit_code != 0
    errors = _one_line_errors(result.output)
    assert errors and "a_file" in errors[0] and ("writable" in errors[0] or "cannot write" in errors[0])


def test_disk_full_during_assembly_leaves_no_partial_file_and_resumes(tmp_path, monkeypatch):
    from wsi_nuclei.outputs import geojson as export

    slide = disc_slide(tmp_path / "s.tif", (600, 600), seed=9)
    real = export.GeoJSONWriter.write_encoded
    disk_fills_at_second_write(monkeypatch)
    out = tmp_path / "out"
    res = segment_many([slide], out, SegmentConfig(**OPTS))[0]
    assert res.status == "failed" and "No space left on device" in res.reason and "free disk space" in res.reason
    leftovers = sorted(p.name for p in (out / "s").iterdir())
    assert leftovers == [WORK_DIR]  # no nuclei.geojson.gz, no mask.zarr, no *.partial
    # the outputs are written while the chunks are computed: the slide fails at the full disk, and
    # the chunks finished by then are kept (the rest were not started)
    n_chunks = len(list((out / "s" / WORK_DIR / "chunks").glob("*.npz")))
    assert 2 <= n_chunks <= 9
    monkeypatch.setattr(export.GeoJSONWriter, "write_encoded", real)
    again = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))[0]
    assert again.status == "ok" and again.extra["chunks_reused"] == n_chunks and again.extra["chunks_computed"] == 9 - n_chunks
    clean = segment_many([slide], tmp_path / "clean", SegmentConfig(**OPTS))[0]
    assert (out / "s" / "nuclei.geojson.gz").read_bytes() == (tmp_path / "clean" / "s" / "nuclei.geojson.gz").read_bytes()
    assert again.nuclei == clean.nuclei


# a damaged model ----------------------------------------------------------------------------------

def _model_copy(tmp_path: Path) -> Path:
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR

    dst = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, dst)
    return dst


@pytest.mark.parametrize("damage, words", [
    ("corrupt", ["model.safetensors", "sha256 differs"]),
    ("no_card", ["model.json", "not found"]),
    ("wrong_card", ["model.json", "outputs"]),
    ("pickle", ["pickle", "never loaded"]),
])
def test_bad_model_is_refused_once(tmp_path, damage, words):
    model = _model_copy(tmp_path)
    weights, card = model / "model.safetensors", model / "model.json"
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
        weights.write_bytes(bytes(data))
    elif damage == "no_card":
        card.unlink()
    elif damage == "wrong_card":
        meta = json.loads(card.read_text())
        meta["outputs"] = ["nucleus", "contour"]
        card.write_text(json.dumps(meta))
    else:
        import pickle

        weights.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    slide = disc_slide(tmp_path / "s.tif", (256, 256), seed=10)
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--model", str(model), "--workers", "0", *FLAGS])
    assert result.exit_code == 2
    errors = _one_line_errors(result.output)
    assert len(errors) == 1, result.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert not (tmp_path / "out").exists()


# invalid options and an unreachable scheduler -----------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--chunk-size", "0"], ["--chunk", "> 0"]),
    (["--chunk-size", "-64"], ["--chunk"]),
    (["--chunk-size", "100"], ["multiple of 32"]),
    (["--halo", "1024", "--chunk-size", "512"], ["--halo", "smaller"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--device", "cuda"], ["no CUDA GPU"]),
    (["--workers", "-1"], ["--workers"]),
    (["--max-slides", "0"], ["--max-slides"]),
    (["--mpp", "0"], ["--mpp"]),
    (["--resume", "--overwrite"], ["exclude"]),
    (["--cluster", "kubernetes"], ["--cluster"]),
    # issue 14: every option checked once, for type, finiteness and range
    (["--connect-timeout", "inf"], ["--connect-timeout", "finite"]),
    (["--connect-timeout", "nan"], ["--connect-timeout"]),
    (["--threads", "0"], ["--threads"]),
    (["--halo", "-32"], ["--halo"]),
    (["--context", "-64"], ["--context"]),
    (["--forward-memory", "lots"], ["--forward-memory", "size"]),
    (["--chunk-size", "65536"], ["--chunk-size", "16384"]),
    (["--context", "100000000"], ["--context", "larger than"]),
    (["--forward-memory", "1e999GB"], ["--forward-memory", "size"]),
    (["--max-slides", "-3"], ["--max-slides"]),
    # issue 16: SLURM's time formats
    (["--worker-wait", "soon"], ["--worker-wait", "duration"]),
    (["--worker-wait", "-300"], ["--worker-wait", "duration"]),
    (["--cluster", "slurm", "--walltime", "4h"], ["--walltime", "HH:MM:SS"]),
    # issue 15: int8 runs on ONNX Runtime only
    (["--precision", "fp16"], ["--precision", "fp32, bf16, int8"]),
    (["--precision", "int8", "--backend", "openvino"], ["--precision int8", "--backend auto or onnx"]),
    (["--precision", "bf16", "--backend", "onnx"], ["--precision bf16", "--backend auto or openvino"]),
])
def test_invalid_options(tmp_path, args, words):
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    errors = _one_line_errors(result.output)
    assert len(errors) == 1, result.output
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_unreachable_scheduler(tmp_path):
    t0 = time.time()
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9",
                                 "--connect-timeout", "2", "--device", "cpu"])
    assert time.time() - t0 < 30
    assert result.exit_code == 2
    errors = _one_line_errors(result.output)
    assert len(errors) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in errors[0]


# a chunk that keeps failing -----------------------------------------------------------------------

def _install_failing_chunk(index: int, counter: str) -> None:
    """Run inside a Dask worker: chunk ``index`` of slide 'a.tif' raises, counting attempts."""
    from wsi_nuclei.pipeline import chunk as chunk_module

    real = chunk_module.segment_chunk

    def failing(plan, chunk, cfg):
        if chunk.index == index and plan.path.endswith("a.tif"):
            with open(counter, "a") as fh:
                fh.write("x")
            raise RuntimeError("simulated crash in a chunk")
        return real(plan, chunk, cfg)

    chunk_module.segment_chunk = failing


@pytest.mark.slow
def test_chunk_that_keeps_raising_fails_only_its_slide(tmp_path):
    from wsi_nuclei.cluster.client import ClusterConfig, close_client, make_client
    from wsi_nuclei.pipeline.batch import TASK_RETRIES

    (tmp_path / "in").mkdir()
    disc_slide(tmp_path / "in" / "a.tif", (512, 512), seed=11)
    disc_slide(tmp_path / "in" / "b.tif", (512, 512), seed=12)
    counter = tmp_path / "attempts.txt"
    client = make_client(ClusterConfig(workers=1, threads=1))
    try:
        client.run(_install_failing_chunk, 2, str(counter))
        results = segment_many([tmp_path / "in"], tmp_path / "out", SegmentConfig(**OPTS), client)
    finally:
        close_client(client)
    status = {Path(r.slide).name: r for r in results}
    assert status["b.tif"].status == "ok"
    a = status["a.tif"]
    assert a.status == "failed" and "chunk 2" in a.reason and "simulated crash" in a.reason and "a.tif" in a.reason
    assert "\n" not in a.reason
    assert len(counter.read_text()) == 1 + TASK_RETRIES  # retried, bounded
    assert not (tmp_path / "out" / "a" / "nuclei.geojson.gz").exists()


# Ctrl-C -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_pressed_several_times_stops_quickly_with_one_line_and_resumes(tmp_path):
    # 6 x 8 = 48 chunks: the Ctrl-C after the 4th chunk file always finds work left (with 20, the
    # run could finish before the signal arrived and exit 0)
    slide = disc_slide(tmp_path / "s.tif", (1536, 2048), seed=13)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_nuclei.cli.main", "segment", str(slide), "-o", str(out), *FLAGS, "--quiet", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = out / "s" / WORK_DIR / "chunks"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(chunks.glob("*.npz")) if chunks.is_dir() else []) < 4:
        time.sleep(0.05)
    assert proc.poll() is None
    t0 = time.time()
    for _ in range(4):  # an impatient user; Ctrl-C in a terminal signals the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 20, "did not stop within seconds"
    assert proc.returncode == 130, err
    # one line however often it was pressed
    assert err.count("interrupted:") == 1 and "--resume" in err and "Traceback" not in err and "Aborted" not in err, err
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "interrupted" and run["slides"][0]["status"] == "interrupted"
    assert not (out / "s" / ".lock").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "s" / "summary.json").read_text())
    assert summary["chunks"]["reused"] >= 4


# degenerate label maps ----------------------------------------------------------------------------

def _check_feature(f: dict) -> None:
    """The QuPath rules of DESIGN.md for one feature."""
    import uuid

    from shapely.geometry import Polygon

    uuid.UUID(f["id"])
    assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
    props = f["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] and len(props["classification"]["color"]) == 3
    assert all(isinstance(v, float) and np.isfinite(v) for v in props["measurements"].values())
    rings = f["geometry"]["coordinates"]
    assert len(rings) == 1
    ring = rings[0]
    assert len(ring) >= 4 and ring[0] == ring[-1]
    poly = Polygon(ring)
    assert poly.is_valid and poly.area > 0
    # QuPath 0.6+ snaps to a 0.01 px grid: still valid there
    snapped = Polygon([(round(x, 2), round(y, 2)) for x, y in ring])
    assert snapped.is_valid and snapped.area > 0


def _features(labels: np.ndarray) -> list[dict]:
    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons
    from wsi_nuclei.outputs.geojson import encode_feature, encode_nuclei, feature

    nuclei = label_polygons(labels.astype(np.int64), PolygonFrame(10, 20, 2.0, 0.25, 0.0, 0.0), labels.astype(np.float32) * 0, None)
    encoded = encode_nuclei(nuclei, "slide:1x1")  # the pipeline's encoder: equal to the reference
    assert encoded == [encode_feature(feature(n, "slide:1x1")) for n in nuclei]
    return [json.loads(b) for b in encoded]


def test_degenerate_label_maps():
    lab = np.zeros((40, 40), np.int32)
    lab[0, 0] = 1  # one pixel in the corner (touches the edge)
    lab[5, 5] = lab[6, 6] = 2  # two pixels touching at a corner (self-touching outline)
    lab[10:20, 10:20] = 3
    lab[14:16, 14:16] = 0  # a hole
    lab[25:35, 25:35] = 4
    lab[29:31, 25:35] = 0  # split in two parts
    lab[30:40, 0:3] = 5  # a thin strip on the border
    for k, (y, x) in enumerate([(22, 2), (22, 4), (24, 2), (24, 4)]):  # a checkerboard of single pixels
        lab[y, x] = 6
    lab[0:40, 39] = 7  # one-pixel-wide line along the edge
    feats = _features(lab)
    for f in feats:
        _check_feature(f)
    assert len(feats) >= 4  # the real nuclei-like objects survive


@pytest.mark.slow
def test_random_label_maps_always_give_valid_qupath_features():
    """Property test: any label map -> only valid, closed, QuPath-importable features."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(arrays(np.int32, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 5)))
    def check(lab):
        feats = _features(lab)
        for f in feats:
            _check_feature(f)
        doc = json.loads(json.dumps({"type": "FeatureCollection", "features": feats}))
        assert len({f["id"] for f in doc["features"]}) == len(feats)

    check()


# odd slide names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["my slide ü 1.tif", "..tif", "a..b.tif", "ü°.tif"])
def test_odd_slide_names_stay_inside_out(tmp_path, name):
    src = tmp_path / "in"
    src.mkdir()
    slide = disc_slide(src / name, (256, 256), seed=14)
    out = tmp_path / "out"
    res = segment_many([slide], out, SegmentConfig(**OPTS))[0]
    assert res.status == "ok", res.reason
    dest = Path(res.out_dir).resolve()
    assert dest.parent == out.resolve() and dest.name not in ("", ".", "..")
    assert (dest / "nuclei.geojson.gz").exists()
    for p in tmp_path.rglob("*"):
        assert p.resolve().is_relative_to(src.resolve()) or p.resolve().is_relative_to(out.resolve())
