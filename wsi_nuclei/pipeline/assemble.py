"""Stage 3, one Dask task per slide: chunk files -> ``mask.zarr``, GeoJSON, Parquet, pictures, ``summary.json``.

The chunk files are replayed in chunk order (so outputs do not depend on which run computed a
chunk: a resumed run is byte-identical to an uninterrupted one), one chunk in memory at a time.
Each output is written under a temporary name and renamed; ``summary.json`` comes last (its
presence means "this slide is finished"), then the chunk files are removed.
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
from ..outputs.density import DensityGrid, density_png
from ..outputs.folder import install, output_size, shown
from ..outputs.h5ad import H5AD_NAME
from .chunk import measurement_names, typed
from .chunkfile import ChunkMeta, chunk_file_problem, read_chunk_file
from .config import SegmentConfig
from .plan import SlidePlan
from .results import SlideResult
from .summary import SUMMARY_NAME, Summary

__all__ = ["assemble_slide", "PARQUET_NAME", "DENSITY_NAME"]

PARQUET_NAME = "nuclei.parquet"
DENSITY_NAME = "density.png"

log = logging.getLogger(__name__)


def assemble_slide(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any] | None = None) -> SlideResult:
    """Write the slide's final outputs from its chunk files, in chunk order (deterministic), each
    under a temporary name first; ``summary.json`` last. Holds one chunk in memory at a time.
    A failure (full disk, damaged chunk file) returns a "failed" result, leaves no partial file
    and keeps the chunk files, so ``--resume`` can assemble again without recomputing."""
    out_dir = Path(plan.out_dir)
    done = _assembled_already(plan)
    if done is not None:
        return done
    temps: dict[str, Path] = {}
    try:
        return _assemble(plan, cfg, run, temps)
    except WsiNucleiError as err:
        reason = str(err)
    except OSError as err:
        reason = (f"{shown(out_dir)}: writing the outputs failed ({err.strerror or err}); free disk space or choose another -o folder, "
                  "then run again with --resume")
    for leftover in temps.values():
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return SlideResult(plan.path, "failed", str(out_dir), reason=reason)


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


def _assemble(plan: SlidePlan, cfg: SegmentConfig, run: dict[str, Any] | None, temps: dict[str, Path]) -> SlideResult:
    """The named steps: open the outputs, replay the chunks into them, draw the pictures, write
    the summary, install everything."""
    t0 = time.perf_counter()
    types = typed(plan.card, cfg)
    files = _output_files(cfg)
    # every output under a name of this run only (two runs never share a temporary file)
    temps.update({name: atomic.temp_path(Path(plan.out_dir) / name) for name in files.values()})
    tally = _Tally.for_plan(plan, types)
    t_write = time.perf_counter()
    _replay_chunks(plan, cfg, files, temps, tally, types)
    t_written = time.perf_counter()
    _log_tally(plan, tally)
    _pictures(plan, temps, tally, types)
    summary = _summary(plan, cfg, run or {}, tally, files, {"write": t_written - t_write, "assemble": time.perf_counter() - t0})
    _install(plan, cfg, temps, summary)
    return SlideResult(
        plan.path, "ok", str(Path(plan.out_dir)), tally.nuclei, extra={"tissue_mm2": plan.tissue_mm2, "chunks": len(plan.chunks)}
    )


def _output_files(cfg: SegmentConfig) -> dict[str, str]:
    """The slide's output files by kind (the formats ``cfg`` asks for)."""
    geo_name = f"nuclei.{cfg.geojson_format}"
    return {"mask": "mask.zarr", **({"geojson": geo_name} if "geojson" in cfg.formats else {}),
            **({"parquet": PARQUET_NAME} if "parquet" in cfg.formats else {}), "overlay": "overlay.png", "density": DENSITY_NAME}


def _replay_chunks(plan: SlidePlan, cfg: SegmentConfig, files: dict[str, str], temps: dict[str, Path],
                   tally: _Tally, types: tuple[Any, ...]) -> None:
    """Every chunk file in chunk order into the Zarr store, the GeoJSON and the Parquet file."""
    from contextlib import ExitStack

    from ..nuclei.instances import overlapping
    from ..outputs.geojson import GeoJSONWriter, drop_features
    from ..outputs.parquet import ParquetWriter
    from ..outputs.store import LabelCanvas, build_pyramids, create_store, open_array

    card, tiling, tmp_zarr = plan.card, plan.tiling, temps["mask.zarr"]
    attrs = {"slide": plan.path, "slide_info": plan.info.as_dict(), "working_mpp": card.working_mpp, "level0_per_working_px": plan.scale,
             "tiling": asdict(tiling), "model_card": json.loads(card.to_json()), "version": __version__,
             "geojson_shift": list(plan.shift)}
    create_store(tmp_zarr, plan.size, tiling.chunk, card.working_mpp, attrs)
    probability = open_array(tmp_zarr, "probability", 0, mode="r+")
    labels = LabelCanvas(tmp_zarr, tiling.chunk)
    height, width = plan.size
    geo_name = files.get("geojson", "")
    with ExitStack() as stack:
        geojson = stack.enter_context(GeoJSONWriter(temps[geo_name], gzipped=geo_name.endswith(".gz"))) if geo_name else None
        parquet = (
            stack.enter_context(
                ParquetWriter(
                    temps[PARQUET_NAME],
                    plan.slide_key,
                    _parquet_meta(plan),
                    names=measurement_names(types),
                    type_names=tuple(t.qupath for t in types),
                )
            )
            if "parquet" in files
            else None
        )
        for ch in plan.chunks:
            part = _read_part(plan, ch)
            core = part.probability[: height - ch.y, : width - ch.x]  # a core is one Zarr chunk, clipped at the slide edge
            probability[ch.y : ch.y + core.shape[0], ch.x : ch.x + core.shape[1]] = core
            y0, x0 = ch.y - tiling.halo, ch.x - tiling.halo
            owned, features, table, count = part.owned, part.features, part.table, part.meta.nuclei
            twice = overlapping(owned, labels.under(y0, x0, owned.shape))  # a nucleus two chunks both kept
            if len(twice):
                owned = np.where(np.isin(owned, twice), np.uint32(0), owned)
                features, removed = drop_features(features, plan.slide_key, twice.tolist())
                table, _ = table.without(twice)
                count -= removed
                tally.dropped += removed
            labels.paste(ch.row, ch.col, y0, x0, owned)
            if geojson is not None:
                geojson.write_encoded(features, count)
            if parquet is not None:
                parquet.write(table, ch.index)
            tally.add(part.meta, table, count, plan.shift, types)
    labels.close()
    build_pyramids(tmp_zarr, tiling.chunk)


def _log_tally(plan: SlidePlan, tally: _Tally) -> None:
    if tally.cut:
        log.warning("%s: %d nuclei reached the edge of their chunk window; raise --halo", plan.path, tally.cut)
    if tally.dropped:
        log.warning("%s: %d nuclei were kept by two chunks in versions that overlap; the later one was dropped "
                    "(a context below the model's measured context_px does this)", plan.path, tally.dropped)


def _pictures(plan: SlidePlan, temps: dict[str, Path], tally: _Tally, types: tuple[Any, ...]) -> None:
    """``overlay.png`` and ``density.png``, from the thumbnail the plan stored."""
    thumb = np.load(plan.work / "thumbnail.npy")
    tissue_file = plan.work / "tissue.npy"
    tissue = np.load(tissue_file) if tissue_file.exists() else None
    _overlay(temps["mask.zarr"], thumb, tissue, temps["overlay.png"], tally.typed_labels(), types)
    per_mm2 = tally.nuclei / plan.tissue_mm2 if plan.tissue_mm2 > 0 else 0.0
    title = f"{Path(plan.path).name}: {tally.nuclei:,} nuclei, {per_mm2:,.0f} per mm² of tissue"
    panels = [(f"{name}: {tally.per_type[name]:,} nuclei", grid) for name, grid in tally.type_density.items()]
    atomic.write_bytes(temps[DENSITY_NAME], density_png(tally.density, thumb, tissue, title, panels))


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


def _overlay(zarr_path: Path, thumb: np.ndarray, tissue: np.ndarray | None, out: Path,
             typed_labels: tuple[np.ndarray, np.ndarray] | None = None, types: tuple[Any, ...] = ()) -> None:
    """The thumbnail with nucleus outlines (green; a typed model's in its types' colours, with a
    legend) and the tissue outline (blue). ``typed_labels``: (sorted labels, their types)."""
    from PIL import Image

    from ..model.infer import resize_labels
    from ..outputs.overlay import inner_boundaries
    from ..outputs.store import open_array

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
        edge = inner_boundaries(lab)
        img[edge] = (0, 255, 0)
        if typed_labels is not None and types and len(typed_labels[0]):
            ids, kinds = typed_labels
            at = np.clip(np.searchsorted(ids, lab[edge]), 0, len(ids) - 1)
            kind = np.where(ids[at] == lab[edge], kinds[at], 0)
            palette = np.array([(0, 255, 0)] + [t.color for t in types], np.uint8)
            img[edge] = palette[kind]

    if tissue is not None:
        img[inner_boundaries(tissue)] = (0, 0, 255)
    if types:
        img = _legend(img, types)
    with atomic.replacing(out) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)  # a quick look: fast beats small (default level 6)


def _legend(img: np.ndarray, types: tuple[Any, ...]) -> np.ndarray:
    """A legend of the type colours in the top left corner."""
    from PIL import Image, ImageDraw

    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    height = 14 * len(types) + 6
    draw.rectangle((2, 2, 110, height), fill=(255, 255, 255))
    for i, t in enumerate(types):
        y = 5 + 14 * i
        draw.rectangle((6, y, 16, y + 10), fill=tuple(t.color))
        draw.text((22, y - 1), t.qupath, fill=(0, 0, 0))
    return np.array(pic)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"wsi-nuclei": __version__}
    for pkg in ("torch", "segmentation-models-pytorch", "timm", "openslide-python", "tiffslide", "zarr", "dask", "shapely"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
