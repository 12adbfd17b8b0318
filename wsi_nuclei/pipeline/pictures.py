"""A slide's two pictures, drawn after its last chunk from the thumbnail the plan stored:
``overlay.png`` (nucleus and tissue outlines) and ``density.png`` (nuclei per mm²). Both are
thumbnail-sized, so their cost does not grow with the slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..outputs.density import density_png
from .plan import SlidePlan

__all__ = ["slide_pictures", "slide_overlay", "DENSITY_NAME"]

DENSITY_NAME = "density.png"


def slide_pictures(plan: SlidePlan, temps: dict[str, Path], tally: Any, types: tuple[Any, ...]) -> None:
    """``overlay.png`` and ``density.png``, from the thumbnail the plan stored; drawn at once, on
    two threads (most of the overlay's time, its PNG encoding and Zarr reads, leaves the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    thumb = np.load(plan.work / "thumbnail.npy")
    tissue_file = plan.work / "tissue.npy"
    tissue = np.load(tissue_file) if tissue_file.exists() else None
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-nuclei-overlay") as pool:
        overlay = pool.submit(slide_overlay, temps["mask.zarr"], thumb, tissue, temps["overlay.png"], tally.typed_labels(), types)
        per_mm2 = tally.nuclei / plan.tissue_mm2 if plan.tissue_mm2 > 0 else 0.0
        title = f"{Path(plan.path).name}: {tally.nuclei:,} nuclei, {per_mm2:,.0f} per mm² of tissue"
        panels = [(f"{name}: {tally.per_type[name]:,} nuclei", grid) for name, grid in tally.type_density.items()]
        atomic.write_bytes(temps[DENSITY_NAME], density_png(tally.density, thumb, tissue, title, panels))
        overlay.result()


def slide_overlay(zarr_path: Path, thumb: np.ndarray, tissue: np.ndarray | None, out: Path,
                  typed_labels: tuple[np.ndarray, np.ndarray] | None = None, types: tuple[Any, ...] = ()) -> None:
    """``out``: the slide's thumbnail with nucleus outlines (green; a typed model's in its types'
    colours, with a legend) and the tissue outline (blue). The labels come from the smallest
    pyramid level of ``zarr_path`` at most twice the thumbnail's height, so the cost does not grow
    with the slide. ``typed_labels``: (sorted labels, their types)."""
    from PIL import Image

    from ..model.infer import resize_labels
    from ..outputs.overlay import inner_boundaries
    from ..outputs.store import open_array

    labels_level = None
    for k in range(8):
        try:
            arr = open_array(zarr_path, "labels", k)
        except Exception:
            break
        labels_level = arr
        if arr.shape[0] <= 2 * thumb.shape[0]:
            break
    img = thumb.copy()
    if labels_level is not None:
        lab = resize_labels(np.asarray(labels_level[:]), thumb.shape[:2])
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
