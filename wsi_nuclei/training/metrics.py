"""Segmentation metrics for nuclei instance label maps: pixel Dice/IoU, AJI, PQ and object F1.

Label maps are 2-D integer arrays ``(H, W)``: 0 is background, each positive id one object, ids
need not be consecutive. Pairwise intersections come from one sparse contingency table over the
overlapping pixels (``O(H * W)`` plus a sort of them), never from a loop over object pairs.

Edge cases (every metric lies in ``[0, 1]``): both maps empty (no objects) -> every metric is
``1.0`` (perfect agreement); exactly one map empty -> every metric is ``0.0``. Invalid input
(shape mismatch, not 2-D, non-integer or bool dtype, negative labels) raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["ImageMetrics", "aji", "evaluate_pair", "mean_metrics", "object_f1",
           "panoptic_quality", "pixel_dice_iou"]


@dataclass(frozen=True)
class ImageMetrics:
    """Metrics of one predicted label map against its ground truth.

    Attributes
    ----------
    dice, iou : float
        Pixel-level Dice and IoU of the foregrounds (``labels > 0``).
    aji : float
        Aggregated Jaccard Index.
    pq, dq, sq, f1, precision, recall : float
        Panoptic / detection / segmentation quality and object detection scores, all from the
        unique matching of objects at IoU > 0.5.
    n_true, n_pred : int
        Number of true / predicted objects.
    matched_true_px, matched_pred_px : int
        Summed areas of the true / predicted objects of the matched pairs (IoU > 0.5): their ratio
        is the size bias (:attr:`size_bias`; below 1: predicted outlines smaller than annotated).
    """

    dice: float
    iou: float
    aji: float
    pq: float
    dq: float
    sq: float
    f1: float
    precision: float
    recall: float
    n_true: int
    n_pred: int
    matched_true_px: int = 0
    matched_pred_px: int = 0

    @property
    def size_bias(self) -> float:
        """Predicted area / true area over the matched pairs (0.0 when none matched)."""
        return self.matched_pred_px / self.matched_true_px if self.matched_true_px else 0.0

    @property
    def unmatched(self) -> int:
        """Objects of either map without an IoU > 0.5 partner in the other (false positives and
        negatives; ``f1 = 2 tp / (n_true + n_pred)``)."""
        return self.n_true + self.n_pred - 2 * round(self.f1 * (self.n_true + self.n_pred) / 2)

    def as_dict(self) -> dict[str, float | int]:
        """Return the metrics as a plain ``{field name: value}`` dict, with ``size_bias``."""
        return {**asdict(self), "size_bias": self.size_bias}


class _Overlap(NamedTuple):
    """Sparse overlap of relabelled true objects ``1..n_true`` and pred objects ``1..n_pred``.

    ``area_true`` / ``area_pred``: int64 ``(n_true + 1,)`` / ``(n_pred + 1,)``, [0] = background;
    ``ti``, ``pi``, ``inter`` (int64), ``iou`` (float64): ``(K,)`` for the K overlapping pairs,
    sorted by ``(ti, pi)``; ``fg_inter``: number of pixels that are foreground in both maps.
    """

    n_true: int
    n_pred: int
    area_true: np.ndarray
    area_pred: np.ndarray
    ti: np.ndarray
    pi: np.ndarray
    inter: np.ndarray
    iou: np.ndarray
    fg_inter: int


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"true and pred shapes differ: true {a.shape}, pred {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"expected 2-D (H, W) arrays, got shape {a.shape}")
    return a, b


def _relabel(labels: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Validate ``labels``; return its ids mapped to ``0..n`` (flat int64, ``(H * W,)``) and n."""
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels must have an integer dtype, got {labels.dtype}")
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    if np.issubdtype(labels.dtype, np.signedinteger) and int(flat.min()) < 0:
        raise ValueError(f"{name} labels must be non-negative, got minimum {int(flat.min())}")
    vmax = int(flat.max())
    if vmax <= 4 * flat.size + 1024:  # dense lookup table: O(N), no sort
        flat = flat.astype(np.int64, copy=False)
        present = np.bincount(flat, minlength=vmax + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)  # id -> rank among present ids; 0 stays 0
        return lut[flat], int(lut[-1])
    ids, inv = np.unique(flat, return_inverse=True)
    has_bg = bool(ids[0] == 0)  # without any background pixel, shift ids to start at 1
    return inv.reshape(-1).astype(np.int64) + (not has_bg), len(ids) - has_bg


def _overlap(true_labels: np.ndarray, pred_labels: np.ndarray) -> _Overlap:
    true_labels, pred_labels = _check_pair(true_labels, pred_labels)
    t, nt = _relabel(true_labels, "true")
    p, npred = _relabel(pred_labels, "pred")
    area_t = np.bincount(t, minlength=nt + 1)
    area_p = np.bincount(p, minlength=npred + 1)
    both = (t > 0) & (p > 0)
    uniq, inter = np.unique(t[both] * (npred + 1) + p[both], return_counts=True)
    ti, pi = np.divmod(uniq, npred + 1)
    iou = inter / (area_t[ti] + area_p[pi] - inter) if len(inter) else np.zeros(0)
    return _Overlap(nt, npred, area_t, area_p, ti, pi, inter, iou, int(both.sum()))


def _ratio(num: float, den: float) -> float:
    """``num / den`` with the convention ``0 / 0 -> 1.0`` (both maps empty)."""
    return 1.0 if den == 0 else float(num) / float(den)


def pixel_dice_iou(true_fg: np.ndarray, pred_fg: np.ndarray) -> tuple[float, float]:
    """Pixel-level Dice and IoU of two binary masks.

    Parameters
    ----------
    true_fg, pred_fg : np.ndarray
        Arrays of identical shape ``(H, W)``, any bool or numeric dtype; nonzero is foreground
        (so label maps may be passed directly).

    Returns
    -------
    (dice, iou) : tuple of float
        ``2|T & P| / (|T| + |P|)`` and ``|T & P| / |T | P|``; both ``1.0`` if both masks are
        empty, both ``0.0`` if exactly one is empty.
    """
    t, p = (x != 0 for x in _check_pair(true_fg, pred_fg))
    inter = int(np.count_nonzero(t & p))
    st, sp = int(np.count_nonzero(t)), int(np.count_nonzero(p))
    return _ratio(2 * inter, st + sp), _ratio(inter, st + sp - inter)


def _aji(ov: _Overlap) -> float:
    total = int(ov.area_true[1:].sum() + ov.area_pred[1:].sum())
    if len(ov.ti) == 0:  # no overlapping pair at all
        return _ratio(0, total)
    # Best pred per true object: sort by (ti, -iou, pi) so ties go to the smallest pred id.
    order = np.lexsort((ov.pi, -ov.iou, ov.ti))
    ti, pi, inter = ov.ti[order], ov.pi[order], ov.inter[order]
    first = np.ones(len(ti), dtype=bool)
    first[1:] = ti[1:] != ti[:-1]
    bt, bp, bi = ti[first], pi[first], inter[first]  # bt is unique, bp may repeat
    num = int(bi.sum())
    # unions of chosen pairs (once per true object) + areas of unmatched true / unchosen preds
    den = int((ov.area_true[bt] + ov.area_pred[bp] - bi).sum())
    den += total - int(ov.area_true[bt].sum() + ov.area_pred[np.unique(bp)].sum())
    return _ratio(num, den)


def aji(true_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) in HoVer-Net's ``get_fast_aji`` form.

    Every true object picks the overlapping prediction of maximal IoU (ties: lowest id) and adds
    their intersection / union to the numerator / denominator; true objects without overlap and
    predictions never picked (one may be picked by several true objects) add their area to the
    denominator.

    Parameters
    ----------
    true_labels, pred_labels : np.ndarray
        Integer label maps of identical shape ``(H, W)``, 0 = background.

    Returns
    -------
    float
        AJI in ``[0, 1]``; ``1.0`` if both maps are empty, ``0.0`` if exactly one is empty.
    """
    return _aji(_overlap(true_labels, pred_labels))


def _match(ov: _Overlap, iou_threshold: float) -> np.ndarray:
    """IoUs, shape ``(TP,)``, of the one-to-one matched pairs with IoU > ``iou_threshold``."""
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    keep = ov.iou > iou_threshold
    if iou_threshold >= 0.5 or not keep.any():  # pairs with IoU > 0.5 are unique
        return ov.iou[keep]
    # below 0.5 pairs may conflict: Hungarian maximum total IoU over the eligible pairs only
    rt = np.unique(ov.ti[keep], return_inverse=True)[1].reshape(-1)
    rp = np.unique(ov.pi[keep], return_inverse=True)[1].reshape(-1)
    mat = np.zeros((int(rt.max()) + 1, int(rp.max()) + 1))
    mat[rt, rp] = ov.iou[keep]
    matched = mat[linear_sum_assignment(-mat)]
    return np.asarray(matched[matched > iou_threshold])


def _pq(ov: _Overlap, iou_threshold: float) -> tuple[float, float, float, int, int, int]:
    matched = _match(ov, iou_threshold)
    if ov.n_true == 0 and ov.n_pred == 0:
        return 1.0, 1.0, 1.0, 0, 0, 0
    tp, fp, fn = len(matched), ov.n_pred - len(matched), ov.n_true - len(matched)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched.mean()) if tp else 0.0
    return dq * sq, dq, sq, tp, fp, fn


def panoptic_quality(
    true_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = 0.5
) -> tuple[float, float, float, int, int, int]:
    """Panoptic quality (Kirillov et al. 2019) of an instance segmentation.

    Objects match when IoU > ``iou_threshold``: unique for thresholds >= 0.5 (identical to
    HoVer-Net's ``get_fast_pq``); below 0.5 a maximum-total-IoU assignment over the pairs above
    the threshold is used (HoVer-Net assigns over all pairs first, which can match fewer).

    Parameters
    ----------
    true_labels, pred_labels : np.ndarray
        Integer label maps of identical shape ``(H, W)``, 0 = background.
    iou_threshold : float, default 0.5
        Strict IoU threshold in ``[0, 1)``.

    Returns
    -------
    (pq, dq, sq, tp, fp, fn) : tuple of (float, float, float, int, int, int)
        ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ`` = mean IoU of matched pairs (``0.0`` when
        ``TP == 0``), ``PQ = DQ * SQ``, and the counts; ``(1.0, 1.0, 1.0, 0, 0, 0)`` if both
        maps are empty.
    """
    return _pq(_overlap(true_labels, pred_labels), iou_threshold)


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * tp / (2 * tp + fp + fn), precision, recall


def object_f1(
    true_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = 0.5
) -> tuple[float, float, float]:
    """Object-level detection F1, precision and recall; parameters as :func:`panoptic_quality`.

    Returns
    -------
    (f1, precision, recall) : tuple of float
        ``F1 = 2TP / (2TP + FP + FN)``, ``TP / (TP + FP)``, ``TP / (TP + FN)``; all ``1.0`` if
        both maps are empty, and an undefined (``0 / 0``) precision or recall is ``0.0``.
    """
    _, _, _, tp, fp, fn = panoptic_quality(true_labels, pred_labels, iou_threshold)
    return _f1(tp, fp, fn)


def evaluate_pair(true_labels: np.ndarray, pred_labels: np.ndarray) -> ImageMetrics:
    """Compute every metric of one image from a single shared overlap table.

    Parameters
    ----------
    true_labels, pred_labels : np.ndarray
        Integer label maps of identical shape ``(H, W)``, 0 = background.

    Returns
    -------
    ImageMetrics
        Pixel Dice/IoU of ``labels > 0``, AJI, PQ/DQ/SQ and object F1/precision/recall at
        IoU > 0.5, and the object counts.
    """
    ov = _overlap(true_labels, pred_labels)
    st, sp = int(ov.area_true[1:].sum()), int(ov.area_pred[1:].sum())
    dice, iou = _ratio(2 * ov.fg_inter, st + sp), _ratio(ov.fg_inter, st + sp - ov.fg_inter)
    pq, dq, sq, tp, fp, fn = _pq(ov, 0.5)
    pairs = ov.iou > 0.5  # unique pairs, as PQ's
    matched_true, matched_pred = int(ov.area_true[ov.ti[pairs]].sum()), int(ov.area_pred[ov.pi[pairs]].sum())
    return ImageMetrics(dice, iou, _aji(ov), pq, dq, sq, *_f1(tp, fp, fn), ov.n_true, ov.n_pred, matched_true, matched_pred)


def mean_metrics(items: Sequence[ImageMetrics]) -> dict[str, float | int]:
    """Average per-image metrics over images (macro average).

    Parameters
    ----------
    items : sequence of ImageMetrics
        Per-image results; must not be empty (``ValueError`` otherwise).

    Returns
    -------
    dict of str to float or int
        The mean of every float field, ``n_images``, the summed counts (``n_true``, ``n_pred``,
        ``matched_true_px``, ``matched_pred_px``) and ``size_bias`` pooled over every matched pair.
    """
    if len(items) == 0:
        raise ValueError("mean_metrics needs at least one ImageMetrics, got an empty sequence")
    out: dict[str, float | int] = {"n_images": len(items)}
    for f in fields(ImageMetrics):
        vals = [getattr(m, f.name) for m in items]
        out[f.name] = int(sum(vals)) if f.type in (int, "int") else float(np.mean(vals))
    matched_true = int(out["matched_true_px"])
    out["size_bias"] = int(out["matched_pred_px"]) / matched_true if matched_true else 0.0
    return out
