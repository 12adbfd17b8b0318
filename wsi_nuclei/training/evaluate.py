"""Evaluate a model on an annotated dataset with the pipeline's own post-processing."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ConfigError, DatasetError, shown
from .datasets import Sample, list_images, load_folder, load_monuseg, load_tnbc

__all__ = ["evaluate_dataset", "record_in_card", "load_dataset", "DATASET_KINDS"]

log = logging.getLogger(__name__)


#: Dataset kinds that :func:`load_dataset` reads.
DATASET_KINDS = ("tnbc", "monuseg-test", "monuseg", "consep-test", "consep-train", "folder")


def load_dataset(kind: str, root: Path | str, mpp: float | None = None, limit: int | None = None) -> list[Sample]:
    """Load ``kind`` (one of :data:`DATASET_KINDS`) from ``root``."""
    if mpp is not None:
        from ..slides.reader import check_mpp

        check_mpp(mpp, "--mpp", override="")
    if kind in ("monuseg", "monuseg-test", "monuseg-train"):
        root = Path(root)
        if limit is not None and (root / "images").is_dir():
            names = [p.stem for p in list_images(root / "images")][:limit]
            return load_monuseg(root, names=names)
        return load_monuseg(root)
    if kind == "tnbc":
        return load_tnbc(root, limit)
    if kind in ("consep-test", "consep-train"):
        from .consep import load_consep

        return load_consep(root, kind.split("-")[1], limit=limit)
    if kind == "folder":
        if mpp is None:  # no default: a wrong guess would score every image at the wrong scale, silently
            raise ConfigError(f"{shown(Path(root))}: a folder dataset needs --mpp, the µm per pixel of its images "
                              "(0.25 at 40x, 0.5 at 20x)")
        return load_folder(root, mpp, limit)
    raise DatasetError(f"unknown dataset kind {kind!r}; use one of {', '.join(DATASET_KINDS)}")


def evaluate_dataset(
    kind: str,
    path: Path | str,
    model_dir: Path | str | None = None,
    mpp: float | None = None,
    limit: int | None = None,
    device: str = "auto",
    threads: int = 0,
    tta: str | None = None,
    backend: str = "auto",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Segment every image of a dataset and compare with its annotation.

    Parameters
    ----------
    kind : {"tnbc", "monuseg-test", "monuseg", "consep-test", "consep-train", "folder"}
        Dataset layout (see :mod:`wsi_nuclei.training.datasets`).
    path : path
        Dataset folder.
    model_dir : path, optional
        Model folder; default the shipped model.
    mpp : float, optional
        µm/px of a "folder" dataset.
    limit : int, optional
        Evaluate only the first ``limit`` images (sorted by name).
    tta : {"none", "flip4", "dihedral8"}, optional
        Test-time augmentation; default the card's ``tta``.
    backend : {"auto", "torch", "onnx"}
        The inference backend, as in the slide pipeline (auto: ONNX Runtime on a CPU when installed).
    precision : {"fp32", "bf16", "int8"}
        As ``wsi-nuclei segment --precision`` (bf16: OpenVINO in bf16; int8: ONNX Runtime on the
        quantised model).

    Returns
    -------
    dict
        Means (``dice``, ``iou``, ``aji``, ``pq``, ``dq``, ``sq``, ``f1``, ``precision``,
        ``recall``), ``n_images``, ``model`` (card name and sha256 prefix), ``seconds_per_image``
        ``groups`` (per tissue group, :mod:`.validation`: nucleus-weighted AJI and Dice) and
        ``images``: one row per image with the same metrics and its group.
    """
    import torch

    from ..model.backends import make_predictor
    from ..model.infer import segment_array, segment_array_typed, select_device
    from ..model.network import load_model
    from .metrics import evaluate_pair, mean_metrics
    from .type_metrics import TypeCounts, typed_nuclei
    from .validation import group_scores, sample_group

    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown --dataset {kind!r}; use one of {', '.join(DATASET_KINDS)}")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be > 0, got {limit}")
    if tta is not None:
        from ..model.tta import check_tta

        check_tta(tta)
    if threads:
        torch.set_num_threads(threads)
    dev = select_device(device)
    model, card = load_model(model_dir)
    predict, backend_name = make_predictor(model, card, backend, dev, threads, precision)
    samples = load_dataset(kind, path, mpp=mpp, limit=limit)
    rows, items, seconds = [], [], 0.0
    counts = TypeCounts()
    typed_set = bool(card.types) and any(s.types is not None for s in samples)
    for s in samples:
        t0 = time.perf_counter()
        if typed_set:
            pred, kinds = segment_array_typed(predict, card, s.image, s.mpp, tta=tta)
        else:
            pred = segment_array(predict, card, s.image, s.mpp, tta=tta)
        seconds += time.perf_counter() - t0
        if typed_set and s.types is not None:
            counts.add(typed_nuclei(s.labels, s.types), typed_nuclei(pred, kinds), radius=3.0 / s.mpp)
        m = evaluate_pair(s.labels, pred)
        items.append(m)
        rows.append({"name": s.name, "group": sample_group(s), **m.as_dict()})
        log.info("%s: AJI %.3f Dice %.3f PQ %.3f", s.name, m.aji, m.dice, m.pq)
    report: dict[str, Any] = dict(mean_metrics(items))
    report.update(
        dataset=kind,
        path=str(path),
        model=card.model_id,
        postprocess=card.postprocess.__dict__,
        tta=tta or card.tta,
        backend=backend_name,
        seconds_per_image=round(seconds / max(1, len(samples)), 4),
        groups={
            g: asdict(v) for g, v in group_scores([(sample_group(s), m.aji, m.dice, m.n_true) for s, m in zip(samples, items)]).items()
        },
        images=rows,
    )
    if typed_set and counts.true_paired:
        scores = counts.scores(len(card.types))
        names = [t["name"] for t in card.types]
        report["types"] = {"f_d": scores["f_d"], **{f"f_c_{n}": scores[f"f_c_{k + 1}"] for k, n in enumerate(names)},
                           "pairing_radius_um": 3.0, "paired": scores["paired"]}
    return report


def record_in_card(report: dict[str, Any], model_dir: Path | str | None = None) -> None:
    """Store the mean metrics of ``report`` in the model card under ``metrics[<dataset>]`` (the
    weights and their hash are unchanged)."""
    from dataclasses import replace

    from ..model.network import CARD_FILE, DEFAULT_MODEL_DIR, load_card

    directory = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    card = load_card(directory)
    if report["model"] != card.model_id:
        raise ConfigError(f"{directory}: the report was made with model {report['model']}, not this one")
    keys = ("dice", "iou", "aji", "pq", "dq", "sq", "f1", "precision", "recall", "size_bias", "n_images", "seconds_per_image")
    entry = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items() if k in keys}
    entry["tta"] = report.get("tta", card.tta)
    extra = f" --tta {entry['tta']}" if entry["tta"] != card.tta else ""
    entry["command"] = f"wsi-nuclei evaluate {report['path']} --dataset {report['dataset']}{extra} --json"
    card = replace(card, metrics={**card.metrics, report["dataset"]: entry})
    atomic.write_text(directory / CARD_FILE, card.to_json() + "\n")
