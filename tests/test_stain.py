"""Macenko stain estimation on a synthetic H&E mix with known stain vectors, and re-staining."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_nuclei.training.stain import (
    DEFAULT_REF,
    StainRef,
    macenko_stains,
    normalise,
    random_restain,
)

# Ruifrok & Johnston haematoxylin and eosin OD vectors
H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def _mix(h: np.ndarray, e: np.ndarray, seed: int = 0, side: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose pixels are pure H, pure E, mixtures and background (Beer-Lambert)."""
    rng = np.random.default_rng(seed)
    n = side * side
    kind = rng.integers(0, 4, n)  # 0 background, 1 H only, 2 E only, 3 both
    conc = np.zeros((n, 2))
    conc[kind == 1, 0] = rng.uniform(0.3, 1.5, (kind == 1).sum())
    conc[kind == 2, 1] = rng.uniform(0.3, 1.2, (kind == 2).sum())
    both = kind == 3
    conc[both] = rng.uniform(0.2, 1.0, (both.sum(), 2))
    od = conc @ np.stack([h, e])
    rgb = np.clip(255 * np.exp(-od) - 1, 0, 255).round().astype(np.uint8)
    return rgb.reshape(side, side, 3), conc


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_macenko_recovers_the_stain_vectors():
    img, conc = _mix(H, E)
    ref = macenko_stains(img)
    assert ref is not None
    assert _angle(ref.matrix[0], H) < 2.0 and _angle(ref.matrix[1], E) < 2.0
    # and the 99th percentile concentrations of the stained pixels
    assert ref.max_conc[0] == pytest.approx(np.percentile(conc[conc[:, 0] > 0, 0], 99), rel=0.15)


def test_macenko_finds_other_stains_too():
    h2 = np.array([0.50, 0.80, 0.35]) / np.linalg.norm([0.50, 0.80, 0.35])
    e2 = np.array([0.15, 0.90, 0.40]) / np.linalg.norm([0.15, 0.90, 0.40])
    ref = macenko_stains(_mix(h2, e2, seed=1)[0])
    assert ref is not None and _angle(ref.matrix[0], h2) < 2.5 and _angle(ref.matrix[1], e2) < 2.5


def test_normalise_moves_an_image_to_the_target_stains():
    h2 = np.array([0.50, 0.80, 0.35]) / np.linalg.norm([0.50, 0.80, 0.35])
    img, _ = _mix(h2, E, seed=2)
    out = normalise(img, DEFAULT_REF)
    est = macenko_stains(out)
    assert est is not None
    assert _angle(est.matrix[0], DEFAULT_REF.matrix[0]) < 3.0 and _angle(est.matrix[1], DEFAULT_REF.matrix[1]) < 3.0


def test_blank_image_is_left_alone_and_restain_is_seeded():
    white = np.full((32, 32, 3), 250, np.uint8)
    assert macenko_stains(white) is None
    assert normalise(white) is white
    img, _ = _mix(H, E, side=48)
    src = macenko_stains(img)
    assert isinstance(src, StainRef)
    a = random_restain(img, src, np.random.default_rng(5), [DEFAULT_REF])
    b = random_restain(img, src, np.random.default_rng(5), [DEFAULT_REF])
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, img)
