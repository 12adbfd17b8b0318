"""Dask worker preload for local clusters: workers ignore Ctrl-C (SIGINT).

A terminal sends Ctrl-C to the whole process group, workers included. The driver handles it
(stops submitting, closes the cluster, tells how to resume); workers that also reacted would
only print tracebacks while being shut down.
"""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
