"""What a new input shape costs a backend: the first call at a shape against a repeated call.

OpenVINO (and TensorRT or torch.compile on a GPU) prepare per input shape; a slide's tissue boxes
give many shapes. This prints, per backend, the first-call and the steady time at each of a set of
shapes (each new to the predictor), their ratio, and the steady time per megapixel, so that the
cost of a new shape can be set against the pixels that rounding boxes up to fewer shapes would add.
Run: .venv/bin/python benchmarks/shape_cost.py [--backend openvino] [--threads 2] [--sizes 320,352,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
STEPS = (32, 128, 256, 512)


def plan_shapes(path: Path, step: int) -> tuple[int, int, int]:
    """(distinct forward-pass input shapes, pixels given to the model, chunks) of ``segment``'s plan
    of ``path`` with tissue boxes grown to multiples of ``step`` (one pass per chunk window)."""
    from wsi_nuclei.model.infer import round_box
    from wsi_nuclei.pipeline.plan import model_card, plan_slide
    from wsi_nuclei.pipeline.segment import SegmentConfig

    cfg = SegmentConfig(box_step=step)
    plan, _, _ = plan_slide(path, Path(tempfile.mkdtemp()), cfg, model_card(cfg))
    side, ctx = plan.tiling.window, plan.tiling.context
    shapes, px = set(), 0
    for ch in plan.chunks:
        box = round_box(ch.infer, side, step) or (0, 0, side, side)
        shape = (box[3] - box[1] + 2 * ctx, box[2] - box[0] + 2 * ctx)
        shapes.add(shape)
        px += shape[0] * shape[1]
    return len(shapes), px, len(plan.chunks)


def main() -> None:
    import numpy as np
    import torch

    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", action="append", default=None, help="repeat; default openvino and onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="448x448,480x448,512x448,512x512,576x512,640x640,704x576,768x768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--synthetic-side", type=int, default=12288, help="level-0 px of the synthetic slide (0.25 µm/px)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-nuclei-pipeline-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, card = load_model()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    costs: dict[str, tuple[float, float]] = {}
    print(f"{'backend':<10} {'shape':>10} {'first s':>8} {'steady s':>9} {'first/steady':>12} {'steady s/Mpx':>12}")
    for backend in args.backend or ["openvino", "onnx"]:
        predict, name = make_predictor(net, card, backend, "cpu", args.threads)
        predict(rng.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8))  # the model loaded and compiled once
        extra, per_px = [], []
        for h, w in sizes:
            img = rng.integers(0, 255, (1, h, w, 3), dtype=np.uint8)
            t0 = time.perf_counter()
            predict(img)
            first = time.perf_counter() - t0
            steady = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                predict(img)
                steady.append(time.perf_counter() - t0)
            s = min(steady)
            extra.append(first - s)
            per_px.append(s / (h * w / 1e6))
            print(f"{name:<10} {h:>4}x{w:<5} {first:>8.3f} {s:>9.3f} {first / s:>12.2f} {s / (h * w / 1e6):>12.3f}")
        cost, per_mpx = float(np.median(extra)), float(np.median(per_px))
        print(f"{name}: a new shape costs {cost:.3f} s more than a repeated one (median over {len(sizes)} shapes)")
        costs[name] = (cost, per_mpx)
    from memory_scaling import build_slide

    args.work.mkdir(parents=True, exist_ok=True)
    slides = {"CMU-1-Small-Region": ROOT / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs",
              f"synthetic {args.synthetic_side}²": build_slide(args.work / f"syn_{args.synthetic_side}_t25.tif", args.synthetic_side,
                                                                 tissue=0.25)}
    print("\ntissue boxes grown to --box-step: input shapes, pixels given, and what they cost (steady s/Mpx x pixels + new shapes x cost)")
    print(f"{'slide':<20} {'step':>5} {'chunks':>6} {'shapes':>6} {'Mpx':>8} {'x px':>6} " + " ".join(f"{n + ' s':>12}" for n in costs))
    for label, path in slides.items():
        base = None
        for step in STEPS:
            n_shapes, px, chunks = plan_shapes(path, step)
            base = base or px
            est = [px / 1e6 * per_mpx + n_shapes * cost for cost, per_mpx in costs.values()]
            cells = " ".join(f"{e:>12.1f}" for e in est)
            print(f"{label:<20} {step:>5} {chunks:>6} {n_shapes:>6} {px / 1e6:>8.1f} {px / base:>6.3f} {cells}")


if __name__ == "__main__":
    main()
