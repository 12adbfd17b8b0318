"""Stage 2, one Dask task per chunk: read -> infer -> instances -> ownership -> polygons -> file.

:func:`segment_chunk` does the work in memory, in named steps:

1. read the chunk's window (core + halo + model context) at the working resolution: only the part
   the model will be given (the window's tissue box and its context), glass elsewhere stays unread;
2. infer probabilities: one forward pass, or tiles that fit this worker's memory, each with the
   model's full context (:func:`wsi_nuclei.model.infer.tile_probabilities`), with the run's TTA;
3. instances: the post-processing shared with ``evaluate`` (:mod:`wsi_nuclei.nuclei.instances`);
4. ownership: keep the nuclei whose centroid lies in the core, with slide-unique ids
   (:func:`wsi_nuclei.nuclei.instances.own_by_centroid`);
5. polygons, as GeoJSON features (encoded) and as a table of columns (:mod:`wsi_nuclei.nuclei.polygons`,
   :mod:`wsi_nuclei.outputs.geojson`, :mod:`wsi_nuclei.nuclei.table`).

:func:`chunk_task` persists the result as one file, ``OUT/<slide>/.partial/chunks/<index>.npz``
(atomic), and returns only numbers (:class:`~wsi_nuclei.pipeline.results.ChunkDone`), so the driver's
memory does not grow with the slide. :mod:`.chunkfile` holds the file's codec, its version and the check that start and assembly share.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .. import atomic
from ..errors import SlideError, WsiNucleiError, shown
from ..nuclei.classes import (
    TYPE_PROBABILITY,
    NucleusType,
    qupath_classes,
    types_from_card,
    vote_types,
)
from ..nuclei.instances import IDS_PER_CHUNK
from ..nuclei.polygons import Nucleus
from ..nuclei.table import PIPELINE_MEASUREMENTS, NucleusTable
from .chunkfile import ChunkMeta, encode_chunk_file, read_chunk_file
from .config import SegmentConfig
from .plan import SlidePlan
from .results import ChunkDone
from .tiling import Chunk
from .worker_cache import cached_predictor, forward_plan, slide_handle

__all__ = ["ChunkResult", "segment_chunk", "chunk_task", "read_chunk_file"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkResult:
    """One chunk segmented in memory (:func:`segment_chunk`)."""

    probability: np.ndarray  # (core, core) uint8: nucleus probability x 255 of the core
    owned: np.ndarray  # (window, window) uint32: the owned nuclei with slide-unique ids
    features: list[bytes]  # the owned nuclei as encoded GeoJSON features, in id order
    cut: int  # owned nuclei that reached the window edge (halo too small)
    forward: tuple[int, int]  # (tile core px, tiles per call) of the forward passes
    times: dict[str, float]  # seconds: read, waiting, inference, instances, polygons
    inferred_px: int = 0  # pixels the model was given (the window's tissue box and its context)
    table: NucleusTable | None = None  # the same nuclei as columns (for nuclei.parquet and density.png)


def segment_chunk(plan: SlidePlan, chunk: Chunk, cfg: SegmentConfig) -> ChunkResult:
    """Segment one chunk in memory (the steps are in the module docstring); ``inference``
    excludes the wait for another chunk's forward pass, which is ``waiting``. Reads the slide only."""
    from ..model.backends import gate_wait_seconds
    from ..model.infer import check_finite, round_box, window_extent, window_probabilities
    from ..model.tta import with_tta
    from ..nuclei.instances import own_by_centroid, probabilities_to_instances
    from ..nuclei.polygons import PolygonFrame, label_polygons
    from ..outputs.geojson import encode_nuclei

    tiling = plan.tiling
    predict, card, _ = cached_predictor(cfg.model_dir, cfg.device, plan.backend, cfg.torch_threads)
    _same_inputs(plan, card)
    slide = slide_handle(plan.path, cfg.reader, cfg.level0_mpp, plan.slide_file)
    h, c, ctx, win = tiling.halo, tiling.chunk, tiling.context, tiling.window
    t0 = time.perf_counter()
    fp = forward_plan(cfg, tiling)  # the whole window in one pass, or tiles that fit memory
    side = fp.read_size(win, ctx)
    # one pass over the tissue box: grown to a multiple of --box-step (fewer input shapes), its
    # probabilities kept only inside the tissue box, so the nuclei are the unrounded box's
    box = round_box(chunk.infer, side - 2 * ctx, cfg.box_step) if fp.tile == side - 2 * ctx else chunk.infer
    # only the part the model is given (the tissue box and its context) is read and decoded
    part = window_extent(side - 2 * ctx, fp.tile, ctx, box)
    rgb = slide.read_working_part((chunk.x - h - ctx, chunk.y - h - ctx, side, side), plan.scale, part)
    t1 = time.perf_counter()
    waited = gate_wait_seconds()
    probs, inferred = window_probabilities(with_tta(predict, plan.tta), card.channels, rgb, fp.tile, ctx, fp.batch, box)
    if box != chunk.infer and chunk.infer is not None:
        x0, y0, x1, y1 = chunk.infer  # zero all but the tissue box: four slices, no window-sized mask
        probs[:, :y0] = 0.0
        probs[:, y1:] = 0.0
        probs[:, :, :x0] = 0.0
        probs[:, :, x1:] = 0.0
    probs = probs[:, :win, :win]
    t2 = time.perf_counter()
    waited = gate_wait_seconds() - waited
    check_finite(probs, f"{plan.path}, chunk {chunk.index} (row {chunk.row}, col {chunk.col})")
    # the model wrote probabilities only inside part (less its context); outside they are 0, no
    # foreground, so the instances of that rectangle are the window's (same ids, raster order)
    px0, py0, px1, py1 = part[0], part[1], min(win, part[2] - 2 * ctx), min(win, part[3] - 2 * ctx)
    labels = np.zeros((win, win), dtype=np.int32)
    labels[py0:py1, px0:px1] = probabilities_to_instances(
        probs[: len(card.outputs), py0:py1, px0:px1], card.outputs, card.postprocess, card.working_mpp
    )
    try:
        owned = own_by_centroid(labels, h, c, (chunk.y, chunk.x), plan.size, chunk.index)
    except OverflowError as err:
        raise SlideError(f"{plan.path}: chunk {chunk.row},{chunk.col} holds {err}; use a smaller --chunk-size") from err
    t3 = time.perf_counter()
    frame = PolygonFrame(chunk.x - h, chunk.y - h, plan.scale, float(plan.info.level0_mpp or 0.0), *plan.shift)
    nuclei = label_polygons(owned.labels, frame, probs[0], rgb[ctx : ctx + win, ctx : ctx + win]) if owned.count else []
    types = typed(card, cfg)
    if types:
        nuclei = _with_types(nuclei, owned.labels, probs[len(card.outputs) :])
    classes = qupath_classes(types) if types else None
    features = encode_nuclei(nuclei, plan.slide_key, classes)
    table = NucleusTable.from_nuclei(nuclei, measurement_names(types), tuple(t.qupath for t in types))
    t4 = time.perf_counter()
    core_prob = np.round(probs[0, h : h + c, h : h + c] * 255).astype(np.uint8)
    times = {"read": t1 - t0, "waiting": waited, "inference": t2 - t1 - waited, "instances": t3 - t2, "polygons": t4 - t3}
    return ChunkResult(core_prob, owned.labels, features, owned.cut, (fp.tile, fp.batch), times, inferred, table)


def _same_inputs(plan: SlidePlan, card: Any) -> None:
    """The model this task runs is the one the run planned with: a model folder replaced in place
    during a run (or under a long-lived worker) fails the slide with one line instead of mixing
    versions under one fingerprint (the slide file is checked by :func:`slide_handle`)."""
    from ..errors import ModelError

    if card.weights_sha256 != plan.card.weights_sha256 or card.output_json() != plan.card.output_json():
        raise ModelError(f"{plan.card.model_id}: the model files changed on disk after this run planned {shown(plan.path)}; "
                         "run again (with --resume, its chunks are computed with the new model)")


def typed(card: Any, cfg: SegmentConfig) -> tuple[NucleusType, ...]:
    """The types a run writes: the card's, unless ``--types off`` (or the model has none)."""
    return types_from_card(card.types) if card.types and cfg.types else ()


def measurement_names(types: tuple[NucleusType, ...]) -> tuple[str, ...]:
    return PIPELINE_MEASUREMENTS + ((TYPE_PROBABILITY,) if types else ())


def _with_types(nuclei: list[Nucleus], labels: np.ndarray, type_probs: np.ndarray) -> list[Nucleus]:
    """Each nucleus with its type by a vote over its pixels, and the type's probability."""
    if not nuclei:
        return nuclei
    fg = labels > 0
    ids = np.unique(labels[fg])
    dense = np.zeros(labels.shape, np.int64)
    dense[fg] = np.searchsorted(ids, labels[fg]) + 1
    kinds, prob = vote_types(dense, type_probs)
    out = []
    for nu in nuclei:
        i = int(np.searchsorted(ids, nu.label))
        out.append(replace(nu, kind=int(kinds[i]), measurements={**nu.measurements, TYPE_PROBABILITY: round(float(prob[i]), 4)}))
    return out


def chunk_task(plan: SlidePlan, chunk: Chunk, cfg: SegmentConfig) -> ChunkDone:
    """Segment one chunk and persist it as ``plan.chunk_file(chunk)`` (atomic: temporary name,
    then rename; a task run twice writes the same bytes). Returns only counts and seconds."""
    t0 = time.perf_counter()
    try:
        res = segment_chunk(plan, chunk, cfg)
    except WsiNucleiError as err:
        return ChunkDone(chunk.index, 0, 0.0, error=str(err), trace=traceback.format_exc())
    blob = b",\n".join(res.features)
    table = res.table if res.table is not None else NucleusTable.empty()
    meta = ChunkMeta(chunk=asdict(chunk), nuclei=len(res.features), cut=res.cut, times=res.times, forward=tuple(res.forward),
                     fingerprint=plan.fingerprint, inferred_px=res.inferred_px, measurements=tuple(table.names),
                     types=tuple(table.type_names or ()))
    # ids are chunk.index * 2**16 + local id: store the local part (uint16, half the bytes)
    local = (res.owned & np.uint32(IDS_PER_CHUNK - 1)).astype(np.uint16)
    data = encode_chunk_file(res.probability, local, blob, meta, table)
    target = plan.chunk_file(chunk)
    try:
        atomic.write_bytes(target, data)
    except OSError as err:
        return ChunkDone(
            chunk.index,
            0,
            0.0,
            error=f"{target}: cannot write the chunk result ({err.strerror}); free disk space or choose another -o folder",
        )
    seconds = time.perf_counter() - t0
    log.debug("%s: chunk %d done (%d nuclei, %.2f s)", plan.path, chunk.index, meta.nuclei, seconds)
    return ChunkDone(chunk.index, meta.nuclei, round(seconds, 4))
