"""Quick-look pictures: nucleus outlines drawn over the image (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np

__all__ = ["draw_outlines", "inner_boundaries"]


def inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean (H, W): labelled pixels with a 4-neighbour of another value (pixels outside the
    image do not count). Equals ``skimage.segmentation.find_boundaries(labels, connectivity=1,
    mode="inner")`` (a test) with four array comparisons instead of a grey dilation and erosion."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    rows = lab[1:] != lab[:-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    cols = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    edge &= lab != 0
    return edge


def draw_outlines(image: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Return a copy of the (H, W, 3) uint8 ``image`` with the outline of every nucleus of the
    (H, W) ``labels`` painted in ``colour`` (1 px, inner boundary)."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    out = image.copy()
    out[inner_boundaries(labels)] = colour
    return out

