"""Slides -> per-slide ``mask.zarr`` + ``nuclei.geojson.gz`` + ``nuclei.parquet`` + ``summary.json`` + pictures.

The batch front end: find the slides, name their output folders, run them, write ``run.json`` and
``report.html``.
Per slide, three stages, each a function of typed values (the modules are named for them):

1. :mod:`.plan` (driver): open the slide, derive the tiling, find tissue, list the chunks, and
   prepare the output folder (``--resume`` / ``--overwrite``).
2. :mod:`.chunk` (one Dask task per chunk): segment one chunk and persist it as one file,
   ``OUT/<slide>/.partial/chunks/<index>.npz``; the task returns numbers, never arrays.
3. :mod:`.assemble` (one Dask task per slide): replay the chunk files in chunk order into the
   Zarr arrays and the GeoJSON; ``summary.json`` last.

:mod:`.batch` runs many slides at once, bounded, on a Dask client or in this process.

Resume (``--resume``): finished slides (``summary.json``) are skipped and chunk files from an
interrupted run are reused when the plan fingerprint (slide, model, tiling, options) matches, so
no finished chunk is recomputed. Outputs do not depend on which run computed a chunk: assembly
always replays all chunk files in chunk order, and ids are deterministic (chunk index x 2^16 +
local rank; GeoJSON uuid5 of slide + id), so a resumed run is byte-identical to an uninterrupted
one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import atomic
from .._version import __version__
from .config import WORK_DIR, SegmentConfig
from .results import SlideResult

__all__ = ["SegmentConfig", "SlideResult", "WORK_DIR", "segment_slide", "segment_many", "find_slides", "slide_jobs"]

log = logging.getLogger(__name__)


def find_slides(inputs: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slide files from files and folders (searched recursively, symlinked folders followed once
    each); also (path, reason) of inputs that are missing, folders without slides, and sub-folders
    that cannot be read (each one line: the batch goes on and reports them)."""
    found: list[Path] = []
    bad: list[tuple[str, str]] = []
    for p in inputs:
        if p.is_dir():
            files, unreadable = _walk_slides(p)
            bad.extend(unreadable)
            if not files and not unreadable:
                from ..slides.reader import SLIDE_EXTENSIONS

                bad.append((str(p), f"{p}: folder holds no slides (looked for {', '.join(SLIDE_EXTENSIONS)}); check the folder"))
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            bad.append((str(p), f"{p}: file not found; check the path"))
    return found, bad


def _walk_slides(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The slide files under ``root`` (sorted; work folders skipped) and the sub-folders that could
    not be read. Symlinked folders are followed (slides are often staged through links), each real
    folder once, so a link back up the tree does not loop."""
    import os

    from ..errors import shown
    from ..slides.reader import SLIDE_EXTENSIONS

    files: list[Path] = []
    unreadable: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def failed(err: OSError) -> None:
        where = err.filename or root
        unreadable.append((str(where), f"{shown(where)}: cannot read this folder ({err.strerror or err}); its slides were not searched: "
                                       "fix its permissions, or give its slides by name"))

    for folder, dirs, names in os.walk(root, onerror=failed, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError as err:
            failed(err)
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if d != WORK_DIR)
        for name in names:
            f = Path(folder) / name
            if f.suffix.lower() in SLIDE_EXTENSIONS and f.is_file():
                files.append(f)
    return sorted(files), unreadable


#: Names in OUT that belong to the tool, never to a slide's folder.
RESERVED_NAMES = frozenset({"run.json", "report.html"})


def _safe_name(path: Path) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem).strip(".") or "slide"
    return name + "_" if name.lower() in RESERVED_NAMES else name


def _taken_by_other(folder: Path, ident: dict[str, Any]) -> bool:
    from ..outputs.folder import folder_owner, same_file

    owner = folder_owner(folder)
    return owner is not None and not same_file(owner, ident) and owner.get("path") != ident["path"]


def slide_jobs(slides: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(slide, output folder) pairs: ``out/<safe slide name>``, made unique. A slide given twice
    (the same file) is segmented once; a folder holding another slide's outputs (a slide of the
    same name from another folder) is passed over, so each slide keeps its own folder from run to run."""
    from ..outputs.folder import shown, slide_file

    used: set[str] = set()
    seen: set[str] = set()
    jobs = []
    for path in slides:
        ident = slide_file(path)
        st = path.stat()
        same = f"{st.st_dev}:{st.st_ino}"  # one file under two paths (a hard link, a symlink)
        if ident["path"] in seen or same in seen:
            log.info("%s: given more than once; segmented once", shown(path))
            continue
        seen.update((ident["path"], same))
        name = _safe_name(path)
        while name in used or _taken_by_other(out / name, ident):
            name += "_"
        used.add(name)
        jobs.append((path, out / name))
    return jobs


def segment_many(
    inputs: Sequence[Path | str] | Path | str,
    out: Path | str,
    cfg: SegmentConfig | None = None,
    client: Any = None,
    on_slide: Callable[[SlideResult], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    max_slides: int = 2,
    min_pending: int = 0,
    stop: Callable[[], bool] | None = None,
    watch: Callable[[], None] | None = None,
) -> list[SlideResult]:
    """Segment every slide of ``inputs`` (files, and folders searched recursively) into
    ``out/<slide name>/``; a failing slide is recorded and the batch goes on. ``out/run.json``
    lists every slide with its status and reason, ``out/report.html`` shows them (:mod:`wsi_nuclei.outputs.report`).

    ``cfg``: the options (default :class:`SegmentConfig`); ``client``: a Dask client (default:
    this process). Up to ``max_slides`` slides are in flight at once (their chunks are scheduled
    together); ``min_pending``: tasks kept queued at least (an adaptive cluster scales on queued
    work). ``on_slide(result)`` and ``on_chunk(done, total)`` report progress. When ``stop()``
    turns true the batch stops with KeyboardInterrupt; finished chunks and slides are kept.
    ``watch()``, called while work is queued, may stop it with an error the same way
    (:class:`wsi_nuclei.cluster.slurm.WorkerWatch`).
    """
    from .batch import BatchHooks, BatchOptions, run_batch

    cfg = cfg or SegmentConfig()
    cfg.check()
    out = Path(out)
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    _check_out(out)
    slides, bad = find_slides(paths)
    results = [SlideResult(p, "failed", reason=r) for p, r in bad]
    jobs = slide_jobs(slides, out)
    done: list[SlideResult] = []

    def record(res: SlideResult) -> None:
        done.append(res)
        if on_slide:
            on_slide(res)

    state = "interrupted"
    started = time.time()
    try:
        options = BatchOptions(max_slides=max_slides, min_pending=min_pending)
        hooks = BatchHooks(on_slide=record, on_chunk=on_chunk, stop=stop, watch=watch)
        done = run_batch(jobs, cfg, client, options, hooks)
        state = "finished"
    finally:  # run.json and report.html are written after a failure or Ctrl-C too: what finished is listed
        known = {r.slide for r in done}
        left = _left_behind([(p, d) for p, d in jobs if str(p) not in known], cfg, started) if state != "finished" else []
        try:
            _write_run_json(out, results + done + left, state)
        finally:
            _write_report(out)
    return results + done


def _write_report(out: Path) -> None:
    """``OUT/report.html`` (:mod:`wsi_nuclei.outputs.report`), best effort: the report is a view of the
    outputs, never the reason a run fails; a failure is one warning naming the command that retries."""
    from ..errors import shown
    from ..outputs.report import write_report

    try:
        write_report(out)
    except Exception as err:  # noqa: BLE001 - see above
        log.warning("%s: the batch report was not written (%s); run: wsi-nuclei report %s", shown(out / "report.html"),
                    str(err).splitlines()[0] if str(err) else type(err).__name__, shown(out))


def _left_behind(jobs: list[tuple[Path, Path]], cfg: SegmentConfig, started: float) -> list[SlideResult]:
    """Results of the slides the batch loop did not report before it stopped: "ok" when a slide's
    assembly finished this run anyway (verified), else "interrupted"."""
    from ..outputs.folder import slide_state
    from .plan import model_card, plan_keys, slide_config

    try:
        card, backend = model_card(cfg), cfg.engine()
    except Exception:  # noqa: BLE001 - a best effort while stopping
        card = None
    out = []
    for path, out_dir in jobs:
        try:
            if card is not None:
                ident, key, _ = plan_keys(path, slide_config(cfg, out_dir), card, backend)
                state = slide_state(out_dir, ident, key)
                if state.state == "finished" and (out_dir / "summary.json").stat().st_mtime >= started:
                    out.append(SlideResult(str(path), "ok", str(out_dir), state.nuclei, "finished while the run was stopping"))
                    continue
        except Exception:  # noqa: BLE001 - the slide then counts as not finished
            pass
        out.append(
            SlideResult(
                str(path), "interrupted", str(out_dir), reason="the run stopped before this slide finished; run again with --resume"
            )
        )
    return out


def _check_out(out: Path) -> None:
    """``out`` must be a folder this process can write, whose ``run.json`` and ``report.html`` (if
    any) are a batch's: checked once, before any slide."""
    from ..outputs.folder import check_writable
    from ..outputs.report import check_ours

    check_writable(out)
    check_ours(out)


def _write_run_json(out: Path, results: list[SlideResult], state: str) -> None:
    """``OUT/run.json``: this run's slides first, then the slides of earlier or concurrent runs into
    the same OUT that this run did not touch (their folders still there), so two runs into one OUT
    do not drop each other's slides. Read, merged and replaced under ``OUT/.run.lock``."""
    from ..errors import OutputError, shown
    from ..outputs.folder import SlideLock

    # absolute paths: the record reads the same from any working directory (and merges with the
    # runs started from another one); slide folders are OUT/<name>, matched by that name
    mine = [{**asdict(r), "slide": _absolute(r.slide), "out_dir": _absolute(r.out_dir)} for r in results]
    lock = SlideLock(out, name=".run.lock")
    deadline = time.monotonic() + 30
    while True:
        try:
            lock.acquire()
            break
        except OutputError:
            if time.monotonic() > deadline:  # another run holds it for long: write ours alone
                break
            time.sleep(0.1)
    try:
        try:
            old = json.loads((out / "run.json").read_text(encoding="utf-8")).get("slides", [])
        except (OSError, ValueError, AttributeError):
            old = []
        seen = {Path(r["out_dir"]).name for r in mine if r["out_dir"]}

        def carry(r: Any) -> bool:
            name = Path(str(r.get("out_dir") or "")).name if isinstance(r, dict) else ""
            return bool(name) and name not in seen and (out / name).is_dir()

        carried = [{**r, "out_dir": os.path.abspath(out / Path(r["out_dir"]).name)} for r in old if carry(r)]
        text = json.dumps({"version": __version__, "state": state, "slides": mine + carried}, indent=2, default=str) + "\n"
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(out / "run.json", text)
        except OSError as err:
            raise OutputError(f"{shown(out / 'run.json')}: cannot write the run's report ({err.strerror or err}); "
                              "the slides' own outputs are kept; free disk space and run again with --resume") from err
    finally:
        lock.release()


def _absolute(path: str) -> str:
    return os.path.abspath(path) if path else path


def segment_slide(
    path: Path | str, out_dir: Path | str, cfg: SegmentConfig | None = None, client: Any = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> SlideResult:
    """Segment one slide into ``out_dir`` (``mask.zarr``, ``nuclei.geojson.gz``, ``summary.json``,
    ``overlay.png``) with ``cfg`` (default :class:`SegmentConfig`). Raises the slide's
    :class:`~wsi_nuclei.errors.WsiNucleiError` on failure."""
    from .batch import BatchHooks, BatchOptions, run_batch

    cfg = cfg or SegmentConfig()
    cfg.check()
    options = BatchOptions(max_slides=1, raise_errors=True)
    (res,) = run_batch([(Path(path), Path(out_dir))], cfg, client, options, BatchHooks(on_chunk=on_chunk))
    return res
