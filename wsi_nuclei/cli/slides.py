"""Slide commands: info, and segment (options -> configs -> one batch call -> exit code)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import ConfigError, WsiNucleiError, shown
from ..pipeline.config import DEFAULT_CHUNK
from .common import _state, app, fail

if TYPE_CHECKING:  # annotations only: the commands import their heavy modules inside
    from ..cluster.client import ClusterConfig
    from ..pipeline.results import SlideResult
    from ..pipeline.segment import SegmentConfig


@app.command()
def info(
    slide: Path = typer.Argument(..., help="Slide file."),
    reader: str = typer.Option("auto", help="Slide reader: auto, openslide or tiffslide."),
) -> None:
    """Vendor, size per level, resolution, objective, bounds and associated images of a slide."""
    from ..slides.reader import open_slide

    try:
        with open_slide(slide, reader) as s:
            i = s.info
    except WsiNucleiError as err:
        fail(err)
        return
    typer.echo(
        f"{shown(i.path)}\n  reader   {i.reader}\n  vendor   {i.vendor}\n  mpp      "
        f"{i.level0_mpp if i.level0_mpp else 'unknown (pass --mpp to segment)'}"
    )
    typer.echo(f"  objective {i.objective or 'unknown'}\n  bounds   {i.bounds or 'none'}\n  associated {', '.join(i.associated) or 'none'}")
    for k, (dims, ds) in enumerate(zip(i.level_dimensions, i.level_downsamples)):
        typer.echo(f"  level {k}: {dims[0]} x {dims[1]} px, downsample {ds:g}")


def _help_all(ctx: typer.Context, value: bool) -> None:
    """``segment --help-all``: the help with the hidden (expert and SLURM) options shown."""
    if not value or ctx.resilient_parsing:
        return
    for param in ctx.command.params:
        if hasattr(param, "hidden"):
            param.hidden = False
    typer.echo(ctx.get_help())
    raise typer.Exit()


@app.command()
def segment(
    input_args: list[str] = typer.Argument(..., metavar="INPUTS", help="Slide files and/or folders (searched recursively)."),
    out_arg: str = typer.Option(..., "--out", "-o", help="Output folder: OUT/<slide>/ per slide and OUT/run.json."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    mpp: Optional[float] = typer.Option(None, help="µm per level-0 pixel, for slides without metadata (overrides it)."),
    unusual_mpp: bool = typer.Option(
        False, "--unusual-mpp", hidden=True, help="Accept a resolution outside 0.05-20 µm/px (from --mpp or the slide)."
    ),
    chunk_size: Optional[int] = typer.Option(
        None,
        help=f"Chunk core size in working px (multiple of 32). Default: {DEFAULT_CHUNK}, "
        "or 1024 where a CPU worker's memory cannot hold a whole chunk window in one forward pass "
        "(--dry-run shows the choice).",
    ),
    halo: Optional[int] = typer.Option(None, hidden=True, help="Instance halo in working px (default: largest nucleus, from the model)."),
    context: Optional[int] = typer.Option(None, help="Model context in working px (default: the model card's measured context_px)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    types: str = typer.Option(
        "on",
        "--types",
        help="on: a typed model's nucleus types as QuPath classes (Tumor, Immune cells, Stroma, Other); off: one class, Nucleus.",
    ),
    batch_size: Optional[int] = typer.Option(
        None, hidden=True, help="Tiles per model call when a window is split (default: as many as fit in memory)."
    ),
    forward_memory: Optional[str] = typer.Option(
        None,
        hidden=True,
        help="Memory a forward pass may use, e.g. 2GB (default: from the worker's memory "
        "limit, cgroup or RAM). A chunk window that does not fit is inferred in tiles.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished slides and reuse finished chunks of interrupted ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    keep_chunks: bool = typer.Option(False, "--keep-chunks", hidden=True, help="Keep the per-chunk result files after a slide finishes."),
    max_slides: int = typer.Option(2, hidden=True, help="Slides in flight at once (their chunks are scheduled together)."),
    no_tissue_mask: bool = typer.Option(False, "--no-tissue-mask", help="Process every chunk, not only tissue."),
    whole_windows: bool = typer.Option(
        False, "--whole-windows", hidden=True, help="Infer each chunk window whole, glass included (default: only its tissue, dilated)."
    ),
    box_step: int = typer.Option(
        32, hidden=True, help="Grow each chunk's tissue box to a multiple of this (px): fewer input shapes for compiled backends."
    ),
    fmt: str = typer.Option("geojson.gz", "--format", hidden=True, help="geojson.gz or geojson."),
    formats: str = typer.Option(
        "geojson,parquet", "--formats", help="Nucleus files: geojson (QuPath) and/or parquet (GeoParquet), comma-separated."
    ),
    raw_coordinates: bool = typer.Option(False, "--raw-coordinates", hidden=True, help="Keep raw level-0 coordinates (no bounds shift)."),
    reader: str = typer.Option("auto", hidden=True, help="Slide reader: auto, openslide or tiffslide."),
    backend: str = typer.Option(
        "auto", help="Inference: auto (OpenVINO, else ONNX Runtime on a CPU; torch on a GPU), torch, onnx or openvino."
    ),
    precision: str = typer.Option(
        "fp32",
        help="fp32; bf16: OpenVINO in bf16 on a CPU that has it natively (AVX512_BF16/AMX; faster "
        "forward passes); int8: ONNX Runtime on the model quantised once and cached (CPU). Both give "
        "slightly different nuclei: docs/performance.md.",
    ),
    assemble: str = typer.Option(
        "stream", hidden=True,
        help="Where the outputs are written: stream (by this process, while the chunks finish) or worker "
        "(one task on a worker after the last chunk: keeps the output I/O off this machine, e.g. a login node).",
        rich_help_panel="Cluster",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (and the SLURM job script) without running."),
    rate: Optional[float] = typer.Option(
        None, hidden=True, help="Seconds per mm² of tissue for one worker, for --dry-run's estimate (default: the model's measured rate)."
    ),
    cluster: str = typer.Option(
        "local", help="local (Dask LocalCluster), slurm (dask-jobqueue) or none (this process).", rich_help_panel="Cluster"
    ),
    scheduler: Optional[str] = typer.Option(
        None, help="Address of an existing Dask scheduler (tcp://host:port).", rich_help_panel="Cluster"
    ),
    connect_timeout: float = typer.Option(
        30.0, hidden=True, help="Seconds to wait for --scheduler before giving up.", rich_help_panel="Cluster"
    ),
    workers: int = typer.Option(1, help="Local worker processes (0: run in this process).", rich_help_panel="Cluster"),
    threads: Optional[int] = typer.Option(
        None,
        help="CPU threads of a forward pass (default 2; on SLURM without GPUs, --cores / --processes). "
        "A worker runs two chunks at once and their forward passes take turns.",
        rich_help_panel="Cluster",
    ),
    gpus: Optional[int] = typer.Option(
        None,
        help="GPUs: local: one worker per GPU (default: all visible when --device is cuda); slurm: GPUs per job.",
        rich_help_panel="Cluster",
    ),
    cluster_config: Optional[Path] = typer.Option(
        None, help="YAML file of SLURM options (e.g. workflows/jobqueue.yaml); flags override it.", rich_help_panel="SLURM"
    ),
    queue: Optional[str] = typer.Option(None, hidden=True, help="SLURM partition.", rich_help_panel="SLURM"),
    account: Optional[str] = typer.Option(None, hidden=True, help="SLURM account.", rich_help_panel="SLURM"),
    walltime: Optional[str] = typer.Option(None, hidden=True, help="Walltime per job, e.g. 04:00:00.", rich_help_panel="SLURM"),
    cores: Optional[int] = typer.Option(None, hidden=True, help="Cores per job.", rich_help_panel="SLURM"),
    memory: Optional[str] = typer.Option(None, hidden=True, help="Memory per job, e.g. 32GB.", rich_help_panel="SLURM"),
    processes: Optional[int] = typer.Option(
        None, hidden=True, help="Worker processes per job (default 1, or one per GPU).", rich_help_panel="SLURM"
    ),
    job_extra: list[str] = typer.Option(
        [], hidden=True, help="Extra #SBATCH directive, repeatable, e.g. --job-extra=--qos=long.", rich_help_panel="SLURM"
    ),
    min_jobs: Optional[int] = typer.Option(None, hidden=True, help="Adaptive scaling: fewest jobs.", rich_help_panel="SLURM"),
    max_jobs: Optional[int] = typer.Option(None, hidden=True, help="Adaptive scaling: most jobs.", rich_help_panel="SLURM"),
    worker_wait: Optional[str] = typer.Option(
        None,
        help="Stop (exit 75, resumable) after this long without any worker, e.g. jobs "
        "pending in the queue: 30m, 2h, 90s; 0: wait for ever (default 1h).",
        rich_help_panel="Cluster",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
    help_all: bool = typer.Option(
        False,
        "--help-all",
        is_eager=True,
        callback=_help_all,
        expose_value=False,
        help="Show every option, the expert and SLURM ones too (SLURM options also go in --cluster-config YAML).",
    ),
) -> None:
    """Segment nuclei in whole slides: mask.zarr, nuclei.geojson.gz (QuPath), nuclei.parquet, summary.json, pictures, OUT/report.html."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..cluster.client import close_client, make_client
    from ..cluster.slurm import NoWorkersError, WorkerWatch, parse_wait
    from ..pipeline.launch import configs, parse_size, prepare_model, queue_depth
    from ..pipeline.segment import segment_many

    console = Console(stderr=True, quiet=quiet)
    try:
        if not out_arg.strip() or any(not a.strip() for a in input_args):  # "" would mean the current folder
            raise WsiNucleiError("an input or -o is an empty path (an unset shell variable?); give the slides and the output folder")
        inputs, out = [Path(a) for a in input_args], Path(out_arg)
        from ..pipeline.config import parse_formats

        segment_options = dict(
            formats=parse_formats(formats), model_dir=str(model) if model else None, level0_mpp=mpp, unusual_mpp=unusual_mpp,
            chunk_size=chunk_size, halo=halo, context=context, tta=tta, types=_on_off("--types", types), batch_size=batch_size,
            forward_memory=parse_size(forward_memory, "--forward-memory"), device=device, tissue_mask=not no_tissue_mask,
            whole_windows=whole_windows, reader=reader, backend=backend, precision=precision, geojson_format=fmt,
            raw_coordinates=raw_coordinates, resume=resume, overwrite=overwrite, keep_chunks=keep_chunks, box_step=box_step,
            assemble=assemble,
        )
        slurm = {"queue": queue, "account": account, "walltime": walltime, "cores": cores, "memory": memory, "processes": processes,
                 "job_extra": tuple(job_extra), "min_jobs": min_jobs, "max_jobs": max_jobs,
                 "worker_wait_s": None if worker_wait is None else parse_wait(worker_wait)}
        cfg, ccfg = configs(segment_options, cluster=cluster, scheduler=scheduler, workers=workers, threads=threads, gpus=gpus,
                            connect_timeout=connect_timeout, cluster_yaml=cluster_config, slurm=slurm, dry_run=dry_run,
                            max_slides=max_slides)
        prepare_model(cfg, dry_run)  # a broken model fails here, once, not on every slide
        if dry_run:
            _dry_run(inputs, out, cfg, ccfg, max_slides, rate)
            return
        client = make_client(ccfg)
    except WsiNucleiError as err:
        fail(err)
        return
    import signal

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupted = _trap_ctrl_c()
    results: list[SlideResult] = []
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=quiet) as bar:
            task = bar.add_task("chunks", total=None)

            def on_chunk(i: int, n: int) -> None:
                bar.update(task, completed=i, total=n)

            def on_slide(r: SlideResult) -> None:
                bar.console.print(f"{r.status:7} {r.slide}: {r.nuclei} nuclei" + (f" — {r.reason}" if r.reason else ""))

            results = segment_many(inputs, out, cfg, client, on_slide, on_chunk, max_slides=max_slides, min_pending=queue_depth(ccfg),
                                   stop=lambda: bool(interrupted), watch=WorkerWatch(client, ccfg.worker_wait_s) if client else None)
    except NoWorkersError as err:  # EX_TEMPFAIL: nothing is wrong with the command, run it again later
        if not interrupted:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(75) from None  # the finally below cancels the jobs
    except WsiNucleiError as err:
        if not interrupted:
            fail(err)
            return
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        try:  # shutting down: a second Ctrl-C is only recorded, it cannot cut this short
            close_client(client)
        finally:
            if not interrupted:  # after a signal the handlers stay: more of them only add to the record
                signal.signal(signal.SIGINT, previous[0])
                signal.signal(signal.SIGTERM, previous[1])
    if interrupted:
        # exit 128 + the first signal: 130 for Ctrl-C, 143 for SIGTERM
        how = "interrupted" if interrupted[0] == signal.SIGINT else "terminated"
        typer.echo(f"{how}: finished chunks and slides are kept in {out}; run the same command with --resume to continue", err=True)
        raise typer.Exit(128 + int(interrupted[0]))
    if not quiet:
        _results_table(console, out, results)
    _report_failures(results)


def _results_table(console: Any, out: Path, results: list[SlideResult]) -> None:
    from rich.table import Table

    table = Table(title=f"wsi-nuclei segment → {out}")
    for col in ("slide", "status", "nuclei", "seconds", "note"):
        table.add_column(col)
    for r in results:
        table.add_row(shown(Path(r.slide).name), r.status, str(r.nuclei), f"{r.seconds:.1f}", r.reason[:80])
    console.print(table)


def _report_failures(results: list[SlideResult]) -> None:
    """One line per failed slide (with --debug its traceback first), then exit 1 if any failed."""
    from ..errors import shown

    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        if _state["debug"] and r.extra.get("error_file"):
            try:
                typer.echo(Path(r.extra["error_file"]).read_text(encoding="utf-8"), err=True)
            except OSError:
                pass
        typer.echo(f"error: {r.reason}" if shown(r.slide) in r.reason else f"error: {shown(r.slide)}: {r.reason}", err=True)
    if failed:
        raise typer.Exit(1)


def _trap_ctrl_c() -> list[int]:
    """Install SIGINT and SIGTERM handlers that only record the signal (in the returned list). The
    batch loop polls the record and stops itself (``segment_many(stop=...)``), so the interrupt
    never lands inside Dask's or tornado's code; the first signal decides the exit code (130 for
    Ctrl-C, 143 for SIGTERM: SLURM's scancel and walltime)."""
    import signal

    hit: list[int] = []

    def handler(signum: int, frame: object) -> None:
        hit.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return hit


def _dry_run(inputs: list[Path], out: Path, cfg: SegmentConfig, ccfg: ClusterConfig, max_slides: int, rate: float | None = None) -> None:
    """Print the SLURM job script (for --cluster slurm), the plan and its time estimate; runs and writes nothing."""
    from ..cluster.client import slurm_job_script
    from ..pipeline.estimate import describe_seconds, walltime
    from ..pipeline.launch import dry_estimate, dry_forward, dry_run_rows

    if ccfg.kind == "slurm" and not ccfg.scheduler:
        typer.echo(f"# SLURM job script (one per job; scaled adaptively {ccfg.min_jobs}..{ccfg.max_jobs} jobs)")
        typer.echo(slurm_job_script(ccfg))
    if ccfg.kind != "none" and not ccfg.gpus:
        typer.echo(f"# model: forward passes of {cfg.torch_threads} CPU threads, one at a time per worker (--threads)")
    forward = dry_forward(cfg, ccfg)
    typer.echo(f"# chunks: {cfg.chunk_size} px cores (--chunk-size)")
    if forward:
        typer.echo(f"# forward passes: {forward.line}")
    rows = dry_run_rows(inputs, out, cfg)
    est, how = dry_estimate(rows, cfg, ccfg, max_slides, forward, rate)
    times = iter(est.per_slide_s if est is not None else ())
    typer.echo(f"# plan: {len(rows)} slides -> {out} ({max_slides} in flight)")
    typer.echo("slide\tsize_level0\tmpp\tchunks\tgrid\ttissue_mm2\testimate_s\toutput\tnote")
    for r in rows:
        if r.error:
            typer.echo(f"{r.slide}\t\t\t\t\t\t\t{r.out_dir}\terror: {r.error}")
        else:
            t = f"{next(times):.0f}" if est is not None else ""
            typer.echo(f"{r.slide}\t{r.size[0]}x{r.size[1]}\t{r.level0_mpp:.4g}\t{r.chunks}\t{r.grid[0]}x{r.grid[1]}\t{r.tissue_mm2:.2f}\t{t}"
                       f"\t{r.out_dir}\t{r.state}")
    ok = [r for r in rows if not r.error]
    typer.echo(f"total: {len(rows)} slides, {sum(r.chunks for r in ok)} chunks, {sum(r.tissue_mm2 for r in ok):.2f} mm² of tissue; "
               "nothing was run (--dry-run)")
    if est is None:
        typer.echo(f"# estimate: none ({how})")
    else:
        peak = f", peak memory {est.worker_peak_bytes / 1e9:.1f} GB per worker" if est.worker_peak_bytes else ""
        measured = f" ({est.rate.measured})" if est.rate.measured else ""
        per = (f"{est.rate.s_per_mpx:.2f} s per Mpx of model input ({sum(r.model_mpx for r in ok):.0f} Mpx)" if est.rate.s_per_mpx > 0
               else f"{est.rate.s_per_mm2:.2f} s/mm²")
        typer.echo(f"# estimate: {describe_seconds(est.total_s)} wall ({how}){peak}; {per} per worker from {est.rate_from}{measured}")
        if ccfg.kind == "slurm" and not ccfg.scheduler:
            fewest = max(1, ccfg.min_jobs) * max(1, ccfg.processes)  # the jobs may not all start: plan for the fewest
            one = est.total_s * max(1, ccfg.max_jobs) * max(1, ccfg.processes) / fewest
            typer.echo(f"# proposed --walltime {walltime(one)} (the estimate with {max(1, ccfg.min_jobs)} job(s), x 1.5; "
                       f"now {ccfg.walltime})")
    if len(ok) < len(rows):  # the run would fail these: the same exit code as the run
        typer.echo(f"error: {len(rows) - len(ok)} of {len(rows)} slides would fail (the 'error:' notes above)", err=True)
        raise typer.Exit(1)


def _on_off(option: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise ConfigError(f"{option} must be on or off, got {value!r}")
    return value == "on"
