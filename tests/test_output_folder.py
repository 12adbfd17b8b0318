"""A slide's output folder is never wrong in silence: one writer per
folder, ``--resume`` verifies before it skips, ``--overwrite`` replaces only on success, damaged
chunk files are recomputed, every failure is that slide's one line with its traceback kept, and
names never collide."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.outputs.folder import LOCK_NAME, SlideLock
from wsi_nuclei.pipeline.segment import WORK_DIR, SegmentConfig, segment_many

from .slides import disc_slide, disk_fills_at_second_write

runner = CliRunner()
OPTS = {"chunk_size": 256, "halo": 32, "context": 64}
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64", "--workers", "0", "--quiet"]
OUTPUTS = ("summary.json", "nuclei.geojson.gz", "nuclei.parquet", "overlay.png", "density.png")


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _clean(folder: Path) -> None:
    """A finished slide's folder holds its outputs only: no work files, lock or temporary files."""
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["density.png", "mask.zarr", "nuclei.geojson.gz", "nuclei.parquet", "overlay.png", "summary.json"], names


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return disc_slide(tmp_path_factory.mktemp("slides") / "s.tif", (512, 512), seed=21)


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory) -> Path:
    """An uninterrupted run of ``slide``: the outputs every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS))
    assert res.status == "ok" and res.nuclei > 20
    _clean(out / "s")
    return out / "s"


def _same_outputs(a: Path, b: Path) -> None:
    for name in ("nuclei.geojson.gz", "nuclei.parquet", "overlay.png", "density.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ta = {k: v for k, v in _tree(a / "mask.zarr").items()}
    assert ta == _tree(b / "mask.zarr")


# one writer per slide ---------------------------------------------------------------------------

def test_a_live_lock_fails_the_slide_at_once_naming_the_other_run(slide, tmp_path):
    out = tmp_path / "out"
    with SlideLock(out / "s"):  # this process is alive: as if another run held the folder
        result = runner.invoke(app, ["segment", str(slide), "-o", str(out), *FLAGS])
        assert result.exit_code == 1
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "another run is writing" in errors[0] and f"pid {os.getpid()}" in errors[0]
        assert socket.gethostname() in errors[0] and LOCK_NAME in errors[0]
        assert sorted(p.name for p in (out / "s").iterdir()) == [LOCK_NAME]  # nothing of the other run touched
    run = json.loads((out / "run.json").read_text())
    assert run["slides"][0]["status"] == "failed"


def test_a_stale_lock_of_a_dead_process_is_taken_over(slide, reference, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    folder = tmp_path / "out" / "s"
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    (res,) = segment_many([slide], tmp_path / "out", SegmentConfig(**OPTS))
    assert res.status == "ok"
    _clean(folder)
    _same_outputs(folder, reference)


def test_a_lock_of_another_host_is_respected(slide, tmp_path):
    folder = tmp_path / "out" / "s"
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-that-is-not-this-one", "since": "earlier"}))
    (res,) = segment_many([slide], tmp_path / "out", SegmentConfig(**OPTS))
    assert res.status == "failed" and "node-that-is-not-this-one" in res.reason and "delete" in res.reason
    assert (folder / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_runs_started_together_into_one_out_never_leave_a_broken_finished_slide(tmp_path):
    """Whatever the timing, every run that exits 0 leaves verified outputs, and a run that loses
    the race says so in one line; afterwards the folder equals a single run's."""
    big = disc_slide(tmp_path / "big.tif", (1024, 1024), seed=22)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_nuclei.cli.main", "segment", str(big), "-o", str(out), "--threads", "1", "--resume", *FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    for rc, text in outs:
        assert "Traceback" not in text
        assert rc == 0 or (rc == 1 and "another run is writing" in text), text
    assert any(rc == 0 for rc, _ in outs)
    _clean(out / "big")
    (again,) = segment_many([big], out, SegmentConfig(**OPTS, resume=True))
    assert again.status == "skipped"  # verified finished
    (ref,) = segment_many([big], tmp_path / "ref", SegmentConfig(**OPTS))
    _same_outputs(out / "big", tmp_path / "ref" / "big")


# --resume verifies ----------------------------------------------------------------------

def test_resume_removes_the_work_folder_a_finished_run_left_unless_kept(slide, reference, tmp_path):
    """A run killed between summary.json and the removal of its work folder leaves both: the next
    --resume finds the slide finished and removes the work folder, unless that run asked to keep its
    chunks (--keep-chunks, recorded in summary.json)."""
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    assert json.loads((out / "s" / "summary.json").read_text())["keep_chunks"] is False
    (out / "s" / WORK_DIR / "chunks").mkdir(parents=True)
    (out / "s" / WORK_DIR / "chunks" / "0.npz").write_bytes(b"left behind")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "skipped" and not (out / "s" / WORK_DIR).exists()
    _clean(out / "s")
    kept = tmp_path / "kept"
    (first,) = segment_many([slide], kept, SegmentConfig(**OPTS, keep_chunks=True))
    assert first.status == "ok" and (kept / "s" / WORK_DIR / "chunks").is_dir()
    (again,) = segment_many([slide], kept, SegmentConfig(**OPTS, resume=True))
    assert again.status == "skipped" and (kept / "s" / WORK_DIR / "chunks").is_dir()  # asked for: kept


def test_slide_state_tells_the_four_states_apart(slide, reference, tmp_path):
    """finished / outdated / interrupted / new: the one answer --resume, the dry run and the stop
    report share (outputs.folder.slide_state)."""
    from wsi_nuclei.outputs.folder import slide_file, slide_state

    summary = json.loads((reference / "summary.json").read_text())
    ident, key = slide_file(slide), summary["output_key"]
    assert slide_state(tmp_path / "none", ident, key).state == "new"
    (tmp_path / "cut" / WORK_DIR).mkdir(parents=True)
    assert slide_state(tmp_path / "cut", ident, key).state == "interrupted"
    done = slide_state(reference, ident, lambda: key)
    assert done.state == "finished" and done.nuclei == summary["nuclei"] > 20
    other = slide_state(reference, ident, "another key")
    assert other.state == "outdated" and "another model or other options" in other.why
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    with open(copy / "nuclei.parquet", "ab") as fh:
        fh.write(b"x")  # an output changed after the summary was written
    changed = slide_state(copy, ident, key)
    assert changed.state == "outdated" and "nuclei.parquet" in changed.why


def test_another_slide_with_the_same_name_gets_its_own_folder(slide, tmp_path):
    a = tmp_path / "A"
    b = tmp_path / "B"
    a.mkdir()
    b.mkdir()
    shutil.copy(slide, a / "x.tif")
    disc_slide(b / "x.tif", (512, 512), seed=23)  # another slide, same name
    out = tmp_path / "out"
    (ra,) = segment_many([a / "x.tif"], out, SegmentConfig(**OPTS))
    before = _tree(out / "x")
    (rb,) = segment_many([b / "x.tif"], out, SegmentConfig(**OPTS, resume=True))
    assert ra.status == rb.status == "ok" and Path(rb.out_dir).name == "x_"
    assert _tree(out / "x") == before  # A's outputs untouched
    assert json.loads((out / "x_" / "summary.json").read_text())["slide"] == str(b / "x.tif")
    (again,) = segment_many([b / "x.tif"], out, SegmentConfig(**OPTS, resume=True))  # B alone, later: finds its folder
    assert again.status == "skipped" and Path(again.out_dir).name == "x_"
    both = segment_many([a / "x.tif", b / "x.tif"], out, SegmentConfig(**OPTS, resume=True))
    assert [r.status for r in both] == ["skipped", "skipped"]


def test_an_explicit_folder_of_another_slide_is_a_one_line_error(slide, tmp_path):
    from wsi_nuclei.errors import OutputError
    from wsi_nuclei.pipeline.segment import segment_slide

    other = disc_slide(tmp_path / "other.tif", (256, 256), seed=24)
    segment_slide(slide, tmp_path / "here", SegmentConfig(**OPTS))
    with pytest.raises(OutputError, match="holds the outputs of another slide"):
        segment_slide(other, tmp_path / "here", SegmentConfig(**OPTS, resume=True))


def test_a_replaced_slide_file_is_segmented_again(tmp_path):
    src = disc_slide(tmp_path / "x.tif", (512, 512), seed=25)
    out = tmp_path / "out"
    (first,) = segment_many([src], out, SegmentConfig(**OPTS))
    disc_slide(src, (512, 512), seed=26)  # same path, new content
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    (second,) = segment_many([src], out, SegmentConfig(**OPTS, resume=True))
    assert second.status == "ok" and second.extra["chunks_computed"] > 0
    (ref,) = segment_many([src], tmp_path / "ref", SegmentConfig(**OPTS))
    _same_outputs(out / "x", tmp_path / "ref" / "x")


@pytest.mark.parametrize("change", [{"halo": 64}, {"tta": "flip4"}, {"raw_coordinates": True}])
def test_other_settings_are_segmented_again_not_skipped(slide, reference, tmp_path, change):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    (res,) = segment_many([slide], out, SegmentConfig(**{**OPTS, **change}, resume=True))
    assert res.status == "ok"
    summary = json.loads((out / "s" / "summary.json").read_text())
    for k, v in change.items():
        assert summary["parameters"][k] == v


def test_another_model_is_segmented_again(slide, reference, tmp_path):
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    card = json.loads((model / "model.json").read_text())
    card["postprocess"]["fg_threshold"] = 0.6
    (model / "model.json").write_text(json.dumps(card))
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, model_dir=str(model), resume=True))
    assert res.status == "ok" and json.loads((out / "s" / "summary.json").read_text())["parameters"]["model_dir"] == str(model)


@pytest.mark.parametrize("damage", ["no-mask", "no-geojson", "empty-summary", "summary-not-json", "empty-geojson", "truncated-geojson",
                                    "no-overlay", "zarr-chunk-gone", "no-parquet", "truncated-parquet", "no-density"])
def test_damaged_finished_outputs_are_made_again(slide, reference, tmp_path, damage):
    out = tmp_path / "out"
    folder = out / "s"
    shutil.copytree(reference, folder)
    if damage == "no-mask":
        shutil.rmtree(folder / "mask.zarr")
    elif damage == "no-geojson":
        (folder / "nuclei.geojson.gz").unlink()
    elif damage == "empty-summary":
        (folder / "summary.json").write_text("")
    elif damage == "summary-not-json":
        (folder / "summary.json").write_text("{broken")
    elif damage == "empty-geojson":
        (folder / "nuclei.geojson.gz").write_bytes(b"")
    elif damage == "truncated-geojson":
        data = (folder / "nuclei.geojson.gz").read_bytes()
        (folder / "nuclei.geojson.gz").write_bytes(data[:100])
    elif damage == "no-overlay":
        (folder / "overlay.png").unlink()
    elif damage == "no-parquet":
        (folder / "nuclei.parquet").unlink()
    elif damage == "truncated-parquet":
        data = (folder / "nuclei.parquet").read_bytes()
        (folder / "nuclei.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "no-density":
        (folder / "density.png").unlink()
    else:
        next(f for f in sorted((folder / "mask.zarr").rglob("*")) if f.is_file() and f.name not in ("zarr.json", ".zgroup")).unlink()
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "ok" and res.nuclei > 20
    _clean(folder)
    _same_outputs(folder, reference)


def test_resume_of_a_verified_slide_skips_it(slide, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "skipped" and res.nuclei == json.loads((reference / "summary.json").read_text())["nuclei"]


# --overwrite replaces on success -----------------------------------------------------------------

def test_overwrite_keeps_the_old_outputs_until_the_new_ones_are_complete(slide, reference, tmp_path, monkeypatch):
    from wsi_nuclei.outputs import geojson as export

    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    before = _tree(out / "s")
    real = export.GeoJSONWriter.write_encoded
    disk_fills_at_second_write(monkeypatch)
    (res,) = segment_many([slide], out, SegmentConfig(**{**OPTS, "halo": 64}, overwrite=True))
    assert res.status == "failed" and "No space left" in res.reason
    after = {k: v for k, v in _tree(out / "s").items() if not k.startswith(WORK_DIR) and k != "error.txt"}
    assert after == before  # the finished outputs of the earlier run, byte for byte
    monkeypatch.setattr(export.GeoJSONWriter, "write_encoded", real)
    (ok,) = segment_many([slide], out, SegmentConfig(**{**OPTS, "halo": 64}, overwrite=True))
    assert ok.status == "ok" and json.loads((out / "s" / "summary.json").read_text())["parameters"]["halo"] == 64
    _clean(out / "s")


def test_overwrite_with_a_failing_start_keeps_the_old_outputs(slide, reference, tmp_path, monkeypatch):
    from wsi_nuclei.pipeline import plan

    def full_disk(path, arr):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan, "_save_npy", full_disk)  # the disk fills while the thumbnail is saved
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")
    before = _tree(out / "s")
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, overwrite=True))
    assert res.status == "failed" and "No space left on device" in res.reason and "free disk space" in res.reason
    assert {k: v for k, v in _tree(out / "s").items() if k != "error.txt"} == before


# damaged chunk files ----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "bad-crc", "empty"])
def test_damaged_chunk_files_are_computed_again_under_resume(slide, reference, tmp_path, damage, caplog):
    out = tmp_path / "out"
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, keep_chunks=True))
    folder = out / "s"
    (folder / "summary.json").unlink()  # as if killed before the summary
    chunk = folder / WORK_DIR / "chunks" / "2.npz"
    data = chunk.read_bytes()
    if damage == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "bad-crc":
        buf = bytearray(data)
        buf[len(buf) // 3] ^= 0xFF
        chunk.write_bytes(bytes(buf))
    else:
        chunk.write_bytes(b"")
    with caplog.at_level("WARNING"):
        (again,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert again.status == "ok" and again.extra["chunks_computed"] == 1
    assert "damaged chunk file" in caplog.text and "2.npz" in caplog.text
    _clean(folder)
    _same_outputs(folder, reference)


def test_a_chunk_file_damaged_after_the_start_is_removed_so_resume_recovers(slide, reference, tmp_path, monkeypatch):
    from wsi_nuclei.pipeline import plan

    out = tmp_path / "out"
    segment_many([slide], out, SegmentConfig(**OPTS, keep_chunks=True))
    folder = out / "s"
    (folder / "summary.json").unlink()
    chunk = folder / WORK_DIR / "chunks" / "3.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    monkeypatch.setattr(plan, "usable_chunk_file", lambda p, ch: p.chunk_file(ch).exists())  # damage after the check
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "failed" and "damaged chunk file" in res.reason and "--resume" in res.reason
    assert not chunk.exists()
    monkeypatch.undo()
    (again,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert again.status == "ok" and again.extra["chunks_computed"] == 1
    _same_outputs(folder, reference)


# any failure is that slide's, with its traceback kept -------------------------------------

def test_an_unexpected_error_while_a_slide_starts_fails_only_that_slide(slide, tmp_path, monkeypatch):
    from wsi_nuclei.pipeline import batch

    good = disc_slide(tmp_path / "good.tif", (256, 256), seed=27)
    real = batch.plan_slide

    def broken(path, *a, **k):
        if Path(path).name == "s.tif":
            raise ZeroDivisionError("float division by zero")
        return real(path, *a, **k)

    monkeypatch.setattr(batch, "plan_slide", broken)
    out = tmp_path / "out"
    res = segment_many([slide, good], out, SegmentConfig(**OPTS))
    assert [r.status for r in res] == ["failed", "ok"]
    assert "ZeroDivisionError" in res[0].reason and "error.txt" in res[0].reason and "\n" not in res[0].reason
    text = (out / "s" / "error.txt").read_text()
    assert "Traceback" in text and "float division by zero" in text
    run = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in run["slides"]] == ["failed", "ok"] and run["state"] == "finished"
    assert not (out / "s" / LOCK_NAME).exists()


def test_debug_prints_the_traceback_of_a_slide_failure(slide, tmp_path, monkeypatch):
    from wsi_nuclei.pipeline import batch

    monkeypatch.setattr(batch, "plan_slide", lambda *a, **k: 1 / 0)
    result = runner.invoke(app, ["--debug", "segment", str(slide), "-o", str(tmp_path / "out"), *FLAGS])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ZeroDivisionError" in result.output
    quiet = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out2"), *FLAGS])
    assert "Traceback" not in quiet.output and "error.txt" in quiet.output


def test_run_json_that_cannot_be_written_is_an_error_line(slide, tmp_path):
    out = tmp_path / "out"
    (out / "run.json").mkdir(parents=True)  # a folder where the report goes
    result = runner.invoke(app, ["segment", str(slide), "-o", str(out), *FLAGS])
    assert result.exit_code == 2 and "run.json" in result.output and "Traceback" not in result.output
    assert (out / "s" / "summary.json").exists()  # the slide's own outputs are kept


# names -----------------------------------------------------------------------------------------

def test_the_same_slide_given_twice_is_segmented_once(slide, tmp_path):
    res = segment_many([slide, slide, slide.parent], tmp_path / "out", SegmentConfig(**OPTS))
    assert [r.status for r in res] == ["ok"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "run.json", "s"]


@pytest.mark.parametrize("name", ["run.json.tif", "report.html.tif", "line\nbreak.tif", "tab\there.tif"])
def test_names_never_collide_with_the_tools_files_and_messages_stay_on_one_line(tmp_path, name):
    src = disc_slide(tmp_path / name, (256, 256), seed=28)
    out = tmp_path / "out"
    (res,) = segment_many([src], out, SegmentConfig(**OPTS))
    assert res.status == "ok" and Path(res.out_dir).parent == out
    assert json.loads((out / "run.json").read_text())["slides"][0]["status"] == "ok"
    assert Path(res.out_dir).name not in ("run.json", "report.html")
    again = runner.invoke(app, ["segment", str(src), "-o", str(out), *FLAGS])  # outputs exist: the error names it
    errors = [ln for ln in again.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--resume" in errors[0]
    assert "\n" not in errors[0] and "\t" not in errors[0]


def test_a_name_that_is_not_utf8_is_segmented_like_any_other(tmp_path):
    """Latin-1 names from a Windows share are bytes that are not UTF-8. Before: the slide failed
    inside its chunk with UnicodeEncodeError, and report.html was not written."""
    folder = tmp_path / "slides"
    folder.mkdir()
    good = os.fsdecode(os.fsencode(folder) + b"/caf\xe9 r\xe9sum\xe9.tif")
    disc_slide(Path(good), (256, 256), seed=52)
    broken = Path(os.fsdecode(os.fsencode(folder) + b"/d\xe9fect.tif"))
    broken.write_text("not a slide")
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(folder), "-o", str(out), *FLAGS])
    assert result.exit_code == 1  # the broken slide failed, the other one did not
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "d\\xe9fect.tif" in errors[0] and "\udce9" not in errors[0]
    slides = {os.fsencode(s["slide"]): s for s in json.loads((out / "run.json").read_text())["slides"]}
    record = slides[os.fsencode(good)]  # the name round-trips: os.fsencode gives the file's own bytes
    assert record["status"] == "ok" and Path(record["out_dir"]).is_dir() and Path(os.fsdecode(os.fsencode(record["slide"]))).is_file()
    assert Path(record["out_dir"]).name.isascii()  # a folder name any file system (and share) accepts
    summary = json.loads((Path(record["out_dir"]) / "summary.json").read_text())
    assert os.fsencode(summary["slide_file"]["path"]) == os.fsencode(good)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "caf\\xe9 r\\xe9sum\\xe9.tif" in page and "d\\xe9fect.tif" in page
    again = runner.invoke(app, ["segment", good, "-o", str(out), *FLAGS, "--resume"])
    assert again.exit_code == 0
    assert [s["status"] for s in json.loads((out / "run.json").read_text())["slides"] if os.fsencode(s["slide"]) == os.fsencode(good)] == [
        "skipped"]


def test_interrupted_run_json_lists_every_slide(slide, tmp_path):
    other = disc_slide(tmp_path / "o.tif", (256, 256), seed=29)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(KeyboardInterrupt):
        segment_many([slide, other], tmp_path / "out", SegmentConfig(**OPTS), max_slides=1, stop=stop)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["state"] == "interrupted" and len(run["slides"]) == 2
    assert {s["status"] for s in run["slides"]} <= {"ok", "interrupted"} and "interrupted" in {s["status"] for s in run["slides"]}
    assert not any((tmp_path / "out").rglob(LOCK_NAME))


def test_lock_is_o_excl(tmp_path):
    first = SlideLock(tmp_path).acquire()
    with pytest.raises(Exception, match="another run"):
        SlideLock(tmp_path).acquire()
    first.release()
    SlideLock(tmp_path).acquire().release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_empty_lock_is_stale_only_when_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")
    with pytest.raises(Exception, match="another run"):
        SlideLock(tmp_path).acquire()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    SlideLock(tmp_path).acquire().release()


def test_outputs_arrays_unchanged(reference):
    import zarr

    g = zarr.open_group(str(reference / "mask.zarr"), mode="r")
    assert np.asarray(g["labels"]["0"]).max() > 0


def test_swapped_chunk_files_are_computed_again(slide, reference, tmp_path, caplog):
    out = tmp_path / "out"
    segment_many([slide], out, SegmentConfig(**OPTS, keep_chunks=True))
    folder = out / "s"
    (folder / "summary.json").unlink()
    chunks = folder / WORK_DIR / "chunks"
    a, b = (chunks / "1.npz").read_bytes(), (chunks / "2.npz").read_bytes()
    (chunks / "1.npz").write_bytes(b)
    (chunks / "2.npz").write_bytes(a)
    with caplog.at_level("WARNING"):
        (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "ok" and res.extra["chunks_computed"] == 2 and "another chunk" in caplog.text
    _same_outputs(folder, reference)


def test_a_hard_link_is_the_same_slide(slide, tmp_path):
    os.link(slide, tmp_path / "linked.tif")
    res = segment_many([slide, tmp_path / "linked.tif"], tmp_path / "out", SegmentConfig(**OPTS))
    assert len(res) == 1 and res[0].status == "ok"


def test_chunk_failures_finishing_together_fail_only_their_slide(tmp_path):
    """Every level-0 tile of a long slide damaged: its chunks fail at about the same moment (two
    at once in this process); the slide fails in one line and the next slide still runs."""
    import tifffile

    from .slides import disc_slide as make

    bad = make(tmp_path / "bad.tif", (128, 4352), seed=43)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(bad, "r+b") as fh:
        for offset, count in spans[1:]:
            fh.seek(offset + 2)
            fh.write(b"\0" * (count - 2))
    good = make(tmp_path / "good.tif", (256, 256), seed=44)
    for k in range(3):
        res = segment_many([bad, good], tmp_path / f"out{k}", SegmentConfig(**OPTS))
        assert [r.status for r in res] == ["failed", "ok"]
        assert "\n" not in res[0].reason


def test_an_unusable_out_is_one_line_before_any_slide(slide, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = runner.invoke(app, ["segment", str(slide), "-o", str(blocker), *FLAGS])
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "a_file" in errors[0] and "choose a writable -o folder" in errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [["", "-o", "OUT"], ["SLIDE", "-o", ""], ["SLIDE", " ", "-o", "OUT"]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(slide, tmp_path, args):
    argv = [str(slide) if a == "SLIDE" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = runner.invoke(app, ["segment", *argv, *FLAGS])
    assert result.exit_code == 2 and "empty path" in result.output
    assert not (tmp_path / "o").exists()


def test_segment_image_names_stay_apart_and_a_bad_image_does_not_stop_the_others(tmp_path):
    from PIL import Image

    from .slides import disc_image

    rgb = disc_image((128, 128), [(40, 40), (90, 90)], 8, seed=45)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    Image.fromarray(rgb[::-1]).save(tmp_path / "x.bmp")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(rgb[:, ::-1]).save(tmp_path / "y.png")
    result = runner.invoke(app, ["segment-image", *(str(tmp_path / n) for n in ("x.png", "broken.png", "x.bmp", "y.png")),
                                 "--mpp", "0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    made = sorted(p.name for p in (tmp_path / "o").glob("*_labels.png"))
    assert made == ["x_bmp_labels.png", "x_labels.png", "y_labels.png"]


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_with_run_json_and_no_locks(tmp_path):
    import signal
    import time

    big = disc_slide(tmp_path / "t.tif", (1536, 2048), seed=46)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_nuclei.cli.main", "segment", str(big), "-o", str(out), "--threads", "1", *FLAGS]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = out / "t" / WORK_DIR / "chunks"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(chunks.glob("*.npz")) if chunks.is_dir() else []) < 2:
        time.sleep(0.05)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)  # scancel, or a walltime
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.count("terminated:") == 1 and "--resume" in err and "Traceback" not in err
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "interrupted" and run["slides"][0]["status"] == "interrupted"
    assert not (out / "t" / LOCK_NAME).exists()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dry_run_fails_where_the_run_would(slide, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out / "s")  # finished outputs: without --resume the run fails on them
    damaged = tmp_path / "damaged.svs"
    damaged.write_text("not a slide")
    result = runner.invoke(app, ["segment", str(slide), str(damaged), str(tmp_path / "missing.tif"), "-o", str(out), "--dry-run", *FLAGS])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "# plan: 3 slides" in result.output and "outputs exist" in result.output and "3 of 3 slides would fail" in result.output
    resumed = runner.invoke(app, ["segment", str(slide), "-o", str(out), "--dry-run", "--resume", *FLAGS])
    assert resumed.exit_code == 0 and "finished" in resumed.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad_out = runner.invoke(app, ["segment", str(slide), "-o", str(blocker), "--dry-run", *FLAGS])
    assert bad_out.exit_code == 2 and "choose a writable -o folder" in bad_out.output


def test_run_json_keeps_the_slides_of_another_run_into_the_same_out(slide, tmp_path):
    other = disc_slide(tmp_path / "o.tif", (256, 256), seed=47)
    out = tmp_path / "out"
    segment_many([slide], out, SegmentConfig(**OPTS))
    segment_many([other], out, SegmentConfig(**OPTS))  # as a second terminal or array task would
    run = json.loads((out / "run.json").read_text())
    assert [Path(s["slide"]).name for s in run["slides"]] == ["o.tif", "s.tif"]  # this run's first
    shutil.rmtree(out / "s")
    segment_many([other], out, SegmentConfig(**OPTS, resume=True))
    assert [Path(s["slide"]).name for s in json.loads((out / "run.json").read_text())["slides"]] == ["o.tif"]  # gone: dropped


def test_an_assembly_task_run_twice_returns_the_finished_slide(tmp_path):
    """Dask runs a task again when the worker holding its result leaves first (a SLURM job at its
    walltime): the second assembly finds this run's summary instead of failing on the chunk files
    the first one removed. Another run's plan of the same slide assembles again."""
    from dataclasses import replace

    from wsi_nuclei.pipeline.assemble import assemble_slide
    from wsi_nuclei.pipeline.chunk import chunk_task
    from wsi_nuclei.pipeline.plan import model_card, plan_slide, start_slide

    slide = disc_slide(tmp_path / "a.tif", (512, 512), seed=4)
    cfg = SegmentConfig(**OPTS)
    card = model_card(cfg)
    out = tmp_path / "out" / "a"
    plan, thumb, tissue = plan_slide(slide, out, cfg, card)
    for ch in start_slide(plan, thumb, tissue, cfg):
        assert not chunk_task(plan, ch, cfg).error
    first = assemble_slide(plan, cfg)
    assert first.status == "ok" and first.nuclei > 20 and not (out / WORK_DIR).exists()
    before = _tree(out)
    again = assemble_slide(plan, cfg)
    assert (again.status, again.nuclei) == ("ok", first.nuclei)
    assert _tree(out) == before  # nothing rewritten
    other = assemble_slide(replace(plan, run_id="another run"), cfg)
    assert other.status == "failed" and "work folder is gone" in other.reason and "--resume" in other.reason


def test_run_json_merges_the_same_out_given_relative_then_absolute_and_from_elsewhere(tmp_path, monkeypatch):
    """Before: run.json matched slides by the path as typed, so OUT given relative then absolute
    listed a slide twice, and a run started from another folder dropped the earlier slides (their
    relative folders did not exist from there)."""
    a, b = (disc_slide(tmp_path / f"{n}.tif", (256, 256), seed=40 + i) for i, n in enumerate("ab"))
    monkeypatch.chdir(tmp_path)
    segment_many([Path("a.tif")], Path("out"), SegmentConfig(**OPTS))
    segment_many([a], tmp_path / "out", SegmentConfig(**OPTS, resume=True))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    segment_many([Path("../b.tif")], Path("../out"), SegmentConfig(**OPTS))
    slides = json.loads((tmp_path / "out" / "run.json").read_text())["slides"]
    assert sorted((Path(s["slide"]).name, s["status"]) for s in slides) == [("a.tif", "skipped"), ("b.tif", "ok")]
    assert all(Path(s["slide"]).is_absolute() and Path(s["out_dir"]).is_dir() for s in slides)


@pytest.mark.parametrize("name", ["run.json", "report.html"])
def test_a_run_json_or_report_of_someone_else_is_never_replaced(slide, tmp_path, name):
    """Before: `segment -o DIR` replaced a report.html or run.json that wsi-nuclei did not write."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / name
    theirs.write_text('{"my": "notes"}' if name.endswith(".json") else "<html>my lab's report</html>")
    before = theirs.read_bytes()
    result = runner.invoke(app, ["segment", str(slide), "-o", str(out), *FLAGS])
    assert result.exit_code != 0 and "was not written by wsi-nuclei" in result.output and name in result.output
    assert theirs.read_bytes() == before and not (out / "s").exists()  # refused before any slide
    result = runner.invoke(app, ["report", str(out)])
    assert theirs.read_bytes() == before
    # ours are replaced as before: a batch into a folder of an earlier batch
    theirs.unlink()
    assert runner.invoke(app, ["segment", str(slide), "-o", str(out), *FLAGS]).exit_code == 0
    assert runner.invoke(app, ["segment", str(slide), "-o", str(out), *FLAGS, "--resume"]).exit_code == 0


def _ids(out_dir: Path) -> set[str]:
    import gzip

    return {f["id"] for f in json.loads(gzip.decompress((out_dir / "nuclei.geojson.gz").read_bytes()))["features"]}


def test_two_scans_with_one_name_and_size_get_different_nucleus_ids(tmp_path):
    """Before: ids were uuid5 of the slide's name and pixel size, so a re-scan of the same name and size
    (and a copy of another centre's s.tif) repeated every id in a merged QuPath project."""
    for name in "abc":
        (tmp_path / name).mkdir()
    a = disc_slide(tmp_path / "a" / "s.tif", (256, 256), seed=50)
    b = disc_slide(tmp_path / "b" / "s.tif", (256, 256), seed=51)
    copy = tmp_path / "c" / "s.tif"
    shutil.copy(a, copy)
    segment_many([a, b, copy], tmp_path / "out", SegmentConfig(**OPTS))
    ids_a, ids_b, ids_copy = (_ids(tmp_path / "out" / n) for n in ("s", "s_", "s__"))
    assert ids_a and ids_b and not ids_a & ids_b
    assert ids_copy == ids_a  # the same file's nuclei keep their ids wherever it lies


def test_evaluate_record_leaves_finished_slides_finished(slide, reference, tmp_path):
    """Before: the output key held the whole card, so `evaluate --record` (which adds metrics to
    it) made every finished slide look unfinished and `--resume` segmented them all again."""
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card
    from wsi_nuclei.training.evaluate import record_in_card

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    out = tmp_path / "out"
    cfg = SegmentConfig(**OPTS, model_dir=str(model))
    segment_many([slide], out, cfg)
    record_in_card({"model": load_card(model).model_id, "dataset": "folder", "path": "x", "aji": 0.5, "n_images": 1}, model)
    assert load_card(model).metrics["folder"]["aji"] == 0.5
    (res,) = segment_many([slide], out, replace(cfg, resume=True))
    assert res.status == "skipped"
    card = json.loads((model / "model.json").read_text())
    card["postprocess"]["fg_threshold"] = 0.6  # what does change the outputs still does
    (model / "model.json").write_text(json.dumps(card))
    (res,) = segment_many([slide], out, replace(cfg, resume=True))
    assert res.status == "ok"


@pytest.mark.parametrize("how", ["overwrite", "resume-outdated"])
def test_an_exported_h5ad_never_outlives_the_outputs_it_came_from(slide, tmp_path, how, caplog):
    """Before: OUT/slide/nuclei.h5ad (``export anndata``) survived ``--overwrite`` and a ``--resume``
    that segmented the slide again, describing nuclei the new outputs no longer have."""
    pytest.importorskip("anndata", reason="anndata is in the [dev] and [anndata] extras")
    out = tmp_path / "out"
    segment_many([slide], out, SegmentConfig(**OPTS))
    assert runner.invoke(app, ["export", "anndata", str(out / "s")]).exit_code == 0
    assert (out / "s" / "nuclei.h5ad").is_file()
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, resume=True))
    assert res.status == "skipped" and (out / "s" / "nuclei.h5ad").is_file()  # still the outputs it came from
    change = {"overwrite": True} if how == "overwrite" else {"resume": True, "tissue_mask": False}
    (res,) = segment_many([slide], out, SegmentConfig(**OPTS, **change))
    assert res.status == "ok" and not (out / "s" / "nuclei.h5ad").exists()
    assert "export anndata" in caplog.text
    _clean(out / "s")
