"""Time the shipped model on one 512x512 TNBC image (40x, resampled to the model's 0.5 µm/px).

Prints a side-by-side table: the bare model forward on the exact working-resolution tensor vs the
whole `segment_image` call (resample, forward, post-processing, resample back), and their ratio.
Run: .venv/bin/python benchmarks/tnbc_image_time.py [--repeat 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from wsi_nuclei.model.backends import make_predictor, to_tensor
    from wsi_nuclei.model.infer import (
        predict_probabilities,
        resize_image,
        segment_array,
        working_shape,
    )
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.training.datasets import load_tnbc

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "tnbc")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, card = load_model()
    predict, _ = make_predictor(model, card, "torch", "cpu")  # the pipeline's torch path (channels_last)
    sample = load_tnbc(args.data, limit=1)[0]
    work = resize_image(sample.image, working_shape(sample.image.shape[:2], sample.mpp, card.working_mpp))
    x = to_tensor(work[None], card).contiguous(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode():
            model(x)

    def ours() -> None:
        segment_array(predict, card, sample.image, sample.mpp)

    def forward_only() -> None:
        predict_probabilities(predict, card, work)

    stages = (("bare model forward", bare), ("predict_probabilities", forward_only), ("segment_image (all)", ours))
    times: dict[str, list[float]] = {name: [] for name, _ in stages}
    for name, fn in stages:
        fn()  # warm-up
    for _ in range(args.repeat):  # round-robin, so drift in CPU speed hits every stage alike
        for name, fn in stages:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = {name: statistics.median(ts) for name, ts in times.items()}
    base = rows["bare model forward"]
    print(f"TNBC {sample.name} {sample.image.shape[1]}x{sample.image.shape[0]} px at {sample.mpp} µm/px -> "
          f"{work.shape[1]}x{work.shape[0]} at {card.working_mpp} µm/px; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'stage':<26}{'median ms':>12}{'x bare':>10}")
    for name, sec in rows.items():
        print(f"{name:<26}{sec * 1000:>12.1f}{sec / base:>10.2f}")
    print(json.dumps({"image": sample.name, "bare_ms": round(base * 1000, 1),
                      "segment_image_ms": round(rows["segment_image (all)"] * 1000, 1),
                      "ratio": round(rows["segment_image (all)"] / base, 2)}))


if __name__ == "__main__":
    main()
