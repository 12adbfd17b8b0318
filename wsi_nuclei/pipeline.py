"""Slides -> per-slide ``mask.zarr`` + ``nuclei.geojson.gz`` + ``summary.json`` + ``overlay.png``.

Three stages per slide, each a function of typed values:

1. :func:`plan_slide` (driver): open the slide, derive the tiling, find tissue, list the chunks.
2. :func:`chunk_task` (a Dask task): segment one chunk and persist its result as one file,
   ``OUT/<slide>/.partial/chunks/<index>.npz`` (written under a temporary name, then renamed, so a
   file exists only when complete). The task returns a few numbers, never arrays, so the driver's
   memory does not grow with the slide.
3. :func:`assemble_slide` (a Dask task): read the chunk files in chunk order, write the Zarr
   arrays and stream the GeoJSON; final files appear atomically; then ``summary.json`` (last: its
   presence means "this slide is finished") and the chunk files are removed.

Resume (``--resume``): finished slides (``summary.json``) are skipped and chunk files from an
interrupted run are reused when the plan fingerprint (slide, model, tiling, options) matches, so
no finished chunk is recomputed. Outputs do not depend on which run computed a chunk: assembly
always replays all chunk files in chunk order, and ids are deterministic (chunk index × 2¹⁶ +
local rank; GeoJSON uuid5 of slide + id), so a resumed run is byte-identical to an uninterrupted
one. The batch scheduling (many slides at once, bounded) lives in :mod:`wsi_nuclei.scheduler`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError, OutputError, SlideError, WsiNucleiError
from .tiling import Chunk, Tiling

__all__ = [
    "SegmentConfig", "SlidePlan", "SlideResult", "ChunkDone", "plan_slide", "start_slide", "chunk_task",
    "assemble_slide", "segment_slide", "segment_many", "find_slides", "slide_jobs", "WORK_DIR",
]

log = logging.getLogger(__name__)

_CACHE: dict[Any, Any] = {}
#: a Dask worker runs several chunk tasks at once in threads: build each cached object once
#: (torch.onnx.export, for one, is not thread-safe)
_CACHE_LOCK = threading.RLock()
#: per-thread objects (open slide handles)
_THREAD = threading.local()
#: ids are chunk index * 2**16 + local id: unique over the slide, uint32.
_IDS_PER_CHUNK = 2**16
#: Per-slide folder of an unfinished slide: plan, thumbnail, chunk files. Removed when finished.
WORK_DIR = ".partial"


@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``wsi-nuclei segment`` (sizes in working px; None = derived from the model)."""

    model_dir: str | None = None
    mpp: float | None = None
    chunk_size: int = 1024
    halo: int | None = None
    context: int | None = None
    batch_size: int | None = None  # tiles per model call when a window is split; None: as many as fit
    forward_memory: int | None = None  # bytes a forward pass may use; None: from the worker's limits
    device: str = "cpu"
    tissue_mask: bool = True
    reader: str = "auto"  # slide reader: auto, openslide, tiffslide
    backend: str = "auto"  # inference: auto, torch, onnx (see backends.py)
    geojson_format: str = "geojson.gz"
    raw_coordinates: bool = False
    resume: bool = False
    overwrite: bool = False
    torch_threads: int = 0
    keep_chunks: bool = False
    tta: str | None = None  # test-time augmentation: none, flip4, dihedral8; None: the model card's

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.forward_memory is not None and self.forward_memory <= 0:
            raise ConfigError(f"--forward-memory must be > 0, got {self.forward_memory}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"--mpp must be > 0 µm/px, got {self.mpp}")
        if self.geojson_format not in ("geojson.gz", "geojson"):
            raise ConfigError(f"--format must be geojson.gz or geojson, got {self.geojson_format!r}")
        if self.tta is not None:
            from .tta import check_tta

            check_tta(self.tta)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.reader not in ("auto", "openslide", "tiffslide"):
            raise ConfigError(f"unknown --reader {self.reader!r}; use auto, openslide or tiffslide")
        from .backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; use {', '.join(BACKENDS)}")


@dataclass
class SlideResult:
    slide: str
    status: str
    out_dir: str = ""
    nuclei: int = 0
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SlidePlan:
    """Everything a chunk or assembly task needs about one slide (small and picklable)."""

    path: str
    out_dir: str
    scale: float  # level-0 px per working px
    size: tuple[int, int]  # (height, width) in working px
    tiling: Tiling
    chunks: tuple[Chunk, ...]
    grid: tuple[int, int]
    shift: tuple[float, float]  # subtracted from level-0 coordinates in the GeoJSON
    slide_key: str
    tissue_mm2: float
    info: dict[str, Any]
    model: str  # card name @ sha256 prefix
    fingerprint: str
    tta: str = "none"  # the test-time augmentation in effect (the option, else the card's)

    @property
    def work(self) -> Path:
        return Path(self.out_dir) / WORK_DIR

    def chunk_file(self, chunk: Chunk) -> Path:
        return self.work / "chunks" / f"{chunk.index}.npz"


@dataclass(frozen=True)
class ChunkDone:
    """What a chunk task returns to the driver: numbers only."""

    index: int
    nuclei: int
    seconds: float
    #: set when the chunk failed for a reason that retrying cannot fix (a damaged region, a full
    #: disk): the slide fails at once instead of Dask retrying the task
    error: str = ""


# ----------------------------------------------------------------------------------------------
# worker-side caches


def _predictor(model_dir: str | None, device: str, backend: str, threads: int) -> Any:
    """(predict, card, backend name) for this worker process, built once."""
    key = ("model", model_dir, device, backend, threads)
    with _CACHE_LOCK:
        return _CACHE[key] if key in _CACHE else _build_predictor(key, model_dir, device, backend, threads)


def _build_predictor(key: Any, model_dir: str | None, device: str, backend: str, threads: int) -> Any:
    import torch

    from .backends import make_predictor
    from .model import load_model

    if threads:
        torch.set_num_threads(threads)
    model, card = load_model(model_dir)
    predict, name = make_predictor(model, card, backend, device, threads)
    _CACHE[key] = (predict, card, name)
    return _CACHE[key]


def _forward_plan(cfg: SegmentConfig, tiling: Any) -> Any:
    """This process's :class:`~wsi_nuclei.memory.ForwardPlan` for ``tiling``'s windows, planned
    once (after the model is loaded, so the process's own memory is counted)."""
    key = ("forward", cfg.model_dir, cfg.device, tiling.window, tiling.context, cfg.batch_size, cfg.forward_memory)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _make_forward_plan(cfg, tiling)
        return _CACHE[key]


def _make_forward_plan(cfg: SegmentConfig, tiling: Any) -> Any:
    from .cluster import CPU_TASKS, GPU_TASKS
    from .memory import describe, forward_budget, plan_forward

    tasks = GPU_TASKS if cfg.device.startswith("cuda") else CPU_TASKS
    try:
        from distributed import get_worker

        tasks = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    if cfg.forward_memory:
        budget, how = cfg.forward_memory, "--forward-memory"
    else:
        budget, how = forward_budget(tasks, tiling.window + 2 * tiling.context, cfg.device)
    fp = plan_forward(tiling.window, tiling.context, budget, batch=cfg.batch_size)
    log.info("forward passes: %s (%s)", describe(fp, tiling.window, tiling.context), how)
    return fp


def _slide(path: str, backend: str, mpp: float | None) -> Any:
    """This thread's open handle of ``path`` (tiffslide's file handle is not meant for concurrent
    reads); the handles go with the thread, so an in-process run's task threads leave none open."""
    from .slide import open_slide

    cache = _THREAD.__dict__.setdefault("slides", {})
    key = (path, backend, mpp)
    if key not in cache:
        cache[key] = open_slide(path, backend, mpp)
    return cache[key]


# ----------------------------------------------------------------------------------------------
# stage 1: plan


def _card(cfg: SegmentConfig) -> Any:
    from .model import DEFAULT_MODEL_DIR, load_card

    return load_card(cfg.model_dir or DEFAULT_MODEL_DIR)


def slide_tiling(cfg: SegmentConfig, card: Any) -> Any:
    """The chunk tiling of ``cfg`` for the model ``card`` (context: the option, else the card's)."""
    from .tiling import derive_tiling

    return derive_tiling(card.mpp, cfg.chunk_size, cfg.halo, cfg.context if cfg.context is not None else card.context_px)


def plan_slide(path: Path, out_dir: Path, cfg: SegmentConfig) -> tuple[SlidePlan, np.ndarray, np.ndarray | None]:
    """Open ``path``, derive tiling and tissue, list the chunks. Returns the plan, the thumbnail
    and the tissue mask (thumbnail grid). Reads the slide; writes nothing."""
    from .backends import resolve_backend
    from .slide import open_slide
    from .tiling import plan_chunks
    from .tissue import looks_greyscale, tissue_mask

    card = _card(cfg)
    with open_slide(path, cfg.reader, cfg.mpp) as slide:
        info = slide.info
        if info.mpp is None:
            raise SlideError(f"{path}: no resolution (mpp) in the slide metadata; pass --mpp, e.g. --mpp 0.25 for 40x or 0.5 for 20x")
        scale = card.mpp / info.mpp
        width, height = math.ceil(info.dimensions[0] / scale), math.ceil(info.dimensions[1] / scale)
        tiling = slide_tiling(cfg, card)
        thumb, thumb_scale = slide.thumbnail(2048)
    if looks_greyscale(thumb):
        raise SlideError(f"{path}: the slide has no colour (greyscale); the model segments H&E-stained RGB slides")
    tissue = tissue_mask(thumb) if cfg.tissue_mask else None
    chunks, grid = plan_chunks(width, height, tiling, tissue, thumb_scale / scale)
    shift = (0.0, 0.0) if cfg.raw_coordinates or info.bounds is None else (float(info.bounds[0]), float(info.bounds[1]))
    if tissue is not None:
        tissue_mm2 = float(tissue.sum()) * (thumb_scale * info.mpp / 1000) ** 2
    else:
        tissue_mm2 = width * height * (card.mpp / 1000) ** 2
    model = f"{card.name}@{card.weights_sha256[:12]}"
    stat = Path(path).stat()
    # What makes a chunk file reusable: same slide file, model and everything that changes pixels.
    key = {"slide": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "model": card.weights_sha256,
           "card": card.to_json(), "tiling": asdict(tiling), "mpp": info.mpp, "reader": cfg.reader,
           "backend": resolve_backend(cfg.backend, cfg.device), "batch": cfg.batch_size,
           "device": cfg.device, "shift": shift, "version": __version__, "chunk_file": 2,
           "tta": cfg.tta or card.tta}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    plan = SlidePlan(str(path), str(out_dir), scale, (height, width), tiling, tuple(chunks), grid, shift,
                     f"{Path(path).name}:{info.dimensions[0]}x{info.dimensions[1]}", round(tissue_mm2, 4), info.as_dict(), model, fingerprint,
                     cfg.tta or card.tta)
    return plan, thumb, tissue


def check_outputs(out_dir: Path, cfg: SegmentConfig) -> SlideResult | None:
    """Apply --resume / --overwrite to an existing output folder. Returns a "skipped" result for a
    finished slide under --resume; raises OutputError for existing outputs without either flag."""
    summary = out_dir / "summary.json"
    work = out_dir / WORK_DIR
    if summary.exists():
        if cfg.resume:
            try:
                done = json.loads(summary.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                done = {}
            return SlideResult(str(done.get("slide", out_dir)), "skipped", str(out_dir), int(done.get("nuclei", 0)),
                               "finished in an earlier run (--resume)")
        if not cfg.overwrite:
            raise OutputError(f"{out_dir}: outputs exist; pass --resume to skip finished slides or --overwrite to replace them")
    elif work.exists() and not (cfg.resume or cfg.overwrite):
        raise OutputError(f"{out_dir}: an interrupted run left unfinished outputs; pass --resume to continue it or --overwrite to start over")
    return None


def start_slide(plan: SlidePlan, thumb: np.ndarray, tissue: np.ndarray | None, cfg: SegmentConfig) -> list[Chunk]:
    """Prepare ``plan.out_dir`` for the chunk tasks; returns the chunks still to compute (all of
    them, or under --resume those without a chunk file from an earlier run with the same plan)."""
    out_dir = Path(plan.out_dir)
    work = plan.work
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot write outputs ({err.strerror}); choose a writable -o folder") from err
    if cfg.overwrite:
        for name in ("summary.json", "mask.zarr", "nuclei.geojson", "nuclei.geojson.gz", "overlay.png"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    plan_file = work / "plan.json"
    if work.exists():
        old = None
        try:
            old = json.loads(plan_file.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            pass
        if cfg.overwrite or old != plan.fingerprint:
            if not cfg.overwrite:
                log.warning("%s: chunk files of an earlier run were made with other settings; recomputing them", plan.path)
            shutil.rmtree(work)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    # kept for the overlay at assembly; .npy: temporary files need no PNG encoder
    np.save(work / "thumbnail.npy", thumb)
    if tissue is not None:
        np.save(work / "tissue.npy", tissue)
    else:
        (work / "tissue.npy").unlink(missing_ok=True)
    _atomic_text(plan_file, json.dumps({"fingerprint": plan.fingerprint, "slide": plan.path, "chunks": len(plan.chunks)}) + "\n")
    return [ch for ch in plan.chunks if not plan.chunk_file(ch).exists()]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# stage 2: one chunk


def segment_chunk(plan: SlidePlan, chunk: Chunk, cfg: SegmentConfig) -> dict[str, Any]:
    """Segment one chunk in memory: the core probability (uint8), the window of owned nuclei with
    global ids (uint32), the encoded GeoJSON features and timings (``inference`` excludes the
    wait for another chunk's forward pass, which is ``waiting``). Reads the slide only."""
    from .backends import gate_wait_seconds
    from .export import encode_nuclei
    from .infer import tile_probabilities
    from .instances import probabilities_to_instances
    from .polygons import PolygonFrame, label_polygons

    tiling = plan.tiling
    predict, card, _ = _predictor(cfg.model_dir, cfg.device, cfg.backend, cfg.torch_threads)
    slide = _slide(plan.path, cfg.reader, cfg.mpp)
    t0 = time.perf_counter()
    margin = tiling.halo + tiling.context
    win = tiling.window
    # the whole window in one forward pass, or tiles (each with the model's context) that fit memory
    fp = _forward_plan(cfg, tiling)
    read = fp.read_size(win, tiling.context)
    rgb = slide.read_working((chunk.x - margin, chunk.y - margin, read, read), plan.scale)
    t1 = time.perf_counter()
    waited = gate_wait_seconds()
    from .tta import with_tta

    probs = tile_probabilities(with_tta(predict, plan.tta), len(card.outputs), rgb, fp.tile, tiling.context, fp.batch)
    probs = probs[:, :win, :win]
    t2 = time.perf_counter()
    waited = gate_wait_seconds() - waited
    labels = probabilities_to_instances(probs, card.outputs, card.postprocess, card.mpp)
    # Ownership: a nucleus belongs to the chunk whose core holds its centroid (and the slide too).
    n = int(labels.max())
    owned = np.zeros(labels.shape, dtype=np.uint32)
    cut = 0
    kept = 0
    h, c = tiling.halo, tiling.chunk
    if n:
        ys, xs = np.nonzero(labels)
        lab = labels[ys, xs]
        cnt = np.bincount(lab, minlength=n + 1)
        cy = np.bincount(lab, weights=ys, minlength=n + 1) / np.maximum(cnt, 1)
        cx = np.bincount(lab, weights=xs, minlength=n + 1) / np.maximum(cnt, 1)
        gy, gx = cy - h + chunk.y, cx - h + chunk.x  # centroid in slide working px
        own = (cy >= h) & (cy < h + c) & (cx >= h) & (cx < h + c) & (gy < plan.size[0]) & (gx < plan.size[1]) & (cnt > 0)
        own[0] = False
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        cut = int(own[edge[edge > 0]].sum())  # owned nuclei reaching the window edge: halo too small
        lut = np.zeros(n + 1, dtype=np.uint32)
        ids = np.flatnonzero(own)
        kept = len(ids)
        if kept >= _IDS_PER_CHUNK:
            raise SlideError(f"{plan.path}: chunk {chunk.row},{chunk.col} holds {kept} nuclei, more than {_IDS_PER_CHUNK - 1}; use a smaller --chunk-size")
        lut[ids] = chunk.index * _IDS_PER_CHUNK + np.arange(1, kept + 1, dtype=np.uint32)
        owned = lut[labels]
    t3 = time.perf_counter()
    m = tiling.context
    slide_mpp = float(plan.info["mpp"])
    frame = PolygonFrame(chunk.x - h, chunk.y - h, plan.scale, slide_mpp, *plan.shift)
    nuclei = label_polygons(owned, frame, probs[0], rgb[m : m + win, m : m + win]) if kept else []
    features = encode_nuclei(nuclei, plan.slide_key)
    t4 = time.perf_counter()
    core_prob = np.round(probs[0, h : h + c, h : h + c] * 255).astype(np.uint8)
    return {
        "probability": core_prob, "owned": owned, "features": features, "cut": cut, "forward": [fp.tile, fp.batch],
        "times": {"read": t1 - t0, "waiting": waited, "inference": t2 - t1 - waited, "instances": t3 - t2, "polygons": t4 - t3},
    }


def chunk_task(plan: SlidePlan, chunk: Chunk, cfg: SegmentConfig) -> ChunkDone:
    """Segment one chunk and persist it as ``plan.chunk_file(chunk)`` (atomic: temporary name,
    then rename; a task run twice writes the same bytes). Returns only counts and seconds."""
    t0 = time.perf_counter()
    try:
        res = segment_chunk(plan, chunk, cfg)
    except WsiNucleiError as err:
        return ChunkDone(chunk.index, 0, 0.0, error=str(err))
    blob = b",\n".join(res["features"])
    meta = {"chunk": asdict(chunk), "nuclei": len(res["features"]), "cut": res["cut"],
            "times": res["times"], "forward": res["forward"], "fingerprint": plan.fingerprint}
    owned = res["owned"]
    # ids are chunk.index * 2**16 + local id: store the local part (uint16, half the bytes)
    local = (owned & np.uint32(_IDS_PER_CHUNK - 1)).astype(np.uint16)
    data = _npz_bytes({"probability": res["probability"], "owned_local": local,
                       "features": np.frombuffer(blob, dtype=np.uint8), "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)})
    target = plan.chunk_file(chunk)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        return ChunkDone(chunk.index, 0, 0.0, error=f"{target}: cannot write the chunk result ({err.strerror}); free disk space or choose another -o folder")
    seconds = time.perf_counter() - t0
    log.debug("%s: chunk %d done (%d nuclei, %.2f s)", plan.path, chunk.index, meta["nuclei"], seconds)
    return ChunkDone(chunk.index, int(meta["nuclei"]), round(seconds, 4))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what ``np.load`` reads) deflated at level 1: a temporary file, written once and
    read once, so compressing it harder (``np.savez_compressed``: level 6) is not worth the time."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def read_chunk_file(path: Path) -> dict[str, Any]:
    """A chunk file as written by :func:`chunk_task`; ``owned`` with global ids (uint32)."""
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            local = z["owned_local"]
            base = np.uint32(int(meta["chunk"]["index"]) * _IDS_PER_CHUNK)
            owned = np.where(local > 0, local.astype(np.uint32) + base, np.uint32(0))
            return {"probability": z["probability"], "owned": owned, "features": bytes(z["features"]), "meta": meta}
    except (OSError, ValueError, KeyError) as err:
        raise OutputError(f"{path}: unreadable chunk file ({err}); delete it and run again with --resume") from err


# ----------------------------------------------------------------------------------------------
# stage 3: assemble


def assemble_slide(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any] | None = None) -> SlideResult:
    """Write the slide's final outputs from its chunk files, in chunk order (deterministic), each
    under a temporary name first; ``summary.json`` last. Holds one chunk in memory at a time.
    A failure (full disk, damaged chunk file) returns a "failed" result, leaves no partial file
    and keeps the chunk files, so ``--resume`` can assemble again without recomputing."""
    out_dir = Path(plan.out_dir)
    try:
        return _assemble(plan, cfg, run)
    except WsiNucleiError as err:
        reason = str(err)
    except OSError as err:
        reason = f"{out_dir}: writing the outputs failed ({err.strerror or err}); free disk space or choose another -o folder, then run again with --resume"
    for leftover in (out_dir / "mask.zarr.partial", out_dir / f"nuclei.{cfg.geojson_format}.partial", out_dir / "overlay.png.partial.png"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return SlideResult(plan.path, "failed", str(out_dir), reason=reason)


def _assemble(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any] | None) -> SlideResult:

    from .export import GeoJSONWriter
    from .store import LabelCanvas, build_pyramids, create_store, open_array

    t0 = time.perf_counter()
    out_dir = Path(plan.out_dir)
    card = _card(cfg)
    geo_path = out_dir / f"nuclei.{cfg.geojson_format}"
    zarr_path = out_dir / "mask.zarr"
    tmp_zarr = out_dir / "mask.zarr.partial"
    shutil.rmtree(tmp_zarr, ignore_errors=True)
    tiling = plan.tiling
    attrs = {"slide": plan.path, "slide_info": plan.info, "mpp": card.mpp, "level0_per_working_px": plan.scale,
             "tiling": asdict(tiling), "model_card": json.loads(card.to_json()), "version": __version__,
             "geojson_shift": list(plan.shift)}
    create_store(tmp_zarr, plan.size, tiling.chunk, card.mpp, attrs)
    probability = open_array(tmp_zarr, "probability", 0, mode="r+")
    labels = LabelCanvas(tmp_zarr, tiling.chunk)
    height, width = plan.size
    totals = {"read": 0.0, "waiting": 0.0, "inference": 0.0, "instances": 0.0, "polygons": 0.0}
    cut = 0
    forwards: dict[tuple[int, ...], int] = {}
    t_write = time.perf_counter()
    with GeoJSONWriter(geo_path) as writer:
        for ch in plan.chunks:
            part = read_chunk_file(plan.chunk_file(ch))
            if part["meta"].get("fingerprint") != plan.fingerprint:
                raise OutputError(f"{plan.chunk_file(ch)}: chunk file from another run's settings; run again with --overwrite")
            core = part["probability"][: height - ch.y, : width - ch.x]  # a core is one Zarr chunk, clipped at the slide edge
            probability[ch.y : ch.y + core.shape[0], ch.x : ch.x + core.shape[1]] = core
            labels.paste(ch.row, ch.col, ch.y - tiling.halo, ch.x - tiling.halo, part["owned"])
            writer.write_encoded(part["features"], int(part["meta"]["nuclei"]))
            cut += int(part["meta"]["cut"])
            fwd = tuple(part["meta"]["forward"])
            forwards[fwd] = forwards.get(fwd, 0) + 1
            for k in totals:
                totals[k] += float(part["meta"]["times"].get(k, 0.0))
        n_nuclei = writer.count
    labels.close()
    build_pyramids(tmp_zarr, tiling.chunk)
    if zarr_path.exists():
        shutil.rmtree(zarr_path)
    os.replace(tmp_zarr, zarr_path)
    t_written = time.perf_counter()
    if cut:
        log.warning("%s: %d nuclei reached the edge of their chunk window; raise --halo", plan.path, cut)
    thumb = np.load(plan.work / "thumbnail.npy")
    tissue_file = plan.work / "tissue.npy"
    tissue = np.load(tissue_file) if tissue_file.exists() else None
    _overlay(zarr_path, thumb, tissue, out_dir / "overlay.png")
    run = run or {}
    summary = {
        "slide": plan.path, "nuclei": n_nuclei, "tissue_mm2": plan.tissue_mm2,
        "chunks": {"processed": len(plan.chunks), "grid": list(plan.grid), "computed_this_run": run.get("computed", len(plan.chunks)),
                   "reused": run.get("reused", 0)},
        "cut_nuclei": cut,
        # how the chunk windows were inferred (planned from each worker's memory, see memory.py)
        "forward_passes": [{"tile_px": f[0] + 2 * tiling.context, "core_px": f[0], "per_call": f[1], "chunks": k}
                           for f, k in sorted(forwards.items())],
        "seconds": {**{k: round(v, 3) for k, v in totals.items()}, "write": round(t_written - t_write, 3),
                    "assemble": round(time.perf_counter() - t0, 3), "wall": round(float(run.get("wall", 0.0)), 3)},
        # the options as given, context and tta resolved (an option left unset takes the card's value)
        "parameters": {**asdict(cfg), "context": tiling.context, "tta": plan.tta}, "tiling": asdict(tiling), "slide_info": plan.info,
        "model": plan.model, "versions": _versions(),
        "outputs": {"mask": "mask.zarr", "geojson": geo_path.name, "overlay": "overlay.png"},
    }
    _atomic_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    if not cfg.keep_chunks:
        shutil.rmtree(plan.work, ignore_errors=True)
    return SlideResult(plan.path, "ok", str(out_dir), n_nuclei, extra={"tissue_mm2": plan.tissue_mm2, "chunks": len(plan.chunks)})


def _overlay(zarr_path: Path, thumb: np.ndarray, tissue: np.ndarray | None, out: Path) -> None:
    from PIL import Image

    from .infer import resize_labels
    from .overlay import inner_boundaries
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
        img[inner_boundaries(lab)] = (0, 255, 0)
    if tissue is not None:
        img[inner_boundaries(tissue)] = (0, 0, 255)
    tmp = out.with_name(out.name + ".partial.png")
    Image.fromarray(img).save(tmp, compress_level=1)  # a quick look: fast beats small (default level 6)
    os.replace(tmp, out)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"wsi-nuclei": __version__}
    for pkg in ("torch", "segmentation-models-pytorch", "timm", "openslide-python", "tiffslide", "zarr", "dask", "shapely"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# batches


def find_slides(inputs: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slide files from files and folders (searched recursively); also (path, reason) of inputs
    that are missing or folders without slides."""
    from .slide import SLIDE_EXTENSIONS

    found: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in inputs:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS and WORK_DIR not in f.parts)
            if not files:
                bad.append((str(p), f"{p}: folder holds no slides (looked for {', '.join(SLIDE_EXTENSIONS)}); check the folder"))
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            bad.append((str(p), f"{p}: file not found; check the path"))
    return found, bad


def _safe_name(path: Path) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem).strip(".") or "slide"
    return name


def slide_jobs(slides: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(slide, output folder) pairs: ``out/<safe slide name>``, made unique."""
    used: set[str] = set()
    jobs = []
    for path in slides:
        name = _safe_name(path)
        while name in used:
            name += "_"
        used.add(name)
        jobs.append((path, out / name))
    return jobs


def segment_many(
    inputs: list[Path],
    out: Path,
    cfg: SegmentConfig,
    client: Any = None,
    on_slide: Any = None,
    on_chunk: Any = None,
    max_slides: int = 2,
    min_pending: int = 0,
) -> list[SlideResult]:
    """Segment every slide of ``inputs`` into ``out/<slide name>/``; a failing slide is recorded
    and the batch goes on. ``out/run.json`` lists every slide with its status and reason.
    Up to ``max_slides`` slides are in flight at once (their chunks are scheduled together);
    ``min_pending``: tasks kept queued at least (an adaptive cluster scales on queued work)."""
    from .scheduler import run_batch

    cfg.check()
    slides, bad = find_slides(inputs)
    results = [SlideResult(p, "failed", reason=r) for p, r in bad]
    results += run_batch(slide_jobs(slides, out), cfg, client, on_slide, on_chunk, max_slides, min_pending=min_pending)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_text(out / "run.json", json.dumps({"version": __version__, "slides": [asdict(r) for r in results]}, indent=2, default=str) + "\n")
    except OSError as err:
        log.error("%s: cannot write run.json (%s)", out, err.strerror)
    return results


def segment_slide(path: Path, out_dir: Path, cfg: SegmentConfig, client: Any = None, on_chunk: Any = None) -> SlideResult:
    """Segment one slide into ``out_dir``. Raises the slide's WsiNucleiError on failure."""
    from .scheduler import run_batch

    cfg.check()
    (res,) = run_batch([(Path(path), Path(out_dir))], cfg, client, None, on_chunk, 1, raise_errors=True)
    return res
