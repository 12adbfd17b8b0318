"""Dask worker preload: pin each worker of a multi-GPU SLURM job to one GPU.

dask-jobqueue starts ``processes`` workers per job named ``<job>-0``, ``<job>-1``, …; SLURM makes
all the job's GPUs visible to each. Loaded with ``--preload wsi_nuclei.cluster.gpu_pin`` (added by
``--cluster slurm --gpus N``), this narrows ``CUDA_VISIBLE_DEVICES`` to the worker's own GPU
before torch is imported (tasks import torch lazily).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .client import gpu_for_worker

log = logging.getLogger(__name__)


def dask_setup(worker: Any) -> None:
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    gpu = gpu_for_worker(str(worker.name), visible)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("worker %s pinned to GPU %s", worker.name, gpu)
