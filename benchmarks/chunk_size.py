"""The chunk size, chosen by measurement: `segment` of the bundled slide and of the synthetic slide
with glass around its tissue (pipeline_vs_model.py's) at each chunk size, with the default backend.

A small chunk skips more glass (its tissue box is tighter) but each one carries the model's whole
context again and adds fixed costs per chunk; a large one the reverse, and its forward pass needs
more memory. Each (slide, chunk size) runs in a fresh process: one warm-up run (model loaded,
every input shape seen once), then the timed run. Printed side by side: the amplification (pixels
given to the model / tissue pixels), seconds, seconds per mm² of tissue, the time relative to the
chunk size of 1024 px (the default before this benchmark chose 1536) and the peak RSS of the process.

A second table: the bare forward pass of one tissue-filled window per chunk size (what a chunk inside
tissue costs per core pixel, where no glass is skipped); ``--forward-only`` prints only it.

Run: .venv/bin/python benchmarks/chunk_size.py [--sizes 512,768,1024,1280,1536,2048] [--threads 2] [--forward-only]
     [--precision fp32|bf16|int8] [--device cuda --backend torch]   (a GPU: benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

ONE = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many
slide, out, size, threads, backend = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device, precision = sys.argv[6], sys.argv[7]
torch.set_num_threads(threads)
cfg = SegmentConfig(chunk_size=size, torch_threads=threads, overwrite=True, backend=backend, device=device, precision=precision)
segment_many([slide], out / "warmup", cfg)
t0 = time.perf_counter()
res = segment_many([slide], out / "timed", cfg)[0]
seconds = time.perf_counter() - t0
s = json.loads((Path(res.out_dir) / "summary.json").read_text())
print(json.dumps({"seconds": seconds, "nuclei": res.nuclei, "chunks": s["chunks"]["processed"], "tissue_mm2": s["tissue_mm2"],
                  "amplification": s["amplification"], "backend": s["backend"], "inference": s["seconds"]["inference"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,768,1024,1280,1536,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: --backend torch)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or int8 (as segment --precision)")
    ap.add_argument("--synthetic-side", type=int, default=12288)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-nuclei-chunk-bench")
    ap.add_argument("--forward-only", action="store_true", help="only the second table: the bare forward pass of a tissue-filled window")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not args.forward_only:
        segment_table(args, sizes)
    forward_table(args, sizes)


def forward_table(args: argparse.Namespace, sizes: list[int]) -> None:
    """The bare forward pass over one tissue-filled chunk window of each size (its core, halo and
    the card's context; best of 2 after a warm-up call): what a chunk inside tissue costs per
    pixel of core, where no glass is skipped."""
    import time

    import numpy as np
    import torch

    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.pipeline.plan import slide_tiling
    from wsi_nuclei.pipeline.segment import SegmentConfig

    torch.set_num_threads(args.threads)
    net, card = load_model()
    predict, name = make_predictor(net, card, args.backend, args.device, args.threads, args.precision)
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        t = slide_tiling(SegmentConfig(chunk_size=size), card)
        side = t.window + 2 * t.context
        x = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        predict(x)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            predict(x)
            best = min(best, time.perf_counter() - t0)
        rows.append((size, side, best))
    ref = next((r for r in rows if r[0] == 1024), None)
    print(f"\nbare forward pass of one tissue-filled chunk window — backend {name}, {args.threads} threads, best of 2")
    print(f"{'chunk':>5} {'input px':>8} {'s':>6} {'us/input px':>11} {'us/core px':>10} {'x1024 per core px':>17}")
    for size, side, sec in rows:
        rel = f"{(sec / size**2) / (ref[2] / ref[0] ** 2):.2f}" if ref else "-"
        print(f"{size:>5} {side:>8} {sec:>6.2f} {sec / side**2 * 1e6:>11.3f} {sec / size**2 * 1e6:>10.3f} {rel:>17}")


def segment_table(args: argparse.Namespace, sizes: list[int]) -> None:
    """The first table: ``segment`` of both slides at each chunk size, a fresh process per row."""
    from memory_scaling import build_slide

    args.work.mkdir(parents=True, exist_ok=True)
    slides = {"CMU-1-Small-Region (real)": ROOT / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs",
              f"synthetic {args.synthetic_side}² @0.25": build_slide(args.work / f"syn_{args.synthetic_side}_t25.tif", args.synthetic_side,
                                                                    tissue=0.25)}
    default = 1024  # the reference row: the default chunk size before this benchmark
    rows = []
    for label, path in slides.items():
        for size in sizes:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    ONE,
                    str(path),
                    str(args.work / f"{path.stem}_{size}"),
                    str(size),
                    str(args.threads),
                    args.backend,
                    args.device,
                    args.precision,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                sys.exit(f"{label} at {size} px failed:\n{proc.stderr[-3000:]}")
            row = {"slide": label, "chunk": size, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"done {label} {size}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    backend = rows[0]["backend"]
    print(f"\nchunk size vs time — {os.cpu_count()} cores, {args.threads} threads, backend {backend}, a fresh process per row "
          f"(warm-up run, then the timed one); x{default}: seconds / seconds at {default} px")
    print(f"{'slide':<28} {'chunk':>5} {'chunks':>6} {'nuclei':>6} {'ampl.':>6} {'inference s':>11} {'s':>6} {'s/mm²':>6} "
          f"{f'x{default}':>6} {'peak RSS GB':>11}")
    for r in rows:
        ref = next((q for q in rows if q["slide"] == r["slide"] and q["chunk"] == default), None)
        rel = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        print(f"{r['slide']:<28} {r['chunk']:>5} {r['chunks']:>6} {r['nuclei']:>6} {r['amplification']:>6.2f} {r['inference']:>11.1f} "
              f"{r['seconds']:>6.1f} {r['seconds'] / r['tissue_mm2']:>6.1f} {rel:>6} {r['peak_rss_gb']:>11.2f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
