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

    rgb = thumbnail.astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    bright = rgb.mean(axis=2)
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
    return mask


def looks_greyscale(thumbnail: np.ndarray) -> bool:
    """True for a thumbnail with dark content but no colour at all: not an H&E slide (blank glass,
    which is also colourless, is not dark)."""
    rgb = thumbnail.astype(np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    dark = rgb.mean(axis=2) < 200
    return bool(dark.mean() > 0.01 and np.percentile(chroma[dark], 99) <= 3)
