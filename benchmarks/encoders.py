"""Encoder cost side by side: UNet++ with ImageNet EfficientNet-Lite0/1/2 (the shipped decoder).

For each encoder, prints the parameter count and the median ONNX Runtime time of one forward pass
of a 1280x1280 window (the pipeline's chunk window with its context is of this order) on this
CPU, with its ratio to Lite0. Validation AJI needs a trained model per encoder: docs/model.md
puts the two side by side for the candidates that were trained.
Run: .venv/bin/python benchmarks/encoders.py [--threads 2] [--repeat 3] [--side 1280]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from wsi_nuclei.model.backends import export_onnx
    from wsi_nuclei.model.network import ModelCard, build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--side", type=int, default=1280)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).normal(size=(1, 3, args.side, args.side)).astype(np.float32)
    print(f"UNet++ decoder (128, 64, 32, 16, 16), 3 outputs; ONNX Runtime, {args.threads} threads, one {args.side}² window")
    print(f"{'encoder':<28}{'params (M)':>12}{'forward ms':>12}{'ratio':>8}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for k in (0, 1, 2):
            name = f"tu-tf_efficientnet_lite{k}"
            net = build_model(name, 3, (128, 64, 32, 16, 16)).eval()
            params = sum(p.numel() for p in net.parameters()) / 1e6
            path = export_onnx(net, ModelCard(encoder=name), Path(tmp) / f"lite{k}.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"input": x})
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                sess.run(None, {"input": x})
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            base = base or ms
            print(f"{name:<28}{params:>12.2f}{ms:>12.0f}{ms / base:>8.2f}")


if __name__ == "__main__":
    main()
