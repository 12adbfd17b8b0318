"""Command line: thin wrappers that parse options, call one library function and set the exit code.

Heavy imports (torch, smp) happen inside the commands so that ``wsi-nuclei --help`` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .errors import WsiNucleiError

if TYPE_CHECKING:  # annotations only: the CLI imports its heavy modules inside the commands
    from .cluster import ClusterConfig
    from .pipeline import SegmentConfig
    from .results import SlideResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Nuclei segmentation for H&E images with EfficientUnet++.")
_state = {"debug": False}
DATA_ROOT_HELP = "Folder holding monuseg/train and consep (default: $WSI_NUCLEI_DATA)."


def _fail(err: BaseException) -> None:
    if _state["debug"]:
        raise err
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    _state["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    if not verbose:  # Dask's scheduler and workers log every start and stop at INFO
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for checkpoints, log.jsonl and the best model."),
    data: str = typer.Option("monuseg", help="Training datasets with optional sampling weights, e.g. monuseg,consep:0.5 (train splits only), or a MoNuSeg-layout folder."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    stain_augment: str = typer.Option("hed", help="Stain augmentation: none, hed (HED jitter), macenko (random Macenko re-staining) or both."),
    init: Optional[Path] = typer.Option(None, help="Start from this model folder's weights (fine-tuning), e.g. wsi_nuclei/weights."),
    validation: Optional[str] = typer.Option(None, help="Comma-separated held-out training image ids (default: 5 MoNuSeg, plus 3 CoNSeP train when CoNSeP trains)."),
    recipe: str = typer.Option("ours", help="ours: instance model (nucleus+boundary+distance); paper: the seed paper's binary UNet++."),
    encoder: Optional[str] = typer.Option(None, help="smp encoder, e.g. tu-tf_efficientnet_lite0, efficientnet-b0."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--scratch", help="ImageNet encoder init (offline for tu-tf_efficientnet_lite0/1/2) or random init. Default: ImageNet for Lite0/1/2."),
    mpp: Optional[float] = typer.Option(None, help="Working resolution in µm/px (ours: 0.5)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs."),
    steps_per_epoch: Optional[int] = typer.Option(None, help="Optimizer steps per epoch."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per step."),
    crop: Optional[int] = typer.Option(None, help="Crop size in pixels at the working mpp (multiple of 32)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    lr_drop_epoch: Optional[int] = typer.Option(None, help="Epoch after which the learning rate is divided by 10."),
    exclude_organ: list[str] = typer.Option([], help="Leave out training images of this organ (e.g. breast: the paper's ablation)."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: torch's default)."),
    resume: bool = typer.Option(False, help="Continue from OUT/state.pt."),
    tune: bool = typer.Option(True, help="After training, tune post-processing thresholds on the validation images."),
) -> None:
    """Train EfficientUnet++ on MoNuSeg (and CoNSeP) train, selecting on held-out training images."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from . import train as tr
    from . import trainset

    try:
        options = dict(encoder=encoder, pretrained=pretrained, mpp=mpp, epochs=epochs, steps_per_epoch=steps_per_epoch,
                       batch_size=batch_size, crop=crop, lr=lr, lr_drop_epoch=lr_drop_epoch, stain_augment=stain_augment,
                       exclude_groups=tuple(exclude_organ) or None, seed=seed, threads=threads)
        cfg = tr.build_config(out, options, recipe=recipe, data=data, init=init, validation=validation)
        folder = Path(data) if Path(data).is_dir() else None
        root = folder or trainset.data_root(data_root)
        train_s, val_s = trainset.split_validation(trainset.load_training_samples(cfg, root, folder), cfg)
        command = " ".join(["wsi-nuclei", *sys.argv[1:]])
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                      TimeRemainingColumn(), disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task("train", total=cfg.epochs * cfg.steps_per_epoch, loss=0.0)
            tr.train(cfg, train_s, val_s, resume=resume, progress=lambda i, n, loss: bar.update(task, completed=i, loss=loss),
                     extra_card={"command": command,
                                 "dataset": ", ".join(f"{n} train (weight {w})" for n, w in cfg.data) + f" under {root}",
                                 "validation_images": sorted(s.name for s in val_s)})
        if tune and val_s:
            typer.echo(json.dumps(tr.tune_model(out / "best", val_s)))
        typer.echo(f"best model: {out / 'best'}")
    except WsiNucleiError as err:
        _fail(err)


@app.command()
def tune(
    model: Path = typer.Option(..., "--model", help="A model folder written by `wsi-nuclei train`."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    tta: Optional[str] = typer.Option(None, "--tta", help="Tune (and store) for this test-time augmentation: none, flip4 or dihedral8."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: default)."),
) -> None:
    """Tune post-processing on the model's own validation images (from its card) and store it."""
    from . import train as tr
    from . import trainset
    from .model import load_card

    try:
        _threads(threads)
        if tta is not None:
            from .tta import check_tta

            check_tta(tta)
        root = trainset.data_root(data_root)
        samples = tr.validation_samples(load_card(model), root)
        command = f"wsi-nuclei tune --model {model} --data-root {root}" + (f" --tta {tta}" if tta else "")
        result = tr.tune_model(model, samples, tta, command)
    except WsiNucleiError as err:
        _fail(err)
        return
    typer.echo(json.dumps(result))


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@app.command()
def evaluate(
    path: Path = typer.Argument(..., help="Dataset folder."),
    dataset: str = typer.Option(..., "--dataset", help="tnbc, monuseg-test, consep-test, monuseg, consep-train or folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    mpp: Optional[float] = typer.Option(None, help="µm/px of a 'folder' dataset (default 0.25)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (means and per-image rows)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: default)."),
    record: bool = typer.Option(False, "--record", help="For model authors: store the means in the model card under metrics.<dataset>."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    backend: str = typer.Option("auto", help="Inference: auto (ONNX Runtime on a CPU when installed), torch or onnx: as the slide pipeline."),
) -> None:
    """Pixel Dice/IoU, AJI, PQ (DQ, SQ) and object F1 of a model on an annotated dataset."""
    from .evaluate import evaluate_dataset

    try:
        report = evaluate_dataset(dataset, path, model_dir=model, mpp=mpp, limit=limit, device=device, threads=threads, tta=tta,
                                  backend=backend)
        if record:
            from .evaluate import record_in_card

            record_in_card(report, model)
    except WsiNucleiError as err:
        _fail(err)
        return
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{dataset}: {report['n_images']} images, model {report['model']}")
    keys = ("dice", "iou", "aji", "pq", "dq", "sq", "f1")
    table.add_column("image")
    for k in keys:
        table.add_column(k, justify="right")
    for row in report["images"]:
        table.add_row(row["name"], *(f"{row[k]:.3f}" for k in keys))
    table.add_row("[bold]mean", *(f"[bold]{report[k]:.3f}" for k in keys))
    Console().print(table)


@app.command("measure-context")
def measure_context_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    slide: Optional[Path] = typer.Option(None, help="Slide with tissue to measure on (default: the bundled CMU sample)."),
    x: int = typer.Option(600, help="Left of the region, working px."),
    y: int = typer.Option(1000, help="Top of the region, working px."),
    tiles: int = typer.Option(3, help="Tiles per side of the compared centre (256 working px each)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: default)."),
    write: bool = typer.Option(False, "--write", help="For model authors: store the result as context_px in the model card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure the model's context: the smallest tile context (multiple of 32) for which a tiled run
    equals a whole-image run (instance AJI >= 0.995, no unmatched nuclei, |Δp| 99.9th pct <= 0.05)."""
    from .context import measure_on_slide

    try:
        _threads(threads)
        result = measure_on_slide(model, slide, x, y, tiles, write)
    except WsiNucleiError as err:
        _fail(err)
        return
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(f"{'context':>8}{'max|dp|':>10}{'p99.9|dp|':>11}{'AJI':>8}{'unmatched':>10}{'nuclei':>8}  ok")
    for r in result.rows:
        typer.echo(f"{r.context:>8}{r.max_abs:>10.4f}{r.p999_abs:>11.4f}{r.aji:>8.4f}{r.unmatched:>10}{r.n_whole:>8}  {'yes' if r.ok else 'no'}")
    typer.echo(f"context_px = {result.context_px}" + (" (written to the card)" if write else ""))


@app.command("segment-image")
def segment_image_cmd(
    images: list[Path] = typer.Argument(..., help="RGB image files (PNG, JPEG, TIFF)."),
    mpp: float = typer.Option(..., help="µm per pixel of the images (e.g. 0.25 at 40x, 0.5 at 20x)."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    backend: str = typer.Option("auto", help="Inference: auto (ONNX Runtime on a CPU when installed), torch or onnx."),
) -> None:
    """Segment nuclei in plain images: writes <name>_labels.png (16-bit ids), <name>_overlay.png
    and <name>_summary.json per image."""
    from .api import segment_image_files

    try:
        if tta is not None:
            from .tta import check_tta

            check_tta(tta)
        for r in segment_image_files(images, mpp, out, model, device, tta, backend):
            typer.echo(f"{Path(r.image).name}: {r.nuclei} nuclei in {r.seconds:.2f} s -> {r.overlay}")
    except WsiNucleiError as err:
        _fail(err)


@app.command()
def info(slide: Path = typer.Argument(..., help="Slide file."), reader: str = typer.Option("auto", help="Slide reader: auto, openslide or tiffslide.")) -> None:
    """Vendor, size per level, resolution, objective, bounds and associated images of a slide."""
    from .slide import open_slide

    try:
        with open_slide(slide, reader) as s:
            i = s.info
    except WsiNucleiError as err:
        _fail(err)
        return
    typer.echo(f"{i.path}\n  backend  {i.backend}\n  vendor   {i.vendor}\n  mpp      {i.mpp if i.mpp else 'unknown (pass --mpp to segment)'}")
    typer.echo(f"  objective {i.objective or 'unknown'}\n  bounds   {i.bounds or 'none'}\n  associated {', '.join(i.associated) or 'none'}")
    for k, (dims, ds) in enumerate(zip(i.level_dimensions, i.level_downsamples)):
        typer.echo(f"  level {k}: {dims[0]} x {dims[1]} px, downsample {ds:g}")


@app.command()
def segment(
    inputs: list[Path] = typer.Argument(..., help="Slide files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/<slide>/ per slide and OUT/run.json."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    mpp: Optional[float] = typer.Option(None, help="µm per level-0 pixel, for slides without metadata."),
    chunk_size: int = typer.Option(1024, help="Chunk core size in working px (multiple of 32)."),
    halo: Optional[int] = typer.Option(None, help="Instance halo in working px (default: largest nucleus, from the model)."),
    context: Optional[int] = typer.Option(None, help="Model context in working px (default: the model card's measured context_px)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    batch_size: Optional[int] = typer.Option(None, help="Tiles per model call when a window is split (default: as many as fit in memory)."),
    forward_memory: Optional[str] = typer.Option(None, help="Memory a forward pass may use, e.g. 2GB (default: from the worker's memory "
                                                 "limit, cgroup or RAM). A chunk window that does not fit is inferred in tiles."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished slides and reuse finished chunks of interrupted ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    keep_chunks: bool = typer.Option(False, "--keep-chunks", help="Keep the per-chunk result files after a slide finishes."),
    max_slides: int = typer.Option(2, help="Slides in flight at once (their chunks are scheduled together)."),
    no_tissue_mask: bool = typer.Option(False, "--no-tissue-mask", help="Process every chunk, not only tissue."),
    fmt: str = typer.Option("geojson.gz", "--format", help="geojson.gz or geojson."),
    raw_coordinates: bool = typer.Option(False, "--raw-coordinates", help="Keep raw level-0 coordinates (no bounds shift)."),
    reader: str = typer.Option("auto", help="Slide reader: auto, openslide or tiffslide."),
    backend: str = typer.Option("auto", help="Inference: auto (ONNX Runtime on CPU, torch on GPU), torch or onnx."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (and the SLURM job script) without running."),
    cluster: str = typer.Option("local", help="local (Dask LocalCluster), slurm (dask-jobqueue) or none (this process).", rich_help_panel="Cluster"),
    scheduler: Optional[str] = typer.Option(None, help="Address of an existing Dask scheduler (tcp://host:port).", rich_help_panel="Cluster"),
    connect_timeout: float = typer.Option(30.0, help="Seconds to wait for --scheduler before giving up.", rich_help_panel="Cluster"),
    workers: int = typer.Option(1, help="Local worker processes (0: run in this process).", rich_help_panel="Cluster"),
    threads: Optional[int] = typer.Option(None, help="CPU threads of a forward pass (default 2; on SLURM without GPUs, --cores / --processes). "
                                          "A worker runs two chunks at once and their forward passes take turns.", rich_help_panel="Cluster"),
    gpus: Optional[int] = typer.Option(None, help="GPUs: local: one worker per GPU (default: all visible when --device is cuda); slurm: GPUs per job.", rich_help_panel="Cluster"),
    cluster_config: Optional[Path] = typer.Option(None, help="YAML file of SLURM options (e.g. workflows/jobqueue.yaml); flags override it.", rich_help_panel="SLURM"),
    queue: Optional[str] = typer.Option(None, help="SLURM partition.", rich_help_panel="SLURM"),
    account: Optional[str] = typer.Option(None, help="SLURM account.", rich_help_panel="SLURM"),
    walltime: Optional[str] = typer.Option(None, help="Walltime per job, e.g. 04:00:00.", rich_help_panel="SLURM"),
    cores: Optional[int] = typer.Option(None, help="Cores per job.", rich_help_panel="SLURM"),
    memory: Optional[str] = typer.Option(None, help="Memory per job, e.g. 32GB.", rich_help_panel="SLURM"),
    processes: Optional[int] = typer.Option(None, help="Worker processes per job (default 1, or one per GPU).", rich_help_panel="SLURM"),
    job_extra: list[str] = typer.Option([], help="Extra #SBATCH directive, repeatable, e.g. --job-extra=--qos=long.", rich_help_panel="SLURM"),
    min_jobs: Optional[int] = typer.Option(None, help="Adaptive scaling: fewest jobs.", rich_help_panel="SLURM"),
    max_jobs: Optional[int] = typer.Option(None, help="Adaptive scaling: most jobs.", rich_help_panel="SLURM"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or table."),
) -> None:
    """Segment nuclei in whole slides: mask.zarr, nuclei.geojson.gz (QuPath), summary.json, overlay.png."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .cluster import close_client, make_client
    from .launch import configs, parse_size, queue_depth
    from .model import load_model
    from .pipeline import segment_many

    console = Console(stderr=True, quiet=quiet)
    try:
        if max_slides <= 0:
            raise WsiNucleiError(f"--max-slides must be > 0, got {max_slides}")
        segment_options = dict(model_dir=str(model) if model else None, mpp=mpp, chunk_size=chunk_size, halo=halo, context=context, tta=tta,
                               batch_size=batch_size, forward_memory=parse_size(forward_memory, "--forward-memory"), device=device,
                               tissue_mask=not no_tissue_mask, reader=reader, backend=backend, geojson_format=fmt,
                               raw_coordinates=raw_coordinates, resume=resume, overwrite=overwrite, keep_chunks=keep_chunks)
        slurm = {"queue": queue, "account": account, "walltime": walltime, "cores": cores, "memory": memory, "processes": processes,
                 "job_extra": tuple(job_extra), "min_jobs": min_jobs, "max_jobs": max_jobs}
        cfg, ccfg = configs(segment_options, cluster, scheduler, workers, threads, gpus, connect_timeout, cluster_config, slurm, dry_run)
        load_model(model)  # a broken model fails here, once, not on every slide
        if dry_run:
            _dry_run(inputs, out, cfg, ccfg, max_slides)
            return
        client = make_client(ccfg)
    except WsiNucleiError as err:
        _fail(err)
        return
    import signal

    previous = signal.getsignal(signal.SIGINT)
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
                                   stop=lambda: bool(interrupted))
    except WsiNucleiError as err:
        if not interrupted:
            _fail(err)
            return
    except KeyboardInterrupt:
        interrupted.append(True)
    finally:
        try:  # shutting down: a second Ctrl-C is only recorded, it cannot cut this short
            close_client(client)
        finally:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        # exit 130 whenever a Ctrl-C arrived
        typer.echo(f"interrupted: finished chunks and slides are kept in {out}; run the same command with --resume to continue", err=True)
        raise typer.Exit(130)
    if not quiet:
        table = Table(title=f"wsi-nuclei segment → {out}")
        for col in ("slide", "status", "nuclei", "seconds", "note"):
            table.add_column(col)
        for r in results:
            table.add_row(Path(r.slide).name, r.status, str(r.nuclei), f"{r.seconds:.1f}", r.reason[:80])
        console.print(table)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        typer.echo(f"error: {r.reason}" if r.slide in r.reason else f"error: {r.slide}: {r.reason}", err=True)
    if failed:
        raise typer.Exit(1)


def _trap_ctrl_c() -> list[bool]:
    """Install a SIGINT handler that only records the Ctrl-C (in the returned list). The batch
    loop polls the record and stops itself (``segment_many(stop=...)``), so the interrupt never
    lands inside Dask's or tornado's code; the record decides the exit code (130)."""
    import signal

    hit: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        hit.append(True)

    signal.signal(signal.SIGINT, handler)
    return hit


def _dry_run(inputs: list[Path], out: Path, cfg: SegmentConfig, ccfg: ClusterConfig, max_slides: int) -> None:
    """Print the SLURM job script (for --cluster slurm) and the plan; runs and writes nothing."""
    from .cluster import slurm_job_script
    from .launch import dry_forward, dry_run_rows

    if ccfg.kind == "slurm" and not ccfg.scheduler:
        typer.echo(f"# SLURM job script (one per job; scaled adaptively {ccfg.min_jobs}..{ccfg.max_jobs} jobs)")
        typer.echo(slurm_job_script(ccfg))
    if ccfg.kind != "none" and not ccfg.gpus:
        typer.echo(f"# model: forward passes of {cfg.torch_threads} CPU threads, one at a time per worker (--threads)")
    forward = dry_forward(cfg, ccfg)
    if forward:
        typer.echo(f"# forward passes: {forward.line}")
    rows = dry_run_rows(inputs, out, cfg)
    planned = [r for r in rows if not r.error or r.out_dir]
    typer.echo(f"# plan: {len(planned)} slides -> {out} ({max_slides} in flight)")
    typer.echo("slide\tsize_level0\tmpp\tchunks\tgrid\ttissue_mm2\toutput\tnote")
    for r in rows:
        if r.error:
            typer.echo(f"{r.slide}\t\t\t\t\t\t{r.out_dir}\terror: {r.error}")
        else:
            typer.echo(f"{r.slide}\t{r.size[0]}x{r.size[1]}\t{r.mpp:.4g}\t{r.chunks}\t{r.grid[0]}x{r.grid[1]}\t{r.tissue_mm2:.2f}\t{r.out_dir}\t{r.state}")
    ok = [r for r in rows if not r.error]
    typer.echo(f"total: {len(planned)} slides, {sum(r.chunks for r in ok)} chunks, {sum(r.tissue_mm2 for r in ok):.2f} mm² of tissue; "
               "nothing was run (--dry-run)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
