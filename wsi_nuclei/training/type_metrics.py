"""Detection and per-type F1 of typed nuclei, after HoVer-Net's ``compute_stats`` definition.

True and predicted nuclei are paired by their centroids: a one-to-one assignment minimising the
summed distance (Hungarian), keeping only pairs closer than ``radius`` px (HoVer-Net: 12 px at
0.25 µm/px, i.e. 6 px at 0.5 µm/px). Counts are pooled over all images of a dataset before the
scores are formed:

- detection: ``F_d = 2 TP / (2 TP + FP + FN)`` over paired / unpaired nuclei;
- type ``t``: among pairs, ``tp`` = both t, ``tn`` = neither t, ``fp`` = predicted t but true other,
  ``fn`` = true t but predicted other; among unpaired, ``fp_d`` = predicted t, ``fn_d`` = true t;
  ``F_c(t) = 2 (tp + tn) / (2 (tp + tn) + 2 fp + 2 fn + fp_d + fn_d)``.

Frames: centroids (y, x) in px of the image they came from; types are 1..n (0 = untyped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["TypedNuclei", "TypeCounts", "pair_centroids", "typed_nuclei", "type_scores"]


@dataclass(frozen=True)
class TypedNuclei:
    """Centroids (N, 2) float (y, x) px and types (N,) int of one image's nuclei."""

    centroids: np.ndarray
    types: np.ndarray


@dataclass
class TypeCounts:
    """Pooled pairing counts over images (:func:`type_scores` adds to it)."""

    true_paired: list[np.ndarray] = field(default_factory=list)
    pred_paired: list[np.ndarray] = field(default_factory=list)
    true_unpaired: list[np.ndarray] = field(default_factory=list)
    pred_unpaired: list[np.ndarray] = field(default_factory=list)

    def add(self, true: TypedNuclei, pred: TypedNuclei, radius: float) -> None:
        ti, pi = pair_centroids(true.centroids, pred.centroids, radius)
        self.true_paired.append(true.types[ti])
        self.pred_paired.append(pred.types[pi])
        self.true_unpaired.append(np.delete(true.types, ti))
        self.pred_unpaired.append(np.delete(pred.types, pi))

    def scores(self, n_types: int) -> dict[str, float | int]:
        """``f_d``, ``f_c_<k>`` for types 1..n_types, and the counts behind them."""
        tp = np.concatenate(self.true_paired) if self.true_paired else np.zeros(0, int)
        pp = np.concatenate(self.pred_paired) if self.pred_paired else np.zeros(0, int)
        tu = np.concatenate(self.true_unpaired) if self.true_unpaired else np.zeros(0, int)
        pu = np.concatenate(self.pred_unpaired) if self.pred_unpaired else np.zeros(0, int)
        n_pair, fp, fn = len(tp), len(pu), len(tu)
        out: dict[str, float | int] = {"f_d": _ratio(2 * n_pair, 2 * n_pair + fp + fn), "paired": n_pair,
                                       "unpaired_pred": fp, "unpaired_true": fn}
        for t in range(1, n_types + 1):
            tp_t = int(((tp == t) & (pp == t)).sum())
            tn_t = int(((tp != t) & (pp != t)).sum())
            fp_t = int(((tp != t) & (pp == t)).sum())
            fn_t = int(((tp == t) & (pp != t)).sum())
            fp_d, fn_d = int((pu == t).sum()), int((tu == t).sum())
            out[f"f_c_{t}"] = _ratio(2 * (tp_t + tn_t), 2 * (tp_t + tn_t) + 2 * fp_t + 2 * fn_t + fp_d + fn_d)
        return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def pair_centroids(true: np.ndarray, pred: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into ``true``, into ``pred``) of the one-to-one pairs closer than ``radius``,
    chosen to minimise the summed distance."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    if len(true) == 0 or len(pred) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    dist = cdist(np.asarray(true, float), np.asarray(pred, float))
    big = 1e9
    cost = np.where(dist <= radius, dist, big)
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < big
    return rows[keep], cols[keep]


def typed_nuclei(labels: np.ndarray, types: np.ndarray) -> TypedNuclei:
    """Centroids and types of the nuclei of a label map: a nucleus' type is the most common
    non-zero value of ``types`` under it (0 when it has none)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return TypedNuclei(np.zeros((0, 2)), np.zeros(0, int))
    cents = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids), float).reshape(-1, 2)
    n_types = int(types.max()) if types.size else 0
    votes = np.zeros((len(ids), n_types + 1), np.int64)
    index = np.searchsorted(ids, labels[labels > 0])
    np.add.at(votes, (index, types[labels > 0].astype(np.int64)), 1)
    votes[:, 0] = 0
    kinds = np.where(votes.max(axis=1) > 0, votes.argmax(axis=1), 0)
    return TypedNuclei(cents, kinds.astype(int))


def type_scores(pairs: list[tuple[TypedNuclei, TypedNuclei]], n_types: int, radius: float) -> dict[str, float | int]:
    """Pooled scores (see the module docstring) over (true, predicted) nuclei of each image."""
    counts = TypeCounts()
    for true, pred in pairs:
        counts.add(true, pred, radius)
    return counts.scores(n_types)
