"""Tests for the post-processing (wsi_nuclei.nuclei.instances), the training targets (wsi_nuclei.training.targets)
and the label resampling helpers of wsi_nuclei.model.infer, on synthetic label maps."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_nuclei.errors import ConfigError
from wsi_nuclei.model.infer import resize_labels, working_shape
from wsi_nuclei.model.network import PostProcess
from wsi_nuclei.nuclei.instances import probabilities_to_instances, relabel_sequential, remove_small
from wsi_nuclei.training.metrics import evaluate_pair
from wsi_nuclei.training.targets import augment, make_targets, random_crop

OUTPUTS = ("nucleus", "boundary", "distance")
MPP = 0.5  # working resolution: default min_area_um2 = 3 µm² is 12 px
# three touching pairs (horizontal, vertical, diagonal; centres 10 px apart) and three isolated discs
PAIRS = [((16, 16), (16, 26)), ((48, 16), (58, 16)), ((40, 50), (47, 57))]
SINGLES = [(80, 80), (20, 75), (80, 40)]


def _discs(centres: list[tuple[int, int]], shape: tuple[int, int] = (96, 96), radius: int = 6) -> np.ndarray:
    """Label map of discs drawn in order (a later disc overwrites an earlier one)."""
    labels = np.zeros(shape, np.int32)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for i, (y, x) in enumerate(centres, start=1):
        labels[(rr - y) ** 2 + (cc - x) ** 2 <= radius * radius] = i
    return labels


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return _discs([c for pair in PAIRS for c in pair] + SINGLES)


@pytest.fixture(scope="module")
def ideal(truth: np.ndarray) -> np.ndarray:
    """"Perfect" probabilities: the training targets themselves."""
    return make_targets(truth, OUTPUTS)


def _assert_consecutive_int32(labels: np.ndarray) -> None:
    assert labels.dtype == np.int32
    ids = np.unique(labels)
    assert np.array_equal(ids, np.arange(len(ids)))


# ---------------------------------------------------------------- probabilities_to_instances


def test_pairs_really_touch(truth: np.ndarray) -> None:
    from scipy import ndimage as ndi

    _, n = ndi.label(truth > 0, structure=ndi.generate_binary_structure(2, 1))
    assert int(truth.max()) == 9 and n == 6


@pytest.mark.parametrize("method", ["boundary", "distance"])
def test_seeded_methods_split_touching_nuclei(truth: np.ndarray, ideal: np.ndarray, method: str) -> None:
    labels = probabilities_to_instances(ideal, OUTPUTS, PostProcess(method=method), MPP)
    assert labels.shape == truth.shape
    _assert_consecutive_int32(labels)
    m = evaluate_pair(truth, labels)
    assert m.n_pred == m.n_true == 9
    assert int(labels.max()) == 9
    assert m.aji > 0.9
    assert m.dice == pytest.approx(1.0)


def test_threshold_merges_touching_pairs(truth: np.ndarray, ideal: np.ndarray) -> None:
    labels = probabilities_to_instances(ideal, OUTPUTS, PostProcess(method="threshold"), MPP)
    _assert_consecutive_int32(labels)
    assert int(labels.max()) == 9 - len(PAIRS)
    m = evaluate_pair(truth, labels)
    assert m.n_pred < m.n_true
    assert m.dice == pytest.approx(1.0)  # same foreground, fewer objects
    for a, b in PAIRS:
        assert labels[a] == labels[b] != 0


@pytest.mark.parametrize("method", ["boundary", "distance", "threshold"])
def test_min_area_removes_tiny_blob(truth: np.ndarray, method: str) -> None:
    labels_in = truth.copy()
    labels_in[2:4, 90:92] = 50  # 4 px = 1 µm² at 0.5 mpp, below the default 3 µm²
    probs = make_targets(labels_in, OUTPUTS)
    out = probabilities_to_instances(probs, OUTPUTS, PostProcess(method=method), MPP)
    assert out[2:4, 90:92].max() == 0
    _assert_consecutive_int32(out)
    # with min_area 0 the blob is kept
    keep = probabilities_to_instances(probs, OUTPUTS, PostProcess(method=method, min_area_um2=0.0), MPP)
    assert keep[2:4, 90:92].min() > 0
    assert int(keep.max()) == int(out.max()) + 1


@pytest.mark.parametrize("method", ["boundary", "distance", "threshold"])
def test_empty_probabilities(method: str) -> None:
    probs = np.zeros((3, 40, 48), np.float32)
    out = probabilities_to_instances(probs, OUTPUTS, PostProcess(method=method), MPP)
    assert out.shape == (40, 48) and out.dtype == np.int32
    assert not out.any()


def test_nucleus_only_model_threshold(truth: np.ndarray, ideal: np.ndarray) -> None:
    out = probabilities_to_instances(ideal[:1], ("nucleus",), PostProcess(method="threshold"), MPP)
    assert int(out.max()) == 6
    with pytest.raises(ConfigError, match="boundary"):
        probabilities_to_instances(ideal[:1], ("nucleus",), PostProcess(method="boundary"), MPP)
    with pytest.raises(ConfigError, match="distance"):
        probabilities_to_instances(ideal[:1], ("nucleus",), PostProcess(method="distance"), MPP)


@pytest.mark.parametrize("shape", [(2, 96, 96), (4, 96, 96), (96, 96)])
def test_wrong_channel_count(ideal: np.ndarray, shape: tuple[int, ...]) -> None:
    probs = np.zeros(shape, np.float32)
    with pytest.raises(ConfigError):
        probabilities_to_instances(probs, OUTPUTS, PostProcess(), MPP)


def test_unknown_method(ideal: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="watershed-2000"):
        probabilities_to_instances(ideal, OUTPUTS, PostProcess(method="watershed-2000"), MPP)


def test_relabel_and_remove_small() -> None:
    labels = np.array([[0, 7, 7, 3], [0, 7, 0, 3], [9, 0, 0, 0]], np.int32)
    small = remove_small(labels, 2)
    assert set(np.unique(small)) == {0, 3, 7}  # label 9 (1 px) is gone
    assert remove_small(labels, 1) is labels
    out = relabel_sequential(small)
    _assert_consecutive_int32(out)
    assert out[0, 1] == out[1, 1] != out[0, 3]
    assert not relabel_sequential(np.zeros((3, 3), np.int32)).any()


# ---------------------------------------------------------------- infer helpers


def test_resize_labels_nearest_round_trip(truth: np.ndarray) -> None:
    down = resize_labels(truth, (48, 48))
    assert down.shape == (48, 48) and down.dtype == truth.dtype
    assert set(np.unique(down)) == set(np.unique(truth))
    up = resize_labels(down, truth.shape)
    assert up.shape == truth.shape
    assert set(np.unique(up)) == set(np.unique(truth))
    assert np.mean(up == truth) > 0.95
    # only existing ids, never interpolated ones
    assert set(np.unique(resize_labels(truth, (37, 61)))) <= set(np.unique(truth))
    assert resize_labels(truth, truth.shape) is truth


def test_resize_labels_exact_on_blocks() -> None:
    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    big = resize_labels(small, (6, 8))
    assert np.array_equal(big, np.kron(small, np.ones((2, 2), np.int32)))
    assert np.array_equal(resize_labels(big, (3, 4)), small)


def test_working_shape() -> None:
    assert working_shape((1000, 1000), 0.25, 0.5) == (500, 500)
    assert working_shape((1000, 600), 0.25, 0.5) == (500, 300)
    assert working_shape((500, 300), 0.5, 0.25) == (1000, 600)
    assert working_shape((512, 512), 0.5, 0.5) == (512, 512)
    assert working_shape((3, 3), 0.1, 10.0) == (1, 1)  # never empty


# ---------------------------------------------------------------- targets


def _two_squares() -> np.ndarray:
    labels = np.zeros((30, 40), np.int32)
    labels[10:20, 10:20] = 1
    labels[10:20, 20:30] = 2  # touches square 1 along columns 19 | 20
    return labels


def test_make_targets_boundary_and_distance() -> None:
    labels = _two_squares()
    t = make_targets(labels, OUTPUTS)
    assert t.shape == (3, 30, 40) and t.dtype == np.float32
    nucleus, boundary, distance = t
    assert np.array_equal(nucleus, (labels > 0).astype(np.float32))
    # the contact line is boundary on both sides, so the squares are split
    assert boundary[10:20, 19].all() and boundary[10:20, 20].all()
    assert not boundary[labels == 0].any()
    assert not boundary[12:18, 12:18].any() and not boundary[12:18, 22:28].any()
    assert set(np.unique(boundary)) == {0.0, 1.0}
    interior = (nucleus > 0) & (boundary == 0)
    from scipy import ndimage as ndi

    _, n = ndi.label(interior, structure=ndi.generate_binary_structure(2, 1))
    assert n == 2
    # distance: 1 at each centre, 0 on background, > 0 inside
    for lab in (1, 2):
        assert distance[labels == lab].max() == pytest.approx(1.0)
        assert distance[labels == lab].min() > 0
    assert not distance[labels == 0].any()
    assert distance.max() <= 1.0
    # contact pixels are as close to their own outline as outer edge pixels
    assert distance[15, 19] == pytest.approx(distance[15, 10])


def test_make_targets_order_and_unknown() -> None:
    labels = _two_squares()
    t = make_targets(labels, ("distance", "nucleus"))
    assert np.array_equal(t[1], (labels > 0).astype(np.float32))
    assert t[0].max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="colour"):
        make_targets(labels, ("nucleus", "colour"))
    assert not make_targets(np.zeros((5, 5), np.int32), OUTPUTS).any()


def test_augment_keeps_alignment(truth: np.ndarray) -> None:
    labels = truth[:, :80]  # not square, so a 90° rotation changes the shape
    labels = labels.copy()
    labels[0:5, 0:3] = 20  # break the symmetry
    targets = make_targets(labels, OUTPUTS)
    image = np.zeros((*labels.shape, 3), np.uint8)
    image[:, :, 0] = targets[0] * 255
    image[:, :, 1] = targets[1] * 255
    image[:, :, 2] = np.round(targets[2] * 200)
    seen = set()
    for seed in range(16):
        img, tgt = augment(image, targets, np.random.default_rng(seed), colour=False)
        assert img.dtype == np.uint8 and tgt.dtype == np.float32
        assert img.flags.c_contiguous and tgt.flags.c_contiguous
        assert img.shape[:2] == tgt.shape[1:]
        assert np.array_equal(img[:, :, 0], (tgt[0] * 255).astype(np.uint8))
        assert np.array_equal(img[:, :, 1], (tgt[1] * 255).astype(np.uint8))
        assert np.array_equal(img[:, :, 2], np.round(tgt[2] * 200).astype(np.uint8))
        seen.add((img.shape, img[:, :, 0].tobytes()))
    assert len(seen) > 4  # several distinct dihedral transforms were drawn


def test_augment_colour_changes_only_image(truth: np.ndarray) -> None:
    targets = make_targets(truth, OUTPUTS)
    image = np.full((*truth.shape, 3), 200, np.uint8)
    image[truth > 0] = (90, 40, 150)
    rng = np.random.default_rng(3)
    img, tgt = augment(image, targets, rng, colour=True)
    assert img.shape == image.shape and img.dtype == np.uint8
    assert tgt.shape == targets.shape
    # the targets are permuted exactly, never interpolated
    assert set(np.unique(tgt[0])) == {0.0, 1.0} and tgt[0].sum() == targets[0].sum()


@pytest.mark.parametrize("size", [32, 128])
def test_random_crop_alignment(truth: np.ndarray, size: int) -> None:
    targets = make_targets(truth, OUTPUTS)
    image = np.repeat((targets[0] * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    img, tgt = random_crop(image, targets, size, np.random.default_rng(0))
    assert img.shape == (size, size, 3) and tgt.shape == (3, size, size)
    assert np.array_equal(img[:, :, 0], (tgt[0] * 255).astype(np.uint8))
