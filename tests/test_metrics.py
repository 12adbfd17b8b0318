"""Tests for wsi_nuclei.training.metrics: hand-computed cases and a brute-force reference."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from wsi_nuclei.training.metrics import (
    ImageMetrics,
    aji,
    evaluate_pair,
    mean_metrics,
    object_f1,
    panoptic_quality,
    pixel_dice_iou,
)

FLOAT_FIELDS = ("dice", "iou", "aji", "pq", "dq", "sq", "f1", "precision", "recall")


def _close(m: ImageMetrics, **expected: float) -> None:
    for name, value in expected.items():
        assert getattr(m, name) == pytest.approx(value), name


# ---------------------------------------------------------------- hand-computed


def test_two_squares_one_shifted() -> None:
    true = np.zeros((6, 6), np.int32)
    true[0:2, 0:2] = 1  # A, 4 px
    true[3:5, 3:5] = 2  # B, 4 px
    pred = np.zeros((6, 6), np.int32)
    pred[0:2, 1:3] = 1  # A shifted right by one: inter 2, union 6, IoU 1/3
    pred[3:5, 3:5] = 2  # B identical: IoU 1
    m = evaluate_pair(true, pred)
    # pixels: |T|=|P|=8, inter 6 -> dice 12/16, iou 6/10
    # AJI: (2 + 4) / (6 + 4) = 0.6
    # PQ: only B matched (1/3 <= 0.5): TP=1 FP=1 FN=1 -> DQ 1/2, SQ 1, PQ 1/2
    _close(m, dice=0.75, iou=0.6, aji=0.6, pq=0.5, dq=0.5, sq=1.0,
           f1=0.5, precision=0.5, recall=0.5)
    assert (m.n_true, m.n_pred) == (2, 2)
    assert panoptic_quality(true, pred) == pytest.approx((0.5, 0.5, 1.0, 1, 1, 1))


def test_iou_exactly_half_is_not_a_match() -> None:
    true = np.zeros((5, 6), np.int64)
    true[1:4, 1:4] = 1  # 3x3 = 9 px
    pred = np.zeros((5, 6), np.int64)
    pred[1:4, 2:5] = 1  # shifted: inter 6, union 12 -> IoU exactly 0.5
    pq, dq, sq, tp, fp, fn = panoptic_quality(true, pred)
    assert (pq, dq, sq, tp, fp, fn) == (0.0, 0.0, 0.0, 0, 1, 1)
    assert aji(true, pred) == pytest.approx(0.5)  # 6 / 12
    # 4x4 shifted by one column: inter 12, union 20 -> IoU 0.6 > 0.5 matched
    true[:] = 0
    pred[:] = 0
    true[0:4, 0:4] = 1
    pred[0:4, 1:5] = 1
    assert panoptic_quality(true, pred) == pytest.approx((0.6, 1.0, 0.6, 1, 0, 0))


def test_split_prediction_aji() -> None:
    true = np.zeros((4, 6), np.int32)
    true[1:3, 1:5] = 1  # 2x4 = 8 px
    pred = np.zeros((4, 6), np.int32)
    pred[1:3, 1:4] = 5  # 6 px, inside true: IoU 6/8 = 0.75
    pred[1:3, 4:5] = 9  # 2 px, inside true: IoU 2/8 = 0.25
    m = evaluate_pair(true, pred)
    # AJI: true 1 picks pred 5 -> num 6, den 8; pred 9 unused adds 2 -> 6/10
    # PQ: TP=1 (0.75), FP=1, FN=0 -> DQ 1/1.5 = 2/3, SQ 0.75, PQ 0.5
    # F1 = 2/(2+1) = 2/3, precision 1/2, recall 1
    _close(m, dice=1.0, iou=1.0, aji=0.6, pq=0.5, dq=2 / 3, sq=0.75,
           f1=2 / 3, precision=0.5, recall=1.0)


def test_split_in_equal_halves_tie() -> None:
    true = np.zeros((2, 4), np.int32)
    true[:, :] = 1  # 8 px
    pred = np.array([[7, 7, 3, 3], [7, 7, 3, 3]], np.int32)  # two halves, IoU 0.5 each
    # AJI: either half -> num 4, den 8 + other half 4 = 12 -> 1/3
    assert aji(true, pred) == pytest.approx(1 / 3)
    # nothing strictly above 0.5: TP=0, FP=2, FN=1
    assert panoptic_quality(true, pred) == (0.0, 0.0, 0.0, 0, 2, 1)
    # below 0.5 the assignment keeps exactly one pair (IoU 0.5): TP=1 FP=1 FN=0
    # DQ = 1/1.5, SQ = 0.5, PQ = 1/3
    assert panoptic_quality(true, pred, 0.4) == pytest.approx((1 / 3, 2 / 3, 0.5, 1, 1, 0))


def test_merged_prediction() -> None:
    true = np.zeros((2, 4), np.int32)
    true[:, 0:3] = 1  # 6 px
    true[:, 3:4] = 2  # 2 px
    pred = np.full((2, 4), 4, np.int32)  # one 8 px object covering both
    m = evaluate_pair(true, pred)
    # IoU(1,4) = 6/8, IoU(2,4) = 2/8; both true objects pick pred 4 (standard AJI)
    # AJI: (6 + 2) / (8 + 8) = 0.5
    # PQ: TP=1 FP=0 FN=1 -> DQ 2/3, SQ 0.75, PQ 0.5; precision 1, recall 1/2
    _close(m, dice=1.0, iou=1.0, aji=0.5, pq=0.5, dq=2 / 3, sq=0.75,
           f1=2 / 3, precision=1.0, recall=0.5)
    assert (m.n_true, m.n_pred) == (2, 1)


def test_one_pixel_objects() -> None:
    true = np.zeros((4, 4), np.uint8)
    true[0, 0] = 1
    true[2, 2] = 2
    pred = np.zeros((4, 4), np.uint16)
    pred[0, 0] = 3  # exact match of true 1
    pred[2, 3] = 4  # misses true 2 (adjacent pixel)
    m = evaluate_pair(true, pred)
    # pixels: inter 1, |T|=|P|=2 -> dice 2/4, iou 1/3
    # AJI: num 1, den 1 + true 2 unmatched (1) + pred 4 unused (1) = 3
    # PQ: TP=1 FP=1 FN=1 -> DQ 0.5, SQ 1
    _close(m, dice=0.5, iou=1 / 3, aji=1 / 3, pq=0.5, dq=0.5, sq=1.0,
           f1=0.5, precision=0.5, recall=0.5)


def test_empty_prediction() -> None:
    true = np.zeros((5, 5), np.int32)
    true[1:3, 1:3] = 1
    m = evaluate_pair(true, np.zeros_like(true))
    assert all(getattr(m, f) == 0.0 for f in FLOAT_FIELDS)
    assert (m.n_true, m.n_pred) == (1, 0)
    assert panoptic_quality(true, np.zeros_like(true)) == (0.0, 0.0, 0.0, 0, 0, 1)


def test_empty_truth() -> None:
    pred = np.zeros((5, 5), np.int32)
    pred[1:3, 1:3] = 8
    m = evaluate_pair(np.zeros_like(pred), pred)
    assert all(getattr(m, f) == 0.0 for f in FLOAT_FIELDS)
    assert (m.n_true, m.n_pred) == (0, 1)
    assert object_f1(np.zeros_like(pred), pred) == (0.0, 0.0, 0.0)


def test_both_empty() -> None:
    z = np.zeros((5, 5), np.int32)
    m = evaluate_pair(z, z)
    assert all(getattr(m, f) == 1.0 for f in FLOAT_FIELDS)
    assert (m.n_true, m.n_pred) == (0, 0)
    assert pixel_dice_iou(z, z) == (1.0, 1.0)
    assert aji(z, z) == 1.0
    assert panoptic_quality(z, z) == (1.0, 1.0, 1.0, 0, 0, 0)
    assert object_f1(z, z) == (1.0, 1.0, 1.0)


def test_pixel_dice_iou_binary() -> None:
    t = np.array([[1, 1, 0], [0, 0, 0]], bool)
    p = np.array([[0, 1, 1], [0, 0, 0]], bool)
    # inter 1, |T|=|P|=2 -> dice 2/4, iou 1/3
    assert pixel_dice_iou(t, p) == pytest.approx((0.5, 1 / 3))


def test_non_consecutive_ids_and_large_ids() -> None:
    true = np.zeros((6, 6), np.int64)
    true[0:2, 0:2] = 1
    true[3:5, 3:5] = 2
    pred = np.zeros((6, 6), np.int64)
    pred[0:2, 1:3] = 1
    pred[3:5, 3:5] = 2
    ref = evaluate_pair(true, pred)
    true2 = np.where(true == 1, 10**12, np.where(true == 2, 7, 0))  # sort path
    pred2 = np.where(pred == 1, 40, np.where(pred == 2, 3, 0)).astype(np.uint32)
    assert evaluate_pair(true2, pred2) == ref
    # a map with no background pixel and huge ids
    full = np.full((3, 3), 2**40, np.int64)
    assert evaluate_pair(full, np.full((3, 3), 5, np.uint64)).pq == 1.0


def test_identical_and_permuted_ids() -> None:
    rng = np.random.default_rng(0)
    lab = _random_rects(rng, (40, 40), 12)
    m = evaluate_pair(lab, lab)
    assert all(getattr(m, f) == pytest.approx(1.0) for f in FLOAT_FIELDS)
    pred = _random_rects(rng, (40, 40), 12)
    ref = evaluate_pair(lab, pred)
    perm_t = np.concatenate([[0], rng.permutation(np.arange(1, 100)) * 3])
    perm_p = np.concatenate([[0], rng.permutation(np.arange(1, 100)) + 1000])
    assert evaluate_pair(perm_t[lab], perm_p[pred]) == ref


def test_errors() -> None:
    a = np.zeros((4, 5), np.int32)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        evaluate_pair(a, np.zeros((5, 4), np.int32))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        pixel_dice_iou(a, np.zeros((5, 4), np.int32))
    with pytest.raises(ValueError, match="integer"):
        aji(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="integer"):
        panoptic_quality(a, a.astype(bool))
    b = a.copy()
    b[0, 0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        evaluate_pair(a, b)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_pair(np.zeros(4, np.int32), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(a, a, 1.0)
    with pytest.raises(ValueError):
        mean_metrics([])


def test_mean_metrics_and_as_dict() -> None:
    z = np.zeros((3, 3), np.int32)
    one = z.copy()
    one[0, 0] = 1
    m1, m2 = evaluate_pair(z, z), evaluate_pair(one, z)  # all 1.0 and all 0.0
    d = m2.as_dict()
    assert set(d) == set(FLOAT_FIELDS) | {"n_true", "n_pred", "matched_true_px", "matched_pred_px", "size_bias"}
    out = mean_metrics([m1, m2])
    assert all(out[f] == 0.5 for f in FLOAT_FIELDS)
    assert (out["n_images"], out["n_true"], out["n_pred"]) == (2, 1, 0)


def test_size_bias_over_matched_pairs_only() -> None:
    """Predicted / true area of the pairs matched at IoU > 0.5, pooled over images; unmatched
    objects do not count (a missed nucleus is a detection error, not an outline error)."""
    true = np.zeros((20, 20), np.int32)
    true[0:4, 0:4] = 1  # 16 px, predicted 3 x 4 = 12 px: IoU 0.75, matched
    true[10:14, 10:14] = 2  # 16 px, not predicted
    pred = np.zeros((20, 20), np.int32)
    pred[0:3, 0:4] = 5
    pred[16:18, 16:18] = 6  # 4 px, no true partner
    m = evaluate_pair(true, pred)
    assert (m.matched_true_px, m.matched_pred_px) == (16, 12) and m.size_bias == pytest.approx(0.75)
    bigger = np.zeros((20, 20), np.int32)
    bigger[0:5, 0:4] = 1  # 20 px against its 16: IoU 0.8
    out = mean_metrics([m, evaluate_pair(true, bigger)])
    assert out["size_bias"] == pytest.approx((12 + 20) / (16 + 16))  # pooled over both images' pairs
    assert evaluate_pair(true, np.zeros_like(true)).size_bias == 0.0


# ---------------------------------------------------------------- brute force


def _random_rects(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Label map of ``n`` random rectangles painted in order (later ones occlude)."""
    lab = np.zeros(shape, np.int32)
    for k in range(n):
        r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(1, 8), rng.integers(1, 8)
        lab[r:r + h, c:c + w] = int(rng.integers(1, 60)) if k % 3 == 0 else k + 1
    return lab


def _brute(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Loop-based reference: dense IoU matrix, HoVer-Net style AJI, greedy PQ."""
    tids = [i for i in np.unique(true) if i]
    pids = [j for j in np.unique(pred) if j]
    inter = np.zeros((len(tids), len(pids)))
    union = np.zeros((len(tids), len(pids)))
    for a, i in enumerate(tids):
        for b, j in enumerate(pids):
            ti, pj = true == i, pred == j
            inter[a, b] = np.sum(ti & pj)
            union[a, b] = np.sum(ti | pj)
    iou = inter / np.maximum(union, 1)
    num = den = 0.0
    used = set()
    for a, i in enumerate(tids):
        if len(pids) and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            num += inter[a, b]
            den += union[a, b]
            used.add(b)
        else:
            den += np.sum(true == i)
    den += sum(np.sum(pred == j) for b, j in enumerate(pids) if b not in used)
    matched = [iou[a, b] for a, b in itertools.product(range(len(tids)), range(len(pids)))
               if iou[a, b] > 0.5]
    tp = len(matched)
    fp, fn = len(pids) - tp, len(tids) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 1.0
    sq = float(np.mean(matched)) if tp else (1.0 if not tids and not pids else 0.0)
    ft, fpm = true > 0, pred > 0
    s = ft.sum() + fpm.sum()
    return {
        "aji": num / den if den else 1.0, "pq": dq * sq, "dq": dq, "sq": sq,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "dice": 2 * np.sum(ft & fpm) / s if s else 1.0,
        "iou": np.sum(ft & fpm) / np.sum(ft | fpm) if s else 1.0,
        "n_true": len(tids), "n_pred": len(pids),
    }


@pytest.mark.parametrize("seed", range(6))
def test_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = _random_rects(rng, (24, 24), 10)
    pred = _random_rects(rng, (24, 24), 10) if seed % 2 else true.copy()
    if seed % 2 == 0:  # perturb: shift the whole map and drop a few pixels
        pred = np.roll(pred, 1, axis=1)
        pred[rng.random(pred.shape) < 0.1] = 0
    got = evaluate_pair(true, pred).as_dict()
    ref = _brute(true, pred)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k


def test_speed_large_image() -> None:
    # 43 x 43 = 1849 squares on a 1000x1000 grid; prediction shifted by 2 px
    rng = np.random.default_rng(1)
    cell = 23
    rr, cc = np.mgrid[0:1000, 0:1000]
    gi, gj = rr // cell, cc // cell
    sizes = rng.integers(8, 20, size=(44, 44))
    inside = (rr % cell < sizes[gi, gj]) & (cc % cell < sizes[gi, gj]) & (gi < 43) & (gj < 43)
    true = np.where(inside, gi * 43 + gj + 1, 0).astype(np.int32)
    pred = np.roll(true, 2, axis=0) * 7
    t0 = time.perf_counter()
    m = evaluate_pair(true, pred)
    elapsed = time.perf_counter() - t0
    assert m.n_true == 43 * 43 and m.n_pred == 43 * 43
    assert 0.0 < m.pq < 1.0
    assert elapsed < 1.0, f"evaluate_pair took {elapsed:.3f}s"
