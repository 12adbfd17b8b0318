"""Amplification (pixels given to the model per tissue pixel) of a slide's plan, by chunk size and
context: with tissue boxes (the default: one box per chunk window), with whole windows
(``--whole-windows``), and with several rectangles per window (not built; measured here to see
whether it would pay): the 64 px cells of the window that touch its tissue (dilated by the halo and
one mask pixel, as the box is), one rectangle per connected group of cells, then any two merged
whenever the merged one with its context costs no more pixels than the two apart. Plans only:
reads the slide and its tissue mask, runs no model, takes seconds.

Run: .venv/bin/python benchmarks/amplification.py [SLIDE] [--chunks 512,1024,1536,2048,3072] [--contexts 256,128]
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CELL = 64

Box = tuple[int, int, int, int]


def _cost(b: Box, context: int) -> int:
    return (b[2] - b[0] + 2 * context) * (b[3] - b[1] + 2 * context)


def tissue_scale(plan) -> float:  # noqa: ANN001
    """Working px per tissue-mask pixel, as ``plan_slide`` derives it (thumbnail scale / plan scale)."""
    from wsi_nuclei.slides.reader import open_slide

    with open_slide(plan.path) as slide:
        return slide.thumbnail(2048)[1] / plan.scale


def window_mask(tissue: np.ndarray, per: float, x: int, y: int, side: int) -> np.ndarray:
    """The tissue mask on the working pixels of the ``side`` px square at (``x``, ``y``); False
    outside the slide."""
    ys, xs = np.floor(np.arange(y, y + side) / per).astype(int), np.floor(np.arange(x, x + side) / per).astype(int)
    oky, okx = (ys >= 0) & (ys < tissue.shape[0]), (xs >= 0) & (xs < tissue.shape[1])
    mask = np.zeros((side, side), bool)
    mask[np.ix_(oky, okx)] = tissue[np.ix_(ys[oky], xs[okx])]
    return mask


def rectangles(mask: np.ndarray, context: int, cell: int = CELL) -> list[Box]:
    """Rectangles (x0, y0, x1, y1) covering the ``cell`` px cells of ``mask`` that hold tissue: one
    per 8-connected group of cells, merged greedily while merging saves pixels (context included)."""
    from scipy import ndimage as ndi

    h, w = mask.shape
    grid = np.zeros((-(-h // cell) * cell, -(-w // cell) * cell), bool)
    grid[:h, :w] = mask
    cells = grid.reshape(grid.shape[0] // cell, cell, grid.shape[1] // cell, cell).any(axis=(1, 3))
    lab, _ = ndi.label(cells, structure=np.ones((3, 3)))
    boxes: list[Box] = [(s[1].start * cell, s[0].start * cell, min(w, s[1].stop * cell), min(h, s[0].stop * cell))
                        for s in ndi.find_objects(lab) if s is not None]
    while len(boxes) > 1:
        best = None
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                u = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                saved = _cost(a, context) + _cost(b, context) - _cost(u, context)
                if saved >= 0 and (best is None or saved > best[0]):
                    best = (saved, i, j, u)
        if best is None:
            break
        _, i, j, u = best
        boxes = [b for k, b in enumerate(boxes) if k not in (i, j)] + [u]
    return boxes


def main() -> None:
    from scipy import ndimage as ndi

    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.pipeline.plan import plan_slide
    from wsi_nuclei.pipeline.segment import SegmentConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", nargs="?", type=Path, default=SAMPLE_SLIDE)
    ap.add_argument("--chunks", default="512,1024,1536,2048,3072")
    ap.add_argument("--contexts", default="256,128")
    args = ap.parse_args()
    print(f"amplification of {args.slide.name} (pixels given to the model / tissue pixels at the model's resolution); "
          f"rectangles: {CELL} px tissue cells grouped and merged per window (not built)")
    print(f"{'chunk':>6} {'context':>7} {'chunks':>6} {'tissue boxes':>12} {'whole windows':>13} {'rectangles':>10} {'(how many)':>10}")
    per = 0.0  # working px per tissue-mask pixel (the same for every plan of the slide)
    for chunk in map(int, args.chunks.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            plan, _, tissue = plan_slide(args.slide, Path("unused"), SegmentConfig(chunk_size=chunk, context=ctx))
            t = plan.tiling
            boxes = sum((x1 - x0 + 2 * t.context) * (y1 - y0 + 2 * t.context)
                        for x0, y0, x1, y1 in (ch.infer or (0, 0, t.window, t.window) for ch in plan.chunks))
            whole = len(plan.chunks) * (t.window + 2 * t.context) ** 2
            tissue_px = plan.tissue_mm2 / (plan.card.working_mpp / 1000) ** 2
            # the tissue mask on each window's pixels, dilated as tiling.tissue_box dilates it
            per = per or tissue_scale(plan)
            grow = t.halo + int(math.ceil(per))
            rect_px, n_rect = 0, 0
            for ch in plan.chunks:
                m = ndi.maximum_filter(window_mask(tissue, per, ch.x - t.halo, ch.y - t.halo, t.window), size=2 * grow + 1)
                rects = rectangles(m, t.context)
                rect_px += sum(_cost(b, t.context) for b in rects)
                n_rect += len(rects)
            print(f"{chunk:>6} {ctx:>7} {len(plan.chunks):>6} {boxes / tissue_px:>12.2f} {whole / tissue_px:>13.2f} "
                  f"{rect_px / tissue_px:>10.2f} {n_rect:>10}")


if __name__ == "__main__":
    main()
