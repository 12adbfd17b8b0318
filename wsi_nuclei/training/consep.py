"""CoNSeP (Graham et al. 2019), from a re-tiled copy: 41 colorectal images, 24,332 nuclei.

Layout: ``<root>/{images,instances,types}/<split>/<split>_<k>_<iii>.*``, 16 tiles of 256² per
1000×1000 image (JPEG images, 16-bit instance maps). Tiles are pasted back at their positions,
so a sample is the whole original image. ``root`` is the dataset folder (holding ``images/``).
The images of this copy are JPEG: numbers on it are not comparable with published CoNSeP results.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..nuclei.classes import consep_type_map
from ..nuclei.instances import relabel_sequential
from .datasets import Sample, read_label_image, read_rgb

__all__ = ["load_consep", "CONSEP_MPP", "CONSEP_TILE_ORIGINS"]

log = logging.getLogger(__name__)

#: CoNSeP is 40x (Graham et al. 2019: ~0.25 µm/px; InstanSeg uses 0.275).
CONSEP_MPP = 0.25
#: CoNSeP tiles: top-left corners (y, x) of the 16 tiles of 256² in a 1000×1000 image (its README).
_CONSEP_P = (0, 256, 512, 744)
CONSEP_TILE_ORIGINS = tuple([(y, x) for y in _CONSEP_P for x in _CONSEP_P[:3]] + [(y, 744) for y in _CONSEP_P])
_CONSEP_TILE = 256
_CONSEP_SIDE = 1000


def _consep_root(root: Path, split: str) -> Path:
    """The dataset folder: ``root`` itself, or its parent when ``root`` is ``.../images/<split>``
    or a split-named folder was given."""
    for cand in (root, root.parent, root.parent.parent):
        if (cand / "images" / split).is_dir() and (cand / "instances" / split).is_dir():
            return cand
    raise DatasetError(
        f"{root}: no CoNSeP images/{split}/ and instances/{split}/ here; pass the consep folder (the one holding images/ and instances/)"
    )


def load_consep(root: Path | str, split: str = "test", names: list[str] | None = None, limit: int | None = None) -> list[Sample]:
    """Load a CoNSeP split from its 256² tiles, stitched back to 1000×1000 images.

    Parameters
    ----------
    root : path
        The CoNSeP folder holding ``images/``, ``instances/`` (and ``types/``).
    split : {"train", "test"}
    names : list of str, optional
        Image ids to load (``"train_3"``); default all, in numeric order.
    limit : int, optional
        Only the first ``limit`` images.

    Overlapping tile strips must agree (they do in the shipped copy); instance ids are renumbered
    1..N in order of the original ids. ``group`` is ``"consep"``. ``types`` holds the grouped
    nucleus types (:func:`wsi_nuclei.nuclei.classes.consep_type_map`) when ``types/`` exists.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"CoNSeP split must be train or test, got {split!r}")
    base = _consep_root(Path(root), split)
    img_dir, inst_dir, type_dir = base / "images" / split, base / "instances" / split, base / "types" / split
    ids: dict[str, set[int]] = {}
    for p in img_dir.iterdir():
        m = re.fullmatch(rf"({split}_\d+)_(\d{{3}})\.jpg", p.name)
        if m:
            ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not ids:
        raise DatasetError(f"{img_dir}: no CoNSeP tiles ({split}_<k>_<iii>.jpg) found")
    order = sorted(ids, key=lambda n: int(n.rsplit("_", 1)[1]))
    if names is not None:
        missing = sorted(set(names) - set(ids))
        if missing:
            raise DatasetError(f"{img_dir}: CoNSeP images not found: {', '.join(missing)}")
        order = [n for n in order if n in set(names)]
    out = []
    for name in order[:limit]:
        if ids[name] != set(range(len(CONSEP_TILE_ORIGINS))):
            raise DatasetError(f"{img_dir}: {name} has tiles {sorted(ids[name])}, expected 000..015; re-copy the dataset")
        image = np.zeros((_CONSEP_SIDE, _CONSEP_SIDE, 3), np.uint8)
        inst = np.zeros((_CONSEP_SIDE, _CONSEP_SIDE), np.int32)
        classes: np.ndarray | None = np.zeros((_CONSEP_SIDE, _CONSEP_SIDE), np.uint8) if type_dir.is_dir() else None
        for i, (y, x) in enumerate(CONSEP_TILE_ORIGINS):
            tile_img = read_rgb(img_dir / f"{name}_{i:03d}.jpg")
            tile_inst = read_label_image(inst_dir / f"{name}_{i:03d}.png").astype(np.int32)
            if tile_img.shape[:2] != (_CONSEP_TILE, _CONSEP_TILE) or tile_inst.shape != (_CONSEP_TILE, _CONSEP_TILE):
                raise DatasetError(f"{img_dir / name}_{i:03d}: tile is not {_CONSEP_TILE}², re-copy the dataset")
            image[y : y + _CONSEP_TILE, x : x + _CONSEP_TILE] = tile_img
            inst[y : y + _CONSEP_TILE, x : x + _CONSEP_TILE] = tile_inst
            if classes is not None:
                classes[y : y + _CONSEP_TILE, x : x + _CONSEP_TILE] = _read_classes(type_dir / f"{name}_{i:03d}.png", tile_inst.shape)
        types = consep_type_map(classes) * (inst > 0) if classes is not None else None
        out.append(Sample(name, image, relabel_sequential(inst), CONSEP_MPP, "consep", "consep", types))
    log.info("loaded %d CoNSeP %s images from %s", len(out), split, base)
    return out


def _read_classes(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """One CoNSeP class tile (uint8 0..7), checked for its size."""
    if not path.is_file():
        raise DatasetError(f"{path}: CoNSeP class tile missing; re-copy the dataset (types/ must have a tile for every image tile)")
    arr = read_label_image(path)
    if arr.shape != shape:
        raise DatasetError(f"{path}: class tile is {arr.shape}, expected {shape}; re-copy the dataset")
    return np.asarray(arr, dtype=np.uint8)
