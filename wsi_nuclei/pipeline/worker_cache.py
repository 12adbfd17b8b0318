"""Per-process caches of the chunk tasks: the model's predictor, the forward plan, slide handles.

A Dask worker runs several chunk tasks at once in threads: each cached object is built once under
a lock (``torch.onnx.export``, for one, is not thread-safe). Open slide handles are per thread
(tiffslide's file handle is not meant for concurrent reads). Used by the chunk tasks; benchmarks
use it to time the same predictor and forward plan.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from .config import SegmentConfig

if TYPE_CHECKING:
    from ..model.memory import ForwardPlan
    from .tiling import Tiling

__all__ = ["cached_predictor", "forward_plan", "make_forward_plan", "slide_handle"]

log = logging.getLogger(__name__)

_CACHE: dict[Any, Any] = {}
_CACHE_LOCK = threading.RLock()
#: per-thread objects (open slide handles)
_THREAD = threading.local()


def cached_predictor(model_dir: str | None, device: str, backend: str, threads: int) -> Any:
    """(predict, card, backend name) for this worker process, built once."""
    key = ("model", model_dir, device, backend, threads)
    with _CACHE_LOCK:
        return _CACHE[key] if key in _CACHE else _build(key, model_dir, device, backend, threads)


def _build(key: Any, model_dir: str | None, device: str, backend: str, threads: int) -> Any:
    import torch

    from ..model.backends import make_predictor
    from ..model.network import load_model

    if threads:
        torch.set_num_threads(threads)
    model, card = load_model(model_dir)
    predict, name = make_predictor(model, card, backend, device, threads)
    _CACHE[key] = (predict, card, name)
    return _CACHE[key]


def forward_plan(cfg: SegmentConfig, tiling: Tiling) -> ForwardPlan:
    """This process's :class:`~wsi_nuclei.model.memory.ForwardPlan` for ``tiling``'s windows, planned
    once (after the model is loaded, so the process's own memory is counted)."""
    key = ("forward", cfg.model_dir, cfg.device, tiling.window, tiling.context, cfg.batch_size, cfg.forward_memory)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make_forward_plan(cfg, tiling)
        plan: ForwardPlan = _CACHE[key]
        return plan


def make_forward_plan(cfg: SegmentConfig, tiling: Tiling) -> ForwardPlan:
    """The forward plan a worker of this process makes (also what ``--dry-run`` prints)."""
    from ..cluster.client import CPU_TASKS, GPU_TASKS
    from ..model.memory import describe, forward_budget, plan_forward

    tasks = GPU_TASKS if cfg.device.startswith("cuda") else CPU_TASKS
    try:
        from distributed import get_worker

        tasks = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    if cfg.forward_memory:
        budget, how = cfg.forward_memory, "--forward-memory"
    else:
        budget, how = forward_budget(tasks, tiling.window + 2 * tiling.context, cfg.device)
    fp = plan_forward(tiling.window, tiling.context, budget, batch=cfg.batch_size)
    log.info("forward passes: %s (%s)", describe(fp, tiling.window, tiling.context), how)
    return fp


def slide_handle(path: str, backend: str, mpp: float | None) -> Any:
    """This thread's open handle of ``path`` (tiffslide's file handle is not meant for concurrent
    reads); the handles go with the thread, so an in-process run's task threads leave none open."""
    from ..slides.reader import open_slide

    cache = _THREAD.__dict__.setdefault("slides", {})
    key = (path, backend, mpp)
    if key not in cache:
        cache[key] = open_slide(path, backend, mpp)
    return cache[key]
