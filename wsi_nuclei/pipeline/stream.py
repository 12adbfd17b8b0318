"""Streaming assembly: a slide's outputs written on the driver while its chunks are computed.

The driver loop (:mod:`.batch`) tells a slide's :class:`StreamedAssembly` which chunk files are
on disk (:meth:`~StreamedAssembly.ready`). A thread of this process adds each chunk to the
slide's :class:`~.assemble.SlideAssembler` as soon as it and every chunk before it are ready:
chunk order, so the outputs do not depend on the order in which chunks finished. After
:meth:`~StreamedAssembly.close` (no chunk is missing) the thread finishes the slide and
:attr:`~StreamedAssembly.future` holds its :class:`SlideResult`. What is left after the last
chunk is the few chunks that finished before an earlier one (the scheduler runs them nearly in
order) and :meth:`~.assemble.SlideAssembler.finish`: bounded, not growing with the slide.

The driver reads the chunk files, which the workers write into the shared output folder, and
writes the outputs; ``--assemble worker`` keeps that I/O on a worker instead, as one task after
the last chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import WsiNucleiError
from .assemble import SlideAssembler, failed_result
from .config import SegmentConfig
from .plan import SlidePlan
from .results import SlideResult

__all__ = ["StreamedAssembly", "STOP_WAIT_S"]

log = logging.getLogger(__name__)

#: Seconds :meth:`StreamedAssembly.stop` waits for the chunk being added (or a finish under way).
STOP_WAIT_S = 120.0


class StreamedAssembly:
    """The assembly of ``plan`` on a thread of this process, fed chunk by chunk. ``ready``: the
    indices of chunk files on disk already (reused from an earlier run); ``t0``: the slide's
    start (``time.perf_counter``), for its wall seconds in ``summary.json``."""

    def __init__(self, plan: SlidePlan, cfg: SegmentConfig, ready: Iterable[int], t0: float) -> None:
        self.plan, self.cfg, self.t0 = plan, cfg, t0
        self.future: cf.Future[SlideResult | None] = cf.Future()
        self._cond = threading.Condition()
        self._ready = set(ready)
        self._run: dict[str, Any] | None = None  # set by close()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name="wsi-nuclei-assemble", daemon=True)
        self._thread.start()

    def ready(self, index: int) -> None:
        """Chunk ``index``'s file is on disk."""
        with self._cond:
            self._ready.add(index)
            self._cond.notify()

    def close(self, computed: int, reused: int) -> None:
        """Every chunk is ready: finish the slide (``computed`` / ``reused`` chunks, for the summary)."""
        with self._cond:
            self._run = {"computed": computed, "reused": reused}
            self._cond.notify()

    def stop(self) -> None:
        """Give up (the slide failed, the run stops): the thread ends after the chunk it is adding
        and removes every file it wrote; the chunk files stay. A finish under way completes."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("%s: the assembly did not stop within %.0f s", self.plan.path, STOP_WAIT_S)

    def _wait_for(self, index: int | None) -> bool:
        """Wait until chunk ``index`` is ready (None: until closed); False when stopped."""
        with self._cond:
            while not self._stopped and (index not in self._ready if index is not None else self._run is None):
                self._cond.wait()
            return not self._stopped

    def _main(self) -> None:
        asm: SlideAssembler | None = None
        try:
            asm = SlideAssembler(self.plan, self.cfg)
            _warm_up()
            for ch in self.plan.chunks:
                if not self._wait_for(ch.index):
                    break
                asm.add(ch)
            else:
                if self._wait_for(None):
                    run = {**(self._run or {}), "wall": time.perf_counter() - self.t0}
                    res = asm.finish(run)
                    asm = None
                    self.future.set_result(res)
                    return
            asm.abort()
            self.future.set_result(None)  # stopped: nobody waits for a result
        except (WsiNucleiError, OSError) as err:
            if asm is not None:
                asm.abort()
            self.future.set_result(failed_result(self.plan, err))
        except BaseException as err:  # noqa: BLE001 - reported by the driver loop, with its traceback
            if asm is not None:
                asm.abort()
            self.future.set_exception(err)


def _warm_up() -> None:
    """Import and prime what :meth:`SlideAssembler.finish` draws with (matplotlib's modules, its
    font cache and Agg renderer, once per process) while the chunks are computed, not after the last one."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1), dpi=20)
    FigureCanvasAgg(fig)
    fig.add_subplot(1, 1, 1).set_title("µm²", fontsize=9)
    fig.savefig(io.BytesIO(), format="png")
