"""Batch scheduling (the driver loop): chunks of several slides in flight at once, bounded, with resume.

The driver loop keeps at most ``max_slides`` slides open and at most ``max_pending`` tasks
submitted (about two per worker thread), so the cluster never idles between slides and the
driver's memory stays flat: it holds plans and futures of small results, never arrays. A slide
whose chunks are all on disk gets one assembly task. A failing chunk (after Dask's retries)
fails its slide, naming the chunk; the other slides go on.

Without a Dask client the same loop runs the tasks in this process, on ``CPU_TASKS`` threads
(chunks overlap: one's forward pass with another's reading and post-processing).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cluster.client import CPU_TASKS
from ..errors import WsiNucleiError
from ..model.network import ModelCard
from ..outputs.folder import SlideLock, shown
from .assemble import assemble_slide
from .chunk import chunk_task
from .config import SegmentConfig
from .plan import SlidePlan, check_outputs, model_card, plan_slide, slide_config, start_slide
from .results import ChunkDone, SlideResult
from .tiling import Chunk

__all__ = ["run_batch", "TASK_RETRIES"]

log = logging.getLogger(__name__)

#: Times Dask re-runs a task that raised (a worker that died is handled by Dask itself).
TASK_RETRIES = 2
#: Seconds between checks of ``run_batch``'s ``stop`` while tasks run.
STOP_POLL_S = 0.2


class _Local:
    """Runs tasks in this process on ``n`` threads; same interface as the Dask executor. Tasks
    start in submission order; a chunk's model call waits its turn (backends.MODEL_GATE)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pool = cf.ThreadPoolExecutor(n, thread_name_prefix="wsi-nuclei-task")

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> cf.Future[Any]:
        return self.pool.submit(fn, *args)

    def wait(self, futures: list[Any], timeout: float | None = None) -> list[Any]:
        return list(cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED).done)

    def capacity(self) -> int:
        return self.n

    def cancel(self, futures: list[Any]) -> None:
        for fut in futures:
            fut.cancel()

    def close(self) -> None:
        # tasks already running finish (each writes its chunk file atomically); queued ones are dropped
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Dask:
    def __init__(self, client: Any, min_pending: int = 0) -> None:
        self.client = client
        self.min_pending = min_pending
        self._threads = (0, -1e9)  # (thread count, when asked): asked at most once a second

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.client.submit(fn, *args, pure=False, retries=TASK_RETRIES, priority=priority)

    def wait(self, futures: list[Any], timeout: float | None = None) -> list[Any]:
        from dask.distributed import wait

        try:
            return list(wait(futures, timeout=timeout, return_when="FIRST_COMPLETED").done)
        except TimeoutError:
            return []

    def capacity(self) -> int:
        threads, when = self._threads
        if time.monotonic() - when > 1.0:
            try:
                threads = sum(self.client.nthreads().values())
            except Exception:  # scheduler busy or reconnecting: a safe default
                threads = 0
            self._threads = (threads, time.monotonic())
        # an adaptive cluster (SLURM) scales on queued tasks: keep enough queued to ask for every job
        return max(4, self.min_pending, 2 * threads + 2)

    def cancel(self, futures: list[Any]) -> None:
        if futures:
            self.client.cancel(futures)


@dataclass
class _Slide:
    order: int
    plan: SlidePlan
    cfg: SegmentConfig  # the run's, with this slide's chunk size (plan.slide_config)
    todo: deque[Chunk]
    reused: int
    t0: float
    outstanding: int = 0
    computed: int = 0
    failed: str = ""
    assembling: bool = False
    futures: set[Any] = field(default_factory=set)


def run_batch(
    jobs: list[tuple[Path, Path]],
    cfg: SegmentConfig,
    client: Any = None,
    on_slide: Callable[[SlideResult], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    max_slides: int = 2,
    raise_errors: bool = False,
    min_pending: int = 0,
    stop: Callable[[], bool] | None = None,
    watch: Callable[[], None] | None = None,
) -> list[SlideResult]:
    """Segment each (slide, output folder) of ``jobs``; results in the order of ``jobs``.

    ``on_chunk(done, total)`` counts chunks over the slides started so far; ``on_slide`` gets each
    slide's result when it is known. With ``raise_errors`` the first failure is raised instead of
    recorded (used by :func:`wsi_nuclei.pipeline.segment.segment_slide`). ``min_pending`` keeps at least
    that many tasks queued (for adaptive clusters, which add workers only for queued work).
    ``stop()`` is polled a few times a second: when it turns true, queued tasks are cancelled,
    running ones finish (each writes its chunk file whole) and KeyboardInterrupt is raised here,
    in this loop, never inside a library call (how ``segment`` handles Ctrl-C). ``watch()`` is
    called as often while tasks are queued; what it raises stops the batch the same way
    (:class:`wsi_nuclei.cluster.slurm.WorkerWatch`: no worker for too long).
    """
    ex: _Local | _Dask = _Dask(client, min_pending) if client is not None else _Local(CPU_TASKS)
    results: dict[int, SlideResult] = {}
    queue = deque(enumerate(jobs))
    active: dict[int, _Slide] = {}
    pending: dict[Any, tuple[int, str, Chunk | None]] = {}
    progress = {"done": 0, "total": 0}
    max_slides = max(1, max_slides)
    locks: dict[int, SlideLock] = {}  # the output folders this run writes (one writer per slide)
    traces: dict[int, str] = {}  # the traceback of a slide's first failure, for its error.txt

    def finish(i: int, res: SlideResult, err: BaseException | None = None) -> None:
        lock = locks.pop(i, None)
        if lock is not None:
            res = _record_error(res, traces.pop(i, ""))  # only into a folder we hold
            lock.release()
        if err is not None and raise_errors:
            ex.cancel(list(pending))
            raise err
        results[i] = res
        active.pop(i, None)
        if on_slide:
            on_slide(res)

    card: ModelCard | None = None  # the model card: read once, when the first slide is planned

    def admit() -> None:
        nonlocal card
        while queue and len(active) < max_slides:
            i, (path, out_dir) = queue.popleft()
            t0 = time.perf_counter()
            try:
                locks[i] = SlideLock(out_dir).acquire()
                if card is None:
                    card = model_card(cfg)
                scfg = slide_config(cfg, out_dir)
                skipped = check_outputs(path, out_dir, scfg, card)
                if skipped is not None:
                    finish(i, replace(skipped, slide=str(path)))
                    continue
                plan, thumb, tissue = plan_slide(path, out_dir, scfg, card)
                todo = start_slide(plan, thumb, tissue, scfg)
            except Exception as err:  # noqa: BLE001 - whatever goes wrong while a slide starts fails only that slide
                if isinstance(err, WsiNucleiError):
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                else:
                    traces[i] = "".join(traceback.format_exception(err))
                    reason = (f"{shown(path)}: starting the slide failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
                              f"the traceback is in {shown(out_dir / 'error.txt')}")
                wrapped = err if isinstance(err, WsiNucleiError) else WsiNucleiError(reason)
                finish(i, SlideResult(str(path), "failed", str(out_dir), reason=reason, seconds=round(time.perf_counter() - t0, 2)), wrapped)
                continue
            reused = len(plan.chunks) - len(todo)
            if reused:
                log.info("%s: %d of %d chunks reused from an earlier run", path, reused, len(plan.chunks))
            st = _Slide(i, plan, scfg, deque(todo), reused, t0)
            active[i] = st
            progress["total"] += len(plan.chunks)
            progress["done"] += reused
            if on_chunk:
                on_chunk(progress["done"], progress["total"])

    def submit_work() -> None:
        cap = ex.capacity()
        for i in sorted(active):
            st = active[i]
            while st.todo and not st.failed and len(pending) < cap:
                ch = st.todo.popleft()
                fut = ex.submit(chunk_task, st.plan, ch, st.cfg, priority=-st.order)
                pending[fut] = (i, "chunk", ch)
                st.futures.add(fut)
                st.outstanding += 1
            if not st.todo and st.outstanding == 0 and not st.assembling and not st.failed:
                st.assembling = True
                run = {"computed": st.computed, "reused": st.reused, "wall": time.perf_counter() - st.t0}
                fut = ex.submit(assemble_slide, st.plan, st.cfg, run, priority=-st.order)
                pending[fut] = (i, "assemble", None)
                st.futures.add(fut)
                st.outstanding += 1

    try:
        while queue or active:
            if stop is not None and stop():
                raise KeyboardInterrupt
            admit()
            submit_work()
            if not pending:
                continue
            if watch is not None:
                watch()
            for fut in ex.wait(list(pending), timeout=None if stop is None and watch is None else STOP_POLL_S):
                if fut not in pending:  # cancelled a moment ago, with the rest of a slide that failed
                    continue
                i, kind, ch = pending.pop(fut)
                st = active[i]
                st.futures.discard(fut)
                st.outstanding -= 1
                try:
                    value = fut.result()
                    err: BaseException | None = None
                except Exception as e:  # noqa: BLE001 - any task failure fails only its slide
                    value, err = None, e
                # failures retrying cannot fix come back as values (no retry storm)
                if isinstance(value, ChunkDone) and value.error:
                    err = WsiNucleiError(value.error)
                    if value.trace and i not in traces:
                        traces[i] = value.trace
                elif isinstance(value, SlideResult) and value.status == "failed":
                    err = WsiNucleiError(value.reason)
                if err is not None and not st.failed:
                    where = f"chunk {ch.index} (row {ch.row}, col {ch.col}, working px x={ch.x} y={ch.y})" if ch is not None else "assembly"
                    if isinstance(err, WsiNucleiError):
                        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                        st.failed = msg if ch is None else f"{msg} [{where}]"
                    else:
                        first = (str(err).splitlines() or [""])[0]
                        tries = f" after {TASK_RETRIES} retries" if isinstance(ex, _Dask) else ""
                        traces.setdefault(i, "".join(traceback.format_exception(err)))
                        st.failed = (f"{shown(st.plan.path)}: {where} failed{tries} ({type(err).__name__}: {first}); the traceback is in "
                                     f"{shown(Path(st.plan.out_dir) / 'error.txt')}; run again with --resume")
                    st.todo.clear()
                    ex.cancel(list(st.futures))
                    for f in list(st.futures):
                        pending.pop(f, None)
                    st.futures.clear()
                    st.outstanding = 0
                    log.info("slide failed: %s", st.failed)
                if st.failed:
                    if st.outstanding == 0:
                        wrapped = WsiNucleiError(st.failed)
                        finish(i, SlideResult(st.plan.path, "failed", st.plan.out_dir, reason=st.failed,
                                              seconds=round(time.perf_counter() - st.t0, 2)), wrapped)
                    continue
                if kind == "chunk":
                    st.computed += 1
                    progress["done"] += 1
                    if on_chunk:
                        on_chunk(progress["done"], progress["total"])
                else:
                    res: SlideResult = value
                    finish(i, replace(res, seconds=round(time.perf_counter() - st.t0, 2),
                                      extra={**res.extra, "chunks_computed": st.computed, "chunks_reused": st.reused}))
    except BaseException:
        ex.cancel(list(pending))
        raise
    finally:
        if isinstance(ex, _Local):
            ex.close()  # running tasks finish first: they write into folders we still hold
        for lock in locks.values():
            lock.release()
    return [results[i] for i in sorted(results)]


def _record_error(res: SlideResult, trace: str) -> SlideResult:
    """Keep the traceback of a slide that failed unexpectedly (with its reason) in
    ``OUT/<slide>/error.txt``; a slide that finished loses the error.txt of an earlier run. (A
    failure of ours is its one-line reason, in ``run.json``.)"""
    if not res.out_dir:
        return res
    path = Path(res.out_dir) / "error.txt"
    if res.status != "failed":
        path.unlink(missing_ok=True)
        return res
    if not trace:
        return res
    from .. import atomic

    try:
        atomic.write_text(path, res.reason + "\n" + (f"\n{trace}" if trace else ""))
    except OSError:
        return res
    return replace(res, extra={**res.extra, "error_file": str(path)})
