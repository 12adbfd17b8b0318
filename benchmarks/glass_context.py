"""Could a chunk's tissue box drop the context on its sides that face glass? Measured, not built.

The model is given each chunk window's tissue box plus the card's ``context_px`` (256 px) on every
side, glass included. Where a side faces only glass, a shorter context there would save pixels
(the bundled slide's tissue is scattered, so many sides do). For every chunk of the bundled slide's
plan (default chunk size) this compares, inside the box, the model's output with a reference run
whose context is 384 px on every side:

- ``card context``: the box and 256 px on every side (what the pipeline does);
- ``glass G``: the box, G px beyond it on every side, and on each side as far as the tissue mask
  reaches within 256 px (tissue still gets its full context; only glass is cut).

Columns: amplification (pixels given / tissue pixels), the 99.9th percentile of |Δ nucleus
probability|, instance AJI against the reference and the nuclei of either without an IoU > 0.5
partner in the other, summed over the chunks; ``ok`` applies measure-context's rule (AJI >= 0.995,
no unmatched nucleus, p99.9 <= 0.05) to every chunk.

Run: .venv/bin/python benchmarks/glass_context.py [SLIDE] [--glass 0,32,64,128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REFERENCE = 384
STRIDE = 32


def main() -> None:
    from amplification import tissue_scale, window_mask

    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.nuclei.instances import probabilities_to_instances
    from wsi_nuclei.pipeline.plan import plan_slide
    from wsi_nuclei.pipeline.segment import SegmentConfig
    from wsi_nuclei.slides.reader import open_slide
    from wsi_nuclei.training.context import AJI_MIN, PROB_TOL
    from wsi_nuclei.training.metrics import evaluate_pair

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", nargs="?", type=Path, default=SAMPLE_SLIDE)
    ap.add_argument("--glass", default="0,32,64,128")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    net, card = load_model()
    predict, backend = make_predictor(net, card, "auto", "cpu", args.threads)
    ctx = int(card.context_px or 256)
    plan, _, tissue = plan_slide(args.slide, Path("unused"), SegmentConfig())
    t = plan.tiling
    per = tissue_scale(plan)  # working px per mask pixel
    tissue_px = plan.tissue_mm2 / (card.working_mpp / 1000) ** 2
    variants = ["card context"] + [f"glass {g}" for g in map(int, args.glass.split(","))]
    px = dict.fromkeys(variants, 0)
    per_chunk: dict[str, list[tuple[float, float, int]]] = {v: [] for v in variants}

    def labels_of(p: np.ndarray) -> np.ndarray:
        return probabilities_to_instances(p, card.outputs, card.postprocess, card.working_mpp)

    with open_slide(plan.path) as slide:
        for ch in plan.chunks:
            side = t.window + 2 * REFERENCE
            ox, oy = ch.x - t.halo - REFERENCE, ch.y - t.halo - REFERENCE
            rgb = slide.read_working((ox, oy, side, side), plan.scale)
            x0, y0, x1, y1 = ch.infer or (0, 0, t.window, t.window)
            bx0, by0, bx1, by1 = x0 + REFERENCE, y0 + REFERENCE, x1 + REFERENCE, y1 + REFERENCE

            def run(rx0: int, ry0: int, rx1: int, ry1: int) -> tuple[np.ndarray, int]:
                p = predict(np.ascontiguousarray(rgb[None, ry0:ry1, rx0:rx1]))[0]
                return p[:, by0 - ry0 : by1 - ry0, bx0 - rx0 : bx1 - rx0], (rx1 - rx0) * (ry1 - ry0)

            ref, _ = run(bx0 - REFERENCE, by0 - REFERENCE, bx1 + REFERENCE, by1 + REFERENCE)
            ref_labels = labels_of(ref)
            mask = window_mask(tissue, per, ox, oy, side)
            near = mask[by0 - ctx : by1 + ctx, bx0 - ctx : bx1 + ctx]
            for v in variants:
                if v == "card context":
                    rect = (bx0 - ctx, by0 - ctx, bx1 + ctx, by1 + ctx)
                else:
                    g = int(v.split()[1])
                    rx0, ry0, rx1, ry1 = bx0 - g, by0 - g, bx1 + g, by1 + g
                    if near.any():  # tissue within the context keeps its place in the input
                        rows, cols = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
                        rx0, rx1 = min(rx0, bx0 - ctx + cols[0]), max(rx1, bx0 - ctx + cols[-1] + 1)
                        ry0, ry1 = min(ry0, by0 - ctx + rows[0]), max(ry1, by0 - ctx + rows[-1] + 1)
                    # on the stride grid, as every read box is
                    rect = (rx0 // STRIDE * STRIDE, ry0 // STRIDE * STRIDE, -(-rx1 // STRIDE) * STRIDE, -(-ry1 // STRIDE) * STRIDE)
                p, n = run(*rect)
                m = evaluate_pair(ref_labels, labels_of(p))
                per_chunk[v].append((float(np.percentile(np.abs(p[0] - ref[0]), 99.9)), float(m.aji), m.unmatched))
                px[v] += n
    print(f"context at the tissue box's glass sides — {args.slide.name}, {len(plan.chunks)} chunks of {t.chunk} px, backend {backend}, "
          f"reference: {REFERENCE} px context on every side")
    print(f"{'variant':<14} {'ampl.':>6} {'max p99.9 |dp|':>14} {'min AJI':>8} {'unmatched':>9} {'ok':>4}")
    for v in variants:
        rows_ = per_chunk[v]
        ok = all(a >= AJI_MIN and u == 0 and d <= PROB_TOL for d, a, u in rows_)
        print(f"{v:<14} {px[v] / tissue_px:>6.2f} {max(r[0] for r in rows_):>14.4f} {min(r[1] for r in rows_):>8.4f} "
              f"{sum(r[2] for r in rows_):>9} {'yes' if ok else 'no':>4}")


if __name__ == "__main__":
    main()
