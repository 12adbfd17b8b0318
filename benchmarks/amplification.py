"""Amplification (pixels given to the model per tissue pixel) of a slide's plan, by chunk size and
context: with tissue boxes (the default) and with whole windows (``--whole-windows``). Plans only:
reads the slide and its tissue mask, runs no model, takes seconds.

Run: .venv/bin/python benchmarks/amplification.py [SLIDE] [--chunks 512,1024,1536,2048,3072] [--contexts 256,128]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.pipeline import SegmentConfig
    from wsi_nuclei.plan import plan_slide

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", nargs="?", type=Path, default=SAMPLE_SLIDE)
    ap.add_argument("--chunks", default="512,1024,1536,2048,3072")
    ap.add_argument("--contexts", default="256,128")
    args = ap.parse_args()
    print(f"amplification of {args.slide.name} (pixels given to the model / tissue pixels at the model's resolution)")
    print(f"{'chunk':>6} {'context':>7} {'chunks':>6} {'tissue boxes':>12} {'whole windows':>13}")
    for chunk in map(int, args.chunks.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            plan, _, _ = plan_slide(args.slide, Path("unused"), SegmentConfig(chunk_size=chunk, context=ctx))
            t = plan.tiling
            boxes = sum((x1 - x0 + 2 * t.context) * (y1 - y0 + 2 * t.context)
                        for x0, y0, x1, y1 in (ch.infer or (0, 0, t.window, t.window) for ch in plan.chunks))
            whole = len(plan.chunks) * (t.window + 2 * t.context) ** 2
            tissue_px = plan.tissue_mm2 / (plan.card.working_mpp / 1000) ** 2
            print(f"{chunk:>6} {ctx:>7} {len(plan.chunks):>6} {boxes / tissue_px:>12.2f} {whole / tissue_px:>13.2f}")


if __name__ == "__main__":
    main()
