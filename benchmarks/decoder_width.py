"""UNet++ decoder width vs speed on this CPU: why the shipped model uses (128, 64, 32, 16, 16).

Prints, for the Lite0 encoder, the parameter count, the median time of one training step
(batch 8, 256x256, Adam, channels_last) and of one inference forward (batch 4, 256x256), side by
side with their ratio to smp's default decoder (256, 128, 64, 32, 16).
Run: .venv/bin/python benchmarks/decoder_width.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _median(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import torch

    from wsi_nuclei.model.network import build_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    widths = {"smp default": (256, 128, 64, 32, 16), "shipped": (128, 64, 32, 16, 16)}
    rows = {}
    for name, dc in widths.items():
        model = build_model("tu-tf_efficientnet_lite0", 3, dc).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters())
        x8 = torch.randn(8, 3, 256, 256).contiguous(memory_format=torch.channels_last)
        x4 = x8[:4].contiguous(memory_format=torch.channels_last)

        def step() -> None:
            model.train()
            loss = model(x8).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        def infer() -> None:
            model.eval()
            with torch.inference_mode():
                model(x4)

        rows[name] = (sum(p.numel() for p in model.parameters()) / 1e6, _median(step, args.repeat), _median(infer, args.repeat))
    base = rows["smp default"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'decoder':<14}{'channels':<24}{'params M':>9}{'train s':>9}{'x':>6}{'infer s':>9}{'x':>6}")
    for name, (params, tr, inf) in rows.items():
        print(f"{name:<14}{str(widths[name]):<24}{params:>9.2f}{tr:>9.3f}{tr / base[1]:>6.2f}{inf:>9.3f}{inf / base[2]:>6.2f}")


if __name__ == "__main__":
    main()
