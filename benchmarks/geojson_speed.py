"""Label maps -> QuPath GeoJSON: nuclei per second per stage, ours beside the plain alternative.

Synthetic label windows like the pipeline's (1152 x 1152 working px, one nucleus-like disc per
32 x 32 px, ~1,300 nuclei each) go through the three steps of the slide pipeline, each timed on
one thread:
  polygons  wsi_nuclei.nuclei.polygons.label_polygons (vectorised over a window) vs a per-nucleus loop
            (scipy find_objects + skimage find_contours + shapely, as a straightforward port would);
  encode    nuclei -> feature bytes: wsi_nuclei.outputs.geojson.encode_nuclei (one orjson call for the rings
            of a window, no dict per feature) vs a dict per feature through the standard library json;
  compress  gzip level wsi_nuclei.outputs.geojson.GZIP_LEVEL through GeoJSONWriter vs gzip's default level 9;
  writing   encode + compress: nuclei -> .geojson.gz, the rate the speed issue asks >= 100,000/s of.
Run: .venv/bin/python benchmarks/geojson_speed.py [--windows 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def windows(n: int, side: int = 1152, seed: int = 0) -> list[np.ndarray]:
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    out = []
    for w in range(n):
        lab = np.zeros((side, side), np.int64)
        k = 0
        for cy in range(16, side, 32):
            for cx in range(16, side, 32):
                k += 1
                rr, cc = disk((cy + rng.uniform(-5, 5), cx + rng.uniform(-5, 5)), rng.uniform(5, 10), shape=lab.shape)
                lab[rr, cc] = w * 65536 + k
        out.append(lab)
    return out


def naive_polygons(labels: np.ndarray, scale: float, mpp: float) -> list[tuple[int, list, dict]]:
    """The per-nucleus alternative: one contour, one shapely polygon and its measurements at a time."""
    import shapely
    from scipy import ndimage as ndi
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    out = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        lab = i + 1
        mask = ndi.binary_fill_holes(labels[sl] == lab)
        contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)
        poly = Polygon(np.column_stack([(ring[:, 1] - 1 + sl[1].start) * scale, (ring[:, 0] - 1 + sl[0].start) * scale]))
        poly = shapely.set_precision(shapely.make_valid(poly.simplify(0.3 * scale)), 0.01)
        if poly.geom_type != "Polygon" or poly.area <= 0:
            continue
        a, p = poly.area, poly.length
        m = {"Area µm^2": a * mpp * mpp, "Perimeter µm": p * mpp, "Circularity": min(1.0, 4 * math.pi * a / (p * p)),
             "Solidity": a / poly.convex_hull.area}
        out.append((lab, [list(c) for c in poly.exterior.coords], m))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()

    import orjson

    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons
    from wsi_nuclei.outputs.geojson import (
        GZIP_LEVEL,
        GeoJSONWriter,
        encode_feature,
        encode_nuclei,
        feature,
    )

    labs = windows(args.windows)
    rng = np.random.default_rng(1)
    prob = rng.random(labs[0].shape).astype(np.float32)
    rgb = (rng.random((*labs[0].shape, 3)) * 255).astype(np.uint8)
    frame = PolygonFrame(0, 0, 2.0, 0.25)
    label_polygons(labs[0], frame, prob, rgb)  # warm-up (imports)

    t0 = time.perf_counter()
    per_window = [label_polygons(lab, frame, prob, rgb) for lab in labs]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = [n for lab in labs[:2] for n in naive_polygons(lab, 2.0, 0.25)]
    t_naive = (time.perf_counter() - t0) * len(labs) / 2
    n = sum(len(w) for w in per_window)

    key = "bench:1x1"
    encode_nuclei(per_window[0][:10], key)  # warm-up
    t0 = time.perf_counter()
    blobs = [b for w in per_window for b in encode_nuclei(w, key)]
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = [
        json.dumps(feature(x, key), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() for w in per_window for x in w
    ]
    t_json = time.perf_counter() - t0
    assert blobs == [encode_feature(feature(x, key)) for w in per_window for x in w]
    assert all(orjson.loads(a) == json.loads(b) for a, b in zip(blobs[:50], plain[:50]))

    raw = b",\n".join(blobs)
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        with GeoJSONWriter(Path(td) / "a.geojson.gz") as w:
            w.write_encoded(raw, len(blobs))
        t_write = time.perf_counter() - t0
        size = (Path(td) / "a.geojson.gz").stat().st_size
        t0 = time.perf_counter()
        with gzip.open(Path(td) / "b.gz", "wb", compresslevel=9) as g:
            g.write(raw)
        t_gz9 = time.perf_counter() - t0
        size9 = (Path(td) / "b.gz").stat().st_size

    writing, writing_alt = t_encode + t_write, t_json + t_gz9
    total_ours, total_alt = t_ours + writing, t_naive + writing_alt
    print(
        f"\n{n} nuclei in {len(labs)} windows of 1152² px, {len(raw) / n:.0f} bytes of JSON each; nuclei per second on one "
        f"thread (higher is better)"
    )
    print(f"{'stage':<10} {'ours':>10} {'alternative':>12} {'speed-up':>9}  (ours / alternative)")
    for name, a, b, what in (
        ("polygons", t_ours, t_naive, "vectorised / per-nucleus loop"),
        ("encode", t_encode, t_json, "encode_nuclei / a dict per feature + json"),
        ("compress", t_write, t_gz9, f"gzip {GZIP_LEVEL} ({size / len(raw):.2f} of raw) / gzip 9 ({size9 / len(raw):.2f})"),
        ("writing", writing, writing_alt, "encode + compress: nuclei -> .geojson.gz"),
        ("all", total_ours, total_alt, "label maps -> .geojson.gz"),
    ):
        print(f"{name:<10} {n / a:>10,.0f} {n / b:>12,.0f} {b / a:>8.1f}x  {what}")
    print(f"(naive polygons timed on {len(naive)} nuclei of 2 windows and scaled)")
    print(json.dumps({"nuclei": n, "polygons_per_s": round(n / t_ours), "encode_per_s": round(n / t_encode),
                      "compress_per_s": round(n / t_write), "writing_per_s": round(n / writing),
                      "all_per_s": round(n / total_ours), "alternative_all_per_s": round(n / total_alt)}))


if __name__ == "__main__":
    main()
