"""Training data: which images train and which select the model, resampled once, and crops.

Data at native resolution are resampled once to the working mpp (:func:`prepare`); each crop
first picks a dataset by its sampling weight (``TrainConfig.data``), then an image of it
(:func:`draw_image`), then a random position; crops get dihedral + stain-colour augmentation
(HED jitter and/or randomised Macenko re-staining, ``TrainConfig.stain_augment``).

Only training *splits* are ever loaded here: TNBC, MoNuSeg test and CoNSeP test are not named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .datasets import Sample
from .options import CONSEP_VALIDATION, DATA_SOURCES, DEFAULT_VALIDATION, TrainConfig, parse_data

__all__ = ["DEFAULT_VALIDATION", "CONSEP_VALIDATION", "DATA_SOURCES", "DATA_ROOT_ENV", "parse_data", "data_root",
           "load_training_samples", "split_validation", "prepare", "draw_image", "make_batch", "type_weights"]

#: Environment variable naming the folder that holds ``monuseg/train`` and ``consep``.
DATA_ROOT_ENV = "WSI_NUCLEI_DATA"


def data_root(given: Path | str | None) -> Path:
    """The training data folder: ``given``, else ``$WSI_NUCLEI_DATA``; one clear error otherwise."""
    value = given if given is not None else os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise ConfigError(f"no training data folder: pass --data-root DIR (holding monuseg/train and consep) or set {DATA_ROOT_ENV}")
    root = Path(value)
    if not root.is_dir():
        raise ConfigError(f"{root}: training data folder not found; pass --data-root DIR holding monuseg/train and consep")
    return root


def load_training_samples(cfg: TrainConfig, root: Path | str, monuseg_dir: Path | str | None = None) -> list[Sample]:
    """All images of the datasets in ``cfg.data`` (training *splits* only): MoNuSeg train from
    ``monuseg_dir`` (default ``root/monuseg/train``), CoNSeP train from ``root/consep``."""
    from .consep import load_consep
    from .datasets import load_monuseg

    samples: list[Sample] = []
    for name, _ in cfg.data:
        if name == "monuseg":
            samples += load_monuseg(Path(monuseg_dir) if monuseg_dir else Path(root) / DATA_SOURCES["monuseg"])
        elif name == "consep":
            samples += load_consep(Path(root) / DATA_SOURCES["consep"], "train")
    return samples


def split_validation(samples: list[Sample], cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, validation) by ``cfg.validation`` names; drops ``cfg.exclude_groups``."""
    names = set(cfg.validation)
    train = [s for s in samples if s.name not in names and s.group not in cfg.exclude_groups]
    val = [s for s in samples if s.name in names]
    if not train:
        raise ConfigError("no training images left after removing validation images and excluded groups")
    return train, val


@dataclass
class Prepared:
    """Training images at the working mpp with their targets, grouped by dataset (:func:`prepare`)."""

    images: list[np.ndarray]
    targets: list[np.ndarray]
    #: per dataset (in ``TrainConfig.data`` order): its sampling weight and its image indices
    groups: list[tuple[float, list[int]]]
    #: per image: its Macenko stains (None when not estimated or too little tissue)
    stains: list[Any]
    #: the estimated stains of all images: the pool random re-staining draws from
    pool: list[Any]


def prepare(samples: list[Sample], cfg: TrainConfig) -> Prepared:
    """Resample samples to ``cfg.working_mpp``, compute their targets (and Macenko stains) once, and
    group them by dataset for the weighted sampler. A sample's dataset is ``Sample.dataset``
    ("" counts as the first dataset of ``cfg.data``)."""
    from ..model.infer import resize_image, resize_labels, working_shape
    from .stain import macenko_stains
    from .targets import make_targets

    names = [name for name, _ in cfg.data]
    images, targets, stains = [], [], []
    members: dict[str, list[int]] = {n: [] for n in names}
    for i, s in enumerate(samples):
        key = s.dataset or names[0]
        if key not in members:
            raise ConfigError(f"training image {s.name} is from dataset {key!r}, which --data does not list ({', '.join(names)})")
        members[key].append(i)
        shape = working_shape(s.labels.shape, s.mpp, cfg.working_mpp)
        images.append(resize_image(s.image, shape))
        tgt = make_targets(resize_labels(s.labels, shape), cfg.outputs)
        if cfg.types:
            kind = resize_labels(s.types, shape) if s.types is not None else np.zeros(shape, np.uint8)
            tgt = np.concatenate([tgt, kind[None].astype(np.float32)])
        targets.append(tgt)
        stains.append(macenko_stains(images[-1]) if cfg.stain_augment in ("macenko", "both") else None)
    empty = [n for n in names if not members[n]]
    if empty:
        raise ConfigError(f"--data lists {', '.join(empty)} but no training image of it is left")
    return Prepared(images, targets, [(w, members[n]) for n, w in cfg.data], stains, [s for s in stains if s is not None])


def draw_image(data: Prepared, rng: np.random.Generator) -> int:
    """Index of a training image: a dataset by weight, then one of its images uniformly."""
    weights = np.array([w for w, _ in data.groups], dtype=np.float64)
    g = int(rng.choice(len(weights), p=weights / weights.sum()))
    members = data.groups[g][1]
    return members[int(rng.integers(len(members)))]


def type_weights(data: Prepared, n_types: int) -> np.ndarray:
    """Cross-entropy weights of the types: 1 / sqrt(pixel frequency), mean 1 (types never seen: 1)."""
    counts = np.zeros(n_types + 1, np.float64)
    for t in data.targets:
        counts += np.bincount(t[-1].astype(np.int64).ravel(), minlength=n_types + 1)[: n_types + 1]
    freq = counts[1:] / max(counts[1:].sum(), 1.0)
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-12)), 0.0)
    w = w / w[w > 0].mean() if (w > 0).any() else np.ones(n_types)
    return np.where(w > 0, w, 1.0).astype(np.float32)


def make_batch(data: Prepared, cfg: TrainConfig, rng: np.random.Generator, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (default ``cfg.batch_size``) augmented crops and their targets, as (N, H, W, 3) and (N, C, H, W)."""
    from .stain import random_restain
    from .targets import augment, random_crop

    xs, ys = [], []
    for _ in range(cfg.batch_size if n is None else n):
        i = draw_image(data, rng)
        img, tgt = random_crop(data.images[i], data.targets[i], cfg.crop, rng)
        if cfg.stain_augment in ("macenko", "both") and rng.random() < 0.5:
            img = random_restain(img, data.stains[i], rng, data.pool)
        img, tgt = augment(img, tgt, rng, colour=cfg.colour_augment, hed=cfg.stain_augment in ("hed", "both"))
        xs.append(img)
        ys.append(tgt)
    return np.stack(xs), np.stack(ys)
