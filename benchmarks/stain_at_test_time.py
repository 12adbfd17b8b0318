"""Does deterministic Macenko normalisation at test time help? Measured on validation images only.

For a model folder, loads its validation images (named in its card), and prints the mean AJI, Dice
and PQ of the model's own post-processing with (a) the images as they are and (b) every image
re-stained to a reference: the median H and E vectors and concentrations of the model's training
images (the reference a card would store). Test sets are not touched.
``--validation-from DIR`` takes the data and validation images from another model's card (to score
an older model on a newer model's validation set: the "as scanned" row is then its validation AJI).
Run: .venv/bin/python benchmarks/stain_at_test_time.py --model runs/NAME/best [--validation-from DIR] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np
    import torch

    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.training import train as tr
    from wsi_nuclei.training.datasets import Sample
    from wsi_nuclei.training.stain import StainRef, macenko_stains, normalise
    from wsi_nuclei.training.train import card_split
    from wsi_nuclei.training.trainset import data_root

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, default=None, help="default: $WSI_NUCLEI_DATA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--validation-from", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from wsi_nuclei.model.network import load_card

    net, card = load_model(args.model)
    train_s, val_s = card_split(load_card(args.validation_from) if args.validation_from else card, data_root(args.data_root))
    refs = [r for r in (macenko_stains(s.image) for s in train_s) if r is not None]
    mats = np.median(np.stack([r.matrix for r in refs]), axis=0)
    mats /= np.linalg.norm(mats, axis=1, keepdims=True)
    conc = np.median(np.array([r.max_conc for r in refs]), axis=0)
    ref = StainRef((tuple(mats[0]), tuple(mats[1])), (float(conc[0]), float(conc[1])))  # type: ignore[arg-type]
    normed = [Sample(s.name, normalise(s.image, ref), s.labels, s.mpp, s.group, s.dataset) for s in val_s]
    plain = tr.validate(net, card, val_s)
    macenko = tr.validate(net, card, normed)
    print(f"model {card.model_id}, {len(val_s)} validation images; reference stains from {len(refs)} training images")
    print(f"reference H {np.round(mats[0], 4).tolist()} E {np.round(mats[1], 4).tolist()} max conc {np.round(conc, 4).tolist()}")
    print(f"{'input':<22}{'val AJI':>9}{'Dice':>8}{'PQ':>8}")
    for name, m in (("as scanned", plain), ("Macenko to reference", macenko)):
        print(f"{name:<22}{m['aji']:>9.4f}{m['dice']:>8.4f}{m['pq']:>8.4f}")
    print(f"ratio (Macenko / as scanned) AJI {macenko['aji'] / plain['aji']:.3f}")


if __name__ == "__main__":
    main()
