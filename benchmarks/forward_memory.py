"""Peak memory of one forward pass versus its input side, per backend: what --forward-memory plans with.

Each (backend, side) runs in a fresh process: load the shipped model and its predictor, run one
64 px forward (sessions, arenas and lazy imports settle), note the peak RSS (``ru_maxrss``), run
one forward of side x side px, and print how much the peak grew. The growth divided by the input
pixels is the per-pixel cost that ``wsi_nuclei.model.memory`` uses to size a forward pass.
Run: .venv/bin/python benchmarks/forward_memory.py [--sides 512,1024,1792] [--backends onnx,torch]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CHILD = """
import json, resource, sys
import numpy as np
from wsi_nuclei.model.backends import make_predictor
from wsi_nuclei.model.network import load_model
backend, side, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(threads)
model, card = load_model()
predict, name = make_predictor(model, card, backend, "cpu", threads)
rng = np.random.default_rng(0)
predict(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = predict(rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"backend": name, "side": side, "grew": after - before, "base": before, "out": out.nbytes}))
"""


def measure(backend: str, side: int, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, backend, str(side), str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", default="512,1024,1792")
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    print(f"peak RSS growth of one forward pass of the shipped model, fresh process each, {args.threads} threads")
    print(f"{'backend':<8}{'side px':>8}{'MiB':>9}{'bytes/px':>10}{'x smallest':>11}")
    rows = []
    for backend in args.backends.split(","):
        first = None
        for side in sides:
            r = measure(backend, side, args.threads)
            per_px = r["grew"] / side**2
            first = first or per_px
            rows.append({**r, "bytes_per_px": round(per_px)})
            print(f"{backend:<8}{side:>8}{r['grew'] / 2**20:>9.0f}{per_px:>10.0f}{per_px / first:>11.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
