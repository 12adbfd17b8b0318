"""``density.png``: nuclei per mm² on a coarse grid over the slide's thumbnail.

:class:`DensityGrid` counts nucleus centroids in square cells of a grid laid over the slide from its
top-left corner (raw level-0 px, before any bounds shift); the last row and column reach to the
slide's edge (between one and two cells wide, never a sliver), and a cell's density is its count
over its area, in mm². The cell side is the smallest of :data:`CELL_UM` that gives at
most :data:`MAX_CELLS` cells along the slide's longer side (100 µm cells up to 8 mm, 500 µm on a
25 mm section): a cell holds dozens of nuclei (about 30 at 3,000 per mm²), so its density is not
counting noise, and the grid stays coarse enough to read. The grid is filled
chunk by chunk during assembly (its memory is the grid's, not the nuclei's).

:func:`density_png` draws the grid over the thumbnail with matplotlib (its object API, no pyplot
state): cells without tissue and without nuclei are left clear, the colour bar runs from 0 to the
99th percentile of the other cells (an arrow when some cells lie above), axes in mm.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DensityGrid", "density_png", "CELL_UM", "MAX_CELLS"]

#: Cell sides to choose from, µm (100 µm: about 30 nuclei in a cell of typical tissue).
CELL_UM = (100, 200, 250, 500, 1000, 2000, 5000, 10000)
#: Most cells along the slide's longer side.
MAX_CELLS = 80
_DRAW = threading.Lock()  # matplotlib's font and text caches are not thread-safe; slides assemble in threads


@dataclass
class DensityGrid:
    """Nucleus counts in square cells over a slide of ``width_px`` x ``height_px`` level-0 px.

    ``cell_um``: the cell side in µm, ``cell_px`` in level-0 px; ``counts``: (rows, cols) int64.
    """

    width_px: int
    height_px: int
    level0_mpp: float
    cell_um: float
    counts: np.ndarray

    @classmethod
    def for_slide(cls, dimensions: tuple[int, int], level0_mpp: float) -> DensityGrid:
        """An empty grid for a slide of ``dimensions`` (width, height) level-0 px at ``level0_mpp``."""
        w, h = int(dimensions[0]), int(dimensions[1])
        if not (w > 0 and h > 0 and math.isfinite(level0_mpp) and level0_mpp > 0):
            raise ValueError(f"a density grid needs a size and a resolution, got {dimensions} px at {level0_mpp} µm/px")
        longest_um = max(w, h) * level0_mpp
        cell = next((c for c in CELL_UM if longest_um / c <= MAX_CELLS), CELL_UM[-1])
        cell_px = cell / level0_mpp
        return cls(w, h, level0_mpp, float(cell), np.zeros((max(1, int(h // cell_px)), max(1, int(w // cell_px))), np.int64))

    @property
    def cell_px(self) -> float:
        return self.cell_um / self.level0_mpp

    def add(self, xy: np.ndarray) -> None:
        """Count the points ``xy`` ((n, 2) x, y in raw level-0 px); points beyond the last cell
        (or outside the slide) go to the nearest border cell."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if not len(xy):
            return
        rows, cols = self.counts.shape
        c = np.clip((xy[:, 0] // self.cell_px).astype(np.int64), 0, cols - 1)
        r = np.clip((xy[:, 1] // self.cell_px).astype(np.int64), 0, rows - 1)
        self.counts += np.bincount(r * cols + c, minlength=rows * cols).reshape(rows, cols)

    def edges_px(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell edges (x of cols + 1, y of rows + 1) in level-0 px; the last ones are the slide's edges."""
        rows, cols = self.counts.shape
        x = np.r_[np.arange(cols) * self.cell_px, self.width_px].astype(np.float64)
        y = np.r_[np.arange(rows) * self.cell_px, self.height_px].astype(np.float64)
        return x, y

    def cell_area_mm2(self) -> np.ndarray:
        """(rows, cols) area of each cell, mm² (the last row and column are wider)."""
        x, y = self.edges_px()
        return np.asarray(np.outer(np.diff(y), np.diff(x)) * (self.level0_mpp / 1000) ** 2)

    def per_mm2(self) -> np.ndarray:
        """(rows, cols) nuclei per mm² of each cell."""
        return np.asarray(self.counts / self.cell_area_mm2())

    def tissue_fraction(self, tissue: np.ndarray) -> np.ndarray:
        """(rows, cols) fraction of each cell that the tissue mask ``tissue`` (a bool thumbnail
        covering the whole slide) marks as tissue."""
        th, tw = tissue.shape
        rows, cols = self.counts.shape
        # each thumbnail pixel's centre, in level-0 px, decides its cell
        r = np.clip(((np.arange(th) + 0.5) * (self.height_px / th) // self.cell_px).astype(np.int64), 0, rows - 1)
        c = np.clip(((np.arange(tw) + 0.5) * (self.width_px / tw) // self.cell_px).astype(np.int64), 0, cols - 1)
        index = (r[:, None] * cols + c[None, :]).ravel()
        total = np.bincount(index, minlength=rows * cols)
        hit = np.bincount(index, weights=np.asarray(tissue, bool).ravel().astype(np.float64), minlength=rows * cols)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(np.where(total > 0, hit / np.maximum(total, 1), 0.0).reshape(rows, cols))


_DPI = 100


def density_png(grid: DensityGrid, thumb: np.ndarray, tissue: np.ndarray | None, title: str,
                panels: Sequence[tuple[str, DensityGrid]] = ()) -> bytes:
    """PNG bytes of the density of ``grid`` over ``thumb`` ((H, W, 3) uint8 of the whole slide);
    ``tissue``: the bool tissue mask on the thumbnail's grid (None: every cell is shown).
    ``panels``: more (title, grid) pairs (a typed model's nuclei per type), each drawn beside the
    first with its own colour scale, two panels to a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w_mm, h_mm = grid.width_px * grid.level0_mpp / 1000, grid.height_px * grid.level0_mpp / 1000
    width_in = 7.0
    height_in = float(np.clip(width_in * h_mm / w_mm, 2.5, 10.0))
    # the thumbnail at about the axes' pixel size (area averaging): matplotlib then draws it without
    # resampling a 2048 px image itself, which was half of this picture's time
    fit = max(thumb.shape[1] / (width_in * _DPI), thumb.shape[0] / (height_in * _DPI))
    if fit > 1:
        from PIL import Image

        thumb = np.asarray(Image.fromarray(thumb).reduce(int(fit)))
    every = [(title, grid), *panels]
    cols = 1 if len(every) == 1 else 2
    rows = (len(every) + cols - 1) // cols
    with _DRAW:
        fig = Figure(figsize=(width_in * cols, height_in * rows), dpi=_DPI)
        FigureCanvasAgg(fig)
        for i, (name, g) in enumerate(every):
            _panel(fig, fig.add_subplot(rows, cols, i + 1), g, thumb, tissue, name, (w_mm, h_mm))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _panel(fig: Any, ax: Any, grid: DensityGrid, thumb: np.ndarray, tissue: np.ndarray | None, title: str,
           size_mm: tuple[float, float]) -> None:
    """One density map with its colour bar on ``ax``."""
    density = grid.per_mm2()
    shown = grid.counts > 0
    if tissue is not None:
        shown |= grid.tissue_fraction(tissue) > 0
    else:
        shown[:] = True
    values = density[shown]
    vmax = float(np.percentile(values, 99)) if values.size else 0.0
    vmax = max(vmax, 1.0)
    clipped = bool(values.size and values.max() > vmax)
    w_mm, h_mm = size_mm
    x_mm, y_mm = (e * grid.level0_mpp / 1000 for e in grid.edges_px())
    ax.imshow(thumb, extent=(0, w_mm, h_mm, 0), interpolation="antialiased")
    image = ax.pcolormesh(x_mm, y_mm, np.ma.masked_array(density, ~shown), cmap="viridis", vmin=0, vmax=vmax, alpha=0.7)
    ax.set_xlim(0, w_mm)
    ax.set_ylim(h_mm, 0)
    ax.set_xlabel("mm")
    ax.set_ylabel("mm")
    ax.set_title("".join(ch if ch.isprintable() else " " for ch in title), fontsize=9, parse_math=False)  # a "$" is no TeX
    bar = fig.colorbar(image, ax=ax, extend="max" if clipped else "neither", shrink=0.85)
    bar.set_label(f"nuclei per mm² ({grid.cell_um:g} µm cells)")
