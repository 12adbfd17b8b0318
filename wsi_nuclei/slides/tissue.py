"""Tissue detection on a thumbnail: which parts of a slide are worth segmenting."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["tissue_mask", "looks_greyscale"]


def tissue_mask(thumbnail: np.ndarray, min_area_px: int = 16) -> np.ndarray:
    """Boolean tissue mask of an (H, W, 3) uint8 RGB thumbnail (same H, W).

    Stained tissue is coloured, glass is grey-white: pixels whose saturation is above an Otsu
    threshold (clipped to [0.05, 0.15]: on a slide that is all tissue Otsu would otherwise split
    nuclei from pale stroma, whose saturation is about 0.2) and that are not near-white are tissue; the mask is closed, holes
    are filled and specks smaller than ``min_area_px`` removed. A blank image gives an empty mask.
    """
    from skimage.filters import threshold_otsu

    r, g, b = thumbnail[:, :, 0], thumbnail[:, :, 1], thumbnail[:, :, 2]
    # channel by channel: numpy's reductions over a last axis of length 3 are much slower
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    # HSV saturation (max - min) / max, 0 for black; brightness = mean of R, G, B in [0, 1]
    sat = (mx - mn).astype(np.float32) / np.maximum(mx, 1).astype(np.float32)
    bright = (r.astype(np.uint16) + g + b).astype(np.float32) / np.float32(3 * 255)
    if float(sat.max()) - float(sat.min()) < 1e-3:
        return np.zeros(thumbnail.shape[:2], dtype=bool)
    thr = min(0.15, max(0.05, float(threshold_otsu(sat))))
    mask = (sat > thr) & (bright < 0.92)
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_area_px
        keep[0] = False
        mask = keep[labels]
    return np.asarray(mask)


def looks_greyscale(thumbnail: np.ndarray) -> bool:
    """True for a thumbnail with dark content but no colour at all: not an H&E slide (blank glass,
    which is also colourless, is not dark)."""
    r, g, b = thumbnail[:, :, 0], thumbnail[:, :, 1], thumbnail[:, :, 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    dark = r.astype(np.uint16) + g + b < 600  # mean < 200
    return bool(dark.mean() > 0.01 and np.percentile(chroma[dark], 99) <= 3)
