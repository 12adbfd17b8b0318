"""Infer only tissue (issue 15): each chunk window is inferred over its tissue box, the tissue's
bounding box in the window dilated by the halo (a nucleus at the tissue edge stays whole) and one
tissue-mask pixel (the mask's own resolution: one thumbnail pixel, up to 2048 per slide side),
rounded out to the 32 px grid. Outside the box the probability is 0. Inside it the output equals
the whole-window run's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.outputs.store import open_array
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_slide
from wsi_nuclei.pipeline.tiling import derive_tiling, plan_chunks, tissue_box
from wsi_nuclei.training.metrics import aji

from .slides import disc_image, write_pyramid


def test_an_island_smaller_than_a_mask_pixel_gets_a_box_holding_it_and_a_nucleus_around_it():
    tissue = np.zeros((64, 64), bool)
    tissue[20, 30] = True  # one mask pixel = 8 working px: working px 240..248 x, 160..168 y
    box = tissue_box(tissue, 8.0, 0, 0, 512, 64)
    assert box is not None and all(v % 32 == 0 for v in box)
    x0, y0, x1, y1 = box
    assert x0 <= 240 - 64 and x1 >= 248 + 64 and y0 <= 160 - 64 and y1 >= 168 + 64  # the pixel, dilated by the halo
    assert x1 - x0 <= 8 + 2 * (64 + 8) + 64 and y1 - y0 <= 8 + 2 * (64 + 8) + 64  # and not much more


def test_tissue_just_outside_a_window_and_no_tissue():
    tissue = np.zeros((64, 64), bool)
    tissue[10, 40] = True  # working x 320..328: 8 px right of a window ending at 312
    box = tissue_box(tissue, 8.0, 0, 0, 312 // 32 * 32 + 32, 32)
    assert box is not None and box[2] == 320  # clipped to the window
    assert tissue_box(np.zeros((64, 64), bool), 8.0, 0, 0, 256, 32) is None


def test_plan_chunks_gives_a_box_only_where_it_saves():
    tiling = derive_tiling(0.5, 256, 32, 64)
    tissue = np.zeros((40, 40), bool)
    tissue[:, :] = True
    chunks, _ = plan_chunks(640, 640, tiling, tissue, 16.0)
    middle = next(ch for ch in chunks if (ch.row, ch.col) == (1, 1))
    assert middle.infer is None  # all tissue: the whole window
    tissue[:] = False
    tissue[2:4, 2:4] = True  # a small island in the first chunk
    chunks, _ = plan_chunks(640, 640, tiling, tissue, 16.0)
    assert [ch.index for ch in chunks] == [0] and chunks[0].infer is not None
    x0, y0, x1, y1 = chunks[0].infer
    assert x1 - x0 < tiling.window and y1 - y0 < tiling.window


def _edge_slide(path: Path) -> Path:
    """A tissue patch on glass with nuclei everywhere in it, several of them cut by its edge."""
    img = np.full((1024, 1024, 3), 242, np.uint8)
    patch = disc_image((420, 380), [(x, y) for y in range(14, 420, 30) for x in range(14, 380, 30)], 7.0, seed=41)
    img[300:720, 350:730] = patch
    # nuclei straddling the patch's left edge: half on tissue, half on glass
    edge = disc_image((420, 40), [(20, y) for y in range(20, 420, 40)], 7.0, seed=42)
    img[300:720, 330:370] = np.where(edge.mean(axis=2, keepdims=True) < 200, edge, img[300:720, 330:370])
    return write_pyramid(path, img, 0.5, levels=2)


def _compare(slide: Path, out: Path, boxed: Path | None = None, **opts) -> tuple[dict, dict]:
    """Segment ``slide`` by tissue boxes (or take that run from ``boxed``) and in whole windows."""
    if boxed is None:
        boxed = out / "box"
        segment_slide(slide, boxed, SegmentConfig(**opts))
    segment_slide(slide, out / "whole", SegmentConfig(**opts, whole_windows=True))
    box, whole = (json.loads((d / "summary.json").read_text()) for d in (boxed, out / "whole"))
    lb, lw = (np.asarray(open_array(d / "mask.zarr", "labels", 0)[:]).astype(np.int64) for d in (boxed, out / "whole"))
    assert box["nuclei"] == whole["nuclei"] and box["nuclei"] > 0
    assert aji(lw, lb) >= 0.995
    pb, pw = (np.asarray(open_array(d / "mask.zarr", "probability", 0)[:]).astype(int) for d in (boxed, out / "whole"))
    inside = lb > 0  # on every nucleus, the probabilities agree within the measured context tolerance
    assert np.abs(pb - pw)[inside].max() <= 255 * 0.01
    assert box["inferred_px"] < whole["inferred_px"]
    return box, whole


def test_nuclei_on_the_tissue_edge_are_kept_whole(tmp_path):
    slide = _edge_slide(tmp_path / "edge.tif")
    box, whole = _compare(slide, tmp_path, chunk_size=512, halo=32)  # the card's measured context
    assert box["amplification"] < whole["amplification"]


@pytest.mark.slow
def test_the_bundled_slide_gives_the_same_nuclei_with_tissue_boxes(bundled_run, tmp_path):
    from wsi_nuclei.api import SAMPLE_SLIDE

    box, whole = _compare(SAMPLE_SLIDE, tmp_path, bundled_run / "CMU-1-Small-Region")  # the defaults: tissue boxes
    assert box["inferred_px"] <= 0.8 * whole["inferred_px"]


def test_the_read_is_the_part_the_model_is_given():
    """Only a window's tissue box and its context are decoded: window_extent is exactly what
    window_probabilities hands the model, and a part read equals the whole read inside the part
    (the bundled slide: 0.499 µm/px, resampled; so the filter edges are exercised)."""
    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.model.infer import window_extent, window_probabilities
    from wsi_nuclei.slides.reader import open_slide

    seen: list[tuple[int, int]] = []

    def predict(x: np.ndarray) -> np.ndarray:
        seen.extend([x.shape[1:3]] * len(x))
        return np.ones((len(x), 1, *x.shape[1:3]), np.float32)

    ctx = 64
    for side, tile, box in ((512, 512, (96, 32, 320, 480)), (512, 256, (96, 32, 224, 192)), (512, 128, (0, 0, 512, 512))):
        image = np.full((side + 2 * ctx,) * 2 + (3,), 255, np.uint8)
        x0, y0, x1, y1 = window_extent(side, tile, ctx, box)
        image[y0:y1, x0:x1] = 7  # the model must see only these pixels
        seen.clear()
        calls: list[np.ndarray] = []

        def spy(x: np.ndarray) -> np.ndarray:
            calls.append(x)
            return predict(x)

        probs, inferred = window_probabilities(spy, 1, image, tile, ctx, 4, box)
        assert all((c == 7).all() for c in calls) and inferred == sum(h * w for h, w in seen)
        assert probs[0, box[1] : box[3], box[0] : box[2]].all()  # the whole box got probabilities
    assert window_extent(512, 512, ctx, None) == (0, 0, 640, 640)

    with open_slide(SAMPLE_SLIDE) as slide:
        scale = 0.5 / slide.info.level0_mpp
        box = (300, 400, 1000, 900)
        whole = slide.read_working(box, scale)
        for part in ((0, 0, 200, 300), (137, 211, 613, 899), (500, 1, 1000, 2), (0, 0, 1000, 900)):
            got = slide.read_working_part(box, scale, part)
            x0, y0, x1, y1 = part
            assert np.array_equal(got[y0:y1, x0:x1], whole[y0:y1, x0:x1]), part
            rest = np.ones(whole.shape[:2], bool)
            rest[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False
            assert (got[rest] == 255).all()  # not read: white


def test_round_box_grows_to_the_step_inside_the_window():
    from wsi_nuclei.model.infer import round_box

    assert round_box((64, 96, 320, 224), 1664, 32) == (64, 96, 320, 224)  # the 32 px grid: as it is
    assert round_box(None, 1664, 256) is None
    x0, y0, x1, y1 = round_box((64, 96, 320, 224), 1664, 256)
    assert (x1 - x0, y1 - y0) == (256, 256) and x0 <= 64 and x1 >= 320 and y0 <= 96 and y1 >= 224
    assert round_box((1600, 0, 1664, 1000), 1664, 512) == (1152, 0, 1664, 1024)  # shifted inward at the edge
    assert round_box((0, 0, 1500, 1500), 1664, 512) == (0, 0, 1536, 1536)
    assert round_box((0, 0, 1600, 1600), 1664, 1024) == (0, 0, 1664, 1664)  # never past the window


@pytest.mark.slow
def test_boxes_rounded_to_fewer_shapes_give_the_same_nuclei(bundled_run, tmp_path):
    """--box-step grows each tissue box to fewer input shapes (a compiled backend prepares per
    shape) and keeps its probabilities only inside the tissue box: the same nuclei, with the
    same outlines, as the unrounded boxes of the default run."""
    import gzip

    from wsi_nuclei.api import SAMPLE_SLIDE

    ref = bundled_run / "CMU-1-Small-Region"
    segment_slide(SAMPLE_SLIDE, tmp_path / "r", SegmentConfig(box_step=512))
    a, b = (json.loads(gzip.open(d / "nuclei.geojson.gz").read())["features"] for d in (ref, tmp_path / "r"))
    assert len(a) == len(b) > 1000
    assert all(x["geometry"] == y["geometry"] for x, y in zip(a, b))
    for x, y in zip(a, b):  # per-nucleus means: float rounding of another input shape at most
        for k, v in x["properties"]["measurements"].items():
            assert y["properties"]["measurements"][k] == pytest.approx(v, abs=2e-3), k
    ra, rb = (json.loads((d / "summary.json").read_text()) for d in (ref, tmp_path / "r"))
    assert rb["inferred_px"] > ra["inferred_px"]  # the rounding is real: more pixels given
    pa, pb = (np.asarray(open_array(d / "mask.zarr", "probability", 0)[:]).astype(int) for d in (ref, tmp_path / "r"))
    diff = np.abs(pa - pb)  # 0 outside the same tissue boxes; inside, within the measured context's tolerance
    assert diff.max() <= 255 * 0.05 and np.percentile(diff, 99.9) <= 1


def test_no_tissue_mask_still_counts_only_tissue_as_tissue(tmp_path):
    """--no-tissue-mask processes every chunk, glass included, but the tissue area (and so
    nuclei_per_mm2 and the amplification) is still the tissue's, not the slide's."""
    from wsi_nuclei.pipeline.plan import model_card, plan_slide

    slide = _edge_slide(tmp_path / "edge.tif")
    cfg = SegmentConfig(chunk_size=512, halo=32)
    card = model_card(cfg)
    masked, _, _ = plan_slide(slide, tmp_path / "a", cfg, card)
    every, _, _ = plan_slide(slide, tmp_path / "b", SegmentConfig(chunk_size=512, halo=32, tissue_mask=False), card)
    whole_mm2 = masked.size[0] * masked.size[1] * (card.working_mpp / 1000) ** 2
    assert all(ch.infer is None for ch in every.chunks) and any(ch.infer is not None for ch in masked.chunks)  # glass inferred too
    assert every.tissue_mm2 == masked.tissue_mm2 < 0.5 * whole_mm2
