"""Nucleus instances -> valid shapely polygons in level-0 pixels, with per-nucleus measurements.

Frames: ``labels`` is a window of working pixels whose top-left pixel is working pixel
(``origin_x``, ``origin_y``); working pixel (i, j) covers level-0 [j·s, (j+1)·s) × [i·s, (i+1)·s)
with s = ``scale``, so a point at pixel-centre coordinates (row r, col c) maps to level-0
x = (origin_x + c + 0.5)·s − shift_x, y = (origin_y + r + 0.5)·s − shift_y, where ``shift`` is the
OpenSlide bounds offset that QuPath crops away (0 to keep raw level-0 coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Nucleus", "PolygonFrame", "label_polygons"]

#: QuPath 0.6+ snaps coordinates to this grid (px); polygons are made valid on it before export.
GRID = 0.01


@dataclass(frozen=True)
class PolygonFrame:
    """Where a label window sits: working-px origin, level-0 px per working px, µm per level-0 px,
    and the level-0 offset subtracted from every coordinate (QuPath's bounds crop)."""

    origin_x: int
    origin_y: int
    scale: float
    mpp: float
    shift_x: float = 0.0
    shift_y: float = 0.0


@dataclass(frozen=True)
class Nucleus:
    """One nucleus: its label id, exterior ring (level-0 px, closed) and measurements."""

    label: int
    ring: list[tuple[float, float]]
    measurements: dict[str, float]


def _hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0]


def label_polygons(
    labels: np.ndarray,
    frame: PolygonFrame,
    probability: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    simplify_px: float = 0.3,
) -> list[Nucleus]:
    """Polygons and measurements of every object in ``labels`` (ascending label order).

    Parameters
    ----------
    labels : np.ndarray
        (H, W) integer labels, 0 = background.
    frame : PolygonFrame
        Position and scale of the window.
    probability : np.ndarray, optional
        (H, W) nucleus probability in [0, 1] for "Nucleus probability".
    rgb : np.ndarray, optional
        (H, W, 3) uint8 image for "Hematoxylin OD mean".
    simplify_px : float
        Douglas-Peucker tolerance in working px (topology preserving).

    Objects whose outline cannot be made a valid polygon of positive area are dropped (never
    written invalid). Only the outer ring is kept (holes in a nucleus are filled).
    """
    import shapely
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    out: list[Nucleus] = []
    hema = _hematoxylin_od(rgb) if rgb is not None else None
    s, mpp = frame.scale, frame.mpp
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == lab
        if not mask.any():
            continue
        mask = ndi.binary_fill_holes(mask)
        padded = np.pad(mask, 1).astype(np.float32)
        contours = find_contours(padded, 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        if len(ring) < 4:
            continue
        rows = ring[:, 0] - 1 + sl[0].start + frame.origin_y
        cols = ring[:, 1] - 1 + sl[1].start + frame.origin_x
        poly = Polygon(np.column_stack([(cols + 0.5) * s - frame.shift_x, (rows + 0.5) * s - frame.shift_y]))
        if simplify_px > 0:
            poly = poly.simplify(simplify_px * s, preserve_topology=True)
        poly = shapely.set_precision(shapely.make_valid(poly), GRID)
        if poly.geom_type == "MultiPolygon" or poly.geom_type == "GeometryCollection":
            parts = [g for g in getattr(poly, "geoms", []) if g.geom_type == "Polygon"]
            poly = max(parts, key=lambda g: g.area) if parts else Polygon()
        if poly.is_empty or poly.geom_type != "Polygon" or poly.area <= 0 or not poly.is_valid:
            continue
        poly = shapely.geometry.polygon.orient(Polygon(poly.exterior), 1.0)
        coords = [(round(x, 2), round(y, 2)) for x, y in poly.exterior.coords]
        if len(coords) < 4:
            continue
        area_px, perim_px = poly.area, poly.length
        hull = poly.convex_hull.area
        m = {
            "Area µm^2": round(area_px * mpp * mpp, 3),
            "Perimeter µm": round(perim_px * mpp, 3),
            "Circularity": round(min(1.0, 4 * math.pi * area_px / (perim_px * perim_px)) if perim_px > 0 else 0.0, 4),
            "Solidity": round(area_px / hull if hull > 0 else 1.0, 4),
            "Eccentricity": round(_eccentricity(mask), 4),
        }
        if probability is not None:
            m["Nucleus probability"] = round(float(probability[sl][mask].mean()), 4)
        if hema is not None:
            m["Hematoxylin OD mean"] = round(float(hema[sl][mask].mean()), 4)
        out.append(Nucleus(lab, coords, m))
    return out


def _eccentricity(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 0.0
    cov = np.cov(np.vstack([xs, ys]).astype(np.float64))
    ev = np.sort(np.linalg.eigvalsh(cov))
    if ev[1] <= 0:
        return 0.0
    return float(math.sqrt(max(0.0, 1.0 - max(ev[0], 0.0) / ev[1])))
