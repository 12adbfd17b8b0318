"""How much context a model tile needs: tile centre vs a whole-image forward, per context width.

Reads a 1536 px square of the CMU sample slide at the model's working resolution, runs the shipped
model on it once, then on a 256 px tile with `ctx` px of context on every side, and prints the
largest and mean absolute difference of the tile's centre. tiling.MODEL_CONTEXT_PX is the
smallest width here whose maximum stays under 1e-3.
Run: .venv/bin/python benchmarks/model_context.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np

    from wsi_nuclei.infer import predict_region
    from wsi_nuclei.model import load_model
    from wsi_nuclei.slide import open_slide

    model, card = load_model()
    slide_path = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs"
    side, tile = 1536, 256
    with open_slide(slide_path) as s:
        img = s.read_working((300, 600, side, side), card.mpp / s.info.mpp)
    whole = predict_region(model, card, img)
    c0 = (side - tile) // 2 // 32 * 32
    print(f"{'context px':>10}{'max |diff|':>12}{'mean |diff|':>14}")
    for ctx in (64, 128, 192, 256, 320, 384):
        sub = img[c0 - ctx : c0 + tile + ctx, c0 - ctx : c0 + tile + ctx]
        part = predict_region(model, card, sub)[:, ctx : ctx + tile, ctx : ctx + tile]
        d = np.abs(part - whole[:, c0 : c0 + tile, c0 : c0 + tile])
        print(f"{ctx:>10}{d.max():>12.5f}{d.mean():>14.2e}")


if __name__ == "__main__":
    main()
