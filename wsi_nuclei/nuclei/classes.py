"""Nucleus types: the classes a typed model predicts, their QuPath names and colours.

The four types are HoVer-Net's grouping of CoNSeP's seven classes (Graham et al. 2019):
other (1), inflammatory (2), epithelial (3 healthy + 4 malignant) and spindle-shaped
(5 fibroblast + 6 muscle + 7 endothelial). Their QuPath names and colours are QuPath's default
classes ("Other", "Immune cells", "Tumor", "Stroma"), so a project's class list fits without edits.

Type maps (H, W) hold 0 for "no type known" (background, or an image without types) and
1..n for the n types in :data:`DEFAULT_TYPES` order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["NucleusType", "DEFAULT_TYPES", "CONSEP_TO_TYPE", "consep_type_map", "types_to_card", "types_from_card", "vote_types",
           "qupath_classes", "TYPE_PROBABILITY"]


@dataclass(frozen=True)
class NucleusType:
    """One predicted nucleus type.

    Attributes
    ----------
    name : str
        The model's name for it (``"epithelial"``).
    qupath : str
        The QuPath classification name written to GeoJSON (``"Tumor"``).
    color : tuple of int
        RGB 0-255, QuPath's default colour for that class.
    source : str
        Which annotated classes it groups, for the model card.
    """

    name: str
    qupath: str
    color: tuple[int, int, int]
    source: str = ""


DEFAULT_TYPES: tuple[NucleusType, ...] = (
    NucleusType("other", "Other", (255, 200, 0), "CoNSeP 1 (other)"),
    NucleusType("inflammatory", "Immune cells", (160, 90, 160), "CoNSeP 2 (inflammatory)"),
    NucleusType("epithelial", "Tumor", (200, 0, 0), "CoNSeP 3 (healthy epithelial) + 4 (malignant epithelial)"),
    NucleusType("spindle", "Stroma", (150, 200, 150), "CoNSeP 5 (fibroblast) + 6 (muscle) + 7 (endothelial)"),
)

#: CoNSeP class value (0..7) -> type index 1..4 of :data:`DEFAULT_TYPES` (0: background).
CONSEP_TO_TYPE = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.uint8)


def consep_type_map(classes: np.ndarray) -> np.ndarray:
    """(H, W) CoNSeP class values 0..7 -> (H, W) uint8 type indices 0..4 (unknown values -> 0)."""
    c = np.asarray(classes).astype(np.int64)
    out = np.zeros(c.shape, np.uint8)
    ok = (c >= 0) & (c < len(CONSEP_TO_TYPE))
    out[ok] = CONSEP_TO_TYPE[c[ok]]
    return out


def types_to_card(types: tuple[NucleusType, ...]) -> tuple[dict[str, Any], ...]:
    """The card's ``types`` field: one JSON object per type."""
    return tuple({**asdict(t), "color": list(t.color)} for t in types)


def types_from_card(entries: Any) -> tuple[NucleusType, ...]:
    """Inverse of :func:`types_to_card`; raises ``ValueError`` naming the bad entry."""
    out = []
    for i, e in enumerate(entries or ()):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("qupath"), str):
            raise ValueError(f"types[{i}] must be an object with string name and qupath, got {e!r}")
        color = e.get("color")
        if not (isinstance(color, (list, tuple)) and len(color) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)):
            raise ValueError(f"types[{i}] ({e['name']}): color must be 3 integers 0-255, got {color!r}")
        out.append(NucleusType(e["name"], e["qupath"], (int(color[0]), int(color[1]), int(color[2])), str(e.get("source", ""))))
    if len({t.name for t in out}) != len(out):
        raise ValueError(f"type names must be unique, got {[t.name for t in out]}")
    return tuple(out)


def vote_types(labels: np.ndarray, type_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each nucleus' type by a vote over its pixels.

    Parameters
    ----------
    labels : np.ndarray
        (H, W) int instance labels 1..N (0 background).
    type_probs : np.ndarray
        (T, H, W) float per-type sigmoid outputs of the model (the logits of a softmax over types,
        passed through a sigmoid like every output); turned back into softmax probabilities.

    Returns
    -------
    kinds, probability : np.ndarray
        (N,) type index 1..T of nucleus ``i + 1`` (0 for ids with no pixel), and (N,) the mean
        softmax probability of that type over the nucleus' pixels.
    """
    n = int(labels.max()) if labels.size else 0
    kinds = np.zeros(n, np.int64)
    prob = np.zeros(n, np.float32)
    if n == 0 or type_probs.shape[0] == 0:
        return kinds, prob
    p = np.clip(type_probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    logits -= logits.max(axis=0, keepdims=True)
    soft = np.exp(logits)
    soft /= soft.sum(axis=0, keepdims=True)
    fg = labels > 0
    ids = labels[fg].astype(np.int64) - 1
    area = np.bincount(ids, minlength=n).astype(np.float64)
    sums = np.stack([np.bincount(ids, weights=soft[t][fg], minlength=n) for t in range(soft.shape[0])], axis=1)
    mean = sums / np.maximum(area, 1)[:, None]
    kinds = np.where(area > 0, mean.argmax(axis=1) + 1, 0)
    prob = np.where(area > 0, mean.max(axis=1), 0).astype(np.float32)
    return kinds, prob


#: The measurement a typed nucleus carries: the mean probability of its type over its pixels.
TYPE_PROBABILITY = "Type probability"


def qupath_classes(types: tuple[NucleusType, ...]) -> list[dict[str, Any]]:
    """GeoJSON ``classification`` objects of types 1..n (QuPath: a name and an RGB colour)."""
    return [{"name": t.qupath, "color": list(t.color)} for t in types]
