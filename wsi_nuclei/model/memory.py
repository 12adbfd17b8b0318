"""How big a forward pass may be: the memory a chunk task may use, and the tiles and batch that fit it.

A chunk window is inferred in one forward pass when it fits (the fastest on a CPU: no context is
inferred twice). When it does not, the window is split into tiles that each see the model's
context (the tiling invariant of :mod:`wsi_nuclei.pipeline.tiling`, so the probabilities stay equal within
float noise) and as many tiles go into one call as fit. A worker is never sized past its memory,
so Dask's nanny (which kills a worker at 95 % of its limit) or SLURM's cgroup never kill it for a
forward pass: a killed worker loses the chunks it was running and, twice in a row, fails the slide.

Memory model (measured by ``benchmarks/forward_memory.py``, README Performance): one forward pass
of the shipped model grows the process's peak RSS by about :data:`FORWARD_BYTES_PER_PX` per input
pixel, the same for ONNX Runtime and torch on a CPU and linear in the pixels; the rest of a chunk
task (RGB, probabilities, labels, polygons) stays under :data:`TASK_BYTES_PER_PX` per read pixel.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .network import STRIDE

__all__ = [
    "ForwardPlan",
    "plan_forward",
    "memory_limit",
    "cgroup_limit",
    "forward_budget",
    "worker_budget",
    "describe",
    "FORWARD_BYTES_PER_PX",
    "TASK_BYTES_PER_PX",
]


def _up32(v: float) -> int:
    """``v`` rounded up to the encoder stride."""
    return int(math.ceil(v / STRIDE) * STRIDE)

log = logging.getLogger(__name__)

#: peak-RSS growth of one forward pass per input pixel: benchmarks/forward_memory.py measured
#: 375-440 (ONNX Runtime) and 441-602 (torch; 548 at 1024 px in one run, 460 in another) bytes/px
#: for 512-2304 px inputs over two runs; 620 is above every measurement
FORWARD_BYTES_PER_PX = 620
#: allowance per read pixel for the rest of a chunk task (measured: 9-28 bytes/px on top of the
#: forward pass for a 1792 px read of CMU-1-Small-Region)
TASK_BYTES_PER_PX = 64
#: peak RSS of a worker process with the shipped model loaded, before any forward pass (measured
#: 0.80-0.85 GB, the "base" column of benchmarks/forward_memory.py): what --dry-run assumes
PROCESS_BASE_BYTES = 900_000_000
#: smallest tile core: below it the context is most of every forward pass (256 px with 320 px of
#: context is 12x the core's pixels); with less memory than that needs the plan stays here and warns
MIN_TILE = 256
#: share of the limit that may be used: Dask's nanny pauses a worker at 80 % and kills it at 95 %
USABLE_FRACTION = 0.75


@dataclass(frozen=True)
class ForwardPlan:
    """``tile``: core side (working px) of each forward tile, which sees ``context`` px more on every
    side; ``batch``: tiles per model call; ``budget``: the bytes it was planned for."""

    tile: int
    batch: int
    budget: int

    def peak_bytes(self, context: int, bytes_per_px: float = FORWARD_BYTES_PER_PX) -> int:
        return int(self.batch * (self.tile + 2 * context) ** 2 * bytes_per_px)

    def per_side(self, window: int) -> int:
        """Tiles per side of a ``window`` px chunk window (1: the whole window in one pass)."""
        return math.ceil(window / self.tile)

    def read_size(self, window: int, context: int) -> int:
        """Side of the RGB read for a window: the tiles' cores plus the context on both sides."""
        return self.per_side(window) * self.tile + 2 * context


def plan_forward(
    window: int, context: int, budget: int, bytes_per_px: float = FORWARD_BYTES_PER_PX, batch: int | None = None
) -> ForwardPlan:
    """The largest forward pass over a ``window`` px chunk window (a multiple of 32) that fits
    ``budget`` bytes: the whole window when it fits, else the fewest tiles per side whose
    (tile + 2·context)² input fits, with as many tiles per call as fit (or ``batch`` when given)."""
    if window <= 0 or window % STRIDE:
        raise ValueError(f"window {window} must be a positive multiple of {STRIDE}")

    def cost(tile: int) -> float:
        return (tile + 2 * context) ** 2 * bytes_per_px

    n = 1
    while cost(_up32(window / n)) > budget and _up32(window / (n + 1)) >= min(MIN_TILE, window):
        n += 1
    tile = _up32(window / n)
    per_side = math.ceil(window / tile)  # can be < n: tiles are rounded up to 32
    fits = max(1, int(budget // cost(tile)))
    if cost(tile) > budget:
        log.warning("the smallest forward pass needs %.1f GB but %.1f GB is available to it; the worker may run out of memory: "
                    "give each worker more memory (--memory, fewer --processes) or set --forward-memory", cost(tile) / 1e9, budget / 1e9)
    return ForwardPlan(tile, batch if batch else min(fits, per_side * per_side), int(budget))


def cgroup_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``,
    the tightest on the way up), as SLURM sets it for ``--mem``; None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].lstrip("/")
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        path = base / rel
        while True:
            try:
                text = (path / name).read_text().strip()
                if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
                    limits.append(int(text))
            except OSError:
                pass
            if path == base or path == path.parent:
                break
            path = path.parent
    return min(limits) if limits else None


def _physical() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _physical()


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def memory_limit() -> tuple[int, str]:
    """(bytes, where from): the tightest of the Dask worker's memory limit (when this runs in one),
    the cgroup limit and the machine's memory."""
    found = [(_physical(), "physical memory")]
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
        if limit:
            found.append((int(limit), "Dask worker memory limit"))
    except (ImportError, ValueError, AttributeError):
        pass
    group = cgroup_limit()
    if group:
        found.append((group, "cgroup memory limit"))
    return min(found)


def forward_budget(tasks: int, read: int, device: str = "cpu") -> tuple[int, str]:
    """(bytes, how) the forward passes of this process may use, with ``tasks`` chunk tasks of
    ``read`` px reads running at once. CPU: forward passes take turns (one at a time), so the
    budget is the usable share of the limit less what the process holds now and the tasks' other
    arrays. CUDA: the free GPU memory, shared by the ``tasks`` concurrent forward passes."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * USABLE_FRACTION / max(1, tasks)), f"{free / 1e9:.1f} GB free on {device} / {tasks} tasks"
    limit, source = memory_limit()
    rss = _rss()
    # the machine's free memory bounds it too (other processes share the node)
    limit = min(limit, int(_available() + rss))
    return worker_budget(limit, tasks, read, rss), f"{source} {limit / 1e9:.1f} GB, process {rss / 1e9:.1f} GB, {tasks} tasks"


def worker_budget(worker_bytes: int, tasks: int, read: int, held: int = PROCESS_BASE_BYTES) -> int:
    """The forward budget of a worker of ``worker_bytes`` memory that holds ``held`` bytes already
    (default: the measured base of a fresh process with the model, what --dry-run assumes)."""
    return max(0, int(worker_bytes * USABLE_FRACTION - held - tasks * TASK_BYTES_PER_PX * read * read))


def describe(fp: ForwardPlan, window: int, context: int) -> str:
    """One line: how a ``window`` px chunk window is inferred under ``fp``."""
    per_side = fp.per_side(window)
    what = (
        f"the whole window, {fp.tile + 2 * context} px" if per_side == 1 else f"{per_side}x{per_side} tiles of {fp.tile + 2 * context} px"
    )
    return f"{what}, {fp.batch} per call, needs {fp.peak_bytes(context) / 1e9:.1f} GB of {fp.budget / 1e9:.1f} GB"
