"""Per-process caches of the chunk tasks: the model's predictor, the forward plan, slide handles.

A Dask worker runs several chunk tasks at once in threads: each cached object is built once under
a lock (``torch.onnx.export``, for one, is not thread-safe). Open slide handles are per thread
(tiffslide's file handle is not meant for concurrent reads). Used by the chunk tasks; benchmarks
use it to time the same predictor and forward plan.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
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


def _files_id(*paths: Path) -> tuple[tuple[int, int], ...]:
    """(size, mtime_ns) of each file (-1, -1 when missing): what tells a file changed in place."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return tuple(out)


def _model_id(model_dir: str | None) -> tuple[tuple[int, int], ...]:
    from ..model.network import CARD_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE

    folder = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    return _files_id(folder / CARD_FILE, folder / WEIGHTS_FILE)


def cached_predictor(model_dir: str | None, device: str, backend: str, threads: int) -> Any:
    """(predict, card, backend name) for this worker process, built once per version of the model
    files: a long-lived worker (``--scheduler``, a notebook's client) whose model folder was
    replaced in place builds it again instead of serving the old one."""
    base = ("model", model_dir, device, backend, threads)
    key = (*base, _model_id(model_dir))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        for old in [k for k in _CACHE if k[: len(base)] == base]:  # an older version of the same model
            del _CACHE[old]
        return _build(key, model_dir, device, backend, threads)


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


def slide_handle(path: str, backend: str, mpp: float | None, planned: dict[str, Any] | None = None) -> Any:
    """This thread's open handle of ``path`` (tiffslide's file handle is not meant for concurrent
    reads); the handles go with the thread, so an in-process run's task threads leave none open.
    A file replaced at the same path (re-exported, copied again) gets a new handle. ``planned``: the
    :func:`~wsi_nuclei.outputs.folder.slide_file` record the run planned with; a file that no longer
    has its size and mtime fails the slide with one line (one stat per chunk serves both)."""
    from ..errors import SlideError, shown
    from ..slides.reader import open_slide

    try:
        st = os.stat(path)
        now: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
    except OSError:
        now = None
    if planned and now != (planned.get("bytes"), planned.get("mtime_ns")):
        raise SlideError(f"{shown(path)}: the slide file changed (or went) after this run planned it; "
                         "run again with --resume (its chunks are computed from the new file)")
    cache = _THREAD.__dict__.setdefault("slides", {})
    key = (path, backend, mpp, now)
    if key not in cache:
        for old in [k for k in cache if k[0] == path]:
            try:
                cache.pop(old).close()
            except Exception:  # noqa: BLE001 - a stale handle: closing it is a courtesy
                pass
        cache[key] = open_slide(path, backend, mpp)
    return cache[key]
