"""The vectorised outline extraction: exact geometry on known shapes."""

from __future__ import annotations

import numpy as np
from shapely.geometry import Polygon

from wsi_nuclei.polygons import PolygonFrame, _hematoxylin_od, label_polygons

FRAME = PolygonFrame(0, 0, 1.0, 0.5)


def test_square_outline_is_the_marching_squares_outline():
    lab = np.zeros((10, 10), np.int32)
    lab[2:6, 3:8] = 7  # 4 rows x 5 cols
    (n,) = label_polygons(lab, FRAME, simplify_px=0)
    poly = Polygon(n.ring)
    assert n.label == 7 and poly.is_valid
    # through the edge midpoints: corners cut by half a pixel -> area 4*5 - 4 * 1/8
    assert abs(poly.area - (20 - 0.5)) < 1e-9
    xs, ys = np.asarray(n.ring)[:, 0], np.asarray(n.ring)[:, 1]
    assert xs.min() == 3 and xs.max() == 8 and ys.min() == 2 and ys.max() == 6  # level-0 px, pixel corners at integers
    assert n.measurements["Area µm^2"] == round(poly.area * 0.25, 3)


def test_every_object_once_in_label_order_with_holes_filled():
    lab = np.zeros((30, 30), np.int32)
    lab[1:8, 1:8] = 5
    lab[3:5, 3:5] = 0  # hole
    lab[10:20, 10:14] = 2
    lab[22, 22] = 9
    out = label_polygons(lab, FRAME, simplify_px=0)
    assert [n.label for n in out] == [2, 5, 9]
    hole_filled = Polygon(out[1].ring)
    assert hole_filled.area > 7 * 7 - 1  # the hole is not cut out


def test_corner_touching_parts_keep_the_larger():
    lab = np.zeros((12, 12), np.int32)
    lab[1:5, 1:5] = 3
    lab[5:7, 5:7] = 3  # touches the first square only at a corner
    (n,) = label_polygons(lab, FRAME, simplify_px=0)
    poly = Polygon(n.ring)
    assert poly.is_valid and abs(poly.area - 15.5) < 1e-9  # the 4x4 part


def test_hematoxylin_lookup_equals_skimage():
    from skimage.color import rgb2hed

    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    assert np.abs(_hematoxylin_od(rgb) - rgb2hed(rgb)[..., 0]).max() < 1e-12
