"""What the stages hand back: a chunk task's numbers and a slide's outcome (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SlideResult", "ChunkDone", "Status"]

#: ok: outputs written; skipped: finished in an earlier run (--resume); failed: see ``reason``;
#: interrupted: not reached before Ctrl-C or a stop (``run.json`` only).
Status = Literal["ok", "skipped", "failed", "interrupted"]


@dataclass(frozen=True)
class SlideResult:
    """One slide's outcome, as listed in ``run.json``."""

    slide: str
    status: Status
    out_dir: str = ""
    nuclei: int = 0
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkDone:
    """What a chunk task returns to the driver: numbers only."""

    index: int
    nuclei: int
    seconds: float
    #: set when the chunk failed for a reason that retrying cannot fix (a damaged region, a full
    #: disk): the slide fails at once instead of Dask retrying the task
    error: str = ""
    trace: str = ""  # the traceback behind ``error``, for the slide's error.txt
