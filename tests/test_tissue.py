"""Tissue detection: glass out, stained tissue in, also when a slide holds no glass at all."""

from __future__ import annotations

import numpy as np

from wsi_nuclei.slides.tissue import tissue_mask

from .slides import disc_image


def test_blank_glass_has_no_tissue():
    glass = np.full((200, 300, 3), 242, np.uint8)
    assert not tissue_mask(glass).any()


def test_tissue_on_glass_is_found():
    img = np.full((200, 200, 3), 243, np.uint8)
    img[50:150, 40:160] = disc_image((100, 120), [(30, 30), (80, 60)], 8, seed=1)
    mask = tissue_mask(img)
    assert mask[60:140, 50:150].all() and not mask[:40].any() and not mask[:, :30].any()


def test_slide_that_is_all_tissue_is_all_tissue():
    """Pale pink stroma between nuclei is tissue even with no glass to compare it with."""
    centres = [(x, y) for y in range(8, 256, 16) for x in range(8, 256, 16)]
    mask = tissue_mask(disc_image((256, 256), centres, 3.5, seed=2))
    assert mask.mean() > 0.95  # (Otsu alone: about 0.15, the nuclei)


def test_cmu_sample_thumbnail(shared_data):
    from wsi_nuclei.slides.reader import open_slide

    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as s:
        thumb, _ = s.thumbnail(512)
    frac = tissue_mask(thumb).mean()
    assert 0.2 < frac < 0.8  # a strip of skin with glass around it


def test_transparent_pixels_are_composited_on_white():
    """Slide reads come as RGBA; the fast path (only non-opaque pixels) equals compositing all."""
    from wsi_nuclei.slides.reader import composite_on_white

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 255
    rgba[20:30, :, 3] = 0
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    expected = (rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
    out = composite_on_white(rgba)
    assert out.shape == (64, 48, 3) and out.flags.c_contiguous
    assert np.array_equal(out, expected)
    assert (out[20:30] == 255).all() and np.array_equal(out[:20], rgba[:20, :, :3])
    opaque = rgba.copy()
    opaque[..., 3] = 255
    assert np.array_equal(composite_on_white(opaque), rgba[..., :3])
    assert np.array_equal(composite_on_white(rgba[..., :3]), rgba[..., :3])
