"""Probabilities -> nucleus instances: the one post-processing used by `evaluate` and the pipeline.

Input is the model's sigmoid output at the working resolution; output is an instance label map
of the same (H, W). Seeds come from the boundary or distance channel and grow by a marker
watershed inside the foreground, so touching nuclei are separated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..errors import ConfigError

__all__ = [
    "PostProcess",
    "POSTPROCESS_METHODS",
    "probabilities_to_instances",
    "remove_small",
    "relabel_sequential",
    "own_by_centroid",
    "Owned",
    "IDS_PER_CHUNK",
    "overlapping",
]

#: Post-processing methods of :func:`probabilities_to_instances`.
POSTPROCESS_METHODS = ("boundary", "distance", "threshold")


@dataclass(frozen=True)
class PostProcess:
    """Parameters of :func:`wsi_nuclei.nuclei.instances.probabilities_to_instances`.

    Attributes
    ----------
    method : {"boundary", "distance", "threshold"}
        Which output seeds the watershed: nucleus minus boundary, the distance map, or none
        (connected components of the thresholded nucleus map, as the seed paper did).
    fg_threshold : float
        Nucleus probability above which a pixel is foreground.
    seed_threshold : float
        Boundary probability below which (method "boundary") or distance above which
        (method "distance") a foreground pixel is a seed.
    min_area_um2 : float
        Objects (and seeds) smaller than this are dropped (µm²).
    """

    method: str = "boundary"
    fg_threshold: float = 0.5
    seed_threshold: float = 0.5
    min_area_um2: float = 3.0


_FOUR = ndi.generate_binary_structure(2, 1)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber an int label map to 1..N (ascending id order), 0 stays background; int32."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return np.asarray(lut[labels])


def remove_small(labels: np.ndarray, min_area_px: int) -> np.ndarray:
    """Set objects with fewer than ``min_area_px`` pixels to 0 (labels are not renumbered)."""
    if min_area_px <= 1 or labels.max(initial=0) == 0:
        return labels
    counts = np.bincount(labels.ravel())
    small = counts < min_area_px
    small[0] = False
    if not small.any():
        return labels
    out = labels.copy()
    out[small[labels]] = 0
    return out


def probabilities_to_instances(
    probs: np.ndarray, outputs: tuple[str, ...], post: PostProcess, mpp: float
) -> np.ndarray:
    """Turn per-pixel probabilities into nucleus instances.

    Parameters
    ----------
    probs : np.ndarray
        (C, H, W) float probabilities in [0, 1] (sigmoid of the logits), channel order ``outputs``.
    outputs : tuple of str
        Channel names, from the model card (must contain ``"nucleus"``).
    post : PostProcess
        Method and thresholds (from the model card).
    mpp : float
        µm per pixel of ``probs`` (converts ``min_area_um2`` to pixels).

    Returns
    -------
    np.ndarray
        (H, W) int32 labels, 0 = background, 1..N nuclei (numbered in raster order of seeds).
    """
    from skimage.segmentation import watershed

    if probs.ndim != 3 or probs.shape[0] != len(outputs):
        raise ConfigError(f"probabilities of shape {probs.shape} do not match outputs {list(outputs)}")
    chan = {name: probs[i] for i, name in enumerate(outputs)}
    if "nucleus" not in chan:
        raise ConfigError(f"outputs {list(outputs)} have no 'nucleus' channel")
    fg = chan["nucleus"] > post.fg_threshold
    min_px = max(1, int(round(post.min_area_um2 / (mpp * mpp))))

    if post.method == "threshold":
        labels, _ = ndi.label(fg, structure=_FOUR)
        return relabel_sequential(remove_small(labels, min_px))
    if post.method == "boundary":
        if "boundary" not in chan:
            raise ConfigError("post-processing 'boundary' needs a model with a boundary output")
        seeds_mask = fg & (chan["boundary"] < post.seed_threshold)
        elevation = chan["boundary"]
    elif post.method == "distance":
        if "distance" not in chan:
            raise ConfigError("post-processing 'distance' needs a model with a distance output")
        seeds_mask = fg & (chan["distance"] > post.seed_threshold)
        elevation = -chan["distance"]
    else:
        raise ConfigError(f"unknown post-processing method {post.method!r}; use boundary, distance or threshold")

    seeds, _ = ndi.label(seeds_mask, structure=_FOUR)
    seeds = remove_small(seeds, max(1, min_px // 4))
    labels = watershed(elevation, markers=seeds, mask=fg)
    # Foreground blobs that hold no seed are nuclei too (small or faint ones).
    orphans, n_orphans = ndi.label(fg & (labels == 0), structure=_FOUR)
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return relabel_sequential(remove_small(labels.astype(np.int32), min_px))


#: A chunk's nuclei get ids ``chunk index * 2**16 + local id`` (local ids 1..65535): unique over
#: the slide, uint32, and deterministic (they do not depend on which run computed the chunk).
IDS_PER_CHUNK = 2**16


@dataclass(frozen=True)
class Owned:
    """The nuclei a chunk owns (:func:`own_by_centroid`)."""

    labels: np.ndarray  # (H, W) uint32: globally unique ids of the owned nuclei, 0 elsewhere
    count: int
    cut: int  # owned nuclei that reach the window's edge: the halo was too small for them


def own_by_centroid(labels: np.ndarray, halo: int, core: int, origin: tuple[int, int], limit: tuple[int, int], index: int) -> Owned:
    """The ownership rule that makes chunks tile the slide without duplicates or gaps.

    ``labels`` is the instance map of a chunk window whose ``core`` x ``core`` core starts at
    (``halo``, ``halo``); ``origin`` is the core's top left (y, x) in slide working px and
    ``limit`` the slide's (height, width). A nucleus belongs to this chunk when its centroid lies
    in the core (half-open: a centroid exactly on the boundary between two cores belongs to the
    lower/right one) and inside the slide. Every centroid lies in exactly one core, so as long as
    both chunks see a nucleus whole and alike, exactly one of them keeps it. Owned nuclei get ids
    ``index * IDS_PER_CHUNK + 1, + 2, ...`` in label order; the others become 0.
    """
    n = int(labels.max(initial=0))
    if not n:
        return Owned(np.zeros(labels.shape, dtype=np.uint32), 0, 0)
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    cnt = np.bincount(lab, minlength=n + 1)
    cy = np.bincount(lab, weights=ys, minlength=n + 1) / np.maximum(cnt, 1)
    cx = np.bincount(lab, weights=xs, minlength=n + 1) / np.maximum(cnt, 1)
    gy, gx = cy - halo + origin[0], cx - halo + origin[1]  # centroid in slide working px
    own = (cy >= halo) & (cy < halo + core) & (cx >= halo) & (cx < halo + core) & (gy < limit[0]) & (gx < limit[1]) & (cnt > 0)
    own[0] = False
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    cut = int(own[edge[edge > 0]].sum())
    ids = np.flatnonzero(own)
    if len(ids) >= IDS_PER_CHUNK:
        raise OverflowError(f"{len(ids)} nuclei in one chunk, more than {IDS_PER_CHUNK - 1}")
    lut = np.zeros(n + 1, dtype=np.uint32)
    lut[ids] = index * IDS_PER_CHUNK + np.arange(1, len(ids) + 1, dtype=np.uint32)
    return Owned(lut[labels], len(ids), cut)


def overlapping(window: np.ndarray, under: np.ndarray) -> np.ndarray:
    """The geometric safety net behind :func:`own_by_centroid`: ids of ``window`` (the owned
    nuclei of a later chunk) that share a pixel with ``under`` (what earlier chunks kept on the
    same pixels). The centroid rule keeps a nucleus once when both chunks see it alike; when they
    predict it slightly differently (too little context), each may own a version. The pipeline
    drops the later chunk's version, so overlapping nuclei never both reach the outputs."""
    hit = (window > 0) & (under > 0)
    return np.unique(window[hit]) if hit.any() else np.zeros(0, window.dtype)
