"""A slide's two pictures, drawn after its last chunk from the thumbnail the plan stored:
``overlay.png`` (nucleus and tissue outlines) and ``density.png`` (nuclei per mm²). Both are
thumbnail-sized, so their cost does not grow with the slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..errors import OutputError, shown
from ..outputs.density import density_png
from .plan import SlidePlan

__all__ = ["slide_pictures", "slide_overlay", "overlay_sample", "DENSITY_NAME"]

DENSITY_NAME = "density.png"


def overlay_sample(levels: Any, plan: SlidePlan) -> Any:
    """The overlay's labels, sampled at the thumbnail's size from the smallest pyramid level at
    most twice its height (else the smallest level) while ``levels`` (a ``store.Pyramid``) is written."""
    try:
        thumb = np.load(plan.work / "thumbnail.npy", mmap_mode="r").shape[:2]
    except (OSError, ValueError):
        raise OutputError(f"{shown(plan.work)}: the slide's work folder is gone or incomplete (its chunk files with it); "
                          "run again with --resume to compute them") from None
    shapes = levels.shapes()
    level = next((k for k, shape in enumerate(shapes) if shape[0] <= 2 * thumb[0]), len(shapes) - 1)
    return levels.sample_level(level, (int(thumb[0]), int(thumb[1])))


def slide_pictures(plan: SlidePlan, temps: dict[str, Path], tally: Any, types: tuple[Any, ...], labels: np.ndarray) -> None:
    """``overlay.png`` and ``density.png``, from the thumbnail the plan stored and ``labels`` (the
    nuclei at its size: :func:`overlay_sample`); drawn at once, on two threads (the overlay's PNG
    encoding leaves the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    thumb = np.load(plan.work / "thumbnail.npy")
    tissue_file = plan.work / "tissue.npy"
    tissue = np.load(tissue_file) if tissue_file.exists() else None
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-nuclei-overlay") as pool:
        overlay = pool.submit(slide_overlay, labels, thumb, tissue, temps["overlay.png"], tally.typed_labels(), types)
        per_mm2 = tally.nuclei / plan.tissue_mm2 if plan.tissue_mm2 > 0 else 0.0
        title = f"{Path(plan.path).name}: {tally.nuclei:,} nuclei, {per_mm2:,.0f} per mm² of tissue"
        panels = [(f"{name}: {tally.per_type[name]:,} nuclei", grid) for name, grid in tally.type_density.items()]
        atomic.write_bytes(temps[DENSITY_NAME], density_png(tally.density, thumb, tissue, title, panels))
        overlay.result()


def slide_overlay(lab: np.ndarray, thumb: np.ndarray, tissue: np.ndarray | None, out: Path,
                  typed_labels: tuple[np.ndarray, np.ndarray] | None = None, types: tuple[Any, ...] = ()) -> None:
    """``out``: the slide's thumbnail with the outlines of the nuclei of ``lab`` (labels at the
    thumbnail's size; green, a typed model's in its types' colours, with a legend) and the tissue
    outline (blue). ``typed_labels``: (sorted labels, their types)."""
    from PIL import Image

    from ..outputs.overlay import inner_boundaries

    img = thumb.copy()
    edge = inner_boundaries(lab)
    img[edge] = (0, 255, 0)
    if typed_labels is not None and types and len(typed_labels[0]):
        ids, kinds = typed_labels
        at = np.clip(np.searchsorted(ids, lab[edge]), 0, len(ids) - 1)
        kind = np.where(ids[at] == lab[edge], kinds[at], 0)
        palette = np.array([(0, 255, 0)] + [t.color for t in types], np.uint8)
        img[edge] = palette[kind]

    if tissue is not None:
        img[inner_boundaries(tissue)] = (0, 0, 255)
    if types:
        img = _legend(img, types)
    with atomic.replacing(out) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)  # a quick look: fast beats small (default level 6)


def _legend(img: np.ndarray, types: tuple[Any, ...]) -> np.ndarray:
    """A legend of the type colours in the top left corner."""
    from PIL import Image, ImageDraw

    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    height = 14 * len(types) + 6
    draw.rectangle((2, 2, 110, height), fill=(255, 255, 255))
    for i, t in enumerate(types):
        y = 5 + 14 * i
        draw.rectangle((6, y, 16, y + 10), fill=tuple(t.color))
        draw.text((22, y - 1), t.qupath, fill=(0, 0, 0))
    return np.array(pic)
