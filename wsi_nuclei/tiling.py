"""Chunk grid and model tiles at the working resolution; the halo is derived, not guessed.

Frames: all boxes here are ``working`` pixels (x, y, width, height), origin at the slide's
level-0 origin. Invariant (stated and tested, as stardist's big.py does): a chunk's core is
segmented from a *window* = core + ``halo`` on every side, and every model tile in that window
sees ``context`` more pixels on every side; all sizes are multiples of 32 and every read box
starts on a multiple of 32, so a tile's pixels meet the encoder's stride-32 grid exactly where
they would in a whole-image run. Then the tiled probabilities equal the whole-image ones (up to
float noise) and a nucleus owned by a chunk (centroid in the core) lies wholly in its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["Tiling", "Chunk", "derive_tiling", "plan_chunks", "STRIDE"]

STRIDE = 32
#: Largest nucleus diameter the halo must hold (µm); tumour nuclei reach ~25 µm.
MAX_NUCLEUS_UM = 30.0
#: Context for a model card without a measured ``context_px`` (cards older than model v2): 320 px,
#: where the v1 model's tiled probabilities matched a whole-image run within 1e-3 (a benchmark
#: since replaced by ``measure-context``). Current cards carry their own value, measured by
#: ``wsi-nuclei measure-context`` (wsi_nuclei/context.py).
MODEL_CONTEXT_PX = 320


def _up32(v: float) -> int:
    return int(math.ceil(v / STRIDE) * STRIDE)


@dataclass(frozen=True)
class Tiling:
    """Sizes in working px: ``chunk`` core, ``halo`` (instances), ``context`` (model). How a window
    is cut into forward passes depends on memory: :func:`wsi_nuclei.memory.plan_forward`."""

    chunk: int
    halo: int
    context: int

    @property
    def window(self) -> int:
        """Side of the region segmented for one chunk: core plus halo on both sides."""
        return self.chunk + 2 * self.halo

    def check(self) -> None:
        for name in ("chunk", "halo", "context"):
            value = getattr(self, name)
            if value < 0 or (name == "chunk" and value <= 0):
                raise ConfigError(f"--{name} must be > 0, got {value}")
            if value % STRIDE:
                raise ConfigError(f"--{name} must be a multiple of {STRIDE} px (the encoder stride), got {value}")
        if self.halo >= self.chunk:
            raise ConfigError(f"--halo {self.halo} must be smaller than --chunk-size {self.chunk}")


def derive_tiling(mpp: float, chunk: int = 1024, halo: int | None = None, context: int | None = None) -> Tiling:
    """Tiling for a model at ``mpp`` µm/px: ``halo`` defaults to the largest nucleus diameter
    (:data:`MAX_NUCLEUS_UM`) and ``context`` to :data:`MODEL_CONTEXT_PX`, both rounded up to 32."""
    halo = _up32(MAX_NUCLEUS_UM / mpp) if halo is None else halo
    context = MODEL_CONTEXT_PX if context is None else context
    t = Tiling(chunk, halo, context)
    t.check()
    return t


@dataclass(frozen=True)
class Chunk:
    """One chunk of the grid: core box origin (x, y) in working px, its grid position and index."""

    row: int
    col: int
    x: int
    y: int
    index: int


def plan_chunks(width: int, height: int, tiling: Tiling, tissue: np.ndarray | None = None, tissue_scale: float = 1.0) -> tuple[list[Chunk], tuple[int, int]]:
    """Chunks (row-major) of a ``width`` × ``height`` working-px image whose window touches tissue.

    ``tissue`` is a boolean mask where one pixel covers ``tissue_scale`` working px; None keeps all.
    Returns the chunks and the grid shape (rows, cols).
    """
    rows, cols = math.ceil(height / tiling.chunk), math.ceil(width / tiling.chunk)
    chunks = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * tiling.chunk, r * tiling.chunk
            if tissue is not None:
                x0 = max(0, int((x - tiling.halo) / tissue_scale))
                y0 = max(0, int((y - tiling.halo) / tissue_scale))
                x1 = int(math.ceil((x + tiling.chunk + tiling.halo) / tissue_scale))
                y1 = int(math.ceil((y + tiling.chunk + tiling.halo) / tissue_scale))
                if not tissue[y0:y1, x0:x1].any():
                    continue
            chunks.append(Chunk(r, c, x, y, r * cols + c))
    return chunks, (rows, cols)
