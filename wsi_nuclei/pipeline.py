"""segment_slide: slide -> mask.zarr + nuclei.geojson.gz + summary.json + overlay.png.

Chunk tasks are pure functions (slide path + chunk box in, arrays and nuclei out) run by Dask
(a distributed client when one is active, else in-process in chunk order: the same function, the
same results). The driver is the only writer: it writes each chunk's probability core (one Zarr
chunk), pastes the chunk's owned nuclei into the labels and streams their features to GeoJSON in
chunk order, so outputs are deterministic and no two writers touch one file.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError, OutputError, SlideError, WsiNucleiError
from .tiling import Chunk, Tiling

__all__ = ["SegmentConfig", "SlideResult", "segment_slide", "segment_many", "find_slides", "chunk_task"]

log = logging.getLogger(__name__)

_CACHE: dict[Any, Any] = {}
#: ids are chunk index * 2**16 + local id: unique over the slide, uint32.
_IDS_PER_CHUNK = 2**16


@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``wsi-nuclei segment`` (sizes in working px; None = derived from the model)."""

    model_dir: str | None = None
    mpp: float | None = None
    chunk_size: int = 1024
    halo: int | None = None
    context: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    tissue_mask: bool = True
    backend: str = "auto"
    geojson_format: str = "geojson.gz"
    raw_coordinates: bool = False
    resume: bool = False
    overwrite: bool = False
    torch_threads: int = 0

    def check(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"--mpp must be > 0 µm/px, got {self.mpp}")
        if self.geojson_format not in ("geojson.gz", "geojson"):
            raise ConfigError(f"--format must be geojson.gz or geojson, got {self.geojson_format!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")


@dataclass
class SlideResult:
    slide: str
    status: str
    out_dir: str = ""
    nuclei: int = 0
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _model(model_dir: str | None, device: str, threads: int) -> Any:
    key = ("model", model_dir, device)
    if key not in _CACHE:
        import torch

        from .model import load_model

        if threads:
            torch.set_num_threads(threads)
        model, card = load_model(model_dir)
        _CACHE[key] = (model.to(device).to(memory_format=torch.channels_last), card)
    return _CACHE[key]


def _slide(path: str, backend: str, mpp: float | None) -> Any:
    from .slide import open_slide

    key = ("slide", path, backend, mpp)
    if key not in _CACHE:
        _CACHE[key] = open_slide(path, backend, mpp)
    return _CACHE[key]


def chunk_task(path: str, chunk: Chunk, tiling: Tiling, scale: float, size: tuple[int, int], cfg: SegmentConfig, frame_shift: tuple[float, float]) -> dict[str, Any]:
    """Segment one chunk. Returns the core probability (uint8), the window of owned nuclei with
    global ids (uint32), their polygons and counts. Pure: reads the slide, writes nothing."""
    from .infer import predict_tiles
    from .instances import probabilities_to_instances
    from .polygons import PolygonFrame, label_polygons

    model, card = _model(cfg.model_dir, cfg.device, cfg.torch_threads)
    slide = _slide(path, cfg.backend, cfg.mpp)
    t0 = time.perf_counter()
    margin = tiling.halo + tiling.context
    rgb = slide.read_working((chunk.x - margin, chunk.y - margin, tiling.read_size, tiling.read_size), scale)
    t1 = time.perf_counter()
    probs = predict_tiles(model, card, rgb, tiling.tiles_per_side * tiling.tile, tiling.context, cfg.batch_size, cfg.device)
    win = tiling.window
    probs = probs[:, :win, :win]
    t2 = time.perf_counter()
    labels = probabilities_to_instances(probs, card.outputs, card.postprocess, card.mpp)
    # Ownership: a nucleus belongs to the chunk whose core holds its centroid (and the slide too).
    n = int(labels.max())
    owned = np.zeros_like(labels, dtype=np.uint32)
    cut = 0
    kept = 0
    if n:
        ys, xs = np.nonzero(labels)
        lab = labels[ys, xs]
        cnt = np.bincount(lab, minlength=n + 1)
        cy = np.bincount(lab, weights=ys, minlength=n + 1) / np.maximum(cnt, 1)
        cx = np.bincount(lab, weights=xs, minlength=n + 1) / np.maximum(cnt, 1)
        h, c = tiling.halo, tiling.chunk
        gy, gx = cy - h + chunk.y, cx - h + chunk.x  # centroid in slide working px
        own = (cy >= h) & (cy < h + c) & (cx >= h) & (cx < h + c) & (gy < size[0]) & (gx < size[1]) & (cnt > 0)
        own[0] = False
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        cut = int(own[edge[edge > 0]].sum())  # owned nuclei reaching the window edge: halo too small
        lut = np.zeros(n + 1, dtype=np.uint32)
        ids = np.flatnonzero(own)
        kept = len(ids)
        if kept >= _IDS_PER_CHUNK:
            raise SlideError(f"{path}: chunk {chunk.row},{chunk.col} holds {kept} nuclei, more than {_IDS_PER_CHUNK - 1}; use a smaller --chunk-size")
        lut[ids] = chunk.index * _IDS_PER_CHUNK + np.arange(1, kept + 1, dtype=np.uint32)
        owned = lut[labels]
    t3 = time.perf_counter()
    m = tiling.context
    h, c = tiling.halo, tiling.chunk
    frame = PolygonFrame(chunk.x - tiling.halo, chunk.y - tiling.halo, scale, float(slide.info.mpp), *frame_shift)
    rgb_win = rgb[m : m + win, m : m + win]
    nuclei = label_polygons(owned.astype(np.int64), frame, probs[0], rgb_win) if kept else []
    t4 = time.perf_counter()
    core_prob = np.round(probs[0, h : h + c, h : h + c] * 255).astype(np.uint8)
    return {
        "chunk": chunk, "probability": core_prob, "owned": owned, "nuclei": nuclei, "cut": cut,
        "times": {"read": t1 - t0, "inference": t2 - t1, "instances": t3 - t2, "polygons": t4 - t3},
    }


def find_slides(inputs: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slide files from files and folders (searched recursively); also (path, reason) of inputs
    that are missing or folders without slides."""
    from .slide import SLIDE_EXTENSIONS

    found: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in inputs:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS)
            if not files:
                bad.append((str(p), f"folder holds no slides (looked for {', '.join(SLIDE_EXTENSIONS)})"))
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            bad.append((str(p), "file not found; check the path"))
    return found, bad


def _safe_name(path: Path) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem).strip(".") or "slide"
    return name


def segment_slide(
    path: Path,
    out_dir: Path,
    cfg: SegmentConfig,
    client: Any = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> SlideResult:
    """Segment one slide into ``out_dir`` (see module docstring). Raises WsiNucleiError on bad input."""
    from .export import GeoJSONWriter, feature
    from .model import DEFAULT_MODEL_DIR, load_card
    from .slide import open_slide
    from .store import build_pyramids, create_store, paste_labels, write_core
    from .tiling import derive_tiling, plan_chunks
    from .tissue import tissue_mask

    cfg.check()
    t_start = time.perf_counter()
    geo_path = out_dir / f"nuclei.{cfg.geojson_format}"
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        if cfg.resume:
            done = json.loads(summary_path.read_text(encoding="utf-8"))
            return SlideResult(str(path), "skipped", str(out_dir), int(done.get("nuclei", 0)), "finished in an earlier run (--resume)")
        if not cfg.overwrite:
            raise OutputError(f"{out_dir}: outputs exist; pass --resume to skip finished slides or --overwrite to replace them")
    card = load_card(cfg.model_dir or DEFAULT_MODEL_DIR)
    with open_slide(path, cfg.backend, cfg.mpp) as slide:
        info = slide.info
        if info.mpp is None:
            raise SlideError(f"{path}: no resolution (mpp) in the slide metadata; pass --mpp, e.g. --mpp 0.25 for 40x or 0.5 for 20x")
        scale = card.mpp / info.mpp
        width, height = math.ceil(info.dimensions[0] / scale), math.ceil(info.dimensions[1] / scale)
        tiling = derive_tiling(card.mpp, cfg.chunk_size, cfg.halo, cfg.context)
        thumb, thumb_scale = slide.thumbnail(2048)
    tissue = tissue_mask(thumb) if cfg.tissue_mask else None
    tissue_scale = thumb_scale / scale  # working px per thumbnail px
    chunks, grid = plan_chunks(width, height, tiling, tissue, tissue_scale)
    t_plan = time.perf_counter()

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot write outputs ({err.strerror}); choose a writable -o folder") from err
    zarr_path = out_dir / "mask.zarr"
    tmp_zarr = out_dir / "mask.zarr.partial"
    shutil.rmtree(tmp_zarr, ignore_errors=True)
    shift = (0.0, 0.0) if cfg.raw_coordinates or info.bounds is None else (float(info.bounds[0]), float(info.bounds[1]))
    attrs = {"slide": str(path), "slide_info": info.as_dict(), "mpp": card.mpp, "level0_per_working_px": scale,
             "tiling": asdict(tiling), "model_card": json.loads(card.to_json()), "version": __version__,
             "geojson_shift": list(shift)}
    create_store(tmp_zarr, (height, width), tiling.chunk, card.mpp, attrs)

    totals = {"read": 0.0, "inference": 0.0, "instances": 0.0, "polygons": 0.0, "write": 0.0}
    cut = 0
    slide_key = f"{path.name}:{info.dimensions[0]}x{info.dimensions[1]}"
    with GeoJSONWriter(geo_path) as writer:
        for i, res in enumerate(_run_chunks(str(path), chunks, tiling, scale, (height, width), cfg, shift, client)):
            t0 = time.perf_counter()
            ch: Chunk = res["chunk"]
            write_core(tmp_zarr, "probability", ch.y, ch.x, res["probability"])
            paste_labels(tmp_zarr, ch.y - tiling.halo, ch.x - tiling.halo, res["owned"])
            for nucleus in res["nuclei"]:
                writer.write(feature(nucleus, slide_key))
            cut += res["cut"]
            for k, v in res["times"].items():
                totals[k] += v
            totals["write"] += time.perf_counter() - t0
            if on_chunk:
                on_chunk(i + 1, len(chunks))
        n_nuclei = writer.count
    build_pyramids(tmp_zarr, tiling.chunk)
    if zarr_path.exists():
        shutil.rmtree(zarr_path)
    tmp_zarr.rename(zarr_path)
    if cut:
        log.warning("%s: %d nuclei reached the edge of their chunk window; raise --halo", path, cut)
    _overlay(zarr_path, thumb, tissue, out_dir / "overlay.png")
    tissue_mm2 = float(tissue.sum()) * (thumb_scale * info.mpp / 1000) ** 2 if tissue is not None else width * height * (card.mpp / 1000) ** 2
    summary = {
        "slide": str(path), "nuclei": n_nuclei, "tissue_mm2": round(tissue_mm2, 4),
        "chunks": {"processed": len(chunks), "grid": list(grid)}, "cut_nuclei": cut,
        "seconds": {**{k: round(v, 3) for k, v in totals.items()}, "plan": round(t_plan - t_start, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
        "parameters": asdict(cfg), "tiling": asdict(tiling), "slide_info": info.as_dict(),
        "model": f"{card.name}@{card.weights_sha256[:12]}", "versions": _versions(),
        "outputs": {"mask": "mask.zarr", "geojson": geo_path.name, "overlay": "overlay.png"},
    }
    tmp = summary_path.with_name("summary.json.partial")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(summary_path)
    return SlideResult(str(path), "ok", str(out_dir), n_nuclei, seconds=round(time.perf_counter() - t_start, 2),
                       extra={"tissue_mm2": summary["tissue_mm2"], "chunks": len(chunks)})


def _run_chunks(path: str, chunks: list[Chunk], tiling: Tiling, scale: float, size: tuple[int, int], cfg: SegmentConfig,
                shift: tuple[float, float], client: Any) -> Iterator[dict[str, Any]]:
    """Chunk results in chunk order: on the Dask client when given, else in this process."""
    if client is None:
        for ch in chunks:
            yield chunk_task(path, ch, tiling, scale, size, cfg, shift)
        return
    futures = [client.submit(chunk_task, path, ch, tiling, scale, size, cfg, shift, pure=False, retries=1) for ch in chunks]
    for fut in futures:
        res = fut.result()
        fut.release()
        yield res


def _overlay(zarr_path: Path, thumb: np.ndarray, tissue: np.ndarray | None, out: Path) -> None:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from .infer import resize_labels
    from .store import open_array

    labels_level = None
    for k in range(8):
        try:
            arr = open_array(zarr_path, "labels", k)
        except Exception:
            break
        labels_level = arr
        if arr.shape[0] <= 2 * thumb.shape[0]:
            break
    img = thumb.copy()
    if labels_level is not None:
        lab = resize_labels(np.asarray(labels_level[:]), thumb.shape[:2])
        img[find_boundaries(lab, mode="inner") & (lab > 0)] = (0, 255, 0)
    if tissue is not None:
        img[find_boundaries(tissue, mode="inner")] = (0, 0, 255)
    Image.fromarray(img).save(out)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"wsi-nuclei": __version__}
    for pkg in ("torch", "segmentation-models-pytorch", "timm", "openslide-python", "tiffslide", "zarr", "dask", "shapely"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def segment_many(
    inputs: list[Path],
    out: Path,
    cfg: SegmentConfig,
    client: Any = None,
    on_slide: Callable[[SlideResult], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> list[SlideResult]:
    """Segment every slide of ``inputs`` into ``out/<slide name>/``; a failing slide is recorded
    and the batch goes on. ``out/run.json`` lists every slide with its status and reason."""
    slides, bad = find_slides(inputs)
    results = [SlideResult(p, "failed", reason=r) for p, r in bad]
    used: set[str] = set()
    for path in slides:
        name = _safe_name(path)
        while name in used:
            name += "_"
        used.add(name)
        t0 = time.perf_counter()
        try:
            res = segment_slide(path, out / name, cfg, client, on_chunk)
        except WsiNucleiError as err:
            res = SlideResult(str(path), "failed", str(out / name), reason=str(err), seconds=round(time.perf_counter() - t0, 2))
        results.append(res)
        if on_slide:
            on_slide(res)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "run.json.partial"
    tmp.write_text(json.dumps({"version": __version__, "slides": [asdict(r) for r in results]}, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(out / "run.json")
    return results
