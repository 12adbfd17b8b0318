"""Stage 3: chunk files -> ``mask.zarr``, GeoJSON, Parquet, pictures, ``summary.json``.

:class:`SlideAssembler` takes a slide's chunks in chunk order, one chunk in memory at a time, and
writes each into the outputs when it comes: Zarr blocks (and their pyramid levels) once they are
final, GeoJSON features, Parquet row groups, density counts. The order makes the outputs a
function of the chunk files alone, not of which run computed a chunk or when: a resumed run is
byte-identical to an uninterrupted one. What :meth:`SlideAssembler.finish` has left does not grow
with the slide's area: about one block per level, the pictures (thumbnail-sized), the summary
and the renames. Two ways to drive it:

- while the chunks are computed (default): :mod:`.stream`, on the driver, adds each chunk as soon
  as it and every chunk before it are on disk;
- :func:`assemble_slide` (``--assemble worker``): one Dask task after the last chunk, all at once.

Each output is written under a temporary name and renamed; ``summary.json`` comes last (its
presence means "this slide is finished"), then the chunk files are removed. A kill at any point
leaves temporary files only (removed when the slide starts again) and the chunk files: ``--resume``
replays them all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from .._version import __version__
from ..errors import OutputError, WsiNucleiError
from ..outputs.density import DensityGrid
from ..outputs.folder import install, output_size, shown
from ..outputs.h5ad import H5AD_NAME
from .chunk import measurement_names, typed
from .chunkfile import ChunkMeta, chunk_file_problem, read_chunk_file
from .config import SegmentConfig
from .pictures import DENSITY_NAME, overlay_sample, slide_pictures
from .plan import SlidePlan
from .results import SlideResult
from .summary import SUMMARY_NAME, Summary

__all__ = ["SlideAssembler", "assemble_slide", "PARQUET_NAME", "DENSITY_NAME"]

PARQUET_NAME = "nuclei.parquet"

log = logging.getLogger(__name__)


def assemble_slide(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any] | None = None) -> SlideResult:
    """Write the slide's final outputs from all its chunk files (the Dask task of ``--assemble
    worker``, after the last chunk). A failure (full disk, damaged chunk file) returns a "failed"
    result, leaves no partial file and keeps the chunk files, so ``--resume`` can assemble again
    without recomputing."""
    done = _assembled_already(plan)
    if done is not None:
        return done
    asm: SlideAssembler | None = None
    try:
        asm = SlideAssembler(plan, cfg)
        for ch in plan.chunks:
            asm.add(ch)
        return asm.finish(run or {})
    except (WsiNucleiError, OSError) as err:
        if asm is not None:
            asm.abort()
        return failed_result(plan, err)


def failed_result(plan: SlidePlan, err: WsiNucleiError | OSError) -> SlideResult:
    """The "failed" result of an assembly stopped by ``err``, with its one line."""
    if isinstance(err, WsiNucleiError):
        reason = str(err)
    else:
        reason = (f"{shown(Path(plan.out_dir))}: writing the outputs failed ({err.strerror or err}); free disk space or choose another "
                  "-o folder, then run again with --resume")
    return SlideResult(plan.path, "failed", str(plan.out_dir), reason=reason)


def _assembled_already(plan: SlidePlan) -> SlideResult | None:
    """The result of this run's assembly of the slide when it already finished. Dask runs a task
    again when the worker holding its result leaves before the driver fetched it (a job at its
    walltime, preempted): the second run must not fail on the chunk files the first removed."""
    from ..outputs.folder import slide_state

    out_dir = Path(plan.out_dir)
    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not plan.run_id or summary.get("run_id") != plan.run_id:
        return None
    state = slide_state(out_dir, plan.slide_file, plan.output_key)
    if state.state != "finished":
        return None
    log.info("%s: assembled already by this run (a repeated assembly task)", plan.path)
    return SlideResult(plan.path, "ok", str(out_dir), state.nuclei, extra={"tissue_mm2": plan.tissue_mm2, "chunks": len(plan.chunks)})


@dataclass
class _Tally:
    """What the replay of the chunk files adds up, for the pictures and ``summary.json``."""

    density: DensityGrid
    type_density: dict[str, DensityGrid]
    per_type: dict[str, int]
    nuclei: int = 0
    cut: int = 0
    dropped: int = 0
    inferred: int = 0
    forwards: dict[tuple[int, ...], int] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "waiting", "inference", "instances", "polygons"), 0.0))
    typed_parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def for_plan(cls, plan: SlidePlan, types: tuple[Any, ...]) -> _Tally:
        def grid() -> DensityGrid:
            return DensityGrid.for_slide(plan.info.dimensions, float(plan.info.level0_mpp or 0.0))

        return cls(grid(), {t.qupath: grid() for t in types}, {t.qupath: 0 for t in types})

    def add(self, meta: ChunkMeta, table: Any, count: int, shift: tuple[float, float], types: tuple[Any, ...]) -> None:
        xy = table.centroids() + np.asarray(shift)  # raw level-0 px
        self.density.add(xy)
        for name, k in table.type_counts().items():
            self.per_type[name] = self.per_type.get(name, 0) + k
        if types and table.kinds is not None:
            self.typed_parts.append((table.labels, table.kinds))
            for k, t in enumerate(types, start=1):
                self.type_density[t.qupath].add(xy[table.kinds == k])
        self.nuclei += count
        self.cut += meta.cut
        self.inferred += meta.inferred_px
        self.forwards[meta.forward] = self.forwards.get(meta.forward, 0) + 1
        for k in self.times:
            self.times[k] += float(meta.times.get(k, 0.0))

    def typed_labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(sorted labels, their types) over the slide, for the overlay; None without types."""
        if not self.typed_parts:
            return None
        ids = np.concatenate([p[0] for p in self.typed_parts])
        order = np.argsort(ids, kind="stable")
        return ids[order], np.concatenate([p[1] for p in self.typed_parts])[order]


class SlideAssembler:
    """One slide's outputs, written chunk by chunk: :meth:`add` each chunk of ``plan.chunks`` in
    order, then :meth:`finish`; or :meth:`abort`, which removes every temporary file. Raises
    :class:`~wsi_nuclei.errors.WsiNucleiError` (a damaged chunk file, removed so that ``--resume``
    computes it again) or OSError (a full disk); :func:`failed_result` words either."""

    def __init__(self, plan: SlidePlan, cfg: SegmentConfig) -> None:
        from ..outputs.store import LabelCanvas, Pyramid, create_store, open_array

        self.plan, self.cfg = plan, cfg
        self.t0 = time.perf_counter()
        self.busy = 0.0  # seconds spent in add()
        self.types = typed(plan.card, cfg)
        self.files = _output_files(cfg)
        out_dir = Path(plan.out_dir)
        # every output under a name of this run only (two runs never share a temporary file)
        self.temps: dict[str, Path] = {name: atomic.temp_path(out_dir / name) for name in self.files.values()}
        self.tally = _Tally.for_plan(plan, self.types)
        self.added = 0
        self._writers: list[Any] = []
        card, tiling, tmp_zarr = plan.card, plan.tiling, self.temps["mask.zarr"]
        attrs = {"slide": plan.path, "slide_info": plan.info.as_dict(), "working_mpp": card.working_mpp,
                 "level0_per_working_px": plan.scale, "tiling": asdict(tiling), "model_card": json.loads(card.to_json()),
                 "version": __version__, "geojson_shift": list(plan.shift)}
        try:
            create_store(tmp_zarr, plan.size, tiling.chunk, card.working_mpp, attrs)
            self.probability = open_array(tmp_zarr, "probability", 0, mode="r+")
            self.probability_levels = Pyramid(tmp_zarr, "probability", tiling.chunk)
            levels = Pyramid(tmp_zarr, "labels", tiling.chunk)
            self.labels = LabelCanvas(tmp_zarr, tiling.chunk, levels)
            self.overlay = overlay_sample(levels, plan)
            self.geojson, self.parquet = self._writers_for(plan)
        except BaseException:
            self.abort()
            raise

    def _writers_for(self, plan: SlidePlan) -> tuple[Any, Any]:
        from ..outputs.geojson import GeoJSONWriter
        from ..outputs.parquet import ParquetWriter

        geo_name = self.files.get("geojson", "")
        geojson = GeoJSONWriter(self.temps[geo_name], gzipped=geo_name.endswith(".gz")) if geo_name else None
        if geojson is not None:
            self._writers.append(geojson)
        parquet = None
        if "parquet" in self.files:
            parquet = ParquetWriter(self.temps[PARQUET_NAME], plan.slide_key, _parquet_meta(plan), names=measurement_names(self.types),
                                    type_names=tuple(t.qupath for t in self.types))
            self._writers.append(parquet)
        return geojson, parquet

    def add(self, ch: Any) -> None:
        """Chunk ``ch`` (the next of ``plan.chunks``) into every output."""
        from ..nuclei.instances import overlapping
        from ..outputs.geojson import drop_features

        t0 = time.perf_counter()
        plan, tiling, tally = self.plan, self.plan.tiling, self.tally
        expected = plan.chunks[self.added]
        if ch.index != expected.index:
            raise ValueError(f"chunk {ch.index} added out of order (chunk {expected.index} is next)")
        height, width = plan.size
        part = _read_part(plan, ch)
        core = part.probability[: height - ch.y, : width - ch.x]  # a core is one Zarr chunk, clipped at the slide edge
        self.probability[ch.y : ch.y + core.shape[0], ch.x : ch.x + core.shape[1]] = core
        self.probability_levels.add(ch.row, ch.col, core)
        cols = plan.grid[1]
        self.probability_levels.flush(lambda r, k: r * cols + k <= ch.index)
        y0, x0 = ch.y - tiling.halo, ch.x - tiling.halo
        owned, features, table, count = part.owned, part.features, part.table, part.meta.nuclei
        twice = overlapping(owned, self.labels.under(y0, x0, owned.shape))  # a nucleus two chunks both kept
        if len(twice):
            owned = np.where(np.isin(owned, twice), np.uint32(0), owned)
            features, removed = drop_features(features, plan.slide_key, twice.tolist())
            table, _ = table.without(twice)
            count -= removed
            tally.dropped += removed
        self.labels.paste(ch.row, ch.col, y0, x0, owned)
        if self.geojson is not None:
            self.geojson.write_encoded(features, count)
        if self.parquet is not None:
            self.parquet.write(table, ch.index)
        tally.add(part.meta, table, count, plan.shift, self.types)
        self.added += 1
        self.busy += time.perf_counter() - t0

    def finish(self, run: dict[str, Any]) -> SlideResult:
        """After the last chunk: the last blocks and the pyramid, the closed files, the pictures,
        ``summary.json``; everything installed under its final name. ``run``: computed / reused
        chunk counts and the slide's wall seconds so far, for the summary."""
        plan = self.plan
        if self.added != len(plan.chunks):
            raise ValueError(f"{self.added} of {len(plan.chunks)} chunks added")
        t_tail = time.perf_counter()
        try:
            self.labels.close()
            self.probability_levels.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            _log_tally(plan, self.tally)
            slide_pictures(plan, self.temps, self.tally, self.types, self.overlay.image)
            now = time.perf_counter()
            seconds = {"write": self.busy, "assemble": self.busy + now - t_tail, "tail": now - t_tail}
            summary = _summary(plan, self.cfg, run, self.tally, self.files, seconds)
            _install(plan, self.cfg, self.temps, summary)
        except BaseException:
            self.abort()
            raise
        return SlideResult(plan.path, "ok", str(Path(plan.out_dir)), self.tally.nuclei,
                           extra={"tissue_mm2": plan.tissue_mm2, "chunks": len(plan.chunks)})

    def abort(self) -> None:
        """Stop: every file this assembler wrote removed (the chunk files stay)."""
        for writer in self._writers:
            writer.abort()
        self._writers.clear()
        for leftover in self.temps.values():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        self.temps.clear()


def _output_files(cfg: SegmentConfig) -> dict[str, str]:
    """The slide's output files by kind (the formats ``cfg`` asks for)."""
    geo_name = f"nuclei.{cfg.geojson_format}"
    return {"mask": "mask.zarr", **({"geojson": geo_name} if "geojson" in cfg.formats else {}),
            **({"parquet": PARQUET_NAME} if "parquet" in cfg.formats else {}), "overlay": "overlay.png", "density": DENSITY_NAME}


def _log_tally(plan: SlidePlan, tally: _Tally) -> None:
    if tally.cut:
        log.warning("%s: %d nuclei reached the edge of their chunk window; raise --halo", plan.path, tally.cut)
    if tally.dropped:
        log.warning("%s: %d nuclei were kept by two chunks in versions that overlap; the later one was dropped "
                    "(a context below the model's measured context_px does this)", plan.path, tally.dropped)


def _summary(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any], tally: _Tally, files: dict[str, str],
             seconds: dict[str, float]) -> Summary:
    card, tiling, area = plan.card, plan.tiling, plan.tissue_mm2
    density = tally.density
    types = {name: {"nuclei": k, "per_mm2": round(k / area, 1) if area > 0 else 0.0} for name, k in tally.per_type.items()}
    return Summary(
        slide=plan.path, nuclei=tally.nuclei, tissue_mm2=area,
        chunks={"processed": len(plan.chunks), "grid": list(plan.grid), "computed_this_run": run.get("computed", len(plan.chunks)),
                "reused": run.get("reused", 0)},
        cut_nuclei=tally.cut, inferred_px=tally.inferred,
        amplification=round(tally.inferred / max(1.0, area / (card.working_mpp / 1000) ** 2), 3),
        overlaps_dropped=tally.dropped,
        forward_passes=[{"tile_px": f[0] + 2 * tiling.context, "core_px": f[0], "per_call": f[1], "chunks": k}
                        for f, k in sorted(tally.forwards.items())],
        seconds={**{k: round(v, 3) for k, v in tally.times.items()}, **{k: round(v, 3) for k, v in seconds.items()},
                 "wall": round(float(run.get("wall", 0.0)), 3)},
        parameters={**asdict(cfg), "context": tiling.context, "tta": plan.tta}, tiling=asdict(tiling), slide_info=plan.info.as_dict(),
        model=plan.model, backend=plan.backend, versions=_versions(),
        nuclei_per_mm2=round(tally.nuclei / area if area > 0 else 0.0, 1),
        types=types if typed(card, cfg) else None,
        density={"cell_um": density.cell_um, "grid": list(density.counts.shape),
                 "max_per_mm2": round(float(density.per_mm2().max()), 1) if density.counts.size else 0.0},
        outputs=files, slide_file=plan.slide_file, output_key=plan.output_key, fingerprint=plan.fingerprint, run_id=plan.run_id,
        keep_chunks=cfg.keep_chunks,
    )


def _install(plan: SlidePlan, cfg: SegmentConfig, temps: dict[str, Path], summary: Summary) -> None:
    """The outputs under their names, then ``summary.json`` (last: it declares the slide finished), then the chunk files removed."""
    out_dir = Path(plan.out_dir)
    os.sync()  # the outputs reach the disk before the summary that declares them finished
    if (out_dir / H5AD_NAME).exists():  # made from the old nuclei.parquet by `export anndata`
        log.warning("%s: removed, it was exported from the outputs these replace; run `wsi-nuclei export anndata %s` again",
                    shown(out_dir / H5AD_NAME), shown(out_dir))
    install(out_dir, temps, stale=("nuclei.geojson", "nuclei.geojson.gz", PARQUET_NAME, H5AD_NAME))
    temps.clear()
    # --resume checks them: a truncated or replaced output is not a finished slide
    summary = summary.with_output_bytes({name: output_size(out_dir / name) for name in summary.outputs.values()})
    atomic.write_text(out_dir / SUMMARY_NAME, summary.to_json(), sync=True)
    if not cfg.keep_chunks:
        shutil.rmtree(plan.work, ignore_errors=True)


def _parquet_meta(plan: SlidePlan) -> dict[str, Any]:
    """What nuclei.parquet records about its slide (the schema key ``wsi_nuclei``)."""
    return {"slide": plan.path, "slide_key": plan.slide_key, "level0_mpp": plan.info.level0_mpp, "level0_size": list(plan.info.dimensions),
            "shift": list(plan.shift), "model": plan.model, "version": __version__,
            "frame": "level-0 px, x right, y down, origin top-left, minus shift (the GeoJSON's frame; QuPath's)"}


def _read_part(plan: SlidePlan, ch: Any) -> Any:
    """Chunk ``ch``'s file; a damaged one is removed, so that ``--resume`` computes it again."""
    path = plan.chunk_file(ch)
    try:
        part = read_chunk_file(path)
    except OutputError as err:
        cause = err.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        path.unlink(missing_ok=True)
        raise OutputError(
            f"{shown(path)}: damaged chunk file{why} (removed); run again with --resume to compute chunk {ch.index} again"
        ) from None
    if chunk_file_problem(path, plan.fingerprint, ch.index, part.meta) is not None:
        path.unlink(missing_ok=True)
        raise OutputError(f"{shown(path)}: chunk file made with other settings (removed); run again with --resume to compute it again")
    return part


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"wsi-nuclei": __version__}
    for pkg in ("torch", "segmentation-models-pytorch", "timm", "openslide-python", "tiffslide", "zarr", "dask", "shapely"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
