"""Test-time augmentation: average the model's probabilities over flips and rotations.

A predictor maps (N, H, W, 3) uint8 tiles to (N, C, H, W) float32 probabilities (see
:mod:`wsi_nuclei.model.backends`). :func:`with_tta` wraps one: each transform of the dihedral group is
applied to the tiles, the outputs are transformed back and averaged *before* post-processing.
Transforms act on each tile's own frame, so tiled runs stay equal to whole-image runs.

Modes: ``none`` (1 pass), ``flip4`` (identity, horizontal, vertical and both flips: 4 passes),
``dihedral8`` (the 4 rotations, each with and without a horizontal flip: 8 passes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["TTA_MODES", "transforms", "with_tta", "check_tta"]

TTA_MODES = ("none", "flip4", "dihedral8")

Predict = Callable[[np.ndarray], np.ndarray]
#: (k rotations by 90° counter-clockwise, then flip left-right)
_Transform = tuple[int, bool]


def check_tta(mode: str) -> str:
    from ..errors import ConfigError

    if mode not in TTA_MODES:
        raise ConfigError(f"unknown --tta {mode!r}; use one of {', '.join(TTA_MODES)}")
    return mode


def transforms(mode: str) -> list[_Transform]:
    """The (rotations, flip) pairs of ``mode``; identity first."""
    check_tta(mode)
    if mode == "none":
        return [(0, False)]
    if mode == "flip4":  # identity, flip LR, flip UD (= rot180 + flip LR), both (= rot180)
        return [(0, False), (0, True), (2, True), (2, False)]
    return [(k, f) for k in range(4) for f in (False, True)]


def _forward(x: np.ndarray, t: _Transform, axes: tuple[int, int]) -> np.ndarray:
    k, flip = t
    x = np.rot90(x, k, axes=axes)
    return np.flip(x, axis=axes[1]) if flip else x


def _inverse(y: np.ndarray, t: _Transform, axes: tuple[int, int]) -> np.ndarray:
    k, flip = t
    if flip:
        y = np.flip(y, axis=axes[1])
    return np.rot90(y, -k, axes=axes)


def with_tta(predict: Predict, mode: str) -> Predict:
    """``predict`` averaged over the transforms of ``mode`` (``predict`` itself for ``none``)."""
    ts = transforms(mode)
    if len(ts) == 1:
        return predict

    def averaged(tiles: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for t in ts:
            x = np.ascontiguousarray(_forward(tiles, t, (1, 2)))
            y = _inverse(predict(x), t, (2, 3))
            total = y.astype(np.float32, copy=True) if total is None else total + y
        assert total is not None
        total /= len(ts)
        return total

    return averaged
