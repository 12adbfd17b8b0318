"""Peak memory of `wsi-nuclei segment` versus slide size: is it flat?

Builds synthetic pyramidal slides (tiled JPEG TIFF, 0.25 µm/px = 40x, every pyramid level a
top-level page) densely covered with nucleus-like discs (one per 16 x 16 µm, about 3,900 per mm²),
of 1x, 4x and 16x the area, runs `wsi-nuclei segment` on
each in a fresh process and samples, every 0.2 s, the resident memory (RSS) summed over the
command and all its child processes (the Dask scheduler runs in the driver; workers are
children). Prints one row per size and the ratio of each peak to the 1x peak.

Tiles are JPEG-encoded once per variant and written as bytes, so a 100,000 x 100,000 px slide
takes minutes to build, not hours. Level 1 (0.5 µm/px, what the model reads) holds the disc
pattern; level 0 is its 2x upsampling; levels >= 2 show the same disc texture at lower resolution.

Run (about 15 min on 2 cores):
    .venv/bin/python benchmarks/memory_scaling.py                      # shipped model, 1x 4x 16x of 4096^2 px
    .venv/bin/python benchmarks/memory_scaling.py --model standin --sizes 1,16 --huge 100000 --huge-tissue 0.5
The stand-in (`--model standin`) is a per-pixel colour classifier (architecture PixelLinear)
with threshold post-processing: every pipeline stage runs, only the network is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TILE = 256
SPACING = 32  # working px between disc centres (0.5 µm/px): 16 µm
RADIUS = 6.5  # working px


def _variant(seed: int) -> np.ndarray:
    """A 256 x 256 working-resolution tile: pink background, one dark disc per 32 px cell (each
    disc inside its cell, so tiles can be placed in any order)."""
    rng = np.random.default_rng(seed)
    img = np.empty((TILE, TILE, 3), np.float32)
    img[:] = (232, 180, 210)
    img += rng.normal(0, 6, img.shape)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    for cy in range(SPACING // 2, TILE, SPACING):
        for cx in range(SPACING // 2, TILE, SPACING):
            jx, jy = rng.uniform(-6, 6, 2)
            r = RADIUS * rng.uniform(0.8, 1.2)
            inside = (xx - cx - jx) ** 2 + (yy - cy - jy) ** 2 <= r * r
            img[inside] = (75, 45, 130) + rng.normal(0, 8, (int(inside.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded(tile: np.ndarray, tmp: Path) -> bytes:
    """JPEG bytes of ``tile`` exactly as tifffile writes them (read back from a one-tile TIFF)."""
    import tifffile

    path = tmp / "one.tif"
    tifffile.imwrite(path, tile, tile=(TILE, TILE), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        page = tif.pages[0]
        fh.seek(page.dataoffsets[0])
        return fh.read(page.databytecounts[0])


def build_slide(path: Path, side0: int, n_variants: int = 8, tissue: float = 1.0) -> Path:
    """A square slide of ``side0`` level-0 px at 0.25 µm/px with levels down to < 2048 px; tissue
    (the disc pattern) fills a centred square of ``tissue`` of the area, glass (white) the rest."""
    import tifffile
    from PIL import Image

    if path.exists():
        return path
    variants = [_variant(s) for s in range(n_variants)]
    levels = [side0]
    while levels[-1] > 2048:
        levels.append((levels[-1] + 1) // 2)
    half = side0 * tissue**0.5 / 2  # tissue square: |x - side0/2| < half, in level-0 px
    block = TILE * 2 ** (len(levels) - 1)
    part = path.with_name(path.name + ".partial")
    with tempfile.TemporaryDirectory() as td, tifffile.TiffWriter(part, bigtiff=True) as tif:
        tmp = Path(td)
        for k, side in enumerate(levels):
            # level-k tile content: level 1 = variants; level 0 = 2x upsampled quadrants; level k >= 2 =
            # variants shrunk 2^(k-1) times and repeated.
            if k == 0:
                cache = {
                    (v, q): _encoded(
                        np.asarray(
                            Image.fromarray(variants[v][q // 2 * 128 : (q // 2 + 1) * 128, q % 2 * 128 : (q % 2 + 1) * 128]).resize(
                                (TILE, TILE), Image.Resampling.BILINEAR
                            )
                        ),
                        tmp,
                    )
                    for v in range(n_variants)
                    for q in range(4)
                }
            elif k == 1:
                cache = {(v, 0): _encoded(variants[v], tmp) for v in range(n_variants)}
            else:
                f = 2 ** (k - 1)
                cache = {}
                for v in range(n_variants):
                    small = np.asarray(Image.fromarray(variants[v]).resize((TILE // f or 1, TILE // f or 1), Image.Resampling.BOX))
                    cache[(v, 0)] = _encoded(
                        np.tile(small, (f, f, 1))[:TILE, :TILE] if f <= TILE else np.full((TILE, TILE, 3), small.mean((0, 1)), np.uint8),
                        tmp,
                    )
            n = -(-side // TILE)
            white = _encoded(np.full((TILE, TILE, 3), 245, np.uint8), tmp)

            def tiles(k: int = k, n: int = n, cache: dict = cache, white: bytes = white):  # noqa: B008
                ds = 2**k
                for r in range(n):
                    for c in range(n):
                        # decided per block of the coarsest level's tile, so that every level agrees
                        cy = (r * TILE * ds // block + 0.5) * block
                        cx = (c * TILE * ds // block + 0.5) * block
                        if abs(cx - side0 / 2) >= half or abs(cy - side0 / 2) >= half:
                            yield white
                        elif k == 0:
                            yield cache[(((r // 2) * 7919 + (c // 2) * 104729) % n_variants, (r % 2) * 2 + c % 2)]
                        elif k == 1:
                            yield cache[((r * 7919 + c * 104729) % n_variants, 0)]
                        else:
                            yield cache[((r * 7919 + c * 104729) % n_variants, 0)]

            res = 1e4 / (0.25 * 2**k)
            tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                      resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
    part.rename(path)
    return path


def standin_model(folder: Path) -> Path:
    """The PixelLinear stand-in: nucleus logit = 8 - 10 (r + g) on [0, 1] RGB (dark purple -> 1)."""
    import torch

    from wsi_nuclei.model.network import ModelCard, PostProcess, build_model, save_model

    if (folder / "model.json").exists():
        return folder
    net = build_model("none", 1, architecture="PixelLinear")
    with torch.no_grad():
        net.weight[:] = torch.tensor([-10.0, -10.0, 0.0]).view(1, 3, 1, 1)
        net.bias[:] = 8.0
    card = ModelCard(encoder="none", outputs=("nucleus",), working_mpp=0.5, architecture="PixelLinear", input_mean=(0.0, 0.0, 0.0),
                     input_std=(1.0, 1.0, 1.0), postprocess=PostProcess("threshold", 0.5, 0.5, 3.0), name="pixel-linear-standin",
                     context_px=0, license="Apache-2.0", training={"note": "hand-set weights; a benchmark stand-in, not a nuclei model"})
    save_model(net, card, folder)
    return folder


def tree_rss(proc) -> int:  # noqa: ANN001
    """Resident bytes of the psutil process ``proc`` and all its children (0 for those gone)."""
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def measure(cmd: list[str], interval: float = 0.2) -> tuple[float, float, int]:
    """Run ``cmd``; return (peak summed RSS in bytes, wall seconds, exit code)."""
    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(interval)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return float(peak), time.perf_counter() - t0, int(proc.returncode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["shipped", "standin"], default="shipped")
    ap.add_argument("--base", type=int, default=4096, help="side of the 1x slide in level-0 px (0.25 µm/px)")
    ap.add_argument("--sizes", default="1,4,16", help="area multiples of the base slide")
    ap.add_argument("--huge", type=int, default=0, help="also run a slide of this side (level-0 px), e.g. 100000")
    ap.add_argument("--huge-tissue", type=float, default=0.5, help="tissue fraction of the huge slide (the rest is glass)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-nuclei-memory-bench")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("wsi-nuclei"))
    model_flags = ["--model", str(standin_model(args.work / "standin"))] if args.model == "standin" else []
    sides = [int(round(args.base * float(s) ** 0.5)) for s in args.sizes.split(",")]
    labels = [f"{s}x" for s in args.sizes.split(",")]
    if args.huge:
        sides.append(args.huge)
        labels.append(f"{args.huge}^2")
    rows = []
    for label, side in zip(labels, sides):
        tissue = args.huge_tissue if label.endswith("^2") else 1.0
        slide = build_slide(args.work / f"discs_{side}_{tissue:g}.tif", side, tissue=tissue)
        out = args.work / f"out_{args.model}_{side}"
        cmd = [exe, "segment", str(slide), "-o", str(out), "--overwrite", "--quiet", "--workers", str(args.workers),
               "--threads", str(args.threads), *model_flags]
        peak, wall, rc = measure(cmd)
        summary = json.loads((out / slide.stem / "summary.json").read_text()) if rc == 0 else {}
        rows.append({"size": label, "side_px": side, "model": args.model, "chunks": summary.get("chunks", {}).get("processed"),
                     "nuclei": summary.get("nuclei"), "tissue_mm2": summary.get("tissue_mm2"), "peak_rss_gib": peak / 2**30,
                     "wall_s": wall, "exit": rc})
        print(f"done {label}: peak {peak / 2**30:.2f} GiB, {wall:.0f} s", file=sys.stderr, flush=True)
    base = rows[0]["peak_rss_gib"] or 1.0
    print(f"\nwsi-nuclei segment, model={args.model}, {args.workers} worker x {args.threads} threads; RSS summed over all processes")
    print(f"{'size':>9} {'level-0 px':>15} {'chunks':>7} {'nuclei':>10} {'tissue mm2':>10} {'peak RSS GiB':>12} {'vs 1x':>6} {'wall s':>8}")
    for r in rows:
        print(
            f"{r['size']:>9} {r['side_px']:>7}x{r['side_px']:<7} {r['chunks'] or '-':>7} {r['nuclei'] or '-':>10} "
            f"{r['tissue_mm2'] or '-':>10} "
            f"{r['peak_rss_gib']:>12.2f} {r['peak_rss_gib'] / base:>6.2f} {r['wall_s']:>8.0f}"
        )
    print(json.dumps({"model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
