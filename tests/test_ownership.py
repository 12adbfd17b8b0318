"""The chunk-ownership rule (instances.own_by_centroid): every nucleus kept by exactly one chunk."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_nuclei.nuclei.instances import IDS_PER_CHUNK, own_by_centroid

HALO, CORE = 16, 64


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _windows(slide: np.ndarray) -> list[tuple[int, tuple[int, int], np.ndarray]]:
    """(chunk index, core origin (y, x), window labels) of a slide cut into CORE chunks + HALO."""
    rows, cols = -(-slide.shape[0] // CORE), -(-slide.shape[1] // CORE)
    padded = np.pad(slide, HALO + CORE)
    out = []
    for r in range(rows):
        for c in range(cols):
            y, x = r * CORE, c * CORE
            win = padded[y + CORE : y + CORE + CORE + 2 * HALO, x + CORE : x + CORE + CORE + 2 * HALO]
            out.append((r * cols + c, (y, x), win))
    return out


def _owners(slide: np.ndarray) -> tuple[dict[int, list[int]], int]:
    """Slide nucleus id -> chunks that own it; total of the cut counts."""
    owners: dict[int, list[int]] = {}
    cut = 0
    for index, origin, win in _windows(slide):
        owned = own_by_centroid(win, HALO, CORE, origin, slide.shape, index)
        cut += owned.cut
        assert owned.labels.dtype == np.uint32 and owned.count == len(np.unique(owned.labels[owned.labels > 0]))
        for gid in np.unique(owned.labels[owned.labels > 0]):
            assert gid // IDS_PER_CHUNK == index  # ids are chunk index * 2**16 + local id
            source = np.unique(win[owned.labels == gid])
            assert len(source) == 1  # an owned id is exactly one input nucleus
            owners.setdefault(int(source[0]), []).append(index)
    return owners, cut


def test_discs_across_chunk_borders_are_kept_once():
    slide = np.zeros((128, 128), np.int32)
    rng = np.random.default_rng(3)
    centres = [(64, 64), (30, 64), (64, 10), (100, 63), (63.5, 100)]  # on, beside and across borders
    centres += [tuple(rng.uniform(5, 123, 2)) for _ in range(20)]
    for i, (cy, cx) in enumerate(centres, 1):
        slide[_disc(slide.shape, cy, cx, 4) & (slide == 0)] = i
    present = set(np.unique(slide[slide > 0]).tolist())
    owners, cut = _owners(slide)
    assert set(owners) == present  # no nucleus lost
    assert all(len(v) == 1 for v in owners.values())  # none kept twice
    assert cut == 0


def test_a_nucleus_exactly_on_the_border_goes_to_the_lower_right_chunk():
    slide = np.zeros((64, 128), np.int32)
    slide[20:29, 60:69] = 1  # columns 60..68: centroid x = 64.0, the first column of chunk 1
    owners, _ = _owners(slide)
    assert owners == {1: [1]}
    slide[:] = 0
    slide[20:29, 59:68] = 2  # centroid x = 63.5: still chunk 0
    assert _owners(slide)[0] == {2: [0]}


def test_a_nucleus_wider_than_the_halo_is_reported_as_cut():
    slide = np.zeros((64, 128), np.int32)
    slide[28:36, 30:100] = 1  # 70 px wide: no window sees it whole
    owners, cut = _owners(slide)
    assert cut >= 1  # the pipeline warns "raise --halo"
    assert set(owners) <= {1}


def test_nothing_outside_the_slide_is_owned_and_ids_overflow_is_refused():
    win = np.zeros((CORE + 2 * HALO,) * 2, np.int32)
    win[HALO + 40 : HALO + 44, HALO + 40 : HALO + 44] = 5  # centroid at slide (y, x) = (41.5, 41.5)
    assert own_by_centroid(win, HALO, CORE, (0, 0), (100, 100), 0).count == 1
    assert own_by_centroid(win, HALO, CORE, (0, 0), (40, 100), 0).count == 0  # beyond the slide's last row
    assert own_by_centroid(np.zeros_like(win), HALO, CORE, (0, 0), (100, 100), 3).count == 0
    many = np.arange(1, 256 * 257 + 1, dtype=np.int64).reshape(256, 257)  # 65,792 one-pixel nuclei
    with pytest.raises(OverflowError, match="more than 65535"):
        own_by_centroid(many, 0, 256, (0, 0), (256, 257), 0)


def test_overlapping_finds_the_later_version_of_a_nucleus():
    from wsi_nuclei.nuclei.instances import overlapping

    under = np.zeros((20, 20), np.uint32)
    under[2:8, 2:8] = 5  # an earlier chunk's nucleus
    window = np.zeros_like(under)
    window[3:9, 3:9] = 70000  # the same nucleus, predicted a pixel off by the later chunk
    window[12:16, 12:16] = 70001  # a nucleus only the later chunk has
    window[8:10, 2:4] = 70002  # touching the earlier nucleus without sharing a pixel
    assert overlapping(window, under).tolist() == [70000]
    assert overlapping(np.zeros_like(window), under).size == 0


def test_canvas_shows_what_earlier_windows_painted(tmp_path):
    from wsi_nuclei.outputs.store import LabelCanvas, create_store

    create_store(tmp_path / "m.zarr", (300, 300), 100, 0.5, {})
    canvas = LabelCanvas(tmp_path / "m.zarr", 100)
    first = np.zeros((140, 140), np.uint32)  # chunk (0, 0): core 100 + halo 20
    first[100:130, 90:110] = 9  # reaches into chunk (0, 1)'s and (1, 0)'s cores
    canvas.paste(0, 0, -20, -20, first)
    seen = canvas.under(-20, 80, (140, 140))  # chunk (0, 1)'s window
    assert seen.shape == (140, 140) and set(np.unique(seen).tolist()) == {0, 9}
    assert (seen == 9).sum() == (first == 9)[:, 100:].sum()  # the part inside (0, 1)'s window, x >= 80
    assert not canvas.under(180, 180, (140, 140)).any()  # nothing painted there


def test_drop_features_removes_exactly_those_ids():
    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons
    from wsi_nuclei.outputs.geojson import drop_features, encode_nuclei

    labels = np.zeros((40, 40), np.uint32)
    labels[2:10, 2:10], labels[15:25, 15:25], labels[30:36, 5:12] = 7, 8, 9
    blob = b",\n".join(encode_nuclei(label_polygons(labels, PolygonFrame(0, 0, 1.0, 0.5)), "s"))
    kept, removed = drop_features(blob, "s", [8, 123])
    assert removed == 1 and kept.count(b'"type":"Feature"') == 2
    assert drop_features(kept, "s", [7, 9]) == (b"", 2)
    assert drop_features(blob, "s", []) == (blob, 0)
