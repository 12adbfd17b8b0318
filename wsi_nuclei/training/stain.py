"""Macenko stain estimation and normalisation for H&E (numpy only).

Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis":
optical density (OD) of the tissue pixels, the plane of its two largest principal directions, and
the two extreme angles in that plane (robust percentiles) are the haematoxylin and eosin vectors.
Concentrations are the least-squares solution of ``OD = C @ S`` (no sparse solver needed).

Frames: images are (H, W, 3) uint8 RGB; a stain matrix ``S`` is (2, 3) float, rows unit OD vectors
(row 0 haematoxylin, row 1 eosin); concentrations are (N, 2) float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["StainRef", "macenko_stains", "concentrations", "normalise", "random_restain", "DEFAULT_REF"]

_IO = 255.0


@dataclass(frozen=True)
class StainRef:
    """A stain reference: unit OD vectors (rows H, E) and the 99th percentile concentrations."""

    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.stains, dtype=np.float64)


#: The reference of Macenko's reference implementation (and most ports): a typical H&E.
DEFAULT_REF = StainRef(((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)), (1.9705, 1.0308))


def _od(image: np.ndarray) -> np.ndarray:
    rgb = image.reshape(-1, 3).astype(np.float64)
    return -np.log((rgb + 1.0) / _IO)


def macenko_stains(image: np.ndarray, beta: float = 0.15, alpha: float = 1.0, min_pixels: int = 100) -> StainRef | None:
    """Estimate the H and E vectors of ``image`` (uint8 RGB); ``None`` when it has too little
    stained tissue (fewer than ``min_pixels`` pixels whose OD vector is longer than ``beta``).
    The length test (not "every channel above beta", as in the original) keeps eosin-only
    pixels, whose red OD is small, so the eosin vector is not estimated from mixtures alone.

    ``alpha`` is the percentile (and 100 - alpha) of the angles taken as the extreme directions.
    """
    od = _od(image)
    stained = np.linalg.norm(od, axis=1) > beta
    tissue = od[stained]
    if len(tissue) < min_pixels:
        return None
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the two largest eigenvectors (eigh sorts ascending)
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin is the vector with the larger red OD (it absorbs red; eosin hardly does)
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    if h.min() < 0 or e.min() < 0:  # degenerate (e.g. one stain only): not an H&E estimate
        return None
    stains = np.stack([h, e])
    conc = concentrations(od, stains)
    tissue_conc = conc[stained]
    max_c = np.percentile(tissue_conc, 99, axis=0)
    if not (max_c > 1e-6).all():
        return None
    return StainRef((tuple(h.tolist()), tuple(e.tolist())), (float(max_c[0]), float(max_c[1])))


def concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """(N, 2) least-squares stain concentrations of (N, 3) OD rows for a (2, 3) stain matrix."""
    conc, *_ = np.linalg.lstsq(stains.T, od.T, rcond=None)
    return np.asarray(conc.T)


def _compose(conc: np.ndarray, stains: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rgb = _IO * np.exp(-(conc @ stains)) - 1.0
    return np.asarray(np.clip(rgb, 0, 255).reshape(shape).astype(np.uint8))


def normalise(image: np.ndarray, target: StainRef = DEFAULT_REF, source: StainRef | None = None) -> np.ndarray:
    """Re-stain ``image`` to ``target``: concentrations in the image's own stains (``source``, by
    default estimated from the image), scaled so their 99th percentiles match the target's.
    An image without enough stained tissue is returned unchanged."""
    source = source or macenko_stains(image)
    if source is None:
        return image
    conc = concentrations(_od(image), source.matrix)
    conc *= np.asarray(target.max_conc) / np.asarray(source.max_conc)
    return _compose(conc, target.matrix, image.shape)


def random_restain(
    image: np.ndarray, source: StainRef | None, rng: np.random.Generator, pool: list[StainRef] | None = None,
    angle_sigma: float = 0.06, conc_sigma: float = 0.2,
) -> np.ndarray:
    """Randomised Macenko augmentation: decompose ``image`` with its stains ``source`` and
    recompose it with the stains of a random reference (from ``pool``, else the image's own),
    each vector turned by a random small rotation (``angle_sigma`` radians) and each stain's
    concentration scaled by a log-normal factor (``conc_sigma``)."""
    if source is None:
        return image
    ref = pool[int(rng.integers(len(pool)))] if pool else source
    stains = ref.matrix + rng.normal(0.0, angle_sigma, size=(2, 3))
    stains = np.abs(stains)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = concentrations(_od(image), source.matrix)
    scale = np.asarray(ref.max_conc) / np.asarray(source.max_conc) * np.exp(rng.normal(0.0, conc_sigma, size=2))
    return _compose(conc * scale, stains, image.shape)
