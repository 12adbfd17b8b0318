"""Synthetic slides for exact invariants: tiled JPEG TIFF pyramids with nucleus-like discs."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramid(path: Path, level0: np.ndarray, mpp: float, levels: int = 2) -> Path:
    """Write ``level0`` (H, W, 3) uint8 as a tiled JPEG TIFF whose pyramid levels are top-level
    pages (OpenSlide's generic TIFF reader then sees every level), with the resolution in the tags."""
    import tifffile
    from PIL import Image

    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        img = level0
        for k in range(levels):
            tif.write(img, tile=(256, 256), compression="jpeg", photometric="rgb",
                      resolution=(res / 2**k, res / 2**k), resolutionunit="CENTIMETER",
                      subfiletype=0 if k == 0 else 1)
            img = np.asarray(Image.fromarray(img).reduce(2))
    return path


def disc_image(shape: tuple[int, int], centres: list[tuple[float, float]], radius: float, seed: int = 0) -> np.ndarray:
    """Pink H&E-like background with dark purple discs at ``centres`` (x, y) in pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = (232, 180, 210)
    img += rng.normal(0, 6, img.shape)
    for cx, cy in centres:  # each disc within its bounding box (the same pixels as a whole-image test)
        y0, y1 = max(0, int(np.floor(cy - radius)) - 1), min(h, int(np.ceil(cy + radius)) + 2)
        x0, x1 = max(0, int(np.floor(cx - radius)) - 1), min(w, int(np.ceil(cx + radius)) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        box = img[y0:y1, x0:x1]
        box[inside] = (75, 45, 130) + rng.normal(0, 8, (int(inside.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def cmu_crop_slide(path: Path, box: tuple[int, int, int, int]) -> Path:
    """A 2-level pyramid from a region (x, y, w, h) of the bundled CMU-1-Small-Region.svs
    (0.499 µm/px; the same file as ../shared/data/wsi), so it needs no data folder."""
    import openslide

    from wsi_nuclei.api import SAMPLE_SLIDE

    with openslide.OpenSlide(str(SAMPLE_SLIDE)) as s:
        region = np.asarray(s.read_region(box[:2], 0, box[2:]).convert("RGB"))
    return write_pyramid(path, region, 0.499, levels=2)


def disc_slide(path: Path, shape: tuple[int, int], seed: int, mpp: float = 0.5, spacing: int = 26, radius: float = 6.5) -> Path:
    """A tiled TIFF slide of ``shape`` (H, W) px at ``mpp`` densely covered with nucleus-like
    discs on a jittered grid (about one per ``spacing``² px)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    centres = [(x + rng.uniform(-4, 4), y + rng.uniform(-4, 4))
               for y in range(spacing // 2, h, spacing) for x in range(spacing // 2, w, spacing)]
    return write_pyramid(path, disc_image(shape, centres, radius, seed), mpp, levels=2)


def disk_fills_at_second_write(monkeypatch) -> None:  # noqa: ANN001
    """Fault injection: the GeoJSON writer's second write fails as on a full disk (ENOSPC)."""
    from wsi_nuclei.outputs import geojson as export

    real = export.GeoJSONWriter.write_encoded
    calls = {"n": 0}

    def full_disk(self, blob: bytes, count: int) -> None:  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(self, blob, count)

    monkeypatch.setattr(export.GeoJSONWriter, "write_encoded", full_disk)
