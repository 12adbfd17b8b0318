"""Forward passes sized from memory: the plan's arithmetic, where limits come from, and that a
split window gives the same result as one forward pass."""

from __future__ import annotations

import json
import math

import pytest

from wsi_nuclei.model.memory import (
    FORWARD_BYTES_PER_PX,
    MIN_TILE,
    cgroup_limit,
    memory_limit,
    plan_forward,
)

WINDOW, CONTEXT = 1152, 320


def _cost(tile: int) -> float:
    return (tile + 2 * CONTEXT) ** 2 * FORWARD_BYTES_PER_PX


def test_whole_window_when_it_fits():
    fp = plan_forward(WINDOW, CONTEXT, int(_cost(WINDOW)))
    assert (fp.tile, fp.batch) == (WINDOW, 1)
    assert fp.peak_bytes(CONTEXT) <= fp.budget


@pytest.mark.parametrize("budget_gb", [0.3, 0.45, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0, 4.0, 8.0])
def test_plan_fits_the_budget_with_the_fewest_tiles(budget_gb):
    budget = int(budget_gb * 1e9)
    fp = plan_forward(WINDOW, CONTEXT, budget)
    per_side = math.ceil(WINDOW / fp.tile)
    assert fp.tile % 32 == 0 and per_side * fp.tile >= WINDOW
    if fp.tile > MIN_TILE:
        assert fp.peak_bytes(CONTEXT) <= budget
    if per_side > 1:  # one tile fewer per side would not fit
        assert _cost(math.ceil(WINDOW / (per_side - 1) / 32) * 32) > budget
    assert 1 <= fp.batch <= per_side * per_side


def test_batch_from_memory_or_given():
    # a 2304 px window (chunk 2048) whole costs 2.7x a 1152 px tile: with 2.2x, 2x2 tiles, two per call
    budget = int(2.2 * _cost(1152))
    fp = plan_forward(2304, CONTEXT, budget)
    assert (fp.tile, fp.batch) == (1152, 2) and fp.peak_bytes(CONTEXT) <= budget
    assert plan_forward(2304, CONTEXT, budget, batch=1).batch == 1


def test_too_little_memory_stops_at_the_smallest_tile_and_warns(caplog):
    fp = plan_forward(WINDOW, CONTEXT, 1000)
    assert fp.tile == MIN_TILE and fp.batch == 1
    assert "more memory" in caplog.text


def test_cgroup_limits_v2_and_v1(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    job = root / "system.slice" / "slurmstepd.scope" / "job_42"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("8589934592\n")
    (root / "system.slice" / "memory.max").write_text("max\n")
    proc.write_text("0::/system.slice/slurmstepd.scope/job_42\n")
    assert cgroup_limit(root, proc) == 8 * 2**30
    (job / "memory.max").write_text("max\n")
    assert cgroup_limit(root, proc) is None
    v1 = root / "memory" / "slurm" / "uid_1" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("4294967296\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    proc.write_text("12:cpuset:/slurm/uid_1/job_7\n9:memory:/slurm/uid_1/job_7\n")
    assert cgroup_limit(root, proc) == 4 * 2**30
    assert cgroup_limit(root, tmp_path / "missing") is None


def _plan_in_worker(window: int, context: int):  # noqa: ANN202
    from wsi_nuclei.pipeline.segment import SegmentConfig
    from wsi_nuclei.pipeline.tiling import Tiling
    from wsi_nuclei.pipeline.worker_cache import make_forward_plan

    return make_forward_plan(SegmentConfig(), Tiling(window - 128, 64, context))


def test_a_dask_workers_memory_limit_is_the_limit():
    """In a worker, the limit is the worker's, and a chunk task plans within it: a worker of 2 GB
    cannot hold a 1792 px forward pass (~2 GB planned), so its windows are split."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit="2GB", dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            limit, source = client.submit(memory_limit).result()
            fp = client.submit(_plan_in_worker, WINDOW, CONTEXT).result()
    assert (limit, source) == (2_000_000_000, "Dask worker memory limit")
    assert fp.tile < WINDOW and fp.budget < 2_000_000_000 * 0.75 - 2 * 64 * 1792**2 + 1
    assert memory_limit()[0] > 0  # outside a worker: the cgroup or the machine


def test_cuda_budget_is_the_free_gpu_memory_shared_by_the_tasks(monkeypatch):
    """The GPU branch (no GPU here: torch's free-memory query is replaced, the arithmetic is ours)."""
    import torch

    from wsi_nuclei.model.memory import USABLE_FRACTION, forward_budget

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(str(device)) or (40_000_000_000, 80_000_000_000))
    budget, how = forward_budget(2, 1792, "cuda:1")
    assert budget == int(40e9 * USABLE_FRACTION / 2) and asked == ["cuda:1"] and "cuda:1" in how
    assert plan_forward(WINDOW, CONTEXT, budget).tile == WINDOW  # a 1792 px window fits easily


def _default_plan_in_worker():  # noqa: ANN202
    from wsi_nuclei.model.memory import _rss
    from wsi_nuclei.pipeline.plan import model_card, slide_tiling
    from wsi_nuclei.pipeline.segment import SegmentConfig
    from wsi_nuclei.pipeline.worker_cache import make_forward_plan

    cfg = SegmentConfig()
    fp = make_forward_plan(cfg, slide_tiling(cfg, model_card(cfg)))
    return fp, _rss()


def test_the_dry_run_plans_what_a_worker_plans():
    """`--dry-run --cluster slurm --memory 2GB --cores 2` prints the plan a 2 GB, 2-thread worker
    makes: the same budget and plan functions, given what the worker holds."""
    from distributed import Client, LocalCluster

    from wsi_nuclei.cluster.client import ClusterConfig
    from wsi_nuclei.pipeline.launch import dry_forward
    from wsi_nuclei.pipeline.segment import SegmentConfig

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit="2GB", dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            worker_plan, held = client.submit(_default_plan_in_worker).result()
    dry = dry_forward(SegmentConfig(), ClusterConfig(kind="slurm", memory="2GB", cores=2, processes=1), held=held)
    assert dry is not None and dry.worker_bytes == 2_000_000_000
    assert (dry.plan.tile, dry.plan.batch) == (worker_plan.tile, worker_plan.batch)
    assert abs(dry.plan.budget - worker_plan.budget) < 50_000_000  # the worker's own memory moved a little in between
    assert worker_plan.tile < 1024 + 2 * 64  # 2 GB cannot hold the whole window: the split is what is compared


def test_the_default_chunk_fits_the_workers_memory():
    """Without --chunk-size, segment takes 1536 px chunks where a CPU worker holds their window in
    one forward pass and 1024 px where it cannot (a split window re-infers the context around each
    tile); a given --chunk-size is kept; --dry-run says which."""
    from typer.testing import CliRunner

    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.cli.main import app
    from wsi_nuclei.pipeline.config import DEFAULT_CHUNK
    from wsi_nuclei.pipeline.launch import configs

    def chunk(memory: str, given: int | None = None) -> int:
        slurm = {"cores": 2, "memory": memory, "processes": 1}
        cfg, _ = configs({"chunk_size": given}, cluster="slurm", slurm=slurm, dry_run=True, max_slides=4)
        return cfg.chunk_size

    assert DEFAULT_CHUNK == 1536
    assert chunk("4GB") == 1024 and chunk("16GB") == 1536
    assert chunk("4GB", 1536) == 1536 and chunk("16GB", 512) == 512
    result = CliRunner().invoke(app, ["segment", str(SAMPLE_SLIDE), "-o", "unused", "--cluster", "slurm", "--cores", "2",
                                      "--memory", "4GB", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "# chunks: 1024 px" in result.output and "the whole window, 1664 px" in result.output


def test_a_resumed_slide_keeps_the_chunk_size_of_its_earlier_run(tmp_path):
    """The default chunk size follows the workers' memory; a slide resumed with other workers
    keeps the chunk size of its earlier run, finished (skipped) or not (its chunk files reused),
    and a given --chunk-size or --overwrite decides as usual."""
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app

    from .slides import disc_slide

    slide = disc_slide(tmp_path / "s.tif", (1600, 1600), seed=5)
    out = tmp_path / "out"
    flags = [str(slide), "-o", str(out), "--workers", "0", "--halo", "32", "--context", "64", "--quiet"]
    summary = out / "s" / "summary.json"

    def run(*extra: str) -> dict:
        result = CliRunner().invoke(app, ["segment", *flags, *extra])
        assert result.exit_code == 0, result.output
        return json.loads(summary.read_text())

    small = run("--forward-memory", "1GB", "--keep-chunks")  # 1 GB cannot hold a 1536 px window: 1024 px chunks
    assert small["parameters"]["chunk_size"] == 1024 and small["chunks"]["processed"] == 4
    assert run("--resume")["run_id"] == small["run_id"]  # finished: skipped, although 1536 would be chosen now
    for name in ("summary.json", "nuclei.geojson.gz", "nuclei.parquet"):  # as if the run had stopped before assembly
        (out / "s" / name).unlink()
    again = run("--resume")
    assert again["parameters"]["chunk_size"] == 1024 and again["chunks"]["reused"] == 4 and again["nuclei"] == small["nuclei"]
    for extra, chosen in ((["--overwrite"], "1536"), (["--resume", "--chunk-size", "512"], "512")):  # what a run would do
        result = CliRunner().invoke(app, ["segment", *flags, *extra, "--dry-run"])
        assert result.exit_code == 0 and f"# chunks: {chosen} px" in result.output, result.output
