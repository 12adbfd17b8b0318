"""The model context measurement: tiled == whole-image at the instance level, per model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wsi_nuclei.training.context import ContextRow, measure_context, pick_context  # noqa: E402


def _row(c: int, ok: bool) -> ContextRow:
    return ContextRow(c, 0.0, 0.0, 1.0 if ok else 0.9, 0 if ok else 3, 10, 10, ok)


def test_pick_context_needs_every_larger_context_to_pass():
    assert pick_context([_row(0, False), _row(32, True), _row(64, True)]) == 32
    assert pick_context([_row(0, False), _row(32, True), _row(64, False), _row(96, True)]) == 96
    assert pick_context([_row(0, False), _row(32, False)]) is None


def _cmu_window(side: int, card) -> np.ndarray:
    from wsi_nuclei.slides.reader import open_slide

    path = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs"
    with open_slide(path) as s:
        return s.read_working((900, 1300, side, side), card.working_mpp / s.info.level0_mpp)


def test_a_per_pixel_model_needs_no_context():
    from dataclasses import replace

    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import ModelCard, PostProcess, build_model

    torch.manual_seed(0)
    net = build_model("none", 1, architecture="PixelLinear").eval()
    with torch.no_grad():  # "dark pixel = nucleus": the normalised channels sum to < 1.5
        net.weight[:] = -2.0
        net.bias[:] = 3.0
    card = replace(ModelCard(encoder="none", outputs=("nucleus",), architecture="PixelLinear"),
                   postprocess=PostProcess(method="threshold", fg_threshold=0.5))
    predict, _ = make_predictor(net, card, "torch", "cpu")
    rows = measure_context(predict, card, _cmu_window(2 * 64 + 2 * 64, card), tile=64, candidates=(0, 32, 64))
    assert all(r.ok and r.max_abs < 1e-5 and r.aji == 1.0 for r in rows)
    assert rows[0].n_whole > 5  # it did find objects
    assert pick_context(rows) == 0


@pytest.mark.slow
def test_the_unet_needs_context_and_more_context_converges():
    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import load_model

    torch.set_num_threads(2)
    net, card = load_model()
    predict, _ = make_predictor(net, card, "torch", "cpu")
    rows = measure_context(predict, card, _cmu_window(2 * 128 + 2 * 192, card), tile=128, candidates=(0, 64, 192))
    by = {r.context: r for r in rows}
    assert not by[0].ok and by[0].p999_abs > 0.05  # a bare tile differs at its borders
    assert by[192].max_abs < by[64].max_abs < by[0].max_abs
    assert by[192].aji > by[0].aji and by[192].n_whole > 20


def test_segment_takes_the_context_from_the_card_unless_overridden():
    from dataclasses import replace

    from wsi_nuclei.model.network import load_card
    from wsi_nuclei.pipeline.plan import slide_tiling
    from wsi_nuclei.pipeline.segment import SegmentConfig
    from wsi_nuclei.pipeline.tiling import MODEL_CONTEXT_PX

    card = load_card(Path(__file__).resolve().parents[1] / "wsi_nuclei" / "weights")
    assert slide_tiling(SegmentConfig(), replace(card, context_px=96)).context == 96
    assert slide_tiling(SegmentConfig(context=64), replace(card, context_px=96)).context == 64
    assert slide_tiling(SegmentConfig(), replace(card, context_px=None)).context == MODEL_CONTEXT_PX  # an old card
    assert card.context_px is not None  # the shipped card carries its measured context
    assert slide_tiling(SegmentConfig(), card).context == card.context_px


@pytest.mark.slow
def test_measure_on_slide_writes_the_card(tmp_path):
    """The library call behind `measure-context`: on the bundled sample, one tile and a few
    candidates, the chosen context lands in a copy of the shipped card."""
    import shutil

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card
    from wsi_nuclei.training import context

    model_dir = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    result = context.measure_on_slide(model_dir, x=600, y=1000, tiles=1, write=True)
    assert result.region[2] == 256 + 2 * max(context.CANDIDATES) and result.slide.endswith("CMU-1-Small-Region.svs")
    assert [r.context for r in result.rows] == sorted(context.CANDIDATES)
    assert result.context_px == context.pick_context(result.rows) == load_card(model_dir).context_px
    assert result.as_dict()["rows"][0]["context"] == 0
