"""The int8 calibration image: 32 crops of MoNuSeg training images (never validation images),
remade with ``python -m wsi_nuclei.training.calibration MONUSEG_TRAIN_DIR``; :mod:`.quantize` reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.quantize import CALIBRATION_IMAGE, CALIBRATION_TILE

__all__ = ["make_calibration_image"]


def make_calibration_image(monuseg_train: Path, out: Path, excluded: list[str], n: int = 32, seed: int = 0) -> list[str]:
    """Cut ``n`` crops of 256 px at 0.5 µm/px from the MoNuSeg training images not in ``excluded``
    (the validation images) and save them as one JPEG mosaic; returns one provenance line per crop."""
    from PIL import Image

    from .datasets import MONUSEG_MPP, list_images, read_rgb

    rng = np.random.default_rng(seed)
    images = [p for p in list_images(monuseg_train / "images") if p.stem not in set(excluded)]
    crops, lines, t = [], [], CALIBRATION_TILE
    for i in range(n):
        path = images[i % len(images)]
        image = read_rgb(path)
        h, w = (round(s * MONUSEG_MPP / 0.5) for s in image.shape[:2])  # area averaging, as the pipeline resamples
        small = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX))
        y, x = (int(rng.integers(0, s - t + 1)) for s in small.shape[:2])
        crops.append(small[y:y + t, x:x + t])
        lines.append(f"{i}\t{path.name}\ty={y}\tx={x}")
    cols = 8
    rows = [np.concatenate(crops[r * cols:(r + 1) * cols], axis=1) for r in range(len(crops) // cols)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, quality=92)
    return lines


if __name__ == "__main__":  # python -m wsi_nuclei.training.calibration MONUSEG_TRAIN_DIR: remake the calibration image
    import sys

    from ..model.network import DEFAULT_MODEL_DIR, load_card

    root = Path(sys.argv[1])
    validation = list(load_card(DEFAULT_MODEL_DIR).training.get("validation_images", []))
    provenance = make_calibration_image(root, CALIBRATION_IMAGE, validation)
    CALIBRATION_IMAGE.with_suffix(".txt").write_text(
        "int8 calibration crops (wsi_nuclei/model/quantize.py): 32 crops of 256 x 256 px at 0.5 µm/px, cut from MoNuSeg 2018\n"
        "training images that are not validation images of the shipped model, mosaic of 8 x 4, JPEG quality 92.\n"
        "MoNuSeg 2018: CC BY-NC-SA 4.0, non-commercial use. Made by: python -m wsi_nuclei.training.calibration "
        "../shared/data/monuseg/train\n"
        "crop\timage\ttop-left at 0.5 um/px\n" + "\n".join(provenance) + "\n"
    )
