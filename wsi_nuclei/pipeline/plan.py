"""Stage 1, on the driver: plan a slide (tiling, tissue, chunks, fingerprint) and prepare its folder.

:func:`plan_slide` reads the slide and writes nothing; :func:`check_outputs` applies
``--resume`` / ``--overwrite`` to an existing output folder; :func:`start_slide` prepares the
folder and returns the chunks still to compute (under ``--resume``, those without a chunk file
from an earlier run with the same plan fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from .._version import __version__
from ..errors import ConfigError, OutputError, SlideError, utf8_text
from ..model.network import ModelCard
from ..nuclei.instances import IDS_PER_CHUNK
from ..outputs.folder import (
    check_writable,
    content_digest,
    folder_owner,
    read_json,
    remove_leftovers,
    same_file,
    shown,
    slide_file,
    slide_state,
)
from ..slides.reader import SlideInfo
from .chunkfile import CHUNK_FILE_VERSION, chunk_file_problem
from .config import WORK_DIR, SegmentConfig, check_mpp
from .results import SlideResult
from .tiling import Chunk, Tiling

__all__ = ["SlidePlan", "model_card", "slide_tiling", "slide_config", "plan_keys", "plan_slide", "check_outputs", "start_slide"]

log = logging.getLogger(__name__)

#: Working pixels no slide exceeds (a 2 m² section at 0.5 µm/px would be 8e12): a larger plan is
#: a wrong resolution, refused before any chunk is listed.
MAX_WORKING_PX = 10**13


@dataclass(frozen=True, kw_only=True)
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
    info: SlideInfo
    card: ModelCard  # read once per run, on the driver
    fingerprint: str
    tta: str = "none"  # the test-time augmentation in effect (the option, else the card's)
    backend: str = "torch"  # the inference backend resolved on the driver (part of the fingerprint)
    slide_file: dict[str, Any] = field(default_factory=dict)  # outputs.slide_file: name, size, mtime
    output_key: str = ""  # what the finished outputs depend on (see plan_keys)
    run_id: str = ""  # this run's plan of the slide: an assembly task run twice finds its own summary

    @property
    def model(self) -> str:
        return self.card.model_id

    @property
    def work(self) -> Path:
        return Path(self.out_dir) / WORK_DIR

    def chunk_file(self, chunk: Chunk) -> Path:
        return self.work / "chunks" / f"{chunk.index}.npz"


def model_card(cfg: SegmentConfig) -> ModelCard:
    """The card of the model ``cfg`` names (default: the shipped model)."""
    from ..model.network import DEFAULT_MODEL_DIR, load_card

    return load_card(cfg.model_dir or DEFAULT_MODEL_DIR)


def slide_tiling(cfg: SegmentConfig, card: ModelCard) -> Tiling:
    """The chunk tiling of ``cfg`` for the model ``card`` (context: the option, else the card's)."""
    from .tiling import derive_tiling

    return derive_tiling(card.working_mpp, cfg.chunk_size, cfg.halo, cfg.context if cfg.context is not None else card.context_px)


def plan_keys(path: Path | str, cfg: SegmentConfig, card: ModelCard, backend: str) -> tuple[dict[str, Any], str, str]:
    """(slide file record, output key, chunk fingerprint) of segmenting ``path`` with ``cfg`` and
    ``card``; needs no slide reading. The output key covers what the finished outputs depend on
    (the slide file, the model, every option that changes a pixel or a coordinate); ``--resume``
    skips a slide only when its summary has the same. The fingerprint adds how the chunks were
    computed (backend, batch, device, version, chunk-file format): chunk files are reused only
    when it matches."""
    # the content digest tells apart two scans of one name and size (nucleus ids derive from it)
    ident = {**slide_file(path), "content": content_digest(path)}
    outputs = {
        "slide": {k: ident[k] for k in ("name", "bytes", "mtime_ns", "content")},
        "model": card.weights_sha256,
        "card": card.output_json(),  # evaluate --record adds metrics: the outputs stay finished
        "tiling": asdict(slide_tiling(cfg, card)),
        "level0_mpp": cfg.level0_mpp,
        "reader": cfg.reader,
        "raw_coordinates": cfg.raw_coordinates,
        "tissue_mask": cfg.tissue_mask,
        "whole_windows": cfg.whole_windows,
        "tta": cfg.tta or card.tta,
        "format": cfg.geojson_format,
        # a typed model's classes change the GeoJSON and the tables: part of the key (only then)
        **({"types": cfg.types} if card.types else {}),
        # int8 and bf16 change the probabilities (fp32 backends agree within 1e-4): only then part of the key
        **({"precision": cfg.precision} if cfg.precision != "fp32" else {}),
    }
    pixels = hashlib.sha256(json.dumps(outputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # the files written (--formats) are part of the output key, not of the chunks: a chunk file holds every format's data
    key = hashlib.sha256(json.dumps({"outputs": pixels, "formats": sorted(cfg.formats)}).encode()).hexdigest()[:16]
    chunks = {"outputs": pixels, "backend": backend, "batch": cfg.batch_size, "device": cfg.device, "version": __version__,
              "chunk_file": CHUNK_FILE_VERSION, **({"box_step": cfg.box_step} if cfg.box_step != 32 else {})}
    fingerprint = hashlib.sha256(json.dumps(chunks, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ident, key, fingerprint


def slide_config(cfg: SegmentConfig, out_dir: Path) -> SegmentConfig:
    """``cfg`` for the slide whose outputs go to ``out_dir``. Under ``--resume`` with a chunk size
    ``segment`` chose (``chunk_auto``: no ``--chunk-size``), the slide keeps the chunk size of its
    earlier run (its unfinished chunk files, else its finished outputs): the choice follows the
    workers' memory, and resuming with other workers must not throw finished work away."""
    if not (cfg.resume and cfg.chunk_auto):
        return cfg
    plan_json, summary = read_json(out_dir / WORK_DIR / "plan.json") or {}, read_json(out_dir / "summary.json") or {}
    earlier_sizes: tuple[Any, ...] = (plan_json.get("chunk_size"), (summary.get("parameters") or {}).get("chunk_size"))
    for value in earlier_sizes:
        try:
            earlier = replace(cfg, chunk_size=int(value))
            earlier.check()
        except (ValueError, TypeError, ConfigError):
            continue
        if earlier.chunk_size != cfg.chunk_size:
            log.info("%s: keeps the %d px chunks of its earlier run (--resume)", shown(out_dir), earlier.chunk_size)
        return earlier
    return cfg


def plan_slide(
    path: Path, out_dir: Path, cfg: SegmentConfig, card: ModelCard | None = None
) -> tuple[SlidePlan, np.ndarray, np.ndarray | None]:
    """Open ``path``, derive tiling and tissue, list the chunks. Returns the plan, the thumbnail
    and the tissue mask (thumbnail grid). ``card``: the model's card, read once per run by the
    caller (default: read here). Reads the slide; writes nothing."""
    from ..slides.reader import open_slide
    from ..slides.tissue import looks_greyscale, tissue_mask
    from .tiling import plan_chunks

    card = card or model_card(cfg)
    with open_slide(path, cfg.reader, cfg.level0_mpp) as slide:
        info = slide.info
        if info.level0_mpp is None:
            raise SlideError(
                f"{shown(path)}: no resolution (mpp) in the slide metadata; pass --mpp, e.g. --mpp 0.25 for 40x or 0.5 for 20x"
            )
        thumb, thumb_scale = slide.thumbnail(2048)  # first: a damaged file says so before anything else
        meta = info.metadata_mpp
        if cfg.level0_mpp is not None and meta and abs(cfg.level0_mpp - meta) > 0.02 * meta:  # never replaced in silence
            log.warning("%s: --mpp %g replaces the slide's own %g µm/px (sizes %.2fx); drop --mpp if the metadata is right",
                        shown(path), cfg.level0_mpp, meta, meta / cfg.level0_mpp)
        if cfg.level0_mpp is None:
            try:
                check_mpp(info.level0_mpp, f"{shown(path)}: the slide's metadata says", cfg.unusual_mpp)
            except ConfigError as err:
                raise SlideError(str(err)) from None
        scale = card.working_mpp / info.level0_mpp
        width, height = math.ceil(info.dimensions[0] / scale), math.ceil(info.dimensions[1] / scale)
        if width * height > MAX_WORKING_PX:
            raise SlideError(f"{shown(path)}: at {info.level0_mpp:g} µm/px the slide is {width:.3g} x {height:.3g} px at the model's "
                             f"{card.working_mpp:g} µm/px, more than any slide; check --mpp")
        tiling = slide_tiling(cfg, card)
        needed = max(-(-max(width, height) // 32) * 32, (tiling.halo // 32 + 1) * 32)  # a core still larger than the halo
        if tiling.chunk > 2 * needed:  # a chunk far larger than the slide (memory for nothing): clipped to it
            tiling = slide_tiling(replace(cfg, chunk_size=needed), card)
        cells = math.ceil(width / tiling.chunk) * math.ceil(height / tiling.chunk)
        if cells > IDS_PER_CHUNK:  # nucleus ids are chunk index x 2**16 + local id, in 32 bits
            fits = -(-math.ceil(math.sqrt(width * height / IDS_PER_CHUNK)) // 32) * 32
            raise SlideError(f"{shown(path)}: {cells:,} chunks of {tiling.chunk} px, more than {IDS_PER_CHUNK:,}; "
                             f"use a larger --chunk-size (at least {max(fits, tiling.chunk + 32)}), or check --mpp")
    if looks_greyscale(thumb):
        raise SlideError(f"{path}: the slide has no colour (greyscale); the model segments H&E-stained RGB slides")
    tissue = tissue_mask(thumb) if cfg.tissue_mask else None
    chunks, grid = plan_chunks(width, height, tiling, tissue, thumb_scale / scale)
    if cfg.whole_windows:
        chunks = [replace(ch, infer=None) for ch in chunks]
    shift = (0.0, 0.0) if cfg.raw_coordinates or info.bounds is None else (float(info.bounds[0]), float(info.bounds[1]))
    # the tissue area from the mask even when every chunk is processed (--no-tissue-mask): glass is
    # not tissue in nuclei_per_mm2; a mask that finds none leaves the whole slide
    area_mask = tissue if tissue is not None else tissue_mask(thumb)
    if tissue is not None or area_mask.any():
        tissue_mm2 = float(area_mask.sum()) * (thumb_scale * info.level0_mpp / 1000) ** 2
    else:
        tissue_mm2 = width * height * (card.working_mpp / 1000) ** 2
    backend = cfg.engine()
    ident, key, fingerprint = plan_keys(path, cfg, card, backend)
    # the GeoJSON ids' key: name (valid UTF-8), pixel size and content digest
    slide_key = f"{utf8_text(Path(path).name)}:{info.dimensions[0]}x{info.dimensions[1]}:{ident['content']}"
    plan = SlidePlan(path=str(path), out_dir=str(out_dir), scale=scale, size=(height, width), tiling=tiling, chunks=tuple(chunks),
                     grid=grid, shift=shift, slide_key=slide_key,
                     tissue_mm2=round(tissue_mm2, 4), info=info, card=card, fingerprint=fingerprint, tta=cfg.tta or card.tta,
                     backend=backend, slide_file=ident, output_key=key, run_id=uuid.uuid4().hex)
    return plan, thumb, tissue


def check_outputs(path: Path, out_dir: Path, cfg: SegmentConfig, card: ModelCard) -> SlideResult | None:
    """Apply --resume / --overwrite to an existing output folder (hold its lock). Returns a
    "skipped" result under --resume for a slide whose outputs are verified finished
    (:func:`.outputs.finished`); a folder whose outputs are not (another slide version, another
    model or options, a missing output) is segmented again, its old outputs kept until the new ones
    are complete. Raises OutputError for existing outputs without either flag, and for a folder
    holding another slide's outputs."""
    ident = slide_file(path)
    owner = folder_owner(out_dir)
    if owner is not None and not same_file(owner, ident) and owner.get("path") != ident["path"] and not cfg.overwrite:
        raise OutputError(f"{shown(out_dir)}: holds the outputs of another slide ({shown(owner.get('path', '?'))}); "
                          "choose another -o folder, or pass --overwrite to replace them")
    if cfg.overwrite:
        return None

    def key() -> str:
        return plan_keys(path, cfg, card, cfg.engine())[1]

    state = slide_state(out_dir, ident, key if cfg.resume else None)  # without --resume nothing is verified
    if state.state == "new":
        return None
    if not cfg.resume:
        if state.state == "interrupted":
            raise OutputError(
                f"{shown(out_dir)}: an interrupted run left unfinished outputs; pass --resume to continue it or --overwrite to start over"
            )
        raise OutputError(f"{shown(out_dir)}: outputs exist; pass --resume to skip finished slides or --overwrite to replace them")
    if state.state == "finished":
        _remove_left_work(out_dir)
        return SlideResult(str(path), "skipped", str(out_dir), state.nuclei, "finished in an earlier run (--resume)")
    if state.state == "outdated":
        log.warning("%s: the outputs in %s are not a finished run of this slide with these settings (%s); segmenting it again",
                    shown(path), shown(out_dir), state.why)
    return None


def _remove_left_work(out_dir: Path) -> None:
    """A finished slide's work folder, left by a run killed between writing ``summary.json`` and
    removing it, is removed (we hold the folder's lock), unless that run kept its chunks on purpose
    (``--keep-chunks``, recorded in the summary; an older summary without the record: kept)."""
    work = out_dir / WORK_DIR
    if not work.exists():
        return
    if (read_json(out_dir / "summary.json") or {}).get("keep_chunks", True) is not False:
        return
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s: removed the work folder a finished run left behind", shown(out_dir))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic.replacing(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def start_slide(plan: SlidePlan, thumb: np.ndarray, tissue: np.ndarray | None, cfg: SegmentConfig) -> list[Chunk]:
    """Prepare ``plan.out_dir`` for the chunk tasks; returns the chunks still to compute (all of
    them, or under --resume those without a chunk file from an earlier run with the same plan)."""
    out_dir = Path(plan.out_dir)
    work = plan.work
    check_writable(out_dir)
    remove_leftovers(out_dir)  # temporary files of a run killed while writing (we hold the lock)
    plan_file = work / "plan.json"
    if work.exists():
        old = (read_json(plan_file) or {}).get("fingerprint")
        if cfg.overwrite or old != plan.fingerprint:
            if not cfg.overwrite:
                log.warning("%s: chunk files of an earlier run were made with other settings; recomputing them", plan.path)
            shutil.rmtree(work)
    try:
        (work / "chunks").mkdir(parents=True, exist_ok=True)
        # kept for the overlay at assembly; .npy: temporary files need no PNG encoder
        _save_npy(work / "thumbnail.npy", thumb)
        if tissue is not None:
            _save_npy(work / "tissue.npy", tissue)
        else:
            (work / "tissue.npy").unlink(missing_ok=True)
        atomic.write_text(plan_file, json.dumps({"fingerprint": plan.fingerprint, "slide": plan.path, "slide_file": plan.slide_file,
                                                 "chunks": len(plan.chunks), "chunk_size": cfg.chunk_size}) + "\n")
    except OSError as err:
        raise OutputError(f"{shown(out_dir)}: cannot write outputs ({err.strerror or err}); free disk space or choose another -o folder, "
                          "then run again with --resume") from err
    return [ch for ch in plan.chunks if not usable_chunk_file(plan, ch)]


def usable_chunk_file(plan: SlidePlan, chunk: Chunk) -> bool:
    """Whether ``chunk``'s file from an earlier run can be reused (:func:`.chunkfile.chunk_file_problem`).
    A damaged one is removed (a warning names it) so the chunk is computed again."""
    path = plan.chunk_file(chunk)
    if not path.exists():
        return False
    bad = chunk_file_problem(path, plan.fingerprint, chunk.index)
    if bad is not None:
        log.warning("%s: damaged chunk file (%s); computing chunk %d again", shown(path), bad, chunk.index)
        path.unlink(missing_ok=True)
        return False
    return True
