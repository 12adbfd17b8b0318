"""Size bias: predicted area / annotated area of the nuclei matched at IoU > 0.5, per model and set.

Below 1 the predicted outlines are tighter than the annotated ones (what costs pixel Dice while
detection is right). Validation images (the ones the model card names) are the only ones a model
may be changed by; the test sets are reported, never tuned on.
Run: .venv/bin/python benchmarks/size_bias.py --model v2=wsi_nuclei/weights [--model v3=DIR] [--data-root DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETS = (("tnbc", "tnbc"), ("monuseg-test", "monuseg/test"), ("consep-test", "consep"))


def score_samples(net, card, samples):  # type: ignore[no-untyped-def]
    """mean_metrics over ``samples`` segmented as ``evaluate`` does (torch on the CPU)."""
    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.infer import segment_array
    from wsi_nuclei.training.metrics import evaluate_pair, mean_metrics

    predict, _ = make_predictor(net, card, "torch", "cpu")
    return mean_metrics([evaluate_pair(s.labels, segment_array(predict, card, s.image, s.mpp)) for s in samples])


def main() -> None:
    import torch

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card, load_model
    from wsi_nuclei.training.evaluate import load_dataset
    from wsi_nuclei.training.trainset import data_root
    from wsi_nuclei.training.tuning import card_split
    from wsi_nuclei.training.validation import sample_group

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR (repeat)")
    ap.add_argument("--validation-from", type=Path, default=DEFAULT_MODEL_DIR, help="card naming the validation images")
    ap.add_argument("--data-root", type=Path, default=None, help="default: $WSI_NUCLEI_DATA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    _, val = card_split(load_card(args.validation_from), root)
    # validation pooled, and per source: the two annotations need not agree on where a nucleus ends
    by_source: dict[str, list] = {}
    for sample in val:
        by_source.setdefault(sample_group(sample).split(":")[0], []).append(sample)
    sets = [("validation", val)] + [(f"validation:{k}", v) for k, v in sorted(by_source.items())]
    sets += [(kind, load_dataset(kind, root / sub)) for kind, sub in SETS]
    rows = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        net, card = load_model(Path(path))
        for set_name, samples in sets:
            m = score_samples(net, card, samples)
            rows.append((name, set_name, len(samples), m["size_bias"], m["dice"], m["aji"], m["sq"]))
    if args.markdown:
        print("| model | set | images | size bias | Dice | AJI | SQ |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} |")
        return
    print(f"{'model':<8} {'set':<19} {'images':>6} {'size bias':>9} {'Dice':>6} {'AJI':>6} {'SQ':>6}")
    for r in rows:
        print(f"{r[0]:<8} {r[1]:<19} {r[2]:>6} {r[3]:>9.3f} {r[4]:>6.3f} {r[5]:>6.3f} {r[6]:>6.3f}")


if __name__ == "__main__":
    main()
