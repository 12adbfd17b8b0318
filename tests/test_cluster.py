"""Scale-out: SLURM job scripts, several slides on a LocalCluster, chunk-level resume after
SIGKILL, a worker killed mid-run, GPU pinning. Every run is compared byte for byte with an
uninterrupted in-process run of the same slides."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.cluster.client import (
    QUIET_DASK,
    ClusterConfig,
    gpu_for_worker,
    load_cluster_yaml,
    make_client,
    slurm_job_script,
)
from wsi_nuclei.pipeline.segment import WORK_DIR, SegmentConfig, segment_many

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
#: small context and chunks: many chunks per slide in a few seconds (equality, not accuracy, is tested)
OPTS = {"chunk_size": 256, "halo": 32, "context": 64, "torch_threads": 1}
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64"]


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every final output file under ``folder`` (summary.json, run.json and report.html hold timings)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in ("summary.json", "run.json", "report.html") and WORK_DIR not in p.parts:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_slurm_job_script_contains_the_flags(tmp_path):
    cfg = ClusterConfig(kind="slurm", queue="gpu-a100", account="lab42", walltime="02:30:00", cores=8, memory="48GB", gpus=2,
                        job_extra=("--qos=long",), prologue=("module load cuda/12.4",), log_directory=str(tmp_path / "logs"))
    script = slurm_job_script(cfg)
    for text in ("#SBATCH -p gpu-a100", "#SBATCH -A lab42", "#SBATCH -t 02:30:00", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=45G", "#SBATCH --gres=gpu:2", "#SBATCH --qos=long", "module load cuda/12.4",
                 "--nworkers 2", "--preload wsi_nuclei.cluster.gpu_pin", sys.executable,
                 "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
                 "--lifetime 8400s --lifetime-stagger 200s"):  # 2:30 h less 10 % (15 min), capped at 10 min
        assert text in script, text


def test_walltimes_and_worker_wait_in_slurm_formats():
    from wsi_nuclei.cluster.slurm import parse_wait, parse_walltime, worker_lifetime
    from wsi_nuclei.errors import ConfigError

    assert [parse_walltime(t) for t in ("30", "00:30", "04:00:00", "1-00", "1-02:03", "2-00:00:05")] == \
        [1800, 30, 14400, 86400, 86400 + 7200 + 180, 2 * 86400 + 5]
    for bad in ("", "4h", "00:00:00", "1:2:3:4", "-1"):
        with pytest.raises(ConfigError, match="walltime"):
            parse_walltime(bad)
    # the worker leaves 10 % before the walltime, at least 15 s and at most 10 min before
    assert worker_lifetime(30) == (15, 3) and worker_lifetime(3600) == (3240, 120) and worker_lifetime(86400) == (85800, 200)
    assert [parse_wait(t) for t in ("30m", "2h", "90s", "90", 0)] == [1800, 7200, 90, 90, 0]
    with pytest.raises(ConfigError, match="--worker-wait"):
        parse_wait("soon")
    with pytest.raises(ConfigError, match="--worker-wait"):
        ClusterConfig(kind="slurm", worker_wait_s=float("inf")).check()
    assert load_cluster_yaml_text("worker-wait: 45m\n")["worker_wait_s"] == 2700


def load_cluster_yaml_text(text: str) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_cluster_yaml(Path(f.name))


def test_job_script_exports_give_workers_the_quiet_dask_settings(tmp_path):
    """The job script's export lines, run by bash as SLURM would, give a fresh Python exactly
    QUIET_DASK, and the nanny no longer sets MALLOC_TRIM_THRESHOLD_ for its worker."""
    script = slurm_job_script(ClusterConfig(kind="slurm", cores=2, memory="4GB"))
    exports = [line for line in script.splitlines() if line.startswith("export DASK_")]
    probe = ("import json, dask, distributed; from distributed.nanny import _get_env_variables; "
             f"keys = {sorted(QUIET_DASK)!r}; "
             "print(json.dumps({'config': {k: dask.config.get(k) for k in keys}, "
             "'nanny_env': _get_env_variables('distributed.nanny.pre-spawn-environ')}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run(["bash", "-c", "\n".join(exports) + f"\nexec {sys.executable} -c {shlex.quote(probe)}"],
                         env=env, capture_output=True, text=True, check=True).stdout
    seen = json.loads(out)
    assert seen["config"] == QUIET_DASK
    assert "MALLOC_TRIM_THRESHOLD_" not in seen["nanny_env"] and seen["nanny_env"]["OMP_NUM_THREADS"] == "1"


def test_dry_run_prints_job_script_from_yaml_and_plan(shared_data, tmp_path):
    yaml_file = tmp_path / "jobqueue.yaml"
    yaml_file.write_text(
        "slurm:\n  queue: short\n  account: pathology\n  walltime: '01:00:00'\n  cores: 4\n  memory: 16GB\n  max-jobs: 7\n"
    )
    assert load_cluster_yaml(yaml_file)["max_jobs"] == 7
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--cluster", "slurm", "--cluster-config",
                                 str(yaml_file), "--walltime", "00:30:00", "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH -p short" in result.output and "#SBATCH -A pathology" in result.output
    assert "#SBATCH -t 00:30:00" in result.output  # the flag beats the YAML
    assert "0..7 jobs" in result.output
    # a CPU job: the worker's forward passes take turns, so each uses all 4 cores of the job
    assert "forward passes of 4 CPU threads" in result.output
    # 16 GB per worker: 1536 px chunks (the default where they fit), each 1664 px window (chunk +
    # halo) in one forward pass with the card's context
    from wsi_nuclei.model.network import load_card

    ctx = load_card(Path(__file__).resolve().parents[1] / "wsi_nuclei" / "weights").context_px
    assert "# chunks: 1536 px" in result.output
    assert f"# forward passes: the whole window, {1664 + 2 * ctx} px, 1 per call" in result.output
    small = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--cluster", "slurm", "--cores", "8",
                                "--memory", "8GB", "--processes", "2", "--device", "cpu", "--dry-run"])
    assert f"# forward passes: 2x2 tiles of {576 + 2 * ctx} px" in small.output and "4.0 GB per worker" in small.output
    tiny = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--cluster", "slurm", "--cores", "8",
                               "--memory", "2GB", "--processes", "2", "--device", "cpu", "--dry-run"])
    assert "TOO LITTLE MEMORY" in tiny.output and "raise --memory or lower --processes" in tiny.output
    from wsi_nuclei.model.memory import memory_limit

    local = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--workers", "2", "--device", "cpu", "--dry-run"])
    assert f"with {memory_limit()[0] // 2 / 1e9:.1f} GB per worker" in local.output  # local workers share the memory
    assert "CMU-1-Small-Region.svs" in result.output and "total: 1 slides" in result.output
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_bad_cluster_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: gpu\nwalltimee: 1\n")
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--cluster", "slurm", "--cluster-config", str(bad)])
    assert result.exit_code == 2 and "unknown option 'walltimee'" in result.output and "Traceback" not in result.output


def test_gpu_pinning():
    assert gpu_for_worker("SLURMCluster-3-0", ["0", "1"]) == "0"
    assert gpu_for_worker("SLURMCluster-3-1", ["0", "1"]) == "1"
    assert gpu_for_worker("tcp://x", ["0", "1"]) is None
    assert gpu_for_worker("w-1", []) is None


@pytest.mark.slow
def test_local_gpu_cluster_gives_each_worker_its_own_device(monkeypatch):
    """One worker per GPU, pinned by CUDA_VISIBLE_DEVICES (checked on CPU: the variable is what pins)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    from distributed.system import MEMORY_LIMIT

    client = make_client(ClusterConfig(gpus=2, threads=1))
    try:
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    finally:
        client.close()
    assert sorted(seen.values()) == ["3", "5"]
    # each GPU worker gets half of the host's memory (what its forward plan and the nanny go by)
    assert set(limits.values()) == {int(MEMORY_LIMIT / 2)}


@pytest.mark.slow
def test_three_slides_at_once_on_two_workers(slides, reference, tmp_path):
    client = make_client(ClusterConfig(workers=2, threads=1))
    progress: list[tuple[int, int]] = []
    finished_at: list[int] = []
    try:
        results = segment_many([slides], tmp_path, SegmentConfig(**OPTS), client, on_slide=lambda r: finished_at.append(progress[-1][1]),
                               on_chunk=lambda d, n: progress.append((d, n)), max_slides=3)
    finally:
        client.close()
    assert [r.status for r in results] == ["ok"] * 3
    # all three slides were admitted (their chunks counted) before the first one finished
    total = sum(r.extra["chunks"] for r in results)
    assert finished_at[0] == total
    assert _digest(tmp_path) == _digest(reference)
    run = json.loads((tmp_path / "run.json").read_text())
    assert [s["status"] for s in run["slides"]] == ["ok"] * 3


@pytest.mark.slow
def test_worker_killed_mid_run_gives_identical_output(slides, reference, tmp_path):
    client = make_client(ClusterConfig(workers=2, threads=1))
    killed: list[str] = []

    def kill_one(done: int, total: int) -> None:
        if done >= 4 and not killed:
            victim = sorted(client.scheduler_info()["workers"])[0]
            pid = client.run(os.getpid, workers=[victim])[victim]
            killed.append(victim)
            os.kill(pid, signal.SIGKILL)  # the worker process dies; its nanny starts a new one

    try:
        results = segment_many([slides / "a.tif"], tmp_path, SegmentConfig(**OPTS), client, on_chunk=kill_one)
        # the nanny restarted the worker: two workers again
        deadline = time.time() + 30
        while len(client.scheduler_info()["workers"]) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(client.scheduler_info()["workers"]) == 2
    finally:
        client.close()
    assert killed and results[0].status == "ok"
    assert _digest(tmp_path / "a") == _digest(reference / "a")


def _copies(slides: Path, folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(slides / name, folder / name)
    return folder


def _same_outputs(out: Path, reference: Path, name: str, folder: Path, slides: Path) -> None:
    """Byte-identical outputs of a copy of a slide, but for the slide's path that the mask's
    attributes and the Parquet file's metadata hold (the copy's): there equal once it is replaced."""
    import pyarrow.parquet as pq

    named = ("mask.zarr/.zattrs", "nuclei.parquet")
    ours, theirs = _digest(out / name), _digest(reference / name)
    assert {k: v for k, v in ours.items() if k not in named} == {k: v for k, v in theirs.items() if k not in named}
    attrs = [(root / name / "mask.zarr" / ".zattrs").read_text() for root in (out, reference)]
    assert str(folder) in attrs[0] and attrs[0].replace(str(folder), str(slides)) == attrs[1]
    if (reference / name / "nuclei.parquet").exists():
        tables = [pq.read_table(root / name / "nuclei.parquet") for root in (out, reference)]
        assert tables[0].replace_schema_metadata(None).equals(tables[1].replace_schema_metadata(None))
        meta = [t.schema.metadata[b"wsi_nuclei"].decode() for t in tables]
        assert str(folder) in meta[0] and meta[0].replace(str(folder), str(slides)) == meta[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_nuclei.cli.main", "segment", *args, *FLAGS, "--quiet", "--threads", "1"]


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical_and_recomputes_nothing(slides, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    chunks_dir = out / "a" / WORK_DIR / "chunks"
    proc = subprocess.Popen(_cli(str(slides / "a.tif"), "-o", str(out), "--keep-chunks"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if chunks_dir.is_dir() and len(list(chunks_dir.glob("*.npz"))) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Dask workers, like a walltime kill
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in chunks_dir.glob("*.npz")}
    assert 6 <= len(before) < 20 and not (out / "a" / "summary.json").exists()
    assert not (out / "a" / "nuclei.geojson.gz").exists()  # nothing partial under a final name

    # without --resume the unfinished outputs are not touched
    again = subprocess.run(_cli(str(slides / "a.tif"), "-o", str(out)), env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr

    done = subprocess.run(_cli(str(slides / "a.tif"), "-o", str(out), "--resume", "--keep-chunks"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "a" / "summary.json").read_text())
    assert summary["chunks"]["reused"] == len(before)
    assert summary["chunks"]["computed_this_run"] == summary["chunks"]["processed"] - len(before)
    after = {p.name: p.stat().st_mtime_ns for p in chunks_dir.glob("*.npz")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished chunks untouched
    assert _digest(out / "a") == _digest(reference / "a")

    # a second --resume skips the finished slide
    skip = subprocess.run(_cli(str(slides / "a.tif"), "-o", str(out), "--resume"), env=env, capture_output=True, text=True)
    assert skip.returncode == 0
    assert json.loads((out / "run.json").read_text())["slides"][0]["status"] == "skipped"


@pytest.mark.slow
def test_slurm_array_script_runs_one_slide_per_task(slides, reference, tmp_path):
    """The array script, run as SLURM would run task 1 (sbatch directives are comments to bash)."""
    script = ROOT / "workflows" / "slurm_array.sh"
    env = {**os.environ, "WSI_NUCLEI": str(Path(sys.executable).with_name("wsi-nuclei")), "SLURM_CPUS_PER_TASK": "1"}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    hint = subprocess.run(["bash", str(script), str(slides), str(tmp_path)], env=env, capture_output=True, text=True, check=True)
    assert "sbatch --array=0-2" in hint.stdout
    listed = next((tmp_path / "slurm-array").glob("slides-*.txt"))
    assert str(listed) in hint.stdout
    subprocess.run(["bash", str(script), str(listed), str(tmp_path), *FLAGS], env={**env, "SLURM_ARRAY_TASK_ID": "1"}, check=True,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "slurm-array") == ["b"]
    assert _digest(tmp_path / "b") == _digest(reference / "b")


def _array_task(folder_or_list: Path, out: Path, task: int, job: str = "77", last: int | None = None) -> subprocess.CompletedProcess:
    """One task of array ``job`` of workflows/slurm_array.sh with a stand-in for wsi-nuclei that
    prints the slide it was given (the mapping task -> slide is under test, not segmentation)."""
    fake = out.parent / "fake-wsi-nuclei"
    if not fake.exists():
        fake.write_text('#!/bin/sh\nprintf "SEGMENT %s\\n" "$2"\n')
        fake.chmod(0o755)
    env = {**os.environ, "WSI_NUCLEI": str(fake), "SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": str(task)}
    if last is not None:
        env["SLURM_ARRAY_TASK_MAX"] = str(last)
    return subprocess.run(["bash", str(ROOT / "workflows" / "slurm_array.sh"), str(folder_or_list), str(out)], env=env,
                          capture_output=True, text=True, check=True)


def _segmented(run: subprocess.CompletedProcess) -> str:
    return Path(run.stdout.split("SEGMENT ")[1].strip()).name


def test_slurm_array_tasks_of_one_array_see_one_slide_list(tmp_path):
    """A slide copied into the folder while the array waits (here: after its first task started)
    must not shift the indices: before, task 1 got the new a0.tif and b.tif was never segmented."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif", "c.tif"):
        (folder / name).write_bytes(b"II*\x00")
    out = tmp_path / "out"
    assert _segmented(_array_task(folder, out, 0)) == "a.tif"
    (folder / "a0.tif").write_bytes(b"II*\x00")  # sorts between a.tif and b.tif
    assert _segmented(_array_task(folder, out, 1)) == "b.tif"
    last = _array_task(folder, out, 2, last=2)
    assert _segmented(last) == "c.tif" and "warning" not in last.stderr
    # a new submission (a new array id) lists the folder again, the new slide included, and the
    # last task says when the array is shorter than the list
    run = _array_task(folder, out, 2, job="78", last=2)
    assert _segmented(run) == "b.tif"
    assert "lists 4 slides but this array ends at task 2" in run.stderr and "--array=3-3" in run.stderr
    assert (out / "slurm-array" / "job-77.txt").read_text().split() == [str(folder / n) for n in ("a.tif", "b.tif", "c.tif")]


def test_slurm_array_list_printed_at_submission_is_the_one_the_tasks_read(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        (folder / name).write_bytes(b"II*\x00")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    hint = subprocess.run(["bash", str(ROOT / "workflows" / "slurm_array.sh"), str(folder), str(out), "--device", "cpu"], env=env,
                          capture_output=True, text=True, check=True)
    assert "2 slides" in hint.stdout and "sbatch --array=0-1 " in hint.stdout and "--device cpu" in hint.stdout
    listed = next((out / "slurm-array").glob("slides-*.txt"))
    (folder / "a0.tif").write_bytes(b"II*\x00")
    assert _segmented(_array_task(listed, out, 1)) == "b.tif"
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run(["bash", str(ROOT / "workflows" / "slurm_array.sh"), str(empty), str(out)], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "holds no slides" in refused.stderr


@pytest.mark.slow
def test_snakemake_workflow_segments_every_slide(slides, reference, tmp_path):
    pytest.importorskip("snakemake", reason="snakemake is in the [dev] extra")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    folder = _copies(slides, tmp_path / "slides", ("b.tif", "c.tif"))
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "workflows" / "Snakefile"), "--cores", "1", "--quiet",
           "--directory", str(tmp_path), "--config", f"slides={folder}", f"out={tmp_path / 'out'}", f"args={' '.join(FLAGS)}"]
    dry = subprocess.run([*cmd, "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir() and p.name != "logs") == ["b", "c"]
    for name in ("b", "c"):
        _same_outputs(tmp_path / "out", reference, name, folder, slides)


def test_one_chunk_at_a_time_equals_the_overlapped_default(slides, reference, tmp_path, monkeypatch):
    """Without Dask, CPU_TASKS chunks run at once (their forward passes take turns, the rest
    overlaps, as in a LocalCluster worker): one chunk at a time gives the same bytes."""
    import wsi_nuclei.pipeline.batch as batch

    monkeypatch.setattr(batch, "CPU_TASKS", 1)
    out = tmp_path / "one_at_a_time"
    results = segment_many([slides], out, SegmentConfig(**OPTS), max_slides=1)
    assert [r.status for r in results] == ["ok"] * 3
    assert _digest(out) == _digest(reference)


def test_gpus_without_a_gpu_is_one_line_and_slurm_gpu_jobs_use_cuda(tmp_path):
    """--gpus asks for GPU workers: on a machine without a GPU (or with --device cpu) that is one
    line, not a quiet CPU run; for SLURM GPU jobs the compute nodes have the GPUs, so --device
    auto means cuda there even if the login node has none."""
    from wsi_nuclei.errors import ConfigError
    from wsi_nuclei.pipeline.launch import configs

    for segment in ({"device": "auto"}, {"device": "cpu"}):
        with pytest.raises(ConfigError, match="--gpus 2 asks for GPU workers.*drop --gpus") as err:
            configs(segment, cluster="local", gpus=2)
        assert ("--device cpu" in str(err.value)) == (segment["device"] == "cpu")
    slurm = {"cores": 8, "memory": "32GB", "processes": 1}
    cfg, ccfg = configs({"device": "auto"}, cluster="slurm", gpus=1, slurm=slurm, dry_run=True)
    assert cfg.device == "cuda" and ccfg.gpus == 1
    with pytest.raises(ConfigError, match="--device cpu"):
        configs({"device": "cpu"}, cluster="slurm", gpus=1, slurm=slurm)
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--gpus", "2", "--device", "cpu"])
    assert result.exit_code == 2 and "--gpus 2 asks for GPU workers" in result.output and "Traceback" not in result.output
