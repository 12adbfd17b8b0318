"""Grouped validation of several models side by side: AJI per tissue group, the selection criteria
(pooled mean, worst group, mean minus spread), and the reliability of the nucleus probability
(predicted foreground probability against the observed frequency) per group.

Validation images only (the ones a model card names; ``--validation-from`` takes them from another
card, so that an older model is scored on a newer model's held-out images). Test sets are never read.
Run: .venv/bin/python benchmarks/validation_groups.py --model v1=DIR --model v2=wsi_nuclei/weights [--data-root DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BINS = 10


def reliability(probs, truth):  # type: ignore[no-untyped-def]
    """(ECE, per-bin (mean predicted, observed, share of pixels)) of nucleus probabilities."""
    import numpy as np

    edges = np.linspace(0, 1, BINS + 1)
    idx = np.clip(np.digitize(probs, edges) - 1, 0, BINS - 1)
    rows, ece = [], 0.0
    for b in range(BINS):
        sel = idx == b
        if not sel.any():
            rows.append((float("nan"), float("nan"), 0.0))
            continue
        p, o, w = float(probs[sel].mean()), float(truth[sel].mean()), float(sel.mean())
        rows.append((p, o, w))
        ece += w * abs(p - o)
    return ece, rows


def main() -> None:
    import numpy as np
    import torch

    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.infer import (
        predict_probabilities,
        resize_image,
        resize_labels,
        working_shape,
    )
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card, load_model
    from wsi_nuclei.training.steps import validate_groups
    from wsi_nuclei.training.trainset import data_root
    from wsi_nuclei.training.tuning import card_split
    from wsi_nuclei.training.validation import criterion, sample_group

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--validation-from", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data-root", type=Path, default=None, help="default: $WSI_NUCLEI_DATA")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, val_s = card_split(load_card(args.validation_from), data_root(args.data_root))
    results = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        net, card = load_model(Path(path))
        res = validate_groups(net, card, val_s)
        predict, _ = make_predictor(net, card, "torch", "cpu")
        rel: dict[str, tuple[list[float], list[float]]] = {}
        for s in val_s:
            work = working_shape(s.image.shape[:2], s.mpp, card.working_mpp)
            p = predict_probabilities(predict, card, resize_image(s.image, work))[0]
            t = resize_labels(s.labels, work) > 0
            ps, ts = rel.setdefault(sample_group(s), ([], []))
            ps.extend(p.ravel().tolist()[::7])
            ts.extend(t.ravel().astype(float).tolist()[::7])
        res["reliability"] = {g: reliability(np.array(ps), np.array(ts)) for g, (ps, ts) in rel.items()}
        res["card"] = card
        results[name] = res
    names = list(results)
    groups = sorted({g for r in results.values() for g in r["groups"]})
    print(f"{len(val_s)} validation images from {args.validation_from}; AJI per group (nucleus-weighted)")
    print(f"{'group':<20}{'images':>7}" + "".join(f"{n:>10}" for n in names))
    for g in groups:
        first = results[names[0]]["groups"][g]
        print(f"{g:<20}{first.n_images:>7}" + "".join(f"{results[n]['groups'][g].aji:>10.4f}" for n in names))
    for rule in ("pooled", "worst_group", "mean_minus_std"):
        vals = [criterion(results[n]["groups"], rule, pooled=float(results[n]["pooled"]["aji"])) for n in names]
        best = names[int(np.argmax(vals))]
        print(f"{rule:<27}" + "".join(f"{v:>10.4f}" for v in vals) + f"   -> {best}")
    post = [results[n]["card"].postprocess for n in names]
    print(f"{'post-processing':<27}" + "".join(f"{p.method[:4]} {p.fg_threshold}/{p.seed_threshold}".rjust(13) for p in post))
    print("\nreliability of the nucleus probability: ECE per group (10 bins), then predicted -> observed in the 0.4-0.6 bins")
    print(f"{'group':<20}" + "".join(f"{n:>10}" for n in names) + "   " + "   ".join(f"{n} 0.4-0.5 / 0.5-0.6" for n in names))
    for g in groups:
        eces = "".join(f"{results[n]['reliability'][g][0]:>10.4f}" for n in names)
        mids = "   ".join(" / ".join(f"{r[0]:.2f}->{r[1]:.2f}" for r in results[n]["reliability"][g][1][4:6]) for n in names)
        print(f"{g:<20}{eces}   {mids}")


if __name__ == "__main__":
    main()
