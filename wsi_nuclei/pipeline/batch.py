"""Batch scheduling (the driver loop): chunks of several slides in flight at once, bounded, with resume.

The driver loop keeps at most ``max_slides`` slides open and at most ``max_pending`` tasks
submitted (about two per worker thread), so the cluster never idles between slides and the
driver's memory stays flat: it holds plans and futures of small results, never arrays. Each
slide's outputs are written while its chunks finish (:mod:`.stream`, on the driver), or, with
``--assemble worker``, by one task once its chunks are all on disk. A failing chunk (after Dask's
retries) fails its slide, naming the chunk; the other slides go on.

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
from .executors import TASK_RETRIES, DaskExecutor, LocalExecutor
from .plan import SlidePlan, check_outputs, model_card, plan_slide, slide_config, start_slide
from .results import ChunkDone, SlideResult
from .stream import StreamedAssembly
from .tiling import Chunk

__all__ = ["run_batch", "BatchOptions", "BatchHooks", "TASK_RETRIES"]

log = logging.getLogger(__name__)

#: Seconds between checks of ``run_batch``'s ``stop`` while tasks run.
STOP_POLL_S = 0.2


@dataclass(frozen=True)
class BatchOptions:
    """How the driver loop schedules. ``max_slides``: slides open at once (their chunks are
    scheduled together); ``min_pending``: tasks kept queued at least (an adaptive cluster adds
    workers only for queued work); ``raise_errors``: raise the first failure instead of recording
    it (:func:`wsi_nuclei.pipeline.segment.segment_slide`)."""

    max_slides: int = 2
    min_pending: int = 0
    raise_errors: bool = False


@dataclass(frozen=True)
class BatchHooks:
    """What the loop tells its caller, and asks it. ``on_slide(result)``: each slide's result when
    it is known; ``on_chunk(done, total)``: chunks over the slides started so far. ``stop()`` is
    polled a few times a second: when it turns true, queued tasks are cancelled, running ones
    finish (each writes its chunk file whole) and KeyboardInterrupt is raised in the loop, never
    inside a library call (how ``segment`` handles Ctrl-C). ``watch()`` is called as often while
    tasks are queued; what it raises stops the batch the same way
    (:class:`wsi_nuclei.cluster.slurm.WorkerWatch`: no worker for too long)."""

    on_slide: Callable[[SlideResult], None] | None = None
    on_chunk: Callable[[int, int], None] | None = None
    stop: Callable[[], bool] | None = None
    watch: Callable[[], None] | None = None


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
    stream: StreamedAssembly | None = None  # the outputs written while the chunks finish

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def run_batch(
    jobs: list[tuple[Path, Path]],
    cfg: SegmentConfig,
    client: Any = None,
    options: BatchOptions = BatchOptions(),
    hooks: BatchHooks = BatchHooks(),
) -> list[SlideResult]:
    """Segment each (slide, output folder) of ``jobs`` on ``client`` (a Dask client; None: this
    process); results in the order of ``jobs``. See :class:`BatchOptions` and :class:`BatchHooks`."""
    ex: LocalExecutor | DaskExecutor = DaskExecutor(client, options.min_pending) if client is not None else LocalExecutor(CPU_TASKS)
    return _Batch(jobs, cfg, ex, options, hooks).run()


class _Batch:
    """One run of the driver loop: admit slides, submit their tasks, collect what finished, fail
    a slide on its first error, finish each slide once."""

    def __init__(self, jobs: list[tuple[Path, Path]], cfg: SegmentConfig, ex: LocalExecutor | DaskExecutor,
                 options: BatchOptions, hooks: BatchHooks) -> None:
        self.cfg, self.ex, self.hooks = cfg, ex, hooks
        self.max_slides = max(1, options.max_slides)
        self.raise_errors = options.raise_errors
        self.queue = deque(enumerate(jobs))
        self.active: dict[int, _Slide] = {}
        self.pending: dict[Any, tuple[int, Chunk | None]] = {}  # future -> (slide, chunk; None: assembly)
        self.results: dict[int, SlideResult] = {}
        self.locks: dict[int, SlideLock] = {}  # the output folders this run writes (one writer per slide)
        self.traces: dict[int, str] = {}  # the traceback of a slide's first failure, for its error.txt
        self.card: ModelCard | None = None  # read once, when the first slide is planned
        self.done = 0
        self.total = 0

    def run(self) -> list[SlideResult]:
        polled = self.hooks.stop is not None or self.hooks.watch is not None
        try:
            while self.queue or self.active:
                if self.hooks.stop is not None and self.hooks.stop():
                    raise KeyboardInterrupt
                self.admit()
                self.submit()
                if not self.pending and not self._streams():
                    continue
                if self.hooks.watch is not None:
                    self.hooks.watch()
                self.wait(polled)
        except BaseException:
            self.ex.cancel(list(self.pending))
            raise
        finally:
            if isinstance(self.ex, LocalExecutor):
                self.ex.close()  # running tasks finish first: they write into folders we still hold
            for st in self.active.values():
                if st.stream is not None:  # removes its temporary files; the chunk files stay for --resume
                    st.stream.stop()
            for lock in self.locks.values():
                lock.release()
        return [self.results[i] for i in sorted(self.results)]

    def _streams(self) -> dict[cf.Future[Any], int]:
        """The streamed assemblies of the open slides: future -> slide."""
        return {st.stream.future: i for i, st in self.active.items() if st.stream is not None}

    def wait(self, polled: bool) -> None:
        """Wait for a task or a streamed assembly to end, and take what ended. A streamed assembly
        ends when its slide is finished, or early when it failed (a damaged chunk file, a full disk)."""
        streams = self._streams()
        if self.pending:
            timeout = STOP_POLL_S if polled or streams else None
            for fut in self.ex.wait(list(self.pending), timeout=timeout):
                if fut in self.pending:  # else: cancelled a moment ago, with the rest of a failed slide
                    self.collect(fut)
        elif streams:  # every chunk is on disk: only assemblies are left
            cf.wait(list(streams), timeout=STOP_POLL_S if polled else None, return_when=cf.FIRST_COMPLETED)
        for fut, i in streams.items():
            st = self.active.get(i)
            if not fut.done() or st is None or st.stream is None or st.stream.future is not fut:
                continue
            st.stream = None  # its thread has ended
            try:
                value, err = fut.result(), None
            except Exception as e:  # noqa: BLE001 - fails only its slide
                value, err = None, e
            self.settle(i, None, value, err)

    def admit(self) -> None:
        """Open slides from the queue until ``max_slides`` are active."""
        while self.queue and len(self.active) < self.max_slides:
            i, (path, out_dir) = self.queue.popleft()
            st = self._start(i, path, out_dir)
            if st is None:
                continue
            if st.cfg.assemble == "stream":
                todo = {ch.index for ch in st.todo}
                st.stream = StreamedAssembly(st.plan, st.cfg, (ch.index for ch in st.plan.chunks if ch.index not in todo), st.t0)
            if st.reused:
                log.info("%s: %d of %d chunks reused from an earlier run", path, st.reused, len(st.plan.chunks))
            self.active[i] = st
            self.total += len(st.plan.chunks)
            self.done += st.reused
            self._progress()

    def _start(self, i: int, path: Path, out_dir: Path) -> _Slide | None:
        """Lock, check and plan one slide; None when it is finished already (skipped) or failed."""
        t0 = time.perf_counter()
        try:
            self.locks[i] = SlideLock(out_dir).acquire()
            if self.card is None:
                self.card = model_card(self.cfg)
            scfg = slide_config(self.cfg, out_dir)
            skipped = check_outputs(path, out_dir, scfg, self.card)
            if skipped is not None:
                self.finish(i, replace(skipped, slide=str(path)))
                return None
            plan, thumb, tissue = plan_slide(path, out_dir, scfg, self.card)
            todo = start_slide(plan, thumb, tissue, scfg)
        except Exception as err:  # noqa: BLE001 - whatever goes wrong while a slide starts fails only that slide
            if isinstance(err, WsiNucleiError):
                reason = _first_line(err)
            else:
                self.traces[i] = "".join(traceback.format_exception(err))
                reason = (f"{shown(path)}: starting the slide failed ({type(err).__name__}: {_first_line(err, '')}); "
                          f"the traceback is in {shown(out_dir / 'error.txt')}")
            wrapped = err if isinstance(err, WsiNucleiError) else WsiNucleiError(reason)
            res = SlideResult(str(path), "failed", str(out_dir), reason=reason, seconds=round(time.perf_counter() - t0, 2))
            self.finish(i, res, wrapped)
            return None
        return _Slide(i, plan, scfg, deque(todo), len(plan.chunks) - len(todo), t0)

    def submit(self) -> None:
        """Queue chunks (up to the executor's capacity), and the assembly of each slide whose chunks are all done."""
        cap = self.ex.capacity()
        for i in sorted(self.active):
            st = self.active[i]
            while st.todo and not st.failed and len(self.pending) < cap:
                ch = st.todo.popleft()
                self._submit(st, ch, chunk_task, st.plan, ch, st.cfg)
            if not st.todo and st.outstanding == 0 and not st.assembling and not st.failed:
                st.assembling = True
                if st.stream is not None:
                    st.stream.close(st.computed, st.reused)
                    continue
                run = {"computed": st.computed, "reused": st.reused, "wall": time.perf_counter() - st.t0}
                self._submit(st, None, assemble_slide, st.plan, st.cfg, run)

    def _submit(self, st: _Slide, ch: Chunk | None, fn: Callable[..., Any], *args: Any) -> None:
        fut = self.ex.submit(fn, *args, priority=-st.order)
        self.pending[fut] = (st.order, ch)
        st.futures.add(fut)
        st.outstanding += 1

    def collect(self, fut: Any) -> None:
        """Take one finished task's value: count a chunk, finish a slide, or fail it."""
        i, ch = self.pending.pop(fut)
        st = self.active[i]
        st.futures.discard(fut)
        st.outstanding -= 1
        try:
            value = fut.result()
            err: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - any task failure fails only its slide
            value, err = None, e
        self.settle(i, ch, value, err)

    def settle(self, i: int, ch: Chunk | None, value: Any, err: BaseException | None) -> None:
        """One task's outcome (``ch``: its chunk; None: the slide's assembly) for slide ``i``."""
        st = self.active[i]
        # failures retrying cannot fix come back as values (no retry storm)
        if isinstance(value, ChunkDone) and value.error:
            err = WsiNucleiError(value.error)
            if value.trace:
                self.traces.setdefault(i, value.trace)
        elif isinstance(value, SlideResult) and value.status == "failed":
            err = WsiNucleiError(value.reason)
        if err is not None and not st.failed:
            self.fail(st, err, ch)
        if st.failed:
            if st.outstanding == 0:
                res = SlideResult(st.plan.path, "failed", st.plan.out_dir, reason=st.failed, seconds=st.seconds())
                self.finish(i, res, WsiNucleiError(st.failed))
        elif ch is not None:
            st.computed += 1
            self.done += 1
            if st.stream is not None:
                st.stream.ready(ch.index)
            self._progress()
        else:
            res = value
            extra = {**res.extra, "chunks_computed": st.computed, "chunks_reused": st.reused}
            self.finish(i, replace(res, seconds=st.seconds(), extra=extra))

    def fail(self, st: _Slide, err: BaseException, ch: Chunk | None) -> None:
        """Mark a slide failed by ``err`` (from chunk ``ch``, or its assembly) and drop its other tasks."""
        where = f"chunk {ch.index} (row {ch.row}, col {ch.col}, working px x={ch.x} y={ch.y})" if ch is not None else "assembly"
        if isinstance(err, WsiNucleiError):
            msg = _first_line(err)
            st.failed = msg if ch is None else f"{msg} [{where}]"
        else:
            tries = f" after {TASK_RETRIES} retries" if isinstance(self.ex, DaskExecutor) else ""
            self.traces.setdefault(st.order, "".join(traceback.format_exception(err)))
            st.failed = (f"{shown(st.plan.path)}: {where} failed{tries} ({type(err).__name__}: {_first_line(err, '')}); "
                         f"the traceback is in {shown(Path(st.plan.out_dir) / 'error.txt')}; run again with --resume")
        st.todo.clear()
        if st.stream is not None:
            st.stream.stop()
            st.stream = None
        self.ex.cancel(list(st.futures))
        for f in st.futures:
            self.pending.pop(f, None)
        st.futures.clear()
        st.outstanding = 0
        log.info("slide failed: %s", st.failed)

    def finish(self, i: int, res: SlideResult, err: BaseException | None = None) -> None:
        """Record a slide's result once: its error.txt, its lock released, the caller told."""
        lock = self.locks.pop(i, None)
        if lock is not None:
            res = _record_error(res, self.traces.pop(i, ""))  # only into a folder we hold
            lock.release()
        if err is not None and self.raise_errors:
            self.ex.cancel(list(self.pending))
            raise err
        self.results[i] = res
        self.active.pop(i, None)
        if self.hooks.on_slide:
            self.hooks.on_slide(res)

    def _progress(self) -> None:
        if self.hooks.on_chunk:
            self.hooks.on_chunk(self.done, self.total)


def _first_line(err: BaseException, empty: str | None = None) -> str:
    """The first line of an error's message (``empty``, default the error's type name, when it has none)."""
    lines = str(err).splitlines()
    if lines and lines[0]:
        return lines[0]
    return type(err).__name__ if empty is None else empty


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
