"""mask.zarr writing: the label canvas (each Zarr chunk written once) equals pasting window by
window with read-modify-write, on a grid with skipped chunks, clipped edges and overlaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.outputs.store import LabelCanvas, create_store, open_array


def paste_labels(path: Path, y: int, x: int, window: np.ndarray) -> None:
    """The reference (what assembly did before LabelCanvas): paint the non-zero pixels of a label
    ``window`` whose top-left is (y, x) (may be negative) into ``labels/0``; pixels outside the
    array are dropped. Read-modify-write: one caller only."""
    arr = open_array(path, "labels", 0, mode="r+")
    h, w = arr.shape
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(h, y + window.shape[0]), min(w, x + window.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    part = window[y0 - y : y1 - y, x0 - x : x1 - x]
    if not part.any():
        return
    current = arr[y0:y1, x0:x1]
    arr[y0:y1, x0:x1] = np.where(part > 0, part, current)


def _windows(shape, chunk, halo, seed):
    rng = np.random.default_rng(seed)
    rows, cols = -(-shape[0] // chunk), -(-shape[1] // chunk)
    out = []
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.25:  # a chunk without tissue: no window
                continue
            win = np.zeros((chunk + 2 * halo, chunk + 2 * halo), np.uint32)
            # blobs everywhere, also in the halo, so windows overlap with non-zero pixels
            for _ in range(12):
                y, x = rng.integers(0, win.shape[0] - 9, 2)
                win[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = (r * cols + c) * 2**16 + rng.integers(1, 500)
            out.append((r, c, r * chunk - halo, c * chunk - halo, win))
    return out


@pytest.mark.parametrize("shape,seed", [((200, 290), 0), ((256, 256), 1), ((97, 301), 2)])
def test_canvas_equals_read_modify_write(tmp_path, shape, seed):
    chunk, halo = 64, 16
    create_store(tmp_path / "a.zarr", shape, chunk, 0.5, {})
    create_store(tmp_path / "b.zarr", shape, chunk, 0.5, {})
    canvas = LabelCanvas(tmp_path / "b.zarr", chunk)
    windows = _windows(shape, chunk, halo, seed)
    for r, c, y, x, win in windows:
        paste_labels(tmp_path / "a.zarr", y, x, win)
        canvas.paste(r, c, y, x, win)
        assert len(canvas.blocks) <= 2 * (-(-shape[1] // chunk)) + 4  # about one grid row held, not the slide
    canvas.close()
    a = np.asarray(open_array(tmp_path / "a.zarr", "labels")[:])
    b = np.asarray(open_array(tmp_path / "b.zarr", "labels")[:])
    assert a.any() and np.array_equal(a, b)


def test_canvas_refuses_windows_out_of_order(tmp_path):
    create_store(tmp_path / "c.zarr", (128, 128), 64, 0.5, {})
    canvas = LabelCanvas(tmp_path / "c.zarr", 64)
    canvas.paste(0, 1, -16, 48, np.ones((96, 96), np.uint32))
    with pytest.raises(ValueError, match="out of row-major order"):
        canvas.paste(0, 0, -16, -16, np.ones((96, 96), np.uint32))


def test_inner_boundaries_equal_skimage():
    from skimage.segmentation import find_boundaries

    from wsi_nuclei.outputs.overlay import inner_boundaries

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (60, 70)).repeat(3, axis=0).repeat(2, axis=1).astype(np.uint32)
    labels[:10] = 0
    for lab in (labels, labels > 1):
        expected = find_boundaries(lab, connectivity=1, mode="inner")
        assert expected.any() and np.array_equal(inner_boundaries(lab), expected)


def test_results_doc_recipes_open_mask_zarr(tmp_path):
    """The ome-zarr-py and dask recipes of docs/results.md, run as written on a store written by store.py."""
    import re

    from wsi_nuclei.outputs.store import build_pyramids

    path = tmp_path / "OUT" / "slide" / "mask.zarr"
    create_store(path, (600, 700), 256, 0.5, {})
    ref = np.zeros((600, 700), np.uint32)
    ref[100:140, 200:260], ref[500:520, 650:690] = 7, 2**16 + 3
    open_array(path, "labels", 0, mode="r+")[:] = ref
    open_array(path, "probability", 0, mode="r+")[:] = 200
    build_pyramids(path, 256)
    readme = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "ome_zarr" in b]
    scope: dict[str, object] = {}
    exec(snippet.replace('"OUT/', f'"{tmp_path}/OUT/'), scope)
    labels = scope["labels"]
    assert np.array_equal(np.asarray(labels), ref)
    (line,) = [ln for ln in readme.splitlines() if "dask.array.from_zarr(" in ln]
    call = re.search(r"`(dask\.array\.from_zarr\(.*?\))`", line).group(1)
    import dask.array  # noqa: F401

    assert np.array_equal(np.asarray(eval(call.replace('"OUT/', f'"{tmp_path}/OUT/'))), ref)


@pytest.mark.parametrize("shape,chunk,seed", [((1100, 1500), 64, 4), ((1037, 2051), 96, 5), ((520, 530), 256, 6)])
def test_pyramid_written_while_level_0_is_equals_build_pyramids(tmp_path, shape, chunk, seed):
    """Levels 1… written block by block as level 0's blocks become final (labels through the
    canvas, probabilities chunk by chunk) equal build_pyramids after the fact, on grids with
    skipped chunks and clipped edges, and hold about one grid row per level, not the slide."""
    from wsi_nuclei.outputs.store import Pyramid, build_pyramids, pyramid_levels

    assert pyramid_levels(shape) >= 2
    halo = chunk // 4
    create_store(tmp_path / "ref.zarr", shape, chunk, 0.5, {})
    create_store(tmp_path / "new.zarr", shape, chunk, 0.5, {})
    ref_labels = LabelCanvas(tmp_path / "ref.zarr", chunk)
    labels = LabelCanvas(tmp_path / "new.zarr", chunk, Pyramid(tmp_path / "new.zarr", "labels", chunk))
    sampled_level = seed % 2  # level 0 or 1, at a size that is not a power of two of either
    sample = labels.pyramid.sample_level(sampled_level, (shape[0] // 3 + 1, shape[1] // 5 + 2))
    ref_prob = open_array(tmp_path / "ref.zarr", "probability", 0, mode="r+")
    prob = open_array(tmp_path / "new.zarr", "probability", 0, mode="r+")
    prob_levels = Pyramid(tmp_path / "new.zarr", "probability", chunk)
    cols = -(-shape[1] // chunk)
    rng = np.random.default_rng(seed)
    held = 0
    for r, c, y, x, win in _windows(shape, chunk, halo, seed):
        ref_labels.paste(r, c, y, x, win)
        labels.paste(r, c, y, x, win)
        core = rng.integers(1, 256, (min(chunk, shape[0] - r * chunk), min(chunk, shape[1] - c * chunk)), dtype=np.uint8)
        ref_prob[r * chunk : r * chunk + core.shape[0], c * chunk : c * chunk + core.shape[1]] = core
        prob[r * chunk : r * chunk + core.shape[0], c * chunk : c * chunk + core.shape[1]] = core
        prob_levels.add(r, c, core)
        prob_levels.flush(lambda rr, kk, index=r * cols + c: rr * cols + kk <= index)
        held = max(held, max(len(b) for b in labels.pyramid.blocks))
    ref_labels.close()
    build_pyramids(tmp_path / "ref.zarr", chunk)
    labels.close()
    prob_levels.close()
    assert held <= cols // 2 + 2
    levels = pyramid_levels(shape)
    for name in ("labels", "probability"):
        for k in range(levels):
            a = np.asarray(open_array(tmp_path / "ref.zarr", name, k)[:])
            b = np.asarray(open_array(tmp_path / "new.zarr", name, k)[:])
            assert a.any() and np.array_equal(a, b), (name, k)
        assert all(not blocks for blocks in (labels.pyramid if name == "labels" else prob_levels).blocks)
    # the overlay's sample of a level, filled while it was written, is that level resized afterwards
    from wsi_nuclei.model.infer import resize_labels

    whole = np.asarray(open_array(tmp_path / "ref.zarr", "labels", sampled_level)[:])
    assert sample.image.any() and np.array_equal(sample.image, resize_labels(whole, sample.image.shape))
