"""Training targets and augmentation for the nucleus model (numpy only, no torch).

Frames: everything here is at the model's working resolution; images are (H, W, 3) uint8 RGB,
labels (H, W) int32, targets (C, H, W) float32 in the order of the model's ``outputs``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["make_targets", "augment", "random_crop"]


def make_targets(labels: np.ndarray, outputs: tuple[str, ...]) -> np.ndarray:
    """(C, H, W) float32 targets for an instance label map.

    ``nucleus`` is labels > 0; ``boundary`` marks the inner outline of every nucleus (pixels whose
    4-neighbourhood holds another label or background), so touching nuclei are split by it;
    ``distance`` is each pixel's Euclidean distance to its nucleus' outline divided by the
    nucleus' maximum (1 at the centre, 0 on background).
    """
    from skimage.segmentation import find_boundaries

    out = np.zeros((len(outputs), *labels.shape), dtype=np.float32)
    for i, name in enumerate(outputs):
        if name == "nucleus":
            out[i] = labels > 0
        elif name == "boundary":
            out[i] = find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)
        elif name == "distance":
            out[i] = _normalised_distance(labels)
        else:
            raise ValueError(f"unknown output {name!r}")
    return out


def _normalised_distance(labels: np.ndarray) -> np.ndarray:
    dist = np.zeros(labels.shape, dtype=np.float32)
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = labels[sl] == lab
        d = ndi.distance_transform_edt(mask)
        peak = d.max()
        if peak > 0:
            dist[sl][mask] = (d[mask] / peak).astype(np.float32)
    return dist


def random_crop(
    image: np.ndarray, targets: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` × ``size`` crop at a random position (reflect-padded when the image is smaller)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        targets = np.pad(targets, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        h, w = image.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], targets[:, y : y + size, x : x + size]


# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) and their inverse.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_RGB_FROM_HED[2] = np.cross(_RGB_FROM_HED[0], _RGB_FROM_HED[1])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def _hed_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Perturb haematoxylin/eosin/DAB concentrations: a stain-colour augmentation (Tellez et al.)."""
    rgb = np.maximum(image.astype(np.float32), 1.0) / 255.0
    od = -np.log(rgb)
    hed = od @ _HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-bias, bias, size=3).astype(np.float32)
    hed = hed * alpha + beta
    out = np.exp(-(hed @ _RGB_FROM_HED))
    return np.asarray(np.clip(out * 255.0, 0, 255), dtype=np.uint8)


def augment(
    image: np.ndarray, targets: np.ndarray, rng: np.random.Generator, colour: bool = True, hed: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random dihedral transform (exact for the targets), then colour (HED jitter when ``hed``),
    brightness, blur and noise on the image when ``colour``."""
    k = int(rng.integers(0, 4))
    image = np.rot90(image, k, axes=(0, 1))
    targets = np.rot90(targets, k, axes=(1, 2))
    if rng.random() < 0.5:
        image = image[:, ::-1]
        targets = targets[:, :, ::-1]
    if colour:
        if hed and rng.random() < 0.8:
            image = _hed_jitter(image, rng)
        img: np.ndarray = image.astype(np.float32)
        if rng.random() < 0.5:  # brightness / contrast / gamma
            mean = img.mean()
            img = (img - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-15, 15)
            img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.8, 1.25)
        if rng.random() < 0.2:
            img = ndi.gaussian_filter(img, sigma=(rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), 0))
        if rng.random() < 0.2:
            img = img + rng.normal(0, rng.uniform(2, 8), img.shape)
        image = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(targets)
