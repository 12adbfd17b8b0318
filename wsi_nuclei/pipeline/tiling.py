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

from ..errors import ConfigError
from ..model.network import STRIDE  # the encoder stride, defined with the model

__all__ = ["Tiling", "Chunk", "derive_tiling", "plan_chunks", "tissue_box", "STRIDE"]

#: Largest nucleus diameter the halo must hold (µm); tumour nuclei reach ~25 µm.
MAX_NUCLEUS_UM = 30.0
#: Context for a model card without a measured ``context_px`` (cards older than model v2): 320 px,
#: where the v1 model's tiled probabilities matched a whole-image run within 1e-3 (a benchmark
#: since replaced by ``measure-context``). Current cards carry their own value, measured by
#: ``wsi-nuclei measure-context`` (wsi_nuclei/training/context.py).
MODEL_CONTEXT_PX = 320


def _up32(v: float) -> int:
    return int(math.ceil(v / STRIDE) * STRIDE)


@dataclass(frozen=True)
class Tiling:
    """Sizes in working px: ``chunk`` core, ``halo`` (instances), ``context`` (model). How a window
    is cut into forward passes depends on memory: :func:`wsi_nuclei.model.memory.plan_forward`."""

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
    #: The part of the window the model infers, (x0, y0, x1, y1) in window px (multiples of 32):
    #: the tissue in the window dilated by the halo and one tissue-mask cell; None: all of it.
    infer: tuple[int, int, int, int] | None = None


def plan_chunks(
    width: int, height: int, tiling: Tiling, tissue: np.ndarray | None = None, tissue_scale: float = 1.0
) -> tuple[list[Chunk], tuple[int, int]]:
    """Chunks (row-major) of a ``width`` × ``height`` working-px image whose window touches tissue.

    ``tissue`` is a boolean mask where one pixel covers ``tissue_scale`` working px; None keeps all.
    Each kept chunk carries the box of its window the model must infer (:func:`tissue_box`).
    Returns the chunks and the grid shape (rows, cols).
    """
    rows, cols = math.ceil(height / tiling.chunk), math.ceil(width / tiling.chunk)
    chunks = []
    for r in range(rows):
        for c in range(cols):
            x, y = c * tiling.chunk, r * tiling.chunk
            box = None
            if tissue is not None:
                x0 = max(0, int((x - tiling.halo) / tissue_scale))
                y0 = max(0, int((y - tiling.halo) / tissue_scale))
                x1 = int(math.ceil((x + tiling.chunk + tiling.halo) / tissue_scale))
                y1 = int(math.ceil((y + tiling.chunk + tiling.halo) / tissue_scale))
                if not tissue[y0:y1, x0:x1].any():
                    continue
                box = tissue_box(tissue, tissue_scale, x - tiling.halo, y - tiling.halo, tiling.window, tiling.halo)
                if box == (0, 0, tiling.window, tiling.window):
                    box = None
            chunks.append(Chunk(r, c, x, y, r * cols + c, box))
    return chunks, (rows, cols)


def tissue_box(tissue: np.ndarray, scale: float, wx: int, wy: int, window: int, halo: int) -> tuple[int, int, int, int] | None:
    """The box of the ``window`` px window at (``wx``, ``wy``) working px that holds tissue, or None
    when none does. ``tissue`` has one pixel per ``scale`` working px. The box is the tissue's
    bounding box dilated by ``halo`` (a nucleus at the tissue's edge, whole) plus one mask pixel (the
    mask's own resolution), rounded out to multiples of 32 in window px and clipped to the window."""
    grow = halo + int(math.ceil(scale))
    x0, y0 = max(0, int((wx - grow) // scale)), max(0, int((wy - grow) // scale))
    x1 = int(math.ceil((wx + window + grow) / scale))
    y1 = int(math.ceil((wy + window + grow) / scale))
    part = tissue[y0:y1, x0:x1]
    if not part.any():
        return None
    ys, xs = np.nonzero(part.any(axis=1))[0], np.nonzero(part.any(axis=0))[0]
    # tissue pixels k cover working px [k*scale, (k+1)*scale)
    bx0, bx1 = (x0 + xs[0]) * scale - grow - wx, (x0 + xs[-1] + 1) * scale + grow - wx
    by0, by1 = (y0 + ys[0]) * scale - grow - wy, (y0 + ys[-1] + 1) * scale + grow - wy
    def down(v: float) -> int:
        return max(0, min(window, int(math.floor(v / STRIDE)) * STRIDE))

    def up(v: float) -> int:
        return max(0, min(window, int(math.ceil(v / STRIDE)) * STRIDE))

    box = (down(bx0), down(by0), up(bx1), up(by1))
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box
