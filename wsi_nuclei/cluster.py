"""Dask clients: a local cluster (default), an existing scheduler, or none (in-process)."""

from __future__ import annotations

import logging
from typing import Any

from .errors import ConfigError

__all__ = ["make_client"]

log = logging.getLogger(__name__)


def make_client(scheduler: str | None = None, workers: int = 1, threads: int = 1, timeout_s: float = 10.0) -> Any:
    """A ``dask.distributed.Client``.

    ``scheduler`` (``tcp://host:port``) attaches to a running cluster, giving up after
    ``timeout_s``; otherwise a LocalCluster of ``workers`` processes with ``threads`` threads each
    is started. ``workers=0`` returns None: chunks then run in this process.
    """
    if workers < 0 or threads <= 0:
        raise ConfigError(f"--workers must be ≥ 0 and threads > 0, got {workers} and {threads}")
    if scheduler is None and workers == 0:
        return None
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout=timeout_s)
        except (OSError, TimeoutError) as err:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} within {timeout_s:.0f} s ({err}); check the address or drop --scheduler") from err
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None)
    return Client(cluster)
