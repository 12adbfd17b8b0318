"""Test-time augmentation: exact inverses, equivariance, and the card/CLI plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_nuclei.errors import ConfigError
from wsi_nuclei.model.tta import TTA_MODES, transforms, with_tta


def _pixelwise(tiles: np.ndarray) -> np.ndarray:
    """A per-pixel 'model' (equivariant to every flip/rotation): 2 channels from the colours."""
    x = tiles.astype(np.float32) / 255
    return np.stack([x[..., 0] * x[..., 2], x[..., 1]], axis=1)


def _asymmetric(tiles: np.ndarray) -> np.ndarray:
    """A 'model' that is not equivariant: a ramp added along x, and a shifted copy."""
    x = tiles.astype(np.float32).mean(axis=3) / 255
    ramp = np.linspace(0, 1, x.shape[2], dtype=np.float32)[None, None, :]
    return np.stack([x + ramp, np.roll(x, 3, axis=1)], axis=1)


def test_transforms_are_the_group():
    assert transforms("none") == [(0, False)]
    assert len(set(transforms("flip4"))) == 4 and len(set(transforms("dihedral8"))) == 8
    with pytest.raises(ConfigError, match="dihedral8"):
        transforms("rot3")


@pytest.mark.parametrize("mode", TTA_MODES)
def test_an_equivariant_model_is_unchanged(mode):
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)  # not square
    np.testing.assert_allclose(with_tta(_pixelwise, mode)(tiles), _pixelwise(tiles), rtol=0, atol=1e-6)


def test_dihedral8_of_a_symmetric_input_equals_no_tta():
    yy, xx = np.mgrid[0:33, 0:33]
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 100)[None, :, :, None]
    tiles = np.where(disc, np.uint8(60), np.uint8(230)).repeat(3, axis=3)  # invariant under all 8 transforms
    np.testing.assert_allclose(with_tta(_pixelwise, "dihedral8")(tiles), _pixelwise(tiles), atol=1e-6)


def test_dihedral8_makes_any_model_equivariant():
    tiles = np.random.default_rng(1).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    f = with_tta(_asymmetric, "dihedral8")
    out = f(tiles)
    assert not np.allclose(out, _asymmetric(tiles))  # it did average something
    rotated = f(np.ascontiguousarray(np.rot90(tiles, 1, axes=(1, 2))))
    np.testing.assert_allclose(rotated, np.rot90(out, 1, axes=(2, 3)), atol=1e-5)
    flipped = with_tta(_asymmetric, "flip4")(np.ascontiguousarray(tiles[:, ::-1]))
    np.testing.assert_allclose(flipped, with_tta(_asymmetric, "flip4")(tiles)[:, :, ::-1], atol=1e-5)


def test_segment_image_honours_tta(shared_data):
    torch = pytest.importorskip("torch")
    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.infer import predict_probabilities, resize_image, working_shape
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.training.datasets import load_tnbc

    torch.set_num_threads(1)
    net, card = load_model()
    model, _ = make_predictor(net, card, "torch", "cpu")
    s = load_tnbc(shared_data / "tnbc", limit=1)[0]
    img = resize_image(s.image[:256, :256], working_shape((256, 256), s.mpp, card.working_mpp))
    plain = predict_probabilities(model, card, img)
    flip = predict_probabilities(model, card, img, tta="flip4")
    def p(v: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, card, np.ascontiguousarray(v))

    assert img.shape[0] % 32 == 0  # no padding: the flips see the same pixels
    manual = np.mean([p(img), p(img[:, ::-1])[:, :, ::-1], p(img[::-1])[:, ::-1], p(img[::-1, ::-1])[:, ::-1, ::-1]], axis=0)
    np.testing.assert_allclose(flip, manual, atol=1e-5)
    assert np.abs(flip - plain).max() > 1e-4
