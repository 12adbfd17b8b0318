"""Run the model on RGB images: resampling to the working resolution, padding, batching.

Frames: ``image`` arrays are (H, W, 3) uint8 RGB at their own ``mpp``; probabilities are
(C, H', W') float32 at the model's working mpp (``card.working_mpp``); labels returned by
:func:`segment_array` are back at the image's own resolution.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np

from ..errors import ModelError
from ..nuclei.instances import probabilities_to_instances
from .backends import Predictor
from .network import (
    STRIDE,  # UNet++ with a 5-stage encoder needs H and W divisible by it
    ModelCard,
    PostProcess,
)

__all__ = [
    "resize_image",
    "resize_labels",
    "predict_probabilities",
    "segment_array",
    "segment_array_typed",
    "check_finite",
    "select_device",
    "predict_region",
    "tile_probabilities",
    "window_probabilities",
    "window_extent",
    "working_shape",
]

log = logging.getLogger(__name__)



@functools.cache
def _process_limit() -> int:
    """This process's memory limit (:func:`memory_limit`), read once: validation and tuning infer
    thousands of images, and the limit (cgroup, Dask worker, machine) does not change under them."""
    from .memory import memory_limit

    return memory_limit()[0]


def select_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; checks explicit choices."""
    import torch

    from ..errors import ConfigError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA GPU is visible; use --device cpu or auto")
    return device


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``shape`` = (H', W') with area averaging / bilinear (uint8)."""
    if image.shape[:2] == tuple(shape):
        return image
    from PIL import Image

    resample = Image.Resampling.BOX if shape[0] < image.shape[0] else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), resample))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map to ``shape`` (pixel-centre sampling)."""
    if labels.shape == tuple(shape):
        return labels
    rows = ((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64)
    return np.asarray(labels[np.minimum(rows, labels.shape[0] - 1)[:, None], np.minimum(cols, labels.shape[1] - 1)[None, :]])


def working_shape(shape: tuple[int, int], mpp: float, working_mpp: float) -> tuple[int, int]:
    """(H, W) of an image of ``shape`` at ``mpp`` once resampled to ``working_mpp``."""
    scale = mpp / working_mpp
    return (max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale))))


def predict_probabilities(
    predict: Predictor, card: ModelCard, image: np.ndarray, tta: str | None = None, budget: int | None = None,
) -> np.ndarray:
    """Sigmoid outputs for one (H, W, 3) uint8 image already at the working mpp.

    ``predict`` is a backend predictor (:func:`wsi_nuclei.model.backends.make_predictor`: the same
    one the slide pipeline runs). The image is reflect-padded to a multiple of 32 (at least
    64 px) and the padding is cropped off again. ``tta`` (default the card's) averages the
    outputs over flips/rotations (:mod:`wsi_nuclei.model.tta`). An image whose forward pass does
    not fit ``budget`` bytes (default: what this process's memory allows) is inferred in tiles,
    each with the card's measured context (equal to one pass within that context's tolerance).
    Returns (C, H, W) float32 in [0, 1].
    """
    from .memory import FORWARD_BYTES_PER_PX, worker_budget
    from .tta import with_tta

    h, w = image.shape[:2]
    ph = max(64, -(-h // STRIDE) * STRIDE) - h
    pw = max(64, -(-w // STRIDE) * STRIDE) - w
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
    padded = np.pad(image, pad, mode="reflect") if ph < h and pw < w else np.pad(image, pad, mode="symmetric")
    fn = with_tta(predict, tta or card.tta)
    H, W = padded.shape[:2]
    if budget is None:
        budget = worker_budget(_process_limit(), 1, max(H, W))
    if H * W * FORWARD_BYTES_PER_PX <= budget:
        probs = fn(padded[None])[0]
    else:
        # the card's measured context; a card without one: a wide 320 px (pipeline.tiling's default)
        probs = _tiled(fn, padded, card.context_px if card.context_px is not None else 320, budget, FORWARD_BYTES_PER_PX)
    return np.asarray(probs[:, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w])


def _tiled(fn: Predictor, image: np.ndarray, context: int, budget: int, bytes_per_px: float) -> np.ndarray:
    """Probabilities of an (H, W, 3) image (multiples of 32) by tiles whose input, the tile and
    ``context`` px on every side (clipped where the image ends, as the one pass sees it), fits
    ``budget``; each tile keeps its core."""
    H, W = image.shape[:2]
    ctx = -(-max(0, context) // STRIDE) * STRIDE
    fit = int(math.sqrt(max(budget, 1) / bytes_per_px)) - 2 * ctx
    tile = max(4 * STRIDE, fit // STRIDE * STRIDE)
    out: np.ndarray | None = None
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            y0, x0 = max(0, y - ctx), max(0, x - ctx)
            y1, x1 = min(H, y + tile + ctx), min(W, x + tile + ctx)
            p = fn(np.ascontiguousarray(image[None, y0:y1, x0:x1]))[0]
            if out is None:
                out = np.zeros((p.shape[0], H, W), dtype=np.float32)
            ty, tx = min(H, y + tile), min(W, x + tile)
            out[:, y:ty, x:tx] = p[:, y - y0 : ty - y0, x - x0 : tx - x0]
    assert out is not None
    return out


def segment_array(
    predict: Predictor,
    card: ModelCard,
    image: np.ndarray,
    mpp: float,
    post: PostProcess | None = None,
    tta: str | None = None,
) -> np.ndarray:
    """Nucleus instances of an (H, W, 3) uint8 RGB image at ``mpp`` µm/px.

    The image is resampled to the model's working mpp, run through ``predict`` (a backend
    predictor), segmented with the card's (or ``post``) post-processing, and the labels are
    resampled back: returns (H, W) int32 labels. ``tta``: test-time augmentation (default the
    card's ``tta``).
    """
    work = working_shape(image.shape[:2], mpp, card.working_mpp)
    probs = predict_probabilities(predict, card, resize_image(image, work), tta)
    check_finite(probs, "the image")
    labels = probabilities_to_instances(probs[: len(card.outputs)], card.outputs, post or card.postprocess, card.working_mpp)
    return resize_labels(labels, image.shape[:2])


def segment_array_typed(
    predict: Predictor, card: ModelCard, image: np.ndarray, mpp: float, post: PostProcess | None = None, tta: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment_array` for a typed model: (H, W) int32 labels and (H, W) uint8 the type of
    each pixel's nucleus (0: background; 1..n by :func:`wsi_nuclei.nuclei.classes.vote_types`),
    both at the image's own resolution."""
    from ..nuclei.classes import vote_types

    work = working_shape(image.shape[:2], mpp, card.working_mpp)
    probs = predict_probabilities(predict, card, resize_image(image, work), tta)
    check_finite(probs, "the image")
    labels = probabilities_to_instances(probs[: len(card.outputs)], card.outputs, post or card.postprocess, card.working_mpp)
    kinds, _ = vote_types(labels, probs[len(card.outputs) :])
    per_pixel = np.zeros(labels.shape, np.uint8)
    per_pixel[labels > 0] = kinds[labels[labels > 0] - 1]
    return resize_labels(labels, image.shape[:2]), resize_labels(per_pixel, image.shape[:2])


def check_finite(probs: np.ndarray, where: str) -> None:
    """NaN or infinite probabilities are an error, never "0 nuclei"."""
    if not np.isfinite(probs).all():
        raise ModelError(f"the model gave NaN or infinite probabilities on {where}; its weights or the input are damaged "
                         "(re-copy the model; check the slide)")


def predict_region(predict: Predictor, image: np.ndarray) -> np.ndarray:
    """Sigmoid outputs (C, H, W) float32 of an (H, W, 3) uint8 image whose sides are multiples of
    32, in one forward pass and without padding (the "whole-image" reference of the tiling tests)."""
    if image.shape[0] % STRIDE or image.shape[1] % STRIDE:
        raise ValueError(f"image sides {image.shape[:2]} must be multiples of {STRIDE}")
    return np.asarray(predict(image[None])[0])


def tile_probabilities(
    predict: Callable[[np.ndarray], np.ndarray], n_outputs: int, image: np.ndarray, tile: int, context: int, batch_size: int = 4
) -> np.ndarray:
    """Probabilities of the centre of ``image`` by batched tiles.

    ``image`` is (S, S, 3) uint8 with S = n·tile + 2·context; tiles of ``tile`` px see
    ``context`` px more on every side and are passed ``batch_size`` at a time to ``predict``
    ((N, h, w, 3) uint8 -> (N, C, h, w) float32, see :mod:`wsi_nuclei.model.backends`). Returns
    (C, n·tile, n·tile) float32 for ``image[context:-context, context:-context]``.
    """
    side = image.shape[0] - 2 * context
    if image.shape[0] != image.shape[1] or side % tile or side <= 0:
        raise ValueError(f"image {image.shape[:2]} is not n*{tile} + 2*{context} square")
    n = side // tile
    origins = [(r * tile, c * tile) for r in range(n) for c in range(n)]
    out = np.zeros((n_outputs, side, side), dtype=np.float32)
    size = tile + 2 * context
    for i in range(0, len(origins), batch_size):
        batch = origins[i : i + batch_size]
        probs = predict(np.stack([image[y : y + size, x0 : x0 + size] for y, x0 in batch]))
        for (y, x0), p in zip(batch, probs):
            out[:, y : y + tile, x0 : x0 + tile] = p[:, context : context + tile, context : context + tile]
    return out


def _box_origins(side: int, tile: int, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """(y, x) of the ``tile`` px tiles of a ``side`` px window that meet ``box``, in raster order."""
    x0, y0, x1, y1 = box
    return [(r, c) for r in range(0, side, tile) for c in range(0, side, tile) if r < y1 and r + tile > y0 and c < x1 and c + tile > x0]


def round_box(box: tuple[int, int, int, int] | None, side: int, step: int) -> tuple[int, int, int, int] | None:
    """``box`` (x0, y0, x1, y1, multiples of 32, inside a ``side`` px window centre) grown so that
    its width and height are multiples of ``step`` (or the whole side): fewer distinct input
    shapes for a backend that prepares per shape. It still contains ``box``, shifted inward at the
    window's edge; ``step`` 32 (or no box) leaves it as it is."""
    if box is None or step <= STRIDE:
        return box

    def grow(a0: int, a1: int) -> tuple[int, int]:
        want = min(side, math.ceil((a1 - a0) / step) * step)
        lo = min(a0, side - want)
        return lo, lo + want

    (x0, x1), (y0, y1) = grow(box[0], box[2]), grow(box[1], box[3])
    return x0, y0, x1, y1


def window_extent(side: int, tile: int, context: int, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """The part (x0, y0, x1, y1) of a window's image (``side`` + 2·``context`` px square) that
    :func:`window_probabilities` gives the model for ``box``: all of it without a box, else the
    box (or the tiles that meet it) and their context. The rest of the image is never looked at,
    so a reader need not decode it."""
    full = side + 2 * context
    if box is None:
        return 0, 0, full, full
    x0, y0, x1, y1 = box
    if side == tile:
        return x0, y0, x1 + 2 * context, y1 + 2 * context
    origins = _box_origins(side, tile, box)
    ys, xs = [y for y, _ in origins], [x for _, x in origins]
    return min(xs), min(ys), max(xs) + tile + 2 * context, max(ys) + tile + 2 * context


def window_probabilities(
    predict: Callable[[np.ndarray], np.ndarray], n_outputs: int, image: np.ndarray, tile: int, context: int, batch_size: int = 4,
    box: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, int]:
    """:func:`tile_probabilities` over only ``box`` = (x0, y0, x1, y1) of the centre (multiples of
    32; None: all of it), 0 elsewhere; also returns the pixels the model was given. With one tile
    per side the box is one forward pass of (y1 - y0 + 2·context) × (x1 - x0 + 2·context) px; with
    several, the tiles that meet the box. Inside the box the result equals the full run's (each
    pixel sees the same context on the same stride-32 grid)."""
    side = image.shape[0] - 2 * context
    size = tile + 2 * context
    if box is None:
        n = side // tile
        return tile_probabilities(predict, n_outputs, image, tile, context, batch_size), n * n * size * size
    x0, y0, x1, y1 = box
    if x0 % STRIDE or y0 % STRIDE or x1 % STRIDE or y1 % STRIDE or not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
        raise ValueError(f"box {box} is not inside a {side} px window on the {STRIDE} px grid")
    out = np.zeros((n_outputs, side, side), dtype=np.float32)
    if side == tile:  # one pass: the box and its context
        p = predict(np.ascontiguousarray(image[None, y0 : y1 + 2 * context, x0 : x1 + 2 * context]))[0]
        out[:, y0:y1, x0:x1] = p[:, context : context + y1 - y0, context : context + x1 - x0]
        return out, (y1 - y0 + 2 * context) * (x1 - x0 + 2 * context)
    origins = _box_origins(side, tile, box)
    for i in range(0, len(origins), batch_size):
        group = origins[i : i + batch_size]
        probs = predict(np.stack([image[y : y + size, x : x + size] for y, x in group]))
        for (y, x), q in zip(group, probs):
            out[:, y : y + tile, x : x + tile] = q[:, context : context + tile, context : context + tile]
    return out, len(origins) * size * size
