"""Where chunks run: a local Dask cluster (default), SLURM jobs (dask-jobqueue), an existing
scheduler, or this process.

- ``local``: a LocalCluster of ``workers`` processes, each running ``CPU_TASKS`` chunks at once
  whose forward passes take turns (``backends.MODEL_GATE``), each with ``threads`` CPU threads:
  one chunk's reading and post-processing overlap another's forward pass. With ``gpus`` > 0, one
  worker per GPU, pinned to its device through ``CUDA_VISIBLE_DEVICES``, running ``GPU_TASKS``
  chunks at once.
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` whose jobs each run ``processes`` workers (one per
  GPU when GPUs are requested), scaled adaptively between ``min_jobs`` and ``max_jobs``.
  Options come from flags or a YAML file (``workflows/jobqueue.yaml``); flags win.
  Before any job is queued the job script is checked with ``sbatch --test-only``: a refused
  partition, account, walltime or memory is one line quoting SLURM, with nothing submitted.
  Each worker leaves gracefully before its job's walltime (``--lifetime``), and adaptive
  scaling starts the next job. :class:`WorkerWatch` stops a run that has had no worker for
  ``worker_wait_s`` (jobs pending in the queue), naming the jobs' SLURM states.
- ``scheduler``: attach to a running cluster (``tcp://host:port``), waiting at most ``timeout_s``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .slurm import check_submission, parse_wait, parse_walltime, worker_lifetime

__all__ = ["ClusterConfig", "load_cluster_yaml", "make_client", "close_client", "slurm_cluster", "slurm_job_script", "gpu_for_worker"]

log = logging.getLogger(__name__)

#: chunks a GPU worker runs at once (CPU stages of one overlap the GPU work of the other)
GPU_TASKS = 2
#: chunks a CPU worker (or the process, without Dask) runs at once; their forward passes take turns
CPU_TASKS = 2
#: Dask settings for the clusters started here. The model keeps every core busy, so whatever else
#: runs takes time from it; measured on 2 cores by benchmarks/dask_overhead.py (README, Performance):
#: - the worker's statistical profiler (a stack sample of every thread each 10 ms) and the 20 ms
#:   event-loop ticks: an idle worker and driver used 0.28 and 0.30 CPU-s per 10 s (0.04 and 0.08
#:   with these settings), and a forward pass in a worker took 1.80 s against 1.71 s;
#: - the nanny's MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's dynamic mmap threshold, so every
#:   large array is mapped and its pages faulted in afresh: an in-process run of CMU-1-Small-Region
#:   took 18.45 s with it and 17.28 s without.
#: None removes a variable the nanny would set; everything else only slows Dask's bookkeeping.
QUIET_DASK: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.tick.limit": "10s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def _env_exports(settings: dict[str, Any]) -> tuple[str, ...]:
    """``export`` lines giving a worker started from a job script the Dask ``settings``.

    Dask reads ``DASK_A__B_C=v`` as ``a.b-c: v`` with the name lower-cased, so an entry whose last
    part is an environment variable (upper case, such as the nanny's ``MALLOC_TRIM_THRESHOLD_``)
    travels inside a dict literal of its parent, which Dask merges into the defaults (None removes)."""
    import shlex

    flat: dict[str, str] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        parent, _, last = key.rpartition(".")
        if last != last.lower():
            nested.setdefault(parent, {})[last] = value
        else:
            flat[key] = str(value)
    for parent, values in nested.items():
        flat[parent] = "{" + ", ".join(f'"{name}": {value!r}' for name, value in values.items()) + "}"
    return tuple(f"export DASK_{key.replace('.', '__').replace('-', '_').upper()}={shlex.quote(value)}"
                 for key, value in flat.items())


#: the same for SLURM jobs, whose workers read their settings from the environment
_QUIET_ENV = _env_exports(QUIET_DASK)

#: local workers ignore Ctrl-C; the driver handles it (see worker_setup.py)
_PRELOAD = "wsi_nuclei.cluster.worker_setup"


@dataclass(frozen=True)
class ClusterConfig:
    """How to get Dask workers. Sizes: ``memory`` like "32GB", ``walltime`` like "04:00:00"."""

    kind: str = "local"  # local | slurm | none
    scheduler: str | None = None
    workers: int = 1
    threads: int = 2
    gpus: int = 0
    # SLURM (dask-jobqueue)
    queue: str | None = None
    account: str | None = None
    walltime: str = "04:00:00"
    cores: int = 8
    memory: str = "32GB"
    processes: int = 1
    job_extra: tuple[str, ...] = ()
    prologue: tuple[str, ...] = ()
    min_jobs: int = 0
    max_jobs: int = 4
    log_directory: str | None = None
    local_directory: str | None = None
    interface: str | None = None
    python: str | None = None
    timeout_s: float = 30.0
    #: seconds a run may go without any worker before it stops (0: wait for ever)
    worker_wait_s: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.kind not in ("local", "slurm", "none"):
            raise ConfigError(f"--cluster must be local or slurm, got {self.kind!r}")
        if self.workers < 0 or self.threads <= 0:
            raise ConfigError(f"--workers must be ≥ 0 and --threads > 0, got {self.workers} and {self.threads}")
        if self.gpus < 0 or self.cores <= 0 or self.processes <= 0:
            raise ConfigError(f"--gpus must be ≥ 0, --cores and --processes > 0; got {self.gpus}, {self.cores}, {self.processes}")
        if self.min_jobs < 0 or self.max_jobs < max(1, self.min_jobs):
            raise ConfigError(f"need 0 ≤ --min-jobs ≤ --max-jobs and --max-jobs ≥ 1; got {self.min_jobs} and {self.max_jobs}")
        if self.kind == "slurm" and self.gpus and self.cores < self.gpus:
            raise ConfigError(f"--cores {self.cores} must be at least --gpus {self.gpus} (one worker per GPU)")
        if not (self.worker_wait_s >= 0 and self.worker_wait_s < float("inf")):
            raise ConfigError(f"--worker-wait must be a finite duration ≥ 0 (e.g. 30m; 0: wait for ever), got {self.worker_wait_s}")
        if self.kind == "slurm":
            parse_walltime(self.walltime)


def load_cluster_yaml(path: Path) -> dict[str, Any]:
    """Options from a YAML file: keys are the ClusterConfig field names (dashes allowed),
    optionally under a top-level ``slurm:`` key."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the cluster file ({err.strerror}); check the path") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the file") from err
    if isinstance(data, dict) and isinstance(data.get("slurm"), dict):
        data = data["slurm"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options such as queue: gpu, walltime: 04:00:00")
    known = {f.name for f in fields(ClusterConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "worker_wait":
            out["worker_wait_s"] = parse_wait(value)
            continue
        if name not in known:
            raise ConfigError(f"{path}: unknown option {key!r}; known: {', '.join(sorted(known - {'extra'}))}")
        out[name] = tuple(value) if name in ("job_extra", "prologue") else value
    return out


def merge(cfg: ClusterConfig, yaml_options: dict[str, Any], flags: dict[str, Any]) -> ClusterConfig:
    """``cfg`` updated by the YAML options, then by the flags that were given (not None)."""
    cfg = replace(cfg, **yaml_options)
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    return replace(cfg, **given)


def _slurm_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    processes = max(cfg.processes, cfg.gpus) if cfg.gpus else cfg.processes
    directives = list(cfg.job_extra)
    prologue = list(_QUIET_ENV) + list(cfg.prologue)
    lifetime, stagger = worker_lifetime(parse_walltime(cfg.walltime))
    worker_args: list[str] = ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]
    if cfg.gpus:
        directives.append(f"--gres=gpu:{cfg.gpus}")
        # one worker per GPU: each pins itself by its index within the job
        worker_args += ["--preload", "wsi_nuclei.cluster.gpu_pin"]
    kwargs: dict[str, Any] = {
        "queue": cfg.queue, "account": cfg.account, "walltime": cfg.walltime, "cores": cfg.cores,
        "memory": cfg.memory, "processes": processes, "job_extra_directives": directives,
        "job_script_prologue": prologue, "worker_extra_args": worker_args,
        # a walltime-killed job must not wedge the run: workers leave when the scheduler is gone
        "death_timeout": 120,
        "job_name": "wsi-nuclei",
    }
    for name in ("log_directory", "local_directory", "interface", "python"):
        if getattr(cfg, name):
            kwargs[name] = getattr(cfg, name)
    kwargs.update(cfg.extra)
    return kwargs


def slurm_cluster(cfg: ClusterConfig, dashboard: bool = True) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` (not yet scaled); its scheduler runs in this process."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as err:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue") from err
    try:
        kwargs = _slurm_kwargs(cfg)
        if not dashboard:
            kwargs["scheduler_options"] = {"dashboard_address": None}
        return SLURMCluster(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid SLURM options ({err}); check --queue/--walltime/--memory or the cluster YAML") from err


def slurm_job_script(cfg: ClusterConfig) -> str:
    """The batch script each SLURM job of this configuration runs (for --dry-run and tests)."""
    cluster = slurm_cluster(cfg, dashboard=False)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


def gpu_for_worker(name: str, visible: list[str]) -> str | None:
    """The GPU a worker named ``<job>-<k>`` (k-th process of a job) should use, from the job's
    visible GPUs; None when it cannot be told (a single-process job keeps all)."""
    if not visible:
        return None
    tail = str(name).rsplit("-", 1)[-1]
    if not tail.isdigit():
        return None
    return visible[int(tail) % len(visible)]


def _local_gpu_cluster(cfg: ClusterConfig) -> Any:
    from dask.distributed import Nanny, Scheduler, SpecCluster

    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v] or [str(i) for i in range(cfg.gpus)]
    if len(visible) < cfg.gpus:
        raise ConfigError(f"--gpus {cfg.gpus} but CUDA_VISIBLE_DEVICES lists only {len(visible)} ({','.join(visible)})")
    workers = {
        # each its share of the host's memory, as LocalCluster gives CPU workers (Dask's own default
        # for a Nanny is a share by threads, 2 of the node's cores: a fraction of the RAM on a big node)
        f"gpu-{k}": {"cls": Nanny, "options": {"nthreads": GPU_TASKS, "env": {"CUDA_VISIBLE_DEVICES": visible[k]}, "preload": [_PRELOAD],
                                               "memory_limit": 1 / cfg.gpus}}
        for k in range(cfg.gpus)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="wsi-nuclei-gpus")


def make_client(cfg: ClusterConfig) -> Any:
    """A ``dask.distributed.Client`` for ``cfg``, or None (kind "none" or local with 0 workers:
    chunks then run in this process)."""
    cfg.check()
    if cfg.scheduler is None and (cfg.kind == "none" or (cfg.kind == "local" and cfg.workers == 0 and not cfg.gpus)):
        return None
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler:
        import time

        t0 = time.monotonic()
        try:
            return Client(cfg.scheduler, timeout=cfg.timeout_s)
        except (OSError, TimeoutError, ValueError) as err:
            waited = f" within {cfg.timeout_s:.0f} s" if time.monotonic() - t0 >= 0.9 * cfg.timeout_s else ""
            raise ConfigError(f"cannot reach the Dask scheduler at {cfg.scheduler}{waited} ({err}); "
                              "check the address (tcp://host:port) or drop --scheduler") from err
    import dask

    with dask.config.set(QUIET_DASK):
        if cfg.kind == "slurm":
            import shutil

            if shutil.which("sbatch") is None:  # else dask-jobqueue waits for ever for workers that never come
                raise ConfigError("--cluster slurm needs SLURM's sbatch, which is not on PATH; run on a node of the cluster "
                                  "(module load slurm?), or use --cluster local")
            import warnings

            with warnings.catch_warnings():  # dashboard port 8787 taken (a notebook's cluster): Dask takes another, and says so
                warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
                cluster = slurm_cluster(cfg)
            try:
                check_submission(cluster.job_script())
            except ConfigError:
                cluster.close()
                raise
            cluster.adapt(minimum_jobs=cfg.min_jobs, maximum_jobs=cfg.max_jobs)
            log.info("SLURM cluster: adaptive %d..%d jobs; dashboard %s", cfg.min_jobs, cfg.max_jobs, cluster.dashboard_link)
            return Client(cluster)
        if cfg.gpus:
            return Client(_local_gpu_cluster(cfg))
        # CPU_TASKS chunks per worker, one forward pass at a time with cfg.threads threads (SegmentConfig.torch_threads)
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=CPU_TASKS, processes=True, dashboard_address=":0",
                               preload=[_PRELOAD])
        return Client(cluster)


def close_client(client: Any, timeout_s: float = 10.0) -> None:
    """Close ``client`` and the cluster it started (LocalCluster, SLURM jobs); never raises."""
    if client is None:
        return
    cluster = getattr(client, "cluster", None)
    try:
        client.close(timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - closing is best effort
        log.debug("closing the Dask client: %s", err)
    if cluster is not None:
        try:
            cluster.close(timeout=timeout_s)
        except Exception as err:  # noqa: BLE001
            log.debug("closing the Dask cluster: %s", err)
