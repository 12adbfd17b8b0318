"""Measure how much context a model needs: the smallest tile context for tiled == whole-image.

The model's output at a pixel depends on a neighbourhood much wider than a nucleus (UNet++ with a
5-stage encoder sees hundreds of pixels). A tile cut from a slide is missing that neighbourhood
near its borders, so every forward pass gets ``context`` px more on every side, which are then
cropped off. This module measures the smallest ``context`` (a multiple of 32) for which a tiled
run equals a whole-image run *at the instance level* on real tissue:

- AJI between the two instance maps ≥ ``aji_min`` (0.995),
- no nucleus of one without an IoU > 0.5 partner in the other (no duplicate, split or lost nuclei),
- the 99.9th percentile of |Δ nucleus probability| ≤ ``prob_tol`` (0.05).

Tiles are ``tile`` px (256 by default, smaller than the pipeline's chunk windows, so the test is
stricter than the pipeline: more pixels lie near a tile border). Frames: working px throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..model.network import ModelCard

__all__ = ["ContextRow", "ContextMeasurement", "measure_context", "measure_on_slide", "pick_context", "AJI_MIN", "PROB_TOL"]

log = logging.getLogger(__name__)

AJI_MIN = 0.995
PROB_TOL = 0.05
#: Contexts tried by default (working px).
CANDIDATES = tuple(range(0, 416, 32))
#: Top left (x, y), working px, of the default region on the bundled sample (tissue).
DEFAULT_REGION = (600, 1000)


@dataclass(frozen=True)
class ContextRow:
    """One tried context: probability differences and instance agreement with the whole run."""

    context: int
    max_abs: float
    p999_abs: float
    aji: float
    unmatched: int  # nuclei of either run with no IoU > 0.5 partner in the other
    n_whole: int
    n_tiled: int
    ok: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def measure_context(
    predict: Callable[[np.ndarray], np.ndarray],
    card: ModelCard,
    image: np.ndarray,
    tile: int = 256,
    candidates: Sequence[int] = CANDIDATES,
    aji_min: float = AJI_MIN,
    prob_tol: float = PROB_TOL,
) -> list[ContextRow]:
    """Compare tiled with whole-image runs of ``predict`` on ``image`` for each context.

    Parameters
    ----------
    predict : callable
        (N, h, w, 3) uint8 -> (N, C, h, w) float32 probabilities (a backend predictor).
    card : ModelCard
        Outputs, post-processing and mpp of the model.
    image : np.ndarray
        (S, S, 3) uint8 at the working mpp with S = n·``tile`` + 2·max(``candidates``); the
        centre n·tile square is compared.
    """
    from ..model.infer import tile_probabilities
    from ..nuclei.instances import probabilities_to_instances
    from .metrics import evaluate_pair

    cmax = max(candidates)
    side = image.shape[0] - 2 * cmax
    if image.shape[0] != image.shape[1] or side <= 0 or side % tile:
        raise ValueError(f"image {image.shape[:2]} must be square with side n*{tile} + 2*{cmax}")
    n_out = card.channels
    whole = predict(image[None])[0][:, cmax : cmax + side, cmax : cmax + side]
    whole_labels = probabilities_to_instances(whole[: len(card.outputs)], card.outputs, card.postprocess, card.working_mpp)
    rows = []
    for c in sorted(candidates):
        sub = image[cmax - c : cmax + side + c, cmax - c : cmax + side + c]
        tiled = tile_probabilities(predict, n_out, sub, tile, c, batch_size=1)
        diff = np.abs(tiled[0] - whole[0])
        labels = probabilities_to_instances(tiled[: len(card.outputs)], card.outputs, card.postprocess, card.working_mpp)
        m = evaluate_pair(whole_labels, labels)
        unmatched = m.unmatched
        p999 = float(np.percentile(diff, 99.9))
        ok = m.aji >= aji_min and unmatched == 0 and p999 <= prob_tol
        rows.append(ContextRow(c, float(diff.max()), p999, float(m.aji), int(unmatched), m.n_true, m.n_pred, bool(ok)))
        log.info("context %d: %s", c, rows[-1])
    return rows


def pick_context(rows: Sequence[ContextRow]) -> int | None:
    """The smallest context from which every larger tried context passes too (None: none passes)."""
    best = None
    for row in sorted(rows, key=lambda r: r.context, reverse=True):
        if not row.ok:
            break
        best = row.context
    return best


@dataclass(frozen=True)
class ContextMeasurement:
    """:func:`measure_on_slide`'s result: the rows, the chosen context and where it was measured."""

    rows: list[ContextRow]
    context_px: int | None
    slide: str
    region: tuple[int, int, int, int]  # x, y, width, height in working px

    def as_dict(self) -> dict[str, object]:
        return {"context_px": self.context_px, "slide": self.slide, "region": list(self.region), "rows": [r.as_dict() for r in self.rows]}


def region_image(card: ModelCard, slide: Path | str | None, x: int, y: int, side: int) -> np.ndarray:
    """A ``side`` px square at (``x``, ``y``) working px of ``slide`` (default: the bundled sample)."""
    from ..errors import ConfigError
    from ..slides.reader import open_slide

    path = Path(slide) if slide is not None else Path(__file__).parent.parent / "data" / "CMU-1-Small-Region.svs"
    with open_slide(path) as s:
        if s.info.level0_mpp is None:
            raise ConfigError(f"{path}: the slide has no mpp metadata; measure on a slide that has it (e.g. the bundled sample)")
        return s.read_working((x, y, side, side), card.working_mpp / s.info.level0_mpp)


def measure_on_slide(
    model_dir: Path | str | None = None,
    slide: Path | str | None = None,
    x: int = DEFAULT_REGION[0],
    y: int = DEFAULT_REGION[1],
    tiles: int = 3,
    write: bool = False,
) -> ContextMeasurement:
    """:func:`measure_context` for the model in ``model_dir`` (default: the shipped one) on a
    square of ``tiles`` x 256 working px (plus the widest candidate context on every side) whose
    top left is (``x``, ``y``) in working px of ``slide`` (default: the bundled CMU sample).
    ``write`` stores the result as ``context_px`` in the model's card."""
    from ..errors import ConfigError
    from ..model.backends import make_predictor
    from ..model.network import DEFAULT_MODEL_DIR, load_model, update_card

    net, card = load_model(model_dir)
    path = Path(slide) if slide is not None else Path(__file__).parent.parent / "data" / "CMU-1-Small-Region.svs"
    side = tiles * 256 + 2 * max(CANDIDATES)
    img = region_image(card, path, x, y, side)
    predict, _ = make_predictor(net, card, "torch", "cpu")
    rows = measure_context(predict, card, img)
    best = pick_context(rows)
    if write:
        if best is None:
            raise ConfigError(f"no tried context up to {max(CANDIDATES)} px passes; the card is unchanged")
        update_card(model_dir or DEFAULT_MODEL_DIR, context_px=best)
    return ContextMeasurement(rows, best, str(path), (x, y, side, side))
