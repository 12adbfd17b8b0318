"""``--cluster slurm`` and the SLURM array route on a real one-node SLURM cluster
(``tests/slurm/cluster.sh``): outputs compared byte for byte with an in-process run, and SLURM's
own faults: a refused submission, a job held in the queue, a worker job cancelled, a walltime
shorter than the work, the driver killed. GPU options are covered by the job-script tests in
test_cluster.py (there is no GPU here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_nuclei.pipeline.segment import WORK_DIR

from .slurm_cluster import Slurm, slurm  # noqa: F401 - the session fixture
from .test_cluster import FLAGS, ROOT, _cli, _copies, _digest, _same_outputs

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

#: one core and 2 GB per worker job: two jobs fit the node at once
JOB = ["--cluster", "slurm", "--cores", "1", "--memory", "2GB", "--max-jobs", "1"]


def _yaml(tmp_path: Path) -> list[str]:
    """Worker logs and scratch under tmp_path (SLURM would write slurm-<id>.out into the cwd)."""
    logs = tmp_path / "slurm-logs"
    logs.mkdir(exist_ok=True)
    path = tmp_path / "jobqueue.yaml"
    path.write_text(f"slurm:\n  log-directory: {logs}\n  local-directory: {logs}\n")
    return ["--cluster-config", str(path)]


def _start(slurm: Slurm, tmp_path: Path, *args: str) -> subprocess.Popen[str]:  # noqa: F811
    return subprocess.Popen(_cli(*args, *JOB, *_yaml(tmp_path)), env=slurm.env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _watch(proc: subprocess.Popen[str], slurm: Slurm, until=None, timeout_s: float = 300) -> set[str]:  # noqa: ANN001, F811
    """Poll the queue while ``proc`` runs; the ids of the wsi-nuclei jobs seen running. Returns
    early once ``until(seen)`` is true."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= {j for j, st in slurm.jobs("wsi-nuclei").items() if st == "RUNNING"}
        if until is not None and until(seen):
            break
        time.sleep(0.2)
    return seen


def _finish(proc: subprocess.Popen[str], timeout_s: float = 300) -> str:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the run hung:\n{err[-3000:]}")
    return err


def test_refused_submission_is_one_line_quoting_slurm(slurm, slides, tmp_path):  # noqa: F811
    import socket

    with socket.socket() as busy:  # Dask's dashboard port taken (a notebook's cluster): still one line
        try:
            busy.bind(("", 8787))
            busy.listen()
        except OSError:
            pass  # taken already
        proc = _start(slurm, tmp_path, str(slides / "b.tif"), "-o", str(tmp_path / "out"), "--queue", "nosuch")
        err = _finish(proc, 120)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: SLURM refused the worker job: invalid partition specified: nosuch"), err
    assert "--queue" in lines[0] and not slurm.jobs()


def test_a_job_held_in_the_queue_stops_the_run_then_resume_finishes(slurm, slides, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = _start(slurm, tmp_path, str(slides / "b.tif"), "-o", str(out), "--job-extra=--hold", "--worker-wait", "8s")
    err = _finish(proc, 120)
    assert proc.returncode == 75, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no Dask worker for" in lines[0] and "PD (JobHeldUser)" in lines[0] and "--resume" in lines[0], err
    assert slurm.wait_empty(), "the held job was left in the queue"
    assert json.loads((out / "run.json").read_text())["slides"][0]["status"] == "interrupted"
    proc = _start(slurm, tmp_path, str(slides / "b.tif"), "-o", str(out), "--resume")
    err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert _digest(out / "b") == _digest(reference / "b")


def test_worker_jobs_run_in_the_queue_and_a_cancelled_one_is_replaced_losing_no_chunk(slurm, slides, reference, tmp_path):  # noqa: F811
    """Route 1: the worker jobs show in squeue; one cancelled mid-run is replaced, the outputs
    are identical and no job is left."""
    out = tmp_path / "out"
    chunks = out / "a" / WORK_DIR / "chunks"
    proc = _start(slurm, tmp_path, str(slides / "a.tif"), "-o", str(out), "--keep-chunks")
    first = _watch(proc, slurm, until=lambda seen: bool(seen) and chunks.is_dir() and len(list(chunks.glob("*.npz"))) >= 3)
    assert proc.poll() is None and first, "the run ended before a worker job could be cancelled"
    slurm.run("scancel", *first)  # as preemption or an admin would
    seen = first | _watch(proc, slurm)
    err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) >= 2, f"no new worker job after the cancel: {seen}"
    summary = json.loads((out / "a" / "summary.json").read_text())
    assert summary["chunks"]["processed"] == len(list(chunks.glob("*.npz")))
    assert _digest(out / "a") == _digest(reference / "a")
    assert slurm.wait_empty(), f"jobs left in the queue: {slurm.jobs()}"
    assert all(slurm.state(j) in ("CANCELLED", "COMPLETED") for j in seen)


def test_a_walltime_shorter_than_the_work_is_survived_through_new_jobs(slurm, slides, reference, tmp_path):  # noqa: F811
    # 30 s: each worker leaves gracefully after 15 +- 3 s (wsi_nuclei.cluster.slurm.worker_lifetime); SLURM
    # itself rounds the limit up to a minute, so the worker's lifetime is what ends each job here.
    # The work: the three slides and two more copies of the largest, longer than the longest
    # lifetime of one worker on this node (one core; the three alone once fitted in one job).
    # A shorter walltime leaves each new job little time after loading the model: many more jobs
    folder = _copies(slides, tmp_path / "slides", ("a.tif", "b.tif", "c.tif"))
    for copy in ("a2", "a3"):  # since the outputs are written by the driver, a job's share of a slide is shorter
        shutil.copy(slides / "a.tif", folder / f"{copy}.tif")
    proc = _start(slurm, tmp_path, str(folder), "-o", str(tmp_path / "out"), "--walltime", "00:30")
    seen = _watch(proc, slurm)
    err = _finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) >= 2, f"one job did the whole batch ({seen}): the work was shorter than the walltime"
    for name in ("a", "b", "c"):
        _same_outputs(tmp_path / "out", reference, name, folder, slides)
    # the copy: the same mask and overlay (its nucleus ids, attributes and density title name a2.tif)
    pixels = [{k: v for k, v in _digest(d).items() if k not in ("mask.zarr/.zattrs", "density.png") and not k.startswith("nuclei.")}
              for d in (tmp_path / "out" / "a2", tmp_path / "out" / "a3", reference / "a")]
    assert pixels[0] == pixels[1] == pixels[2] and "overlay.png" in pixels[0]
    assert slurm.wait_empty()


def test_the_driver_killed_then_resume_reuses_finished_chunks(slurm, slides, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    chunks = out / "a" / WORK_DIR / "chunks"
    proc = _start(slurm, tmp_path, str(slides / "a.tif"), "-o", str(out), "--keep-chunks")
    _watch(proc, slurm, until=lambda seen: chunks.is_dir() and len(list(chunks.glob("*.npz"))) >= 4)
    assert proc.poll() is None, "the run ended before the driver could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # what a walltime on the driver's own job ends with
    proc.communicate()
    before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.npz")}
    assert before and not (out / "a" / "summary.json").exists()
    try:
        proc = _start(slurm, tmp_path, str(slides / "a.tif"), "-o", str(out), "--resume", "--keep-chunks")
        err = _finish(proc)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads((out / "a" / "summary.json").read_text())
        assert summary["chunks"]["reused"] >= len(before)
        assert all(p.stat().st_mtime_ns == before[p.name] for p in chunks.glob("*.npz") if p.name in before)
        assert _digest(out / "a") == _digest(reference / "a")
    finally:
        slurm.cancel_all()  # the killed driver's worker job would wait for its scheduler for death_timeout


def test_array_route_one_task_per_slide_and_a_failed_task_is_reported(slurm, slides, reference, tmp_path):  # noqa: F811
    folder = _copies(slides, tmp_path / "slides", ("b.tif", "c.tif"))  # two slides: the node runs two tasks at once
    (folder / "d.tif").write_bytes(b"not a slide")
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    env = {**slurm.env, "WSI_NUCLEI": str(Path(sys.executable).with_name("wsi-nuclei"))}
    submit = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--cpus-per-task=1", "--mem=2G", f"--output={logs}/%A_%a.out",
                             str(ROOT / "workflows" / "slurm_array.sh"), str(folder), str(out), *FLAGS],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    array = submit.stdout.strip().split(";")[0]
    tasks = [f"{array}_{k}" for k in range(3)]
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and any(slurm.state(t) in ("PENDING", "RUNNING", "") for t in tasks):
        time.sleep(0.5)
    states = {t: slurm.state(t) for t in tasks}
    assert [states[t] for t in tasks] == ["COMPLETED", "COMPLETED", "FAILED"], states
    for name in ("b", "c"):
        _same_outputs(out, reference, name, folder, slides)
    run = {Path(s["slide"]).name: s for s in json.loads((out / "run.json").read_text())["slides"]}
    assert sorted(run) == ["b.tif", "c.tif", "d.tif"]
    assert run["d.tif"]["status"] == "failed" and "d.tif" in run["d.tif"]["reason"]
    assert "d.tif" in (logs / f"{array}_2.out").read_text()


def test_snakemake_slurm_executor_segments_every_slide(slurm, slides, reference, tmp_path):  # noqa: F811
    """Route 3: workflows/Snakefile with snakemake-executor-plugin-slurm, one SLURM job per slide.
    This cluster has no accounting (no sacct), so job states come from squeue
    (``--slurm-status-command squeue``; SLURM keeps ended jobs for MinJobAge = 300 s). The
    plugin's job step drops every SLURM_* variable, SLURM_CONF included, and srun inside the job
    would not find this cluster's configuration (a real cluster's is in /etc/slurm): a shim
    srun on PATH gives it back."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm is in the [dev] extra")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "srun").write_text(
        f'#!/bin/sh\nexport SLURM_CONF={slurm.env["SLURM_CONF"]}\nexec {shutil.which("srun", path=slurm.env["PATH"]) or "srun"} "$@"\n'
    )
    (shim / "srun").chmod(0o755)
    env = {**slurm.env, "PATH": f"{shim}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{slurm.env['PATH']}"}
    out, folder = tmp_path / "out", _copies(slides, tmp_path / "slides", ("b.tif", "c.tif"))  # one job each, at once
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "workflows" / "Snakefile"), "--executor", "slurm",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5", "--jobs", "2",
           "--set-resources", "segment:mem_mb=2000", "segment:runtime=10", "--set-threads", "segment=1",
           "--config", f"slides={folder}", f"out={out}", f"args={' '.join(FLAGS)}"]
    try:
        run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"snakemake hung:\n{(err.stderr or b'')[-3000:]!r}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs") == ["b", "c"]
    for name in ("b", "c"):
        _same_outputs(out, reference, name, folder, slides)
    assert slurm.wait_empty()
