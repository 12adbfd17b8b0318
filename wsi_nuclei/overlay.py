"""Quick-look pictures: nucleus outlines drawn over the image (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np

__all__ = ["draw_outlines"]


def draw_outlines(image: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Return a copy of the (H, W, 3) uint8 ``image`` with the outline of every nucleus of the
    (H, W) ``labels`` painted in ``colour`` (1 px, inner boundary)."""
    from skimage.segmentation import find_boundaries

    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    out = image.copy()
    out[find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)] = colour
    return out
