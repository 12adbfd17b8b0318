"""The vectorised outline extraction: exact geometry on known shapes."""

from __future__ import annotations

import numpy as np
from shapely.geometry import Polygon

from wsi_nuclei.nuclei.polygons import PolygonFrame, _hematoxylin_od, label_polygons

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


def _disc_labels(side: int = 160, seed: int = 0) -> np.ndarray:
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.int64)
    for k, (cy, cx) in enumerate(((y, x) for y in range(10, side, 20) for x in range(10, side, 20)), start=1):
        rr, cc = disk((cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)), rng.uniform(2, 9), shape=lab.shape)
        lab[rr, cc] = 3 * 65536 + k
    return lab


def test_feature_ids_equal_uuid5():
    import uuid

    from wsi_nuclei.outputs.geojson import _NAMESPACE, feature_id, feature_ids

    labels = [0, 1, 9, 65537, 4_294_967_295, *range(1000, 1200)]
    text = feature_ids("CMU-1.svs:2220x2967", labels)
    assert len(text) == 36 * len(labels)
    for i, label in enumerate(labels):
        expected = str(uuid.uuid5(_NAMESPACE, f"CMU-1.svs:2220x2967/{label}"))
        assert text[36 * i : 36 * i + 36].decode() == expected == feature_id("CMU-1.svs:2220x2967", label)


def test_pipeline_encoder_is_byte_identical_to_the_reference_features():
    """encode_nuclei (the pipeline's fast path) == encode_feature(feature(n)) for every nucleus,
    including the fallbacks: a non-finite measurement, numpy scalars, and degenerate shapes."""
    import dataclasses
    import json

    from wsi_nuclei.outputs.geojson import encode_feature, encode_nuclei, feature

    rng = np.random.default_rng(3)
    lab = _disc_labels()
    prob = rng.random(lab.shape).astype(np.float32)
    rgb = rng.integers(0, 256, (*lab.shape, 3), dtype=np.uint8)
    nuclei = label_polygons(lab, PolygonFrame(-7, 13, 2.0, 0.2527, 11.5, 3.25), prob, rgb)
    assert len(nuclei) > 40

    def reference(ns, key="s:1x1"):
        return [encode_feature(feature(n, key)) for n in ns]

    fast = encode_nuclei(nuclei, "s:1x1")
    assert fast == reference(nuclei)
    assert len({json.loads(b)["id"] for b in fast}) == len(nuclei)
    odd = list(nuclei)
    odd[3] = dataclasses.replace(odd[3], measurements={**odd[3].measurements, "Solidity": float("nan")})
    odd[5] = dataclasses.replace(odd[5], measurements={k: np.float32(v) for k, v in odd[5].measurements.items()})
    assert encode_nuclei(odd, "s:1x1") == reference(odd)
    assert json.loads(encode_nuclei(odd, "s:1x1")[3])["properties"]["measurements"]["Solidity"] == 0.0
    assert encode_nuclei([], "s:1x1") == []
    tiny = np.zeros((12, 12), np.int32)
    tiny[0, 0] = 1
    tiny[5, 5] = tiny[6, 6] = 2
    tiny[8:12, 0:2] = 3
    few = label_polygons(tiny, PolygonFrame(0, 0, 1.0, 0.5))
    assert encode_nuclei(few, "t:1x1") == reference(few, "t:1x1")
