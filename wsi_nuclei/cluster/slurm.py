"""SLURM's side of ``--cluster slurm``: its time formats, asking it before submitting
(``sbatch --test-only``), the queue states of a run's jobs, and :class:`WorkerWatch`, which stops a
run that has waited too long for workers. Only SLURM's own commands are called (no accounting:
``sacct`` is not needed)."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from ..errors import ConfigError, WsiNucleiError

__all__ = ["NoWorkersError", "WorkerWatch", "check_submission", "job_states", "parse_walltime", "parse_wait", "worker_lifetime"]


class NoWorkersError(WsiNucleiError):
    """The run had no Dask worker for longer than ``--worker-wait``."""


_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_walltime(text: str) -> float:
    """Seconds in a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    m = _WALLTIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"--walltime {text!r} is not a SLURM time; use HH:MM:SS (e.g. 04:00:00) or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"--walltime {text!r} is zero; give the time a job may run, e.g. 04:00:00")
    return float(seconds)


def parse_wait(text: str | float | int) -> float:
    """Seconds in ``--worker-wait``: a number of seconds or a duration such as ``30s``, ``30m``, ``2h``."""
    from dask.utils import parse_timedelta

    try:
        value = float(parse_timedelta(text, default="s"))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--worker-wait {text!r} is not a duration; use e.g. 30m, 2h or 90s (0: wait for ever)") from err
    return value


def worker_lifetime(walltime_s: float) -> tuple[int, int]:
    """(lifetime, stagger) in seconds for a worker in a job of ``walltime_s``: it leaves gracefully
    a margin (10 %, 15 s to 10 min) before SLURM kills the job, so no chunk is cut mid-write and
    adaptive scaling starts the next job."""
    margin = min(600.0, max(15.0, 0.1 * walltime_s))
    lifetime = max(5.0, walltime_s - margin)
    return int(lifetime), int(min(margin / 3, lifetime / 4))


def _slurm_says(text: str) -> str:
    """SLURM's own words from sbatch's output: its error lines joined, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln.removeprefix("sbatch: ").removeprefix("error: ") for ln in lines if "error" in ln.lower()]
    return "; ".join(dict.fromkeys(errors)) or (lines[-1] if lines else "no message")


def check_submission(job_script: str, timeout_s: float = 60.0) -> None:
    """Ask SLURM whether it would accept ``job_script`` (``sbatch --test-only``: nothing is
    queued). A refusal is a ConfigError quoting SLURM's message."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="wsi-nuclei-job-") as f:
        f.write(job_script)
        f.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise ConfigError(f"sbatch did not answer within {timeout_s:.0f} s (is slurmctld reachable from here?); "
                              "try again, or use --cluster local") from err
        except OSError as err:
            raise ConfigError(f"cannot run sbatch ({err.strerror or err}); run on a node of the cluster, or use --cluster local") from err
    if done.returncode != 0:
        raise ConfigError(f"SLURM refused the worker job: {_slurm_says(done.stderr + done.stdout)}; "
                          "check --queue, --account, --walltime, --memory, --cores and --job-extra (or the cluster YAML)")


def job_states(job_ids: list[str], timeout_s: float = 30.0) -> dict[str, str]:
    """``{job id: "PD (Resources)"}`` from ``squeue`` for the jobs still known to SLURM."""
    if not job_ids:
        return {}
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%t|%r"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = f"{parts[1]} ({parts[2]})" if parts[2] and parts[2] != "None" else parts[1]
    return states


class WorkerWatch:
    """Stops a run whose cluster has had no worker for ``wait_s`` seconds (0: never).

    Called by the batch loop while work is queued; it asks the scheduler at most once a second.
    On a SLURM cluster the error names the jobs and their queue states (``PD (Resources)``,
    ``PD (JobHeldUser)``), or SLURM's refusal when no job is queued at all."""

    def __init__(self, client: Any, wait_s: float, clock: Any = time.monotonic) -> None:
        self.client, self.wait_s, self.clock = client, wait_s, clock
        self.since = clock()  # the first workers are awaited from the start
        self.asked = -1e9

    def __call__(self) -> None:
        if not self.wait_s:
            return
        now = self.clock()
        if now - self.asked < 1.0:
            return
        self.asked = now
        try:
            workers = len(self.client.nthreads())  # the cheap query (the batch loop asks the same)
        except Exception:  # noqa: BLE001 - a scheduler busy for a moment is not "no workers"
            return
        if workers:
            self.since = now
        elif now - self.since > self.wait_s:
            raise NoWorkersError(f"no Dask worker for {_duration(now - self.since)} (--worker-wait {_duration(self.wait_s)}): "
                                 f"{self.why()}; finished chunks and slides are kept: run the same command with --resume later")

    def why(self) -> str:
        cluster: Any = getattr(self.client, "cluster", None)
        jobs = getattr(cluster, "workers", None)
        if cluster is None or not isinstance(jobs, dict) or not hasattr(cluster, "job_script"):
            return "the scheduler has no workers (are they running and able to reach it?)"
        ids = [str(j.job_id) for j in jobs.values() if getattr(j, "job_id", None)]
        states = job_states(ids)
        if states:
            return "SLURM jobs " + ", ".join(f"{i} {st}" for i, st in states.items())
        try:
            check_submission(cluster.job_script())
        except ConfigError as err:
            return str(err).split(";")[0]
        return "no SLURM job of this run is in the queue (the worker jobs ended or were never submitted: see their logs)"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
