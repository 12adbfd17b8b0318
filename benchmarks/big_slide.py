"""A resection-sized slide: `wsi-nuclei segment` on a large mosaic of real H&E tissue.

Builds, into a temporary folder, a tiled JPEG BigTIFF at 0.25 µm/px (level 0; every pyramid level
a top-level page, 2x steps down to <= 2048 px) holding ``--tissue-mm2`` mm² of tissue (default
60) laid out as several irregular tissue fragments ("islands", a few large and a few small) with
glass gaps between them and white glass (about 240-250 RGB, a little noise) around; the tissue
is 30-60 % of the slide. The tissue is real H&E at 0.25 µm/px: the 30 MoNuSeg training images
(40x, 1000²), the 41 CoNSeP images (40x, their 256² JPEG tiles pasted back to 1000²) and the
bundled CMU-1-Small-Region.svs (0.499 µm/px, upsampled 2x, only crops that are >= 80 % tissue).
TNBC is not used. Each island has its own patch grid (cell side 384-640 px, random phase); each
cell is a random crop of a source chosen by its tissue area, turned by a random multiple of 90°
and flipped at random, so no two cells are the same pixels. Seeded (``--seed``) and deterministic:
a cell's content depends only on the seed, its island and its grid position. Built in 512-row
strips: level 0 is never whole in memory (level 1 and below go through memory-mapped files on
disk); the default (60 mm², seed 0) is 75,264 x 29,696 px, 0.85 GB, built in about 2.5 min.

Then, for each layout (``--layouts``, workers x threads: 1x2 and 2x1 by default), a fresh
`wsi-nuclei segment --workers W --threads T` process, and reports:
  wall s         the command's wall time (process start to exit: imports, cluster, plan, chunks, assembly);
  s/mm²          wall s / tissue mm² (summary.json ``tissue_mm2``, the pipeline's own tissue mask);
  peak RSS GB    the resident memory summed over the command and all its children (the Dask
                 workers), sampled every 0.2 s;
  ampl.          summary.json ``amplification`` (pixels given to the model / tissue pixels);
  limit s        the physical limit as in pipeline_vs_model.py: the bare forward pass (same
                 backend, T threads) over only the 256 px working tiles touching the tissue mask,
                 no context or halo, 8 per call, divided by W (workers in parallel). ESTIMATED:
                 the seconds per tile are measured on a random sample of ``--limit-sample``
                 tissue tiles (in this process, before the runs) and multiplied by the tile count;
  to limit       wall s / limit s;
  after fwd      the wall time after the last forward pass ended, and its share of wall s. The
                 pipeline records no per-chunk end times, so the benchmark watches the chunk files
                 (``OUT/<slide>/.partial/chunks/<i>.npz``, written when a chunk ends) and reads each
                 one's stage seconds: a chunk's forward pass ended at the file's mtime less its
                 ``instances`` and ``polygons`` seconds (its encoding and write, a little, count as
                 before: the share is a slight underestimate); the last chunk file to end the tail;
  ÷ fwd          wall s / the forward passes' own seconds (the chunks' ``inference`` stage summed,
                 divided by W: a worker's forward passes take turns), against the target ≤ 1.10;
  tail ≤ 1.5     whether ``after fwd`` met the streaming tail's target (≤ 1.5 s);
  after the last chunk file, s until: the times from the last chunk file to summary.json (the
                 slide's finish), OUT/run.json (the chunk files removed, the slide's result in),
                 OUT/report.html, and the process's end (the cluster closed), from the files' mtimes;
  estimate s     the per-slide estimate that `segment --dry-run` (same layout) prints, against wall s
                 (est/wall, and whether it is within ±30 %).
A table of the layouts side by side (``x first``: wall s / the first layout's), then a last line
JSON object with every number. Nothing is warmed up: each run is a cold CLI run, as a user's is.

Run (--tissue-mm2 4: about 5 min on 2 cores; 60 mm²: about 17 min per layout by the dry run's estimate):
    .venv/bin/python benchmarks/big_slide.py [--tissue-mm2 60] [--layouts 1x2,2x1] [--keep DIR] [--seed 0]
    .venv/bin/python benchmarks/big_slide.py --estimate-only    # build the slide and print the dry runs' estimates only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MPP0 = 0.25  # level-0 µm/px
TILE = 256  # TIFF tile side (every level)
STRIP = 512  # level-0 rows built at once (two level-0 tile rows, one level-1 tile row)
MASK_PX = 16  # level-0 px per island-mask px (4 µm)
GLASS = (244, 244, 246)  # mean glass RGB; per-pixel noise of 1.5 grey levels
CELLS = (384, 448, 512, 576, 640)  # patch-grid cell sides (level-0 px), one per island


# --- the tissue sources ------------------------------------------------------------------------


def _tissue_table(img: np.ndarray) -> np.ndarray:
    """Summed-area table (padded with a zero row and column) of tissue pixels per 16 px cell:
    a pixel is tissue when it is coloured (max - min channel > 15) or dark (mean < 200)."""
    h, w = img.shape[0] // 16 * 16, img.shape[1] // 16 * 16
    a = img[:h, :w].astype(np.int16)
    tissue = ((a.max(axis=2) - a.min(axis=2)) > 15) | (a.sum(axis=2) < 600)
    cells = tissue.reshape(h // 16, 16, w // 16, 16).mean(axis=(1, 3))
    return np.pad(cells.cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def load_sources(data_root: Path) -> list[dict]:
    """The real H&E images at 0.25 µm/px: MoNuSeg train, CoNSeP (train and test), the CMU sample x2."""
    import openslide
    from PIL import Image

    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.training.consep import CONSEP_TILE_ORIGINS
    from wsi_nuclei.training.datasets import read_rgb

    images: list[tuple[str, np.ndarray]] = []
    for p in sorted((data_root / "monuseg" / "train" / "images").glob("*.tif")):
        images.append((f"monuseg/{p.stem}", read_rgb(p)))
    for split in ("train", "test"):
        folder = data_root / "consep" / "images" / split
        for name in sorted({p.name.rsplit("_", 1)[0] for p in folder.glob(f"{split}_*_*.jpg")}):
            img = np.zeros((1000, 1000, 3), np.uint8)
            for i, (y, x) in enumerate(CONSEP_TILE_ORIGINS):
                img[y : y + 256, x : x + 256] = read_rgb(folder / f"{name}_{i:03d}.jpg")
            images.append((f"consep/{name}", img))
    with openslide.OpenSlide(str(SAMPLE_SLIDE)) as s:  # 0.499 µm/px: upsampled 2x to 0.25
        cmu = s.read_region((0, 0), 0, s.dimensions).convert("RGB")
    images.append(("CMU-1-Small-Region x2", np.asarray(cmu.resize((cmu.width * 2, cmu.height * 2), Image.Resampling.BICUBIC))))
    if len(images) < 2:
        sys.exit(f"{data_root}: no MoNuSeg or CoNSeP images found (pass --data-root, the shared data folder)")
    out = []
    for name, img in images:
        sat = _tissue_table(img)
        out.append({"name": name, "image": img, "sat": sat, "tissue_px": float(sat[-1, -1]) * 256})
    return out


def _patch(sources: list[dict], weights: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A ``side``² crop of a random source (chosen by tissue area; crops >= 80 % tissue preferred,
    the best of 20 tries otherwise), turned by k x 90° and flipped at random."""
    src = sources[int(rng.choice(len(sources), p=weights))]
    img, sat = src["image"], src["sat"]
    n = side // 16
    best, best_frac = (0, 0), -1.0
    for _ in range(20):
        cy, cx = int(rng.integers(0, sat.shape[0] - n)), int(rng.integers(0, sat.shape[1] - n))
        frac = (sat[cy + n, cx + n] - sat[cy, cx + n] - sat[cy + n, cx] + sat[cy, cx]) / (n * n)
        if frac > best_frac:
            best, best_frac = (cy, cx), frac
        if frac >= 0.8:
            break
    y, x = best[0] * 16, best[1] * 16
    crop = np.rot90(img[y : y + side, x : x + side], int(rng.integers(4)))
    return crop[:, ::-1] if rng.integers(2) else crop


# --- the islands -------------------------------------------------------------------------------


def _outline(rng: np.random.Generator, area_px: float) -> np.ndarray:
    """A star-shaped blob (low-frequency radial wobble, elongated, turned) of ``area_px`` mask px,
    as (N, 2) vertices (x, y) around the origin."""
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 8):
        r += rng.uniform(0, 0.28) / k**0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.maximum(r, 0.35)
    e, turn = rng.uniform(1.0, 1.7), rng.uniform(0, np.pi)
    x, y = r * np.cos(theta) * e, r * np.sin(theta) / e
    x, y = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)
    unit = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    return np.stack([x, y], axis=1) * math.sqrt(area_px / unit)


def island_mask(tissue_mm2: float, seed: int, aspect: float = 1.6) -> np.ndarray:
    """The slide's island map at MASK_PX level-0 px per px (uint8: 0 glass, i = island i), its
    shape a multiple of STRIP / MASK_PX: a few large islands and a few small fragments, each
    placed (largest first) where it grows the layout's bounding box least, within a canvas about
    ``aspect`` wide, keeping a glass gap of 0.06-0.2 of a large island's diameter to every island
    before it, with a margin of 0.06 diameters around; landscape (wider than tall)."""
    from scipy.ndimage import binary_dilation
    from scipy.signal import fftconvolve
    from skimage.draw import polygon
    from skimage.morphology import disk

    rng = np.random.default_rng([seed, 1])
    big = int(np.clip(round(tissue_mm2 / 10) + 2, 3, 8))
    share = np.concatenate([rng.uniform(0.6, 1.4, big), rng.uniform(0.04, 0.12, big // 2 + 1)])
    mm = 1000 / (MASK_PX * MPP0)  # mask px per mm
    outlines = [_outline(rng, tissue_mm2 * s / share.sum() * mm * mm) for s in share]
    size = math.sqrt(tissue_mm2 / big) * mm  # a large island's diameter, about
    coarse = max(1, int(size / 40))  # mask px per placement px
    width = int(math.sqrt(tissue_mm2 * mm * mm / 0.4 * aspect) / coarse)
    occupied = np.zeros((int(3 * width / aspect) + 1, width), bool)
    spots, extent = [], (0, 0)
    for i in np.argsort(-share):
        o = (outlines[i] - outlines[i].min(0)) / coarse
        shape = (int(o[:, 1].max()) + 2, int(o[:, 0].max()) + 2)
        rr, cc = polygon(o[:, 1], o[:, 0], shape)
        isl = np.zeros(shape, bool)
        isl[rr, cc] = True
        gap = max(2, int(rng.uniform(0.06, 0.2) * size / coarse))
        need = binary_dilation(np.pad(isl, gap), disk(gap))
        hits = fftconvolve(occupied.astype(np.float32), need[::-1, ::-1].astype(np.float32), mode="valid")
        free = np.argwhere(hits < 0.5)
        grown = np.maximum(extent[0], free[:, 0] + need.shape[0]) * np.maximum(extent[1], free[:, 1] + need.shape[1])
        y, x = free[np.argmin(grown * rng.uniform(1.0, 1.05, len(free)))]  # the place that grows the layout least, about
        extent = (max(extent[0], y + need.shape[0]), max(extent[1], x + need.shape[1]))
        occupied[y : y + need.shape[0], x : x + need.shape[1]] |= need
        spots.append((i, (x + gap) * coarse, (y + gap) * coarse))
    used = np.argwhere(occupied)
    margin = int(0.06 * size)
    step = STRIP // MASK_PX
    h = -(-(int(used[:, 0].max() + 1) * coarse + margin) // step) * step
    w = -(-(int(used[:, 1].max() + 1) * coarse + margin) // step) * step
    mask = np.zeros((h, w), np.uint8)
    for label, (i, px, py) in enumerate(spots, start=1):
        o = outlines[i] - outlines[i].min(0) + (px, py)
        rr, cc = polygon(o[:, 1], o[:, 0], mask.shape)
        mask[rr, cc] = label
    return np.ascontiguousarray(mask.T) if mask.shape[0] > mask.shape[1] else mask


# --- the slide, strip by strip -----------------------------------------------------------------


def _glass(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    return np.clip(np.array(GLASS, np.float32) + rng.normal(0, 1.5, (1024, 1024, 3)), 0, 255).astype(np.uint8)


def level0_strip(
    y0: int, mask: np.ndarray, grids: list[tuple[int, int, int]], sources: list[dict], weights: np.ndarray, glass: np.ndarray, seed: int
) -> np.ndarray:
    """Level-0 rows [y0, y0 + STRIP) of the slide: glass, then each island's cells where the mask is that island."""
    width = mask.shape[1] * MASK_PX
    gy = y0 % glass.shape[0]
    strip = np.tile(np.roll(glass, -gy, axis=0), (STRIP // glass.shape[0] + 1, width // glass.shape[1] + 1, 1))[:STRIP, :width].copy()
    mrows = mask[y0 // MASK_PX : (y0 + STRIP) // MASK_PX]
    for label in np.unique(mrows):
        if label == 0:
            continue
        side, py, px = grids[label - 1]
        here = np.repeat(np.repeat(mrows == label, MASK_PX, 0), MASK_PX, 1)  # level-0 px of this island in the strip
        cols = np.flatnonzero(here.any(axis=0))
        for r in range((y0 + py) // side, (y0 + STRIP - 1 + py) // side + 1):
            cy0 = r * side - py  # the cell's top row, level-0 px
            ys, ye = max(cy0, y0), min(cy0 + side, y0 + STRIP)
            for c in np.unique((cols + px) // side):
                cx0 = int(c) * side - px
                xs, xe = max(cx0, 0), min(cx0 + side, width)
                sub = here[ys - y0 : ye - y0, xs:xe]
                if not sub.any():
                    continue
                patch = _patch(sources, weights, side, np.random.default_rng([seed, 3, int(label), r, int(c)]))
                part = patch[ys - cy0 : ye - cy0, xs - cx0 : xe - cx0]
                strip[ys - y0 : ye - y0, xs:xe][sub] = part[sub]
    return strip


def _halve(rows: np.ndarray) -> np.ndarray:
    """2x2 mean (odd edges repeated)."""
    h, w = rows.shape[:2]
    rows = np.pad(rows, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    return ((rows[0::2, 0::2] + rows[1::2, 0::2] + rows[0::2, 1::2] + rows[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _tiles(rows: np.ndarray):  # noqa: ANN202
    """The TILE² tiles of TILE rows, in order, padded with glass."""
    w = rows.shape[1]
    padded = np.full((TILE, -(-w // TILE) * TILE, 3), GLASS, np.uint8)
    padded[: rows.shape[0], :w] = rows
    for x in range(0, w, TILE):
        yield padded[:, x : x + TILE]


def build_slide(path: Path, tissue_mm2: float, seed: int, data_root: Path) -> dict:
    """Write the slide to ``path`` (see the module docstring); returns what it is made of."""
    import tifffile

    t0 = time.perf_counter()
    mask = island_mask(tissue_mm2, seed)
    sources = load_sources(data_root)
    weights = np.array([s["tissue_px"] for s in sources])
    weights /= weights.sum()
    rng = np.random.default_rng([seed, 4])
    grids = []
    for _ in range(int(mask.max())):
        side = int(rng.choice(CELLS))
        grids.append((side, int(rng.integers(side)), int(rng.integers(side))))
    glass = _glass(seed)
    h0, w0 = mask.shape[0] * MASK_PX, mask.shape[1] * MASK_PX
    sizes = [(h0, w0)]
    while max(sizes[-1]) > 2048:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=".levels-"))
    stores = [None] + [np.lib.format.open_memmap(work / f"{k}.npy", "w+", np.uint8, (h, w, 3)) for k, (h, w) in enumerate(sizes) if k]

    def level_tiles(k: int):  # noqa: ANN202
        h = sizes[k][0]
        for y in range(0, h, STRIP):
            rows = level0_strip(y, mask, grids, sources, weights, glass, seed) if k == 0 else np.asarray(stores[k][y : y + STRIP])
            if k + 1 < len(sizes):
                half = _halve(rows)
                stores[k + 1][y // 2 : y // 2 + half.shape[0]] = half[: sizes[k + 1][0] - y // 2]
            for ty in range(0, rows.shape[0], TILE):
                yield from _tiles(rows[ty : ty + TILE])

    part = path.with_name(path.name + ".partial")
    try:
        with tifffile.TiffWriter(part, bigtiff=True) as tif:
            for k, (h, w) in enumerate(sizes):
                res = 1e4 / (MPP0 * 2**k)  # px per cm
                tif.write(
                    level_tiles(k),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(TILE, TILE),
                    compression="jpeg",
                    photometric="rgb",
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if k == 0 else 1,
                )
        part.rename(path)
    finally:
        stores.clear()  # the memory maps close before their files go
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()
    tissue_px = int((mask > 0).sum())
    return {
        "path": str(path),
        "level0_px": [w0, h0],
        "levels": len(sizes),
        "islands": int(mask.max()),
        "tissue_mm2_built": round(tissue_px * (MASK_PX * MPP0 / 1000) ** 2, 3),
        "tissue_fraction": round(tissue_px / mask.size, 3),
        "sources": len(sources),
        "file_gb": round(path.stat().st_size / 1e9, 3),
        "build_s": round(time.perf_counter() - t0, 1),
    }


# --- measuring ---------------------------------------------------------------------------------


def limit_per_tile(path: Path, threads: list[int], sample: int, seed: int, backend: str) -> dict:
    """The tissue tiles of the slide (256 px working tiles touching the pipeline's tissue mask, as
    pipeline_vs_model.limit_only counts them) and the bare forward pass's seconds per tile at each
    thread count, timed on ``sample`` of them (8 per call, the first call not timed)."""
    import torch

    from wsi_nuclei.model.backends import make_predictor
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.pipeline.plan import plan_slide
    from wsi_nuclei.pipeline.segment import SegmentConfig
    from wsi_nuclei.slides.reader import open_slide

    cfg = SegmentConfig(backend=backend)
    with tempfile.TemporaryDirectory() as td:
        plan, _, tissue = plan_slide(path, Path(td) / "plan", cfg)
    with open_slide(path) as sl:
        _, thumb_scale = sl.thumbnail(2048)
    per, (h, w), tile = thumb_scale / plan.scale, plan.size, 256  # working px per tissue-mask px
    boxes = [
        (x, y)
        for y in range(0, h, tile)
        for x in range(0, w, tile)
        if tissue[int(y / per) : int(math.ceil((y + tile) / per)), int(x / per) : int(math.ceil((x + tile) / per))].any()
    ]
    picked = np.random.default_rng([seed, 5]).choice(len(boxes), min(sample, len(boxes)), replace=False)
    with open_slide(plan.path, cfg.reader, cfg.level0_mpp) as slide:
        tiles = np.stack([slide.read_working((*boxes[i], tile, tile), plan.scale) for i in picked])
    model, card = load_model()
    out = {"tiles": len(boxes), "sampled": len(picked), "tissue_mm2_plan": plan.tissue_mm2, "per_tile_s": {}}
    for t in threads:
        torch.set_num_threads(t)
        predict, name = make_predictor(model, card, backend, "cpu", t)
        predict(tiles[:8])
        t0 = time.perf_counter()
        for i in range(0, len(tiles), 8):
            predict(tiles[i : i + 8])
        out["per_tile_s"][t] = (time.perf_counter() - t0) / len(tiles)
        out["backend"] = name
        del predict
    return out


class Watch(threading.Thread):
    """Samples a process tree's summed RSS every ``interval`` s, and notes each chunk file of
    ``chunks`` (its mtime and stage seconds) as it appears."""

    def __init__(self, proc, chunks: Path, interval: float = 0.2) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.proc, self.chunks, self.interval = proc, chunks, interval
        self.peak, self.seen = 0, {}

    def run(self) -> None:
        from memory_scaling import tree_rss

        while self.proc.poll() is None:
            self.peak = max(self.peak, tree_rss(self.proc))
            self._chunks()
            time.sleep(self.interval)

    def _chunks(self) -> None:
        try:
            names = [p for p in self.chunks.iterdir() if re.fullmatch(r"\d+\.npz", p.name) and p.name not in self.seen]
        except OSError:
            return
        for p in names:
            try:
                mtime = p.stat().st_mtime
                with np.load(p) as z:
                    times = json.loads(bytes(z["meta"]).decode())["times"]
            except (OSError, ValueError, KeyError):
                continue  # gone (assembled) or not readable yet: asked again next time
            self.seen[p.name] = (mtime, times)


def run_segment(exe: str, slide: Path, out: Path, workers: int, threads: int, extra: list[str]) -> dict:
    """One cold `wsi-nuclei segment` run of the slide; wall s, peak RSS, the tail after the last forward pass, summary.json."""
    import psutil

    cmd = [
        exe,
        "segment",
        str(slide),
        "-o",
        str(out),
        "--overwrite",
        "--quiet",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        *extra,
    ]
    t0 = time.time()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = Watch(proc, out / slide.stem / ".partial" / "chunks")
    watch.start()
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.wait()
    t1 = time.time()
    watch.join()
    if proc.returncode:
        sys.exit(f"segment failed ({proc.returncode}): {err[-2000:]}")
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    ends = [(m, m - t.get("instances", 0.0) - t.get("polygons", 0.0)) for m, t in watch.seen.values()]
    starts = [m - sum(t.values()) for m, t in watch.seen.values()]
    wall = t1 - t0
    row = {
        "layout": f"{workers}x{threads}",
        "workers": workers,
        "threads": threads,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(watch.peak / 1e9, 2),
        "nuclei": summary["nuclei"],
        "tissue_mm2": summary["tissue_mm2"],
        "chunks": summary["chunks"]["processed"],
        "amplification": summary["amplification"],
        "stages": summary["seconds"],
        "chunks_watched": len(ends),
        "backend": summary["backend"],
    }
    row["s_per_mm2"] = round(wall / max(summary["tissue_mm2"], 1e-9), 2)
    row["over_forward"] = round(wall / max(summary["seconds"]["inference"] / workers, 1e-9), 3)
    row["nuclei_per_mm2"] = summary["nuclei_per_mm2"]
    if ends:
        last = max(m for m, _ in ends)
        # the steps after the last chunk file, from the files they write last: the slide's
        # summary.json (its finish), OUT/run.json (after the chunk files' removal and the slide's
        # result), OUT/report.html; then closing the cluster and the exit
        marks = {"summary": out / slide.stem / "summary.json", "run_json": out / "run.json", "report": out / "report.html"}
        row["after_last_chunk_steps_s"] = {k: round(f.stat().st_mtime - last, 2) for k, f in marks.items() if f.exists()}
        row["after_last_chunk_steps_s"]["exit"] = round(t1 - last, 2)
        row["after_last_chunk_s"] = round(t1 - max(m for m, _ in ends), 1)
        row["after_fwd_s"] = round(t1 - max(e for _, e in ends), 1)
        row["after_fwd_share"] = round(row["after_fwd_s"] / wall, 3)
        row["before_first_chunk_s"] = round(min(starts) - t0, 1)
    return row


def dry_estimate(exe: str, slide: Path, out: Path, workers: int, threads: int, extra: list[str]) -> dict:
    """`segment --dry-run` with the same layout: the slide's estimate_s and the '# estimate:' line."""
    cmd = [exe, "segment", str(slide), "-o", str(out), "--dry-run", "--workers", str(workers), "--threads", str(threads), *extra]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("slide\t"))
    cols = dict(zip(lines[head].split("\t"), lines[head + 1].split("\t")))
    line = next((ln for ln in lines if ln.startswith("# estimate:")), "# estimate: (none printed)")
    est = float(cols["estimate_s"]) if cols.get("estimate_s") else None
    return {"estimate_s": est, "estimate_line": line, "dry_chunks": int(cols["chunks"]), "dry_tissue_mm2": float(cols["tissue_mm2"])}


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            sys.exit(f"--layouts: {part!r} is not WORKERSxTHREADS, e.g. 1x2,2x1")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def print_table(info: dict, limit: dict, rows: list[dict]) -> None:
    w, h = info["level0_px"]
    print(
        f"\nbig slide — {w}x{h} px at {MPP0} µm/px, {info['levels']} levels, {info['file_gb']} GB; {info['tissue_mm2_built']} mm² of "
        f"tissue built in {info['islands']} islands ({info['tissue_fraction']:.0%} of the slide) from {info['sources']} real H&E "
        f"images; backend {limit['backend']}, {os.cpu_count()} cores; a fresh `segment` process per row"
    )
    print(
        f"{'layout':>6} {'chunks':>6} {'nuclei':>8} {'tissue mm²':>10} {'wall s':>7} {'x first':>7} {'s/mm²':>6} {'peak RSS GB':>11} "
        f"{'limit s':>7} {'to limit':>8} {'ampl.':>6} {'after fwd s':>11} {'after %':>7} {'tail ≤ 1.5':>10} {'÷ fwd':>6} {'≤ 1.10':>6} "
        f"{'estimate s':>10} {'est/wall':>8} {'±30%':>5}"
    )
    first = rows[0]["wall_s"]
    for r in rows:
        est = r.get("estimate_s")
        print(
            f"{r['layout']:>6} {r['chunks']:>6} {r['nuclei']:>8} {r['tissue_mm2']:>10.2f} {r['wall_s']:>7.1f} "
            f"{r['wall_s'] / first:>7.2f} {r['s_per_mm2']:>6.1f} {r['peak_rss_gb']:>11.2f} {r['limit_s']:>7.1f} "
            f"{r['ratio_to_limit']:>8.2f} {r['amplification']:>6.2f} "
            f"{r.get('after_fwd_s', float('nan')):>11.1f} {100 * r.get('after_fwd_share', float('nan')):>7.1f} "
            f"{'yes' if r.get('after_fwd_s', 99.0) <= 1.5 else 'no':>10} {r['over_forward']:>6.2f} "
            f"{'yes' if r['over_forward'] <= 1.10 else 'no':>6} "
            f"{est if est is not None else float('nan'):>10.0f} {r.get('estimate_ratio', float('nan')):>8.2f} "
            f"{'yes' if r.get('estimate_ok') else 'no':>5}"
        )
    per = ", ".join(f"{1000 * s:.1f} ms/tile at {t} thread(s)" for t, s in limit["per_tile_s"].items())
    print(
        f"limit s: the bare forward pass over the {limit['tiles']} 256 px tissue tiles (no context, no halo) / workers, estimated "
        f"from {limit['sampled']} sampled tiles: {per}"
    )
    print(
        "to limit = wall s / limit s; ampl. = pixels given to the model / tissue pixels; after fwd: wall time after the last forward "
        "pass ended (chunk files' mtimes less their post-processing s); ÷ fwd: wall s / (inference s / workers); estimate s: "
        "`segment --dry-run`, same layout"
    )
    for r in rows:
        print(f"{r['layout']}: {r['estimate_line']}")
        st = r["stages"]
        print(
            f"{r['layout']}: stages summed over chunks (s): read {st['read']:.1f} / waiting {st.get('waiting', 0):.1f} / inference "
            f"{st['inference']:.1f} / instances {st['instances']:.1f} / polygons {st['polygons']:.1f}; assembly {st['assemble']:.1f} "
            f"(of it after the last chunk: {st.get('tail', float('nan')):.2f}); "
            f"before the first chunk {r.get('before_first_chunk_s', float('nan')):.1f} s, after the last chunk file "
            f"{r.get('after_last_chunk_s', float('nan')):.1f} s; {r['nuclei_per_mm2']:.0f} nuclei/mm²"
        )
        steps = r.get("after_last_chunk_steps_s", {})
        if steps:
            print(f"{r['layout']}: after the last chunk file, s until: " + ", ".join(
                f"{k} {v:.2f}" for k, v in steps.items()) + " (summary: the slide's finish; run_json: its chunk files "
                "removed and its result in; report: the batch report; exit: the cluster closed and the process ended)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tissue-mm2", type=float, default=60.0, help="tissue area of the slide (default 60)")
    ap.add_argument("--layouts", default="1x2,2x1", help="WORKERSxTHREADS per row, comma-separated (default 1x2,2x1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="build the slide in DIR and keep it (reused when it is already there)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder (MoNuSeg, CoNSeP)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None, help="working px (default: segment's default)")
    ap.add_argument("--limit-sample", type=int, default=64, help="tissue tiles the limit's seconds per tile are timed on")
    ap.add_argument("--estimate-only", action="store_true", help="build the slide and print the dry runs' estimates; run nothing")
    args = ap.parse_args()

    layouts = _layouts(args.layouts)
    exe = str(Path(sys.executable).with_name("wsi-nuclei"))
    extra = ["--backend", args.backend] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    with tempfile.TemporaryDirectory(prefix="wsi-nuclei-big-slide-") as td:
        work = Path(td)
        folder = args.keep or work
        folder.mkdir(parents=True, exist_ok=True)
        slide = folder / f"big_{args.tissue_mm2:g}mm2_seed{args.seed}.tif"
        info_file = slide.with_suffix(".json")
        if slide.exists() and info_file.exists():
            info = json.loads(info_file.read_text())
        else:
            info = build_slide(slide, args.tissue_mm2, args.seed, args.data_root)
            info_file.write_text(json.dumps(info))
        print(f"slide: {json.dumps(info)}", file=sys.stderr, flush=True)
        dry = {lay: dry_estimate(exe, slide, work / "dry", *lay, extra) for lay in layouts}
        if args.estimate_only:
            for (wk, th), d in dry.items():
                print(f"{wk}x{th}: {d['dry_chunks']} chunks, {d['dry_tissue_mm2']} mm² of tissue; {d['estimate_line']}")
            print(json.dumps({"slide": info, "dry_runs": {f"{wk}x{th}": d for (wk, th), d in dry.items()}}))
            return
        limit = limit_per_tile(slide, sorted({t for _, t in layouts}), args.limit_sample, args.seed, args.backend)
        print(f"limit: {json.dumps(limit)}", file=sys.stderr, flush=True)
        rows = []
        for wk, th in layouts:
            row = run_segment(exe, slide, work / f"out_{wk}x{th}", wk, th, extra)
            row.update(dry[(wk, th)])
            row["limit_s"] = round(limit["per_tile_s"][th] * limit["tiles"] / wk, 1)
            row["ratio_to_limit"] = round(row["wall_s"] / row["limit_s"], 2)
            if row["estimate_s"]:
                row["estimate_ratio"] = round(row["estimate_s"] / row["wall_s"], 2)
                row["estimate_ok"] = abs(row["estimate_ratio"] - 1) <= 0.3
            rows.append(row)
            print(f"done {wk}x{th}: {row['wall_s']} s", file=sys.stderr, flush=True)
    print_table(info, limit, rows)
    print(json.dumps({"tissue_mm2_asked": args.tissue_mm2, "seed": args.seed, "slide": info, "limit": limit, "rows": rows}))


if __name__ == "__main__":
    main()
