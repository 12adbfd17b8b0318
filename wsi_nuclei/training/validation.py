"""Grouped validation: scores per tissue group, and selection by the worst group.

A model (or a post-processing setting) is chosen by how it does on the group it does worst on,
not by the pooled mean over validation images: a pooled mean is dominated by the groups with most
images and rewards fitting them, which does not carry over to tissue no group stands for.

Groups are tissue sources: a MoNuSeg image's organ (from its TCGA barcode), ``consep`` for
CoNSeP, a folder dataset's name. A group's AJI is the nucleus-weighted mean of its images' AJI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .datasets import Sample

__all__ = ["GroupScore", "sample_group", "group_scores", "criterion", "CRITERIA", "best_row", "check_groups"]

#: Selection criteria: the worst group's AJI, or the mean over groups minus their spread.
CRITERIA = ("worst_group", "mean_minus_std", "pooled")


@dataclass(frozen=True)
class GroupScore:
    """One validation group: nucleus-weighted AJI and Dice, images and true nuclei."""

    group: str
    aji: float
    dice: float
    n_images: int
    n_true: int


def sample_group(sample: Sample) -> str:
    """The validation group of a sample: its dataset for CoNSeP and folders, its organ for MoNuSeg."""
    if sample.dataset == "monuseg":
        return f"monuseg:{sample.group or 'unknown'}"
    return sample.dataset or sample.group or "folder"


def group_scores(rows: Sequence[tuple[str, float, float, int]]) -> dict[str, GroupScore]:
    """Per group, from (group, AJI, Dice, true nuclei) rows of single images."""
    by: dict[str, list[tuple[float, float, int]]] = {}
    for group, aji, dice, n in rows:
        by.setdefault(group, []).append((aji, dice, n))
    out = {}
    for group, items in sorted(by.items()):
        w = np.array([max(n, 1) for _, _, n in items], float)
        out[group] = GroupScore(group, float(np.average([a for a, _, _ in items], weights=w)),
                                float(np.average([d for _, d, _ in items], weights=w)), len(items), int(sum(n for _, _, n in items)))
    return out


def criterion(scores: Mapping[str, GroupScore], rule: str = "worst_group", pooled: float | None = None) -> float:
    """The number selection maximises: the worst group's AJI, the mean over groups minus
    their standard deviation, or the pooled mean (``pooled``, the old rule)."""
    if rule not in CRITERIA:
        raise ConfigError(f"unknown selection criterion {rule!r}; use {', '.join(CRITERIA)}")
    if rule == "pooled":
        if pooled is None:
            raise ValueError("the pooled criterion needs the pooled mean")
        return pooled
    if not scores:
        raise ValueError("no validation groups")
    ajis = np.array([s.aji for s in scores.values()])
    return float(ajis.min()) if rule == "worst_group" else float(ajis.mean() - ajis.std())


def best_row(table: Sequence[Mapping[str, float]], rule: str = "worst_group") -> int:
    """Index of the best row of a table whose rows map group -> AJI (e.g. one row per checkpoint
    or per threshold setting); ties go to the first row."""
    if not table:
        raise ValueError("empty table")
    values = [criterion({g: GroupScore(g, a, 0.0, 1, 1) for g, a in row.items()}, rule,
                        pooled=float(np.mean(list(row.values())))) for row in table]
    return int(np.argmax(values))


def check_groups(train: Sequence[Sample], val: Sequence[Sample]) -> dict[str, list[str]]:
    """The validation images by group; refuses an image in both splits or in two groups, and a
    group with no validation image is simply absent (every returned group is non-empty)."""
    names = [s.name for s in val]
    if len(set(names)) != len(names):
        raise ConfigError(f"validation lists an image twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    both = {s.name for s in train} & set(names)
    if both:
        raise ConfigError(f"images both in training and validation: {sorted(both)}")
    groups: dict[str, list[str]] = {}
    for s in val:
        groups.setdefault(sample_group(s), []).append(s.name)
    return groups
