"""Post-processing tuned on validation images, and the validation images of a model card."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model.network import ModelCard, PostProcess
from .datasets import Sample
from .options import DEFAULT_VALIDATION, TrainConfig

__all__ = ["validate", "tune_postprocess", "tune_model", "card_split", "validation_samples"]

log = logging.getLogger(__name__)


def validate(model: Any, card: ModelCard, samples: list[Sample], post: PostProcess | None = None) -> dict[str, float | int]:
    """Mean metrics of ``model`` on ``samples`` with the pipeline's post-processing."""
    from ..model.backends import make_predictor
    from ..model.infer import segment_array
    from .metrics import evaluate_pair, mean_metrics

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")  # the pipeline's torch path (the weights change every epoch)
    items = [evaluate_pair(s.labels, segment_array(predict, card, s.image, s.mpp, post)) for s in samples]
    return mean_metrics(items)


def tune_postprocess(
    model: Any, card: ModelCard, samples: list[Sample], tta: str | None = None, select: str = "worst_group",
    tolerance: float = 0.005,
) -> tuple[PostProcess, dict[str, Any]]:
    """Grid-search method and thresholds on ``samples`` (validation only), then the smallest
    nucleus area at the best thresholds (small pale specks on stroma are the commonest false
    detections). Settings are scored by ``select`` over the validation groups
    (:func:`.validation.criterion`: by default the worst group's nucleus-weighted AJI).

    Returns the best setting and a report: its score, the best score per method, the plateau
    (every grid setting within ``tolerance`` of the best: a wide plateau is a flat optimum), and
    each group's own best setting (where they differ, one threshold does not suit every group)."""
    from ..model.backends import make_predictor
    from ..model.infer import predict_probabilities, resize_image, resize_labels, working_shape
    from ..nuclei.instances import probabilities_to_instances
    from .metrics import evaluate_pair
    from .validation import criterion, group_scores, sample_group

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")
    cached = []
    for s in samples:
        work = working_shape(s.image.shape[:2], s.mpp, card.working_mpp)
        cached.append((s, predict_probabilities(predict, card, resize_image(s.image, work), tta=tta)))
    methods: list[str] = [m for m in ("boundary", "distance") if m in card.outputs] or ["threshold"]
    grid: list[PostProcess] = []
    for method in methods:
        seeds = {"boundary": (0.2, 0.3, 0.4, 0.5, 0.6), "distance": (0.2, 0.3, 0.4, 0.5, 0.6)}.get(method, (0.5,))
        for fg in (0.3, 0.4, 0.5, 0.6, 0.7):
            for seed in seeds:
                grid.append(replace(card.postprocess, method=method, fg_threshold=fg, seed_threshold=seed))
    groups_of: dict[PostProcess, dict[str, float]] = {}

    def score(post: PostProcess) -> float:
        rows = []
        for s, probs in cached:
            labels = probabilities_to_instances(probs[: len(card.outputs)], card.outputs, post, card.working_mpp)
            m = evaluate_pair(s.labels, resize_labels(labels, s.labels.shape))
            rows.append((sample_group(s), m.aji, m.dice, m.n_true))
        groups = group_scores(rows)
        groups_of[post] = {g: v.aji for g, v in groups.items()}
        return criterion(groups, select, pooled=float(np.mean([r[1] for r in rows])))

    scored = [(score(post), post) for post in grid]
    per_method: dict[str, float] = {}
    for value, post in scored:
        per_method[post.method] = max(per_method.get(post.method, -1.0), value)
        log.info("tune %s fg=%.2f seed=%.2f: %s %.4f", post.method, post.fg_threshold, post.seed_threshold, select, value)
    best = max(scored, key=lambda vp: vp[0])
    for area in (1.0, 3.0, 6.0, 10.0, 15.0):
        post = replace(best[1], min_area_um2=area)
        if post != best[1]:
            value = score(post)
            log.info("tune min_area_um2=%.1f: %s %.4f", area, select, value)
            if value > best[0]:
                best = (value, post)
    plateau = [_setting(p) for v, p in scored if v >= best[0] - tolerance]
    group_names = sorted(groups_of[best[1]])
    optima = {g: _setting(_best_for(grid, groups_of, g)) for g in group_names}
    report = {"select": select, "score": best[0], "by_method": per_method, "tolerance": tolerance,
              "plateau": plateau, "plateau_width": len(plateau), "grid_size": len(grid),
              "groups": groups_of[best[1]], "group_optima": optima,
              "optima_differ": len({tuple(o.values()) for o in optima.values()}) > 1}
    return best[1], report


def _best_for(grid: list[PostProcess], groups_of: dict[PostProcess, dict[str, float]], group: str) -> PostProcess:
    return max(grid, key=lambda p: groups_of[p].get(group, -1.0))


def _setting(post: PostProcess) -> dict[str, Any]:
    return {"method": post.method, "fg": post.fg_threshold, "seed": post.seed_threshold}


def card_split(card: ModelCard, root: Path | str) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) images of the datasets a model card trained on, loaded from ``root``:
    validation is what the card names (``training.validation_images``, else ``validation``)."""
    from .trainset import load_training_samples, split_validation

    t = card.training
    names = tuple(t.get("validation_images") or t.get("validation") or DEFAULT_VALIDATION)
    cfg = TrainConfig(out=Path("."), data=tuple((str(n), float(w)) for n, w in t.get("data", [["monuseg", 1.0]])), validation=names)
    return split_validation(load_training_samples(cfg, root), cfg)


def validation_samples(card: ModelCard, root: Path | str) -> list[Sample]:
    """The validation images of a model card (see :func:`card_split`)."""
    return card_split(card, root)[1]


def tune_model(model_dir: Path | str, samples: list[Sample], tta: str | None = None, command: str | None = None,
               select: str = "worst_group") -> dict[str, Any]:
    """Tune the post-processing of the model in ``model_dir`` on ``samples`` (its validation
    images, see :func:`validation_samples`) and store it in the card, for ``tta``
    (default: the card's). Test-set metrics recorded in the card are dropped: they were measured
    with the old setting. Returns what was chosen and the validation metrics."""
    from ..model.network import load_model, save_model

    if not samples:
        raise ConfigError(f"{model_dir}: no validation images to tune on")
    net, card = load_model(model_dir)
    card = replace(card, tta=tta or card.tta)
    post, report = tune_postprocess(net, card, samples, card.tta, select)
    val = validate(net, replace(card, postprocess=post), samples)
    metrics = {"epoch": card.metrics.get("epoch"), "val_aji": card.metrics.get("val_aji"), "val": val,
               "val_aji_by_method": report["by_method"], "tune": report}
    training = {**card.training, "tune_command": command} if command else card.training
    save_model(net, replace(card, postprocess=post, metrics=metrics, training=training), model_dir)
    return {"postprocess": asdict(post), "tta": card.tta, "val": val, "tune": report}
