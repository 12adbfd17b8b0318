"""From ``wsi-nuclei segment``'s options to checked configs, and the ``--dry-run`` plan.

The policy the command line used to hold lives here, so the CLI is parse -> :func:`configs` ->
one call: the device chunk tasks use, the local GPU count, the forward-pass threads of a SLURM CPU
job, the queue depth an adaptive cluster needs, and the dry run's forward plan, which uses the
same budget and plan functions as a worker (:mod:`wsi_nuclei.model.memory`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..cluster.client import ClusterConfig
from ..errors import ConfigError, WsiNucleiError
from ..model.memory import PROCESS_BASE_BYTES, TASK_BYTES_PER_PX, ForwardPlan
from .config import DEFAULT_CHUNK, SegmentConfig

__all__ = [
    "segment_device",
    "configs",
    "fitting_chunk",
    "CHUNK_CHOICES",
    "queue_depth",
    "DryForward",
    "dry_forward",
    "DryRow",
    "dry_run_rows",
    "parse_size",
]

log = logging.getLogger(__name__)

#: Forward-pass CPU threads when not given (a worker runs two chunks whose forward passes take turns).
DEFAULT_THREADS = 2


def parse_size(text: str | None, flag: str) -> int | None:
    """Bytes of a size like "2GB" or "512MiB" (None stays None); a bad value is a one-line error."""
    if text is None:
        return None
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"{flag} {text!r} is not a size; use e.g. 2GB or 512MB") from None


def segment_device(device: str, cluster: str, scheduler: str | None, dry_run: bool) -> str:
    """The device chunk tasks use. Workers elsewhere (SLURM, ``--scheduler``) may have GPUs this
    machine lacks, so an explicit ``--device`` is trusted there; "auto" means cpu unless this
    machine sees a GPU."""
    from ..model.infer import select_device

    if (cluster == "slurm" or scheduler or dry_run) and device != "auto":
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
        return device
    return select_device(device)


def configs(
    segment: dict[str, Any], *, cluster: str = "local", scheduler: str | None = None, workers: int = 1, threads: int | None = None,
    gpus: int | None = None, connect_timeout: float = 30.0, cluster_yaml: Path | None = None, slurm: dict[str, Any] | None = None,
    dry_run: bool = False, max_slides: int = 2,
) -> tuple[SegmentConfig, ClusterConfig]:
    """Checked (:class:`SegmentConfig`, :class:`ClusterConfig`) for ``segment``'s options.

    ``segment`` holds the :class:`SegmentConfig` fields given on the command line, with
    ``device`` as typed (resolved here); ``slurm`` the SLURM flags (None = not given; they
    override ``cluster_yaml``). Defaults decided here: local GPU workers = every visible GPU
    when the device is cuda; forward-pass threads = ``DEFAULT_THREADS``, or on a SLURM CPU job all
    of a worker's cores (``cores / processes``: its forward passes take turns).
    """
    from ..cluster.client import load_cluster_yaml, merge
    from .tiling import derive_tiling

    if cluster not in ("local", "slurm", "none"):
        raise ConfigError(f"--cluster must be local, slurm or none, got {cluster!r}")
    if not (math.isfinite(connect_timeout) and connect_timeout > 0):
        raise ConfigError(f"--connect-timeout must be a finite number of seconds > 0, got {connect_timeout}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if max_slides < 1:
        raise ConfigError(f"--max-slides must be > 0, got {max_slides}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    asked = str(segment.get("device", "auto"))
    if gpus and cluster == "slurm" and not scheduler and asked == "auto":
        asked = "cuda"  # GPU jobs: the compute nodes have the GPUs this login node may lack
    dev = segment_device(asked, cluster, scheduler, dry_run)
    if gpus and dev == "cpu":
        why = "--device cpu" if asked == "cpu" else "no CUDA GPU is visible here"
        raise ConfigError(f"--gpus {gpus} asks for GPU workers, but {why}; drop --gpus to run on the CPU, "
                          "or run where the GPUs are (nvidia-smi lists them)")
    n_gpus = gpus
    if n_gpus is None and cluster == "local" and dev.startswith("cuda") and dev != "cuda:0" and not scheduler:
        import torch

        n_gpus = torch.cuda.device_count()
    chunk_given = segment.get("chunk_size") is not None
    options = {k: v for k, v in segment.items() if not (k == "chunk_size" and v is None)}
    # SLURM jobs or an existing scheduler's workers: they check their own CPU (bf16), this driver does not
    remote = cluster == "slurm" or scheduler is not None
    cfg = SegmentConfig(**{**options, "device": dev, "torch_threads": threads or DEFAULT_THREADS, "remote_workers": remote})
    cfg.check()
    if cfg.engine() != "torch":  # every other backend exports to the cache
        from ..model.backends import usable_cache_dir

        usable_cache_dir()  # checked (or replaced, with a warning) before any worker starts
    derive_tiling(0.5, cfg.chunk_size, cfg.halo, cfg.context)  # check sizes before starting a cluster
    yaml_options = load_cluster_yaml(cluster_yaml) if cluster_yaml else {}
    ccfg = merge(ClusterConfig(kind=cluster, workers=workers, threads=threads or DEFAULT_THREADS, timeout_s=connect_timeout), yaml_options,
                 {"scheduler": scheduler, "gpus": n_gpus, **(slurm or {})})
    if threads is None and ccfg.kind == "slurm" and not ccfg.gpus and not ccfg.scheduler:
        per_worker = max(1, ccfg.cores // max(1, ccfg.processes))
        ccfg, cfg = replace(ccfg, threads=per_worker), replace(cfg, torch_threads=per_worker)
    ccfg.check()
    if not chunk_given:
        cfg = replace(cfg, chunk_size=fitting_chunk(cfg, ccfg), chunk_auto=True)
    return cfg, ccfg


#: The chunk sizes ``segment`` chooses from when ``--chunk-size`` is not given, largest first.
CHUNK_CHOICES = (DEFAULT_CHUNK, 1024)


def prepare_model(cfg: SegmentConfig, dry_run: bool = False) -> None:
    """Load the model ``cfg`` names once, on the driver, before any slide: a broken model fails
    here with one line, not on every slide. For ``--precision int8`` the quantised model is made
    and cached here too (not by every worker at once); a dry run skips that."""
    from ..model.network import load_model

    net, card = load_model(Path(cfg.model_dir) if cfg.model_dir else None)
    if cfg.precision == "int8" and not dry_run:
        from ..model.backends import ensure_int8

        ensure_int8(net, card)


def fitting_chunk(cfg: SegmentConfig, ccfg: ClusterConfig) -> int:
    """The default chunk size for the workers of ``ccfg``: the largest of :data:`CHUNK_CHOICES`
    whose window a CPU worker infers in one forward pass with the memory it gets (a split window
    re-infers the model's context around every tile: a 1536 px chunk in 2x2 tiles gives the model
    16 % more pixels than a 1024 px chunk in one pass); the smallest choice when none fits (its
    windows are then split, as before). GPU workers and workers of ``--scheduler``: the default."""
    for chunk in CHUNK_CHOICES:
        forward = dry_forward(replace(cfg, chunk_size=chunk), ccfg)
        if forward is None:
            return DEFAULT_CHUNK
        if forward.whole:
            if chunk != DEFAULT_CHUNK:
                log.info("chunk size %d px: a worker's %.1f GB cannot hold a %d px chunk window in one forward pass",
                         chunk, forward.worker_bytes / 1e9, DEFAULT_CHUNK)
            return chunk
    return CHUNK_CHOICES[-1]


def queue_depth(ccfg: ClusterConfig) -> int:
    """Tasks to keep queued: SLURM scales on queued tasks, so enough to fill every job it may start."""
    return 2 * ccfg.max_jobs * ccfg.cores if ccfg.kind == "slurm" and not ccfg.scheduler else 0


@dataclass(frozen=True)
class DryForward:
    """How a CPU worker will infer a chunk window with the memory it gets."""

    plan: ForwardPlan
    worker_bytes: int
    line: str  # the dry run's "# forward passes:" line
    window: int  # the chunk window it plans for (px)
    peak_bytes: int = 0  # a worker's peak as the plan assumes: process with model + task buffers + one forward pass

    @property
    def whole(self) -> bool:
        """Whether the window is one forward pass (not split into tiles)."""
        return self.plan.per_side(self.window) == 1


def dry_forward(
    cfg: SegmentConfig, ccfg: ClusterConfig, held: int = PROCESS_BASE_BYTES, worker_bytes: int | None = None
) -> DryForward | None:
    """The forward plan a CPU worker of ``ccfg`` will make (SLURM: ``--memory / --processes``;
    local: the machine's or cgroup's memory shared by the workers), through the budget and plan
    functions a worker calls, for a process that holds ``held`` bytes; None where the workers
    are not ours to size (``--scheduler``) or plan from GPU memory."""
    from dask.utils import parse_bytes

    from ..cluster.client import CPU_TASKS
    from ..model.memory import describe, memory_limit, plan_forward, worker_budget
    from .plan import model_card, slide_tiling

    if ccfg.scheduler or ccfg.gpus or cfg.device.startswith("cuda"):
        return None
    if ccfg.kind == "slurm":
        per_worker = int(parse_bytes(ccfg.memory)) // max(1, ccfg.processes)
        tasks = max(1, ccfg.cores // max(1, ccfg.processes))
        fix = "raise --memory or lower --processes"
    else:
        per_worker = memory_limit()[0] // max(1, ccfg.workers if ccfg.kind == "local" else 1)
        tasks = CPU_TASKS
        fix = "use fewer --workers or a machine with more memory"
    per_worker = worker_bytes if worker_bytes is not None else per_worker
    tiling = slide_tiling(cfg, model_card(cfg))
    budget = cfg.forward_memory or worker_budget(per_worker, tasks, tiling.window + 2 * tiling.context, held)
    fp = plan_forward(tiling.window, tiling.context, budget, batch=cfg.batch_size)
    line = f"{describe(fp, tiling.window, tiling.context)}, with {per_worker / 1e9:.1f} GB per worker"
    if fp.peak_bytes(tiling.context) > budget:
        line = f"{line} -- TOO LITTLE MEMORY, workers may be killed: {fix}"
    read = tiling.window + 2 * tiling.context
    peak = held + tasks * TASK_BYTES_PER_PX * read * read + fp.peak_bytes(tiling.context)
    return DryForward(fp, per_worker, line, tiling.window, peak)


@dataclass(frozen=True)
class DryRow:
    """One slide of the dry run's table (``error`` set when it cannot be planned)."""

    slide: str
    out_dir: str
    size: tuple[int, int] = (0, 0)
    level0_mpp: float = 0.0
    chunks: int = 0
    grid: tuple[int, int] = (0, 0)
    tissue_mm2: float = 0.0
    state: str = ""  # finished, outdated, interrupted or "" (new): outputs.folder.slide_state
    error: str = ""
    model_mpx: float = 0.0  # million px of model input its chunks take (estimate.model_mpx)


def dry_run_rows(inputs: Sequence[Path], out: Path, cfg: SegmentConfig) -> list[DryRow]:
    """Plan every slide of ``inputs`` as ``segment`` would; reads the slides, writes nothing."""
    from ..outputs.folder import check_writable, slide_state
    from .estimate import model_mpx
    from .plan import check_outputs, model_card, plan_slide, slide_config
    from .segment import find_slides, slide_jobs

    check_writable(out, create=False)  # a dry run creates nothing
    slides, bad = find_slides(list(inputs))
    card = model_card(cfg)
    rows = []
    for path, out_dir in slide_jobs(slides, out):
        try:
            scfg = slide_config(cfg, out_dir)
            check_outputs(path, out_dir, scfg, card)  # reads only: what the run would say about the folder
            plan, _, _ = plan_slide(path, out_dir, scfg, card)
        except WsiNucleiError as err:
            rows.append(DryRow(str(path), str(out_dir), error=str(err)))
            continue
        # "outdated": outputs of another model, options or slide version (segmented again)
        state = slide_state(out_dir, plan.slide_file, plan.output_key).state
        state = "" if state == "new" else state
        mpx = model_mpx(plan.chunks, plan.tiling.window, plan.tiling.context)
        rows.append(DryRow(str(path), str(out_dir), plan.info.dimensions, plan.info.level0_mpp or 0.0, len(plan.chunks), plan.grid,
                           plan.tissue_mm2, state, model_mpx=mpx))
    rows += [DryRow(p, "", error=reason) for p, reason in bad]
    return rows


def dry_estimate(rows: list[DryRow], cfg: SegmentConfig, ccfg: ClusterConfig, max_slides: int, forward: DryForward | None,
                 rate_s_per_mm2: float | None = None) -> tuple[Any, str]:
    """(:class:`~.estimate.Estimate` or None, how the worker count was read) for the dry run's
    plannable slides. ``rate_s_per_mm2``: ``--rate``; else the model's rates.json."""
    from ..model.network import DEFAULT_MODEL_DIR
    from .estimate import Rate, estimate, load_rate, rate_key

    if ccfg.kind == "slurm" and not ccfg.scheduler:
        workers, how = max(1, ccfg.max_jobs) * max(1, ccfg.processes), f"{ccfg.max_jobs} jobs x {ccfg.processes} workers at most"
    elif ccfg.scheduler:
        workers, how = 1, "per worker of the scheduler"
    elif ccfg.kind == "local" and ccfg.workers > 0:
        workers, how = ccfg.workers, f"{ccfg.workers} local worker{'s' if ccfg.workers > 1 else ''}"
    else:
        workers, how = 1, "this process"
    engine, threads = cfg.engine(), cfg.torch_threads or DEFAULT_THREADS
    if rate_s_per_mm2 is not None:
        found: tuple[Rate, str] | None = (Rate(rate_s_per_mm2, 0.0, threads), "--rate")
    else:
        found = load_rate(Path(cfg.model_dir) if cfg.model_dir else DEFAULT_MODEL_DIR, engine, cfg.device, threads)
    if found is None:
        return None, f"no measured rate for {rate_key(engine, cfg.device, threads)}: run wsi-nuclei measure-rate --write, or pass --rate"
    areas = [r.tissue_mm2 for r in rows if not r.error]
    peak = forward.peak_bytes if forward is not None else 0
    return estimate(areas, found[0], found[1], workers, max_slides, peak, [r.model_mpx for r in rows if not r.error]), how
