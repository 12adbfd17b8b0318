"""Nucleus instances -> valid polygons in level-0 pixels, with per-nucleus measurements.

Vectorised over all nuclei of a window (no Python loop per nucleus): every pixel edge between a
nucleus and anything else becomes a directed unit edge (nucleus on the right); edges are chained
into rings by a sort and pointer jumping; the ring runs through the edge midpoints, exactly the
outline marching squares draws at level 0.5 of the nucleus mask. Where two pixels of a nucleus
touch only at a corner, the chain turns right, so such parts become separate rings; each nucleus
keeps its largest outer ring (holes are filled). Rings are simplified, snapped to QuPath's
0.01 px grid and made valid with shapely's array functions.

Frames: ``labels`` is a window of working pixels whose top-left pixel is working pixel
(``origin_x``, ``origin_y``); working pixel (i, j) covers level-0 [j·s, (j+1)·s) × [i·s, (i+1)·s)
with s = ``scale``, so a point at pixel-centre coordinates (row r, col c) maps to level-0
x = (origin_x + c + 0.5)·s − shift_x, y = (origin_y + r + 0.5)·s − shift_y, where ``shift`` is the
OpenSlide bounds offset that QuPath crops away (0 to keep raw level-0 coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    level0_mpp: float
    shift_x: float = 0.0
    shift_y: float = 0.0


@dataclass(frozen=True)
class Nucleus:
    """One nucleus: its label id, exterior ring (level-0 px, closed, (n, 2) float array of x, y),
    measurements and type (0: none; 1..n: the model card's ``types``)."""

    label: int
    ring: np.ndarray
    measurements: dict[str, float]
    kind: int = 0


_OD_LUT: np.ndarray | None = None


def _hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of (..., 3) uint8 RGB, as ``skimage.color.rgb2hed(rgb)[..., 0]``
    computes it (Ruifrok & Johnston stain vectors), through a 256-entry lookup table."""
    global _OD_LUT
    from skimage.color import hed_from_rgb

    if _OD_LUT is None:
        v = np.maximum(np.arange(256) / 255.0, 1e-6)
        _OD_LUT = np.log(v) / np.log(1e-6)
    lut = _OD_LUT
    rgb = np.asarray(rgb)
    od = lut[rgb[..., 0]] * hed_from_rgb[0, 0] + lut[rgb[..., 1]] * hed_from_rgb[1, 0] + lut[rgb[..., 2]] * hed_from_rgb[2, 0]
    return np.asarray(np.maximum(od, 0.0))


# unit edge directions: 0 right (+col), 1 down (+row), 2 left, 3 up
_DROW = np.array([0, 1, 0, -1], np.int64)
_DCOL = np.array([1, 0, -1, 0], np.int64)


def _boundary_edges(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Directed unit edges between each labelled pixel and a differently labelled neighbour,
    oriented clockwise on screen (the nucleus on the right). Returns (label, dir, row, col) of each
    edge's start corner, in the padded corner grid."""
    p = np.pad(labels, 1)
    width = p.shape[1]
    flat = p.ravel()
    # the labelled pixels once (a nucleus window is mostly background), then their 4 neighbours
    at = np.flatnonzero(flat)
    lab_at = flat[at]
    out = []
    # (neighbour offset, direction, start-corner offset (drow, dcol)) for top, right, bottom, left sides
    for offset, direction, dr, dc in ((-width, 0, 0, 0), (1, 1, 0, 1), (width, 2, 1, 1), (-1, 3, 1, 0)):
        hit = np.flatnonzero(flat[at + offset] != lab_at)
        pos = at[hit]
        # padded pixel (r, c) is window pixel (r - 1, c - 1), whose corner grid row/col is r, c
        out.append((lab_at[hit], np.full(len(hit), direction, np.int8), pos // width + dr, pos % width + dc))
    lab = np.concatenate([o[0] for o in out]).astype(np.int64)
    d = np.concatenate([o[1] for o in out]).astype(np.int64)
    row = np.concatenate([o[2] for o in out]).astype(np.int64)
    col = np.concatenate([o[3] for o in out]).astype(np.int64)
    return lab, d, row, col


def _rings(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Outer rings of every label: (labels (k,), ring offsets (k+1,), rows, cols) of the ring
    vertices in the padded corner grid (midpoints of unit edges, collinear ones dropped)."""
    lab, d, row, col = _boundary_edges(labels)
    n = len(lab)
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, np.zeros(1, np.int64), e.astype(float), e.astype(float)
    width = labels.shape[1] + 3
    nv = (labels.shape[0] + 3) * width
    start = row * width + col
    end = (row + _DROW[d]) * width + (col + _DCOL[d])
    key_start = lab * nv + start
    key_end = lab * nv + end
    # A label's boundary is closed: every (label, corner) has as many edges ending as starting, so
    # the i-th smallest end key meets the i-th smallest start key (two sorts, no search).
    order_s = np.argsort(key_start, kind="stable")
    order_e = np.argsort(key_end, kind="stable")
    succ = np.empty(n, np.int64)
    succ[order_e] = order_s
    sorted_start = key_start[order_s]
    pinch = np.flatnonzero(sorted_start[1:] == sorted_start[:-1])  # two in, two out: take the right turn
    if len(pinch):
        s0, s1 = order_s[pinch], order_s[pinch + 1]
        for e in (order_e[pinch], order_e[pinch + 1]):
            succ[e] = np.where(d[s1] == (d[e] + 1) % 4, s1, s0)
    # ring id = smallest edge index in the cycle (pointer jumping)
    rep = np.arange(n)
    jump = succ.copy()
    while True:
        new = np.minimum(rep, rep[jump])
        if np.array_equal(new, rep):
            break
        rep, jump = new, jump[jump]
    # position along the ring: cut each cycle before its representative, rank by pointer jumping
    idx = np.arange(n)
    nxt = np.where(succ == rep, idx, succ)  # the edge before the representative ends its list
    rank = (nxt != idx).astype(np.int64)
    while True:
        more = rank[nxt]
        if not more.any():
            break
        rank = rank + more
        nxt = nxt[nxt]
    ring_order = np.argsort(rep * (n + 1) + (n - rank))  # by ring, then along it (one int64 sort)
    rep_o, d_o = rep[ring_order], d[ring_order]
    mid_r = row[ring_order] + 0.5 * _DROW[d_o]
    mid_c = col[ring_order] + 0.5 * _DCOL[d_o]
    starts = np.flatnonzero(np.r_[True, rep_o[1:] != rep_o[:-1]])
    ring_of = np.cumsum(np.r_[True, rep_o[1:] != rep_o[:-1]]) - 1
    lengths = np.diff(np.r_[starts, len(rep_o)])
    # next direction along the ring (cyclic); a midpoint is a vertex where the step vector changes
    pos = np.arange(len(rep_o)) - starts[ring_of]
    nxt_i = starts[ring_of] + (pos + 1) % lengths[ring_of]
    prv_i = starts[ring_of] + (pos - 1) % lengths[ring_of]
    step = (_DROW[d_o] + _DROW[d_o[nxt_i]]) * 4 + (_DCOL[d_o] + _DCOL[d_o[nxt_i]])  # 2x step vector, coded
    keep = step != step[prv_i]
    # signed area (shoelace on all midpoints); outer rings are clockwise on screen = positive here
    area2 = np.bincount(ring_of, weights=mid_c * mid_r[nxt_i] - mid_c[nxt_i] * mid_r)
    ring_lab = lab[ring_order][starts]
    outer = area2 > 0
    # per label, its largest outer ring
    cand = np.flatnonzero(outer)
    best = cand[np.lexsort((area2[cand], ring_lab[cand]))]
    last = np.r_[ring_lab[best][1:] != ring_lab[best][:-1], True]
    chosen = best[last]
    sel = keep & np.isin(ring_of, chosen)
    ring_sel = ring_of[sel]
    # rings in label order
    lab_of_ring = ring_lab[chosen]
    rank_of_ring = np.empty(len(ring_lab), np.int64)
    rank_of_ring[chosen[np.argsort(lab_of_ring, kind="stable")]] = np.arange(len(chosen))
    o = np.argsort(rank_of_ring[ring_sel], kind="stable")
    rr, cc, rs = mid_r[sel][o], mid_c[sel][o], rank_of_ring[ring_sel][o]
    counts = np.bincount(rs, minlength=len(chosen))
    offsets = np.r_[0, np.cumsum(counts)]
    return np.sort(lab_of_ring), offsets, rr, cc


def _moments(labels: np.ndarray, present: np.ndarray, ids: np.ndarray, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-label pixel count, eccentricity and means of ``extra`` images, for ``ids``;
    ``present``: every label of ``labels`` but 0, sorted."""
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    lab = flat[nz]
    w = labels.shape[1]
    y, x = (nz // w).astype(np.float64), (nz % w).astype(np.float64)
    # compact label ids to 0..k-1 (a search in the k labels, cheaper than np.unique's sort)
    uniq = np.asarray(present)
    inv = np.searchsorted(uniq, lab)
    k = len(uniq)
    cnt = np.bincount(inv, minlength=k).astype(np.float64)
    mx, my = np.bincount(inv, x, k) / cnt, np.bincount(inv, y, k) / cnt
    sxx = np.bincount(inv, x * x, k) / cnt - mx * mx
    syy = np.bincount(inv, y * y, k) / cnt - my * my
    sxy = np.bincount(inv, x * y, k) / cnt - mx * my
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    big, small = tr / 2 + disc, tr / 2 - disc
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where((big > 0) & (cnt >= 3), np.sqrt(np.clip(1 - np.maximum(small, 0) / big, 0, 1)), 0.0)
    at = np.searchsorted(uniq, ids)
    out = {"count": cnt[at], "eccentricity": ecc[at]}
    for name, img in extra.items():
        vals = img.ravel()[nz] if img.ndim == 2 else img
        out[name] = (np.bincount(inv, vals.astype(np.float64), k) / cnt)[at]
    return out


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
    written invalid). Only the outer ring of the largest part is kept (holes are filled).
    """
    import shapely

    ids, offsets, rows, cols = _rings(np.asarray(labels))
    if len(ids) == 0:
        return []
    s = frame.scale
    # padded corner grid -> level-0 px: corner c of the window is working px origin + c - 1
    xs = (cols - 1 + frame.origin_x) * s - frame.shift_x
    ys = (rows - 1 + frame.origin_y) * s - frame.shift_y
    counts = np.diff(offsets)
    ok = counts >= 3
    ring_index = np.repeat(np.arange(len(ids)), counts)
    sel = ok[ring_index]
    # on QuPath's 0.01 px grid from the start; simplification keeps a subset of these vertices
    xy = np.round(np.column_stack([xs[sel], ys[sel]]) / GRID) * GRID
    idx = np.flatnonzero(ok)  # position in ``ids`` of each polygon below
    geoms = (
        shapely.polygons(shapely.linearrings(xy, indices=np.repeat(np.arange(len(idx)), counts[ok]))) if len(idx) else np.empty(0, object)
    )
    if simplify_px > 0:
        geoms = shapely.simplify(geoms, simplify_px * s, preserve_topology=True)
    bad = ~shapely.is_valid(geoms) | (shapely.get_type_id(geoms) != 3)
    for k in np.flatnonzero(bad):  # rare: repair, keep the largest polygon part
        g = shapely.set_precision(shapely.make_valid(geoms[k]), GRID)
        parts = [p for p in shapely.get_parts(g) if p.geom_type == "Polygon" and p.area > 0] if not g.is_empty else []
        geoms[k] = shapely.polygons(shapely.get_exterior_ring(max(parts, key=lambda p: p.area))) if parts else None
    present = np.array([g is not None for g in geoms], bool)
    geoms, idx = geoms[present], idx[present]
    geoms = shapely.polygons(shapely.get_exterior_ring(geoms))  # holes filled
    geoms = shapely.orient_polygons(geoms, exterior_cw=False)  # the exterior of a valid polygon is valid
    area = shapely.area(geoms)
    valid = area > 0
    geoms, idx, area = geoms[valid], idx[valid], area[valid]
    perim = shapely.length(geoms)
    hull = shapely.area(shapely.convex_hull(geoms))
    coords, which = shapely.get_coordinates(geoms, return_index=True)
    coords = np.round(coords, 2)
    cuts = np.searchsorted(which, np.arange(1, len(geoms)))
    rings = np.split(coords, cuts)
    extra: dict[str, Any] = {}
    if probability is not None:
        extra["probability"] = np.asarray(probability, np.float32)
    if rgb is not None:
        fg = np.asarray(labels).ravel() > 0
        extra["hematoxylin"] = _hematoxylin_od(np.asarray(rgb).reshape(-1, 3)[fg])
    m = _moments(np.asarray(labels), ids, ids[idx], extra)
    mpp = frame.level0_mpp
    area_um = np.round(area * mpp * mpp, 3)
    perim_um = np.round(perim * mpp, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.round(np.where(perim > 0, np.minimum(1.0, 4 * math.pi * area / (perim * perim)), 0.0), 4)
        solid = np.round(np.where(hull > 0, area / hull, 1.0), 4)
    columns = {"Area µm^2": area_um, "Perimeter µm": perim_um, "Circularity": circ, "Solidity": solid,
               "Eccentricity": np.round(m["eccentricity"], 4)}
    if probability is not None:
        columns["Nucleus probability"] = np.round(m["probability"], 4)
    if rgb is not None:
        columns["Hematoxylin OD mean"] = np.round(m["hematoxylin"], 4)
    names = list(columns)
    # one tolist() for every value: Python floats without a numpy scalar per value
    rows = np.column_stack([np.asarray(columns[k], np.float64) for k in names]).tolist()
    return [Nucleus(lab, rings[j], dict(zip(names, row))) for j, (lab, row) in enumerate(zip(ids[idx].tolist(), rows))]
