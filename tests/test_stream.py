"""The streaming tail (issue 31): a slide's outputs are written while its chunks finish.

Chunks reach the assembly in any order and the outputs are the same bytes; a run killed at each
point where the streaming assembly writes, then resumed, gives the uninterrupted run's bytes; the
one-task assembly (``--assemble worker``) gives them too."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wsi_nuclei.pipeline.segment import WORK_DIR, SegmentConfig, segment_many

from .test_cluster import OPTS, _cli, _digest


def _kept_run(slides: Path, out: Path) -> Path:
    (res,) = segment_many([slides / "b.tif"], out, SegmentConfig(**OPTS, keep_chunks=True))
    assert res.status == "ok"
    return out / "b"


def test_chunks_ready_in_any_order_give_the_same_outputs(slides, reference, tmp_path):
    """The streamed assembly fed its chunk files in a shuffled order, from another thread, with
    pauses, writes the bytes of the uninterrupted run; before a chunk is ready nothing after it
    is written."""
    from wsi_nuclei.pipeline.plan import model_card, plan_slide
    from wsi_nuclei.pipeline.stream import StreamedAssembly

    folder = _kept_run(slides, tmp_path / "out")
    (folder / "summary.json").unlink()
    cfg = SegmentConfig(**OPTS, resume=True, keep_chunks=True)
    plan, _, _ = plan_slide(slides / "b.tif", folder, cfg, model_card(cfg))
    order = [ch.index for ch in plan.chunks]
    random.Random(7).shuffle(order)
    stream = StreamedAssembly(plan, cfg, [], time.perf_counter())

    def feed() -> None:
        for index in order:
            time.sleep(0.02)
            stream.ready(index)
        stream.close(0, len(order))

    feeder = threading.Thread(target=feed)
    feeder.start()
    res = stream.future.result(timeout=120)
    feeder.join()
    assert res is not None and res.status == "ok", res
    assert _digest(folder) == _digest(reference / "b")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["chunks"]["reused"] == len(order) and summary["seconds"]["tail"] <= summary["seconds"]["assemble"]


def test_assemble_on_a_worker_gives_the_same_outputs(slides, reference, tmp_path):
    (res,) = segment_many([slides / "b.tif"], tmp_path, SegmentConfig(**OPTS, assemble="worker"))
    assert res.status == "ok" and res.extra["chunks_computed"] == res.extra["chunks"]
    assert _digest(tmp_path / "b") == _digest(reference / "b")


def test_a_failing_assembly_stops_its_slide_early(slides, tmp_path, monkeypatch):
    """The streamed assembly failing on its first chunk (here: a chunk file unreadable after the
    slide started) fails the slide at once with its one line, not after every chunk: the chunks
    not yet computed are dropped, and no temporary output is left."""
    from wsi_nuclei.errors import OutputError
    from wsi_nuclei.pipeline import assemble

    def unreadable(plan, ch):  # noqa: ANN001, ANN202
        raise OutputError(f"{plan.chunk_file(ch)}: damaged chunk file (removed); run again with --resume to compute chunk {ch.index} again")

    monkeypatch.setattr(assemble, "_read_part", unreadable)
    (res,) = segment_many([slides / "a.tif"], tmp_path, SegmentConfig(**OPTS))
    assert res.status == "failed" and "damaged chunk file" in res.reason and "--resume" in res.reason
    folder = tmp_path / "a"
    computed = len(list((folder / WORK_DIR / "chunks").glob("*.npz")))
    assert 0 < computed < 15  # of 20: stopped soon after the first chunk, not at the end
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")] and not (folder / "summary.json").exists()


# A kill at each point where the streaming assembly writes ----------------------------------------

_KILL_AT = """
import os, signal, sys
from pathlib import Path
point, record = sys.argv[1], Path(sys.argv[2])
sys.argv = ["wsi-nuclei", *sys.argv[3:]]

def kill(what):
    record.write_text(what)
    os.kill(os.getpid(), signal.SIGKILL)

def pending(plan):
    done = len(list((Path(plan.out_dir) / ".partial" / "chunks").glob("*.npz")))
    return len(plan.chunks) - done

from wsi_nuclei.pipeline import assemble
from wsi_nuclei.outputs import store
from wsi_nuclei.pipeline import pictures
if point == "stream":  # after the second chunk written into the outputs, chunks still to compute
    add = assemble.SlideAssembler.add
    def add_then_kill(self, ch):
        add(self, ch)
        if self.added == 2:
            kill(f"pending={pending(self.plan)}")
    assemble.SlideAssembler.add = add_then_kill
elif point == "pyramid":  # right after the first block of level 1 is written
    set_block = store.Pyramid.flush
    def flush(self, done):
        before = [len(b) for b in self.blocks]
        set_block(self, done)
        if before and before[0] and len(self.blocks[0]) < before[0]:
            kill("level 1 block written")
    store.Pyramid.flush = flush
elif point == "pictures":  # in the finish, while the overlay is drawn
    draw = pictures.slide_overlay
    def overlay(*a, **k):
        draw(*a, **k)
        kill("overlay written")
    pictures.slide_overlay = overlay
elif point == "summary":  # every output installed, summary.json not yet written
    from wsi_nuclei import atomic
    write_text = atomic.write_text
    def text(path, *a, **k):
        if Path(path).name == "summary.json":
            kill("outputs installed")
        return write_text(path, *a, **k)
    atomic.write_text = text
    assemble.atomic.write_text = text
from wsi_nuclei.cli.main import main
main()
"""


@pytest.mark.slow
def test_a_run_killed_at_each_streaming_write_point_resumes_to_the_same_bytes(slides, reference, tmp_path):
    """One slide, killed (SIGKILL) four times in a row, each run resumed from the last: after the
    stream wrote its second chunk (chunks still computing), after the first level-1 pyramid block,
    while the pictures are drawn, and after the outputs are installed but before summary.json.
    Each kill leaves no final output without its summary; the last ``--resume`` writes the bytes of
    the uninterrupted run, reuses every chunk file and leaves no temporary file."""
    out, folder = tmp_path / "out", tmp_path / "out" / "a"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = _cli(str(slides / "a.tif"), "-o", str(out), "--workers", "0")[3:]  # after "python -m wsi_nuclei.cli.main"
    notes = {}
    for i, point in enumerate(("stream", "pyramid", "pictures", "summary")):
        record = tmp_path / f"{point}.txt"
        cmd = [sys.executable, "-c", _KILL_AT, point, str(record), *args, *(["--resume"] if i else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        notes[point] = record.read_text()
        assert not (folder / "summary.json").exists(), point
        if point != "summary":
            assert not (folder / "mask.zarr").exists() and not (folder / "nuclei.geojson.gz").exists(), point
            assert [p for p in folder.iterdir() if p.name.endswith(".tmp")], f"{point}: the kill did not land while writing"
    assert int(notes["stream"].removeprefix("pending=")) > 0 and notes["pyramid"] == "level 1 block written"
    done = subprocess.run([*_cli(str(slides / "a.tif"), "-o", str(out), "--workers", "0"), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["chunks"]["computed_this_run"] == 0 and summary["chunks"]["reused"] == summary["chunks"]["processed"]
    assert _digest(folder) == _digest(reference / "a")
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")] and not (folder / WORK_DIR).exists()
