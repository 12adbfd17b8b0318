"""density.png (issue 17): nuclei per mm² on a coarse grid, counted chunk by chunk, drawn over the thumbnail."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wsi_nuclei.outputs.density import CELL_UM, MAX_CELLS, DensityGrid, density_png


@pytest.mark.parametrize("size_px, mpp", [((2000, 1000), 0.5), ((2967, 2220), 0.499), ((50000, 40000), 0.5), ((10**6, 10**6), 0.25)])
def test_the_cell_is_the_smallest_that_keeps_the_grid_coarse(size_px, mpp):
    grid = DensityGrid.for_slide(size_px, mpp)
    longest_um = max(size_px) * mpp
    assert grid.cell_um in CELL_UM
    smaller = [c for c in CELL_UM if c < grid.cell_um]
    assert longest_um / grid.cell_um <= MAX_CELLS or grid.cell_um == CELL_UM[-1]
    assert all(longest_um / c > MAX_CELLS for c in smaller)
    assert grid.counts.shape == (max(1, int(size_px[1] * mpp // grid.cell_um)), max(1, int(size_px[0] * mpp // grid.cell_um)))


def test_counts_per_mm2_and_the_wider_last_cells():
    grid = DensityGrid.for_slide((2100, 1000), 0.5)  # 1.05 x 0.5 mm: 100 µm cells = 200 px
    assert grid.cell_um == 100 and grid.counts.shape == (5, 10)
    rng = np.random.default_rng(0)
    grid.add(rng.uniform(0, 199.9, (10, 2)))  # 10 nuclei in the top-left cell
    grid.add(np.array([[2050.0, 950.0], [5000.0, -3.0]]))  # the last cell (300 px wide), and one outside: the nearest cell
    area = grid.cell_area_mm2()
    assert area[0, 0] == pytest.approx(0.01) and area[4, 9] == pytest.approx(0.015)  # 0.1 x 0.15 mm
    density = grid.per_mm2()
    assert density[0, 0] == pytest.approx(10 / 0.01) and density[4, 9] == pytest.approx(1 / 0.015)
    assert grid.counts[0, 9] == 1 and grid.counts.sum() == 12
    assert area.sum() == pytest.approx(1.05 * 0.5)


def test_tissue_fraction_per_cell():
    grid = DensityGrid.for_slide((2000, 1000), 0.5)  # 10 x 5 cells
    tissue = np.zeros((100, 200), bool)  # a thumbnail at 10 level-0 px per pixel
    tissue[:, :100] = True  # the left half
    frac = grid.tissue_fraction(tissue)
    assert frac.shape == (5, 10) and np.all(frac[:, :5] == 1) and np.all(frac[:, 5:] == 0)


def test_the_picture_is_a_png_and_the_same_every_time():
    grid = DensityGrid.for_slide((2000, 1000), 0.5)
    rng = np.random.default_rng(1)
    grid.add(rng.uniform((0, 0), (2000, 1000), (500, 2)))
    thumb = np.full((100, 200, 3), 230, np.uint8)
    tissue = np.ones((100, 200), bool)
    a = density_png(grid, thumb, tissue, "a slide")
    assert a == density_png(grid, thumb, tissue, "a slide")  # a resumed run writes the same file
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.width > 400
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20  # a colour scale, not a blank figure
    empty = DensityGrid.for_slide((2000, 1000), 0.5)
    assert Image.open(io.BytesIO(density_png(empty, thumb, None, "no nuclei"))).format == "PNG"
