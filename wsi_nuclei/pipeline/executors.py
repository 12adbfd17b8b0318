"""Where the driver loop's tasks run: Dask (:class:`DaskExecutor`) or threads of this process
(:class:`LocalExecutor`), behind one small interface (submit, wait, capacity, cancel)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LocalExecutor", "DaskExecutor", "TASK_RETRIES"]

#: Times Dask re-runs a task that raised (a worker that died is handled by Dask itself).
TASK_RETRIES = 2


class LocalExecutor:
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


class DaskExecutor:
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
