"""Dask worker preload for local clusters: workers ignore Ctrl-C (SIGINT), and end quickly.

A terminal sends Ctrl-C to the whole process group, workers included. The driver handles it
(stops submitting, closes the cluster, tells how to resume); workers that also reacted would
only print tracebacks while being shut down.

A worker that closes normally (the cluster shuts down) ends without the interpreter's teardown:
with torch and OpenVINO loaded, unloading their modules and libraries takes over a second on 2 cores,
which every ``segment`` run waited for after its last slide. By then the worker has finished its
tasks (each wrote its chunk file whole) and closed its connections, so nothing is lost.
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def dask_teardown(worker: Any) -> None:
    # registered last, so it runs first at exit (multiprocessing's own clean-up has run before)
    atexit.register(_exit_now)


def _exit_now() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
            pass
    os._exit(0)
