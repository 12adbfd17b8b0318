"""Model commands: train, tune, evaluate, measure-context, segment-image (each one library call)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError, WsiNucleiError, shown
from .common import DATA_ROOT_HELP, app, fail, set_threads


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for checkpoints, log.jsonl and the best model."),
    data: str = typer.Option(
        "monuseg",
        help="Training datasets with optional sampling weights, e.g. monuseg,consep:0.5 (train splits only), or a MoNuSeg-layout folder.",
    ),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    stain_augment: str = typer.Option(
        "hed", help="Stain augmentation: none, hed (HED jitter), macenko (random Macenko re-staining) or both."
    ),
    init: Optional[Path] = typer.Option(None, help="Start from this model folder's weights (fine-tuning), e.g. wsi_nuclei/weights."),
    validation: Optional[str] = typer.Option(
        None, help="Comma-separated held-out training image ids (default: 5 MoNuSeg, plus 3 CoNSeP train when CoNSeP trains)."
    ),
    recipe: str = typer.Option("ours", help="ours: instance model (nucleus+boundary+distance); paper: the seed paper's binary UNet++."),
    encoder: Optional[str] = typer.Option(None, help="smp encoder, e.g. tu-tf_efficientnet_lite0, efficientnet-b0."),
    pretrained: Optional[bool] = typer.Option(
        None,
        "--pretrained/--scratch",
        help="ImageNet encoder init (offline for tu-tf_efficientnet_lite0/1/2) or random init. Default: ImageNet for Lite0/1/2.",
    ),
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
    types: bool = typer.Option(False, "--types/--no-types", help="Also learn nucleus types (CoNSeP's 4 groups) where the data has them."),
    context_pairs: bool = typer.Option(
        False, help="Context-robust training: each crop seen whole and as a short window, with a consistency loss."
    ),
    context_margins: Optional[str] = typer.Option(
        None, help="Margins (px) the short window keeps around its loss box, e.g. 32,48,64,80,96."
    ),
    freeze_bn: bool = typer.Option(False, help="Batch-norm statistics fixed while training (as at inference)."),
    schedule: str = typer.Option("step", help="Learning-rate schedule: step (÷10 at --lr-drop-epoch) or cosine."),
    select: str = typer.Option(
        "worst_group", help="Checkpoint (and post-processing) selection on validation groups: worst_group, mean_minus_std or pooled."
    ),
    val_every: Optional[int] = typer.Option(None, help="Validate every this many epochs."),
    snapshot_every: int = typer.Option(0, help="Keep a copy of the model every this many epochs (0: none)."),
    probe_every: int = typer.Option(0, help="Log tiled-vs-whole agreement at 96 px context every this many epochs (0: never)."),
) -> None:
    """Train EfficientUnet++ on MoNuSeg (and CoNSeP) train, selecting on held-out training images."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..training import train as tr
    from ..training import trainset

    try:
        options = dict(encoder=encoder, pretrained=pretrained, working_mpp=mpp, epochs=epochs, steps_per_epoch=steps_per_epoch,
                       batch_size=batch_size, crop=crop, lr=lr, lr_drop_epoch=lr_drop_epoch, stain_augment=stain_augment,
                       exclude_groups=tuple(exclude_organ) or None, seed=seed, threads=threads, types=types or None,
                       context_pairs=context_pairs or None, freeze_bn=freeze_bn or None, schedule=schedule, select=select,
                       val_every=val_every, snapshot_every=snapshot_every or None, probe_every=probe_every or None,
                       context_margins=tuple(int(m) for m in context_margins.split(",")) if context_margins else None)
        cfg = tr.build_config(out, options, recipe=recipe, data=data, init=init, validation=validation)
        folder = Path(data) if Path(data).is_dir() else None
        root = folder or trainset.data_root(data_root)
        train_s, val_s = trainset.split_validation(trainset.load_training_samples(cfg, root, folder), cfg)
        from ..training.validation import check_groups

        command = " ".join(["wsi-nuclei", *sys.argv[1:]])
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                      TimeRemainingColumn(), disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task("train", total=cfg.epochs * cfg.steps_per_epoch, loss=0.0)
            tr.train(cfg, train_s, val_s, resume=resume, progress=lambda i, n, loss: bar.update(task, completed=i, loss=loss),
                     extra_card={"command": command,
                                 "dataset": ", ".join(f"{n} train (weight {w})" for n, w in cfg.data) + f" under {root}",
                                 "validation_images": sorted(s.name for s in val_s),
                                 "validation_groups": check_groups(train_s, val_s), "selection": cfg.select})
        if tune and val_s:
            typer.echo(json.dumps(tr.tune_model(out / "best", val_s, select=cfg.select)))
        typer.echo(f"best model: {out / 'best'}")
    except WsiNucleiError as err:
        fail(err)


@app.command()
def tune(
    model: Path = typer.Option(..., "--model", help="A model folder written by `wsi-nuclei train`."),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    tta: Optional[str] = typer.Option(None, "--tta", help="Tune (and store) for this test-time augmentation: none, flip4 or dihedral8."),
    select: str = typer.Option("worst_group", help="Score of a setting over the validation groups: worst_group, mean_minus_std or pooled."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: default)."),
) -> None:
    """Tune post-processing on the model's own validation images (from its card) and store it:
    the setting whose worst validation group does best, with the width of its plateau."""
    from ..model.network import load_card
    from ..training import train as tr
    from ..training import trainset

    try:
        set_threads(threads)
        if tta is not None:
            from ..model.tta import check_tta

            check_tta(tta)
        root = trainset.data_root(data_root)
        samples = tr.validation_samples(load_card(model), root)
        from ..training.validation import CRITERIA

        if select not in CRITERIA:
            raise ConfigError(f"--select must be one of {', '.join(CRITERIA)}, got {select!r}")
        command = f"wsi-nuclei tune --model {model} --data-root {root} --select {select}" + (f" --tta {tta}" if tta else "")
        result = tr.tune_model(model, samples, tta, command, select)
    except WsiNucleiError as err:
        fail(err)
        return
    typer.echo(json.dumps(result))


@app.command()
def evaluate(
    path: Path = typer.Argument(..., help="Dataset folder."),
    dataset: str = typer.Option(..., "--dataset", help="tnbc, monuseg-test, consep-test, monuseg, consep-train or folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    mpp: Optional[float] = typer.Option(None, help="µm/px of a 'folder' dataset's images (required for it)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (means, per-group and per-image rows)."),
    per_image: bool = typer.Option(
        False, "--per-image", help="Print a row per image too (the table shows the means and one row per tissue group)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: default)."),
    record: bool = typer.Option(False, "--record", help="For model authors: store the means in the model card under metrics.<dataset>."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    backend: str = typer.Option(
        "auto",
        help="Inference: auto (OpenVINO, else ONNX Runtime on a CPU when installed), torch, onnx or openvino: as the slide pipeline.",
    ),
    precision: str = typer.Option(
        "fp32", help="fp32, bf16 (OpenVINO, CPUs with native bf16) or int8 (ONNX Runtime on the quantised model): as the slide pipeline."
    ),
) -> None:
    """Pixel Dice/IoU, AJI, PQ (DQ, SQ), object F1 and size bias of a model on an annotated dataset."""
    from ..training.evaluate import evaluate_dataset

    try:
        report = evaluate_dataset(dataset, path, model_dir=model, mpp=mpp, limit=limit, device=device, threads=threads, tta=tta,
                                  backend=backend, precision=precision)
        if record:
            from ..training.evaluate import record_in_card

            record_in_card(report, model)
    except WsiNucleiError as err:
        fail(err)
        return
    if as_json:
        typer.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{dataset}: {report['n_images']} images, model {report['model']}")
    keys = ("dice", "iou", "aji", "pq", "dq", "sq", "f1", "size_bias")
    table.add_column("image")
    for k in keys:  # size: predicted / true area of the matched nuclei (below 1: outlines too tight)
        table.add_column("size" if k == "size_bias" else k, justify="right")
    if per_image:
        for row in report["images"]:
            table.add_row(row["name"], *(f"{row[k]:.3f}" for k in keys))
    if len(report["groups"]) > 1:
        for name, g in report["groups"].items():
            table.add_row(f"group {name} ({g['n_images']} img)", f"{g['dice']:.3f}", "", f"{g['aji']:.3f}", "", "", "", "", "")
    table.add_row("[bold]mean", *(f"[bold]{report[k]:.3f}" for k in keys))
    Console().print(table)
    if "types" in report:  # HoVer-Net's detection and per-type F1 (centroids paired within 3 µm)
        t = report["types"]
        typer.echo("F_d {:.3f}  ".format(t["f_d"]) + "  ".join(f"{k}: {v:.3f}" for k, v in t.items() if k.startswith("f_c_")))


@app.command("measure-rate")
def measure_rate_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    backend: str = typer.Option("auto", help="Inference backend, as segment's --backend."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: int = typer.Option(2, help="CPU threads of a forward pass, as segment's --threads."),
    write: bool = typer.Option(False, "--write", help="Store the rate in the model folder's rates.json (what --dry-run estimates from)."),
) -> None:
    """Measure this machine's speed on the bundled slide: seconds per mm² of tissue for one worker,
    the rate segment --dry-run estimates time from. Run it on the machine (or node type) you plan for."""
    import tempfile

    from ..model.network import DEFAULT_MODEL_DIR
    from ..pipeline.estimate import measure_rate, store_rate

    try:
        set_threads(threads)
        with tempfile.TemporaryDirectory(prefix="wsi-nuclei-rate-") as tmp:
            key, rate = measure_rate(model, backend, device, threads, Path(tmp))
        typer.echo(f"{key}: {rate.s_per_mm2:.2f} s per mm² of tissue, {rate.s_per_slide:.2f} s per slide ({rate.measured})")
        if write:
            typer.echo(f"written to {store_rate(model or DEFAULT_MODEL_DIR, key, rate)}")
    except WsiNucleiError as err:
        fail(err)


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
    from ..training.context import measure_on_slide

    try:
        set_threads(threads)
        result = measure_on_slide(model, slide, x, y, tiles, write)
    except WsiNucleiError as err:
        fail(err)
        return
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(f"{'context':>8}{'max|dp|':>10}{'p99.9|dp|':>11}{'AJI':>8}{'unmatched':>10}{'nuclei':>8}  ok")
    for r in result.rows:
        typer.echo(
            f"{r.context:>8}{r.max_abs:>10.4f}{r.p999_abs:>11.4f}{r.aji:>8.4f}{r.unmatched:>10}{r.n_whole:>8}  {'yes' if r.ok else 'no'}"
        )
    typer.echo(f"context_px = {result.context_px}" + (" (written to the card)" if write else ""))


@app.command("segment-image")
def segment_image_cmd(
    images: list[Path] = typer.Argument(..., help="RGB image files (PNG, JPEG, TIFF)."),
    mpp: float = typer.Option(..., help="µm per pixel of the images (e.g. 0.25 at 40x, 0.5 at 20x)."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none, flip4 or dihedral8 (default: the model card's)."),
    backend: str = typer.Option(
        "auto", help="Inference: auto (OpenVINO, else ONNX Runtime on a CPU when installed), torch, onnx or openvino."
    ),
    precision: str = typer.Option(
        "fp32",
        help="fp32; bf16: OpenVINO in bf16 on a CPU that has it natively (AVX512_BF16/AMX; faster forward passes); "
        "int8: ONNX Runtime on the model quantised once and cached (CPU; both opt-in, see docs/performance.md).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files of the output names that wsi-nuclei did not write."),
) -> None:
    """Segment nuclei in plain images: writes <name>_labels.png (16-bit ids), <name>_overlay.png
    and <name>_summary.json per image."""
    from ..api import segment_image_files

    failed = []
    try:
        for r in segment_image_files(images, mpp, out, model, device, tta, backend, precision, overwrite):
            if r.error:
                failed.append(r.error)
                continue
            typer.echo(f"{shown(Path(r.image).name)}: {r.nuclei} nuclei in {r.seconds:.2f} s -> {shown(r.overlay)}")
    except WsiNucleiError as err:
        fail(err)
    for reason in failed:  # a bad image does not stop the others; each is one line at the end
        typer.echo(f"error: {reason}", err=True)
    if failed:
        raise typer.Exit(1)
