"""Train EfficientUnet++ on one or more datasets at the working resolution, with resume.

The data side (which images, resampling, weighted crops, augmentation) is :mod:`.trainset`.
Validation runs the exact post-processing of the
pipeline (:func:`wsi_nuclei.model.infer.segment_image`) on held-out training images and the best
epoch by validation AJI is kept. TNBC, MoNuSeg test and CoNSeP test are never touched here.

Outputs in ``TrainConfig.out``: ``last/`` and ``best/`` model folders (safetensors + card),
``state.pt`` (optimizer, epoch and RNG state; written and read only by this module, loaded with
``weights_only=True``), and ``log.jsonl`` with one line per epoch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model.network import ModelCard, PostProcess
from .datasets import Sample
from .trainset import DEFAULT_VALIDATION, prepare

__all__ = ["TrainConfig", "PAPER_RECIPE", "STAIN_AUGMENTS", "train", "validate", "tune_postprocess", "tune_model",
           "build_config", "card_split", "validation_samples"]

log = logging.getLogger(__name__)

STAIN_AUGMENTS = ("none", "hed", "macenko", "both")


@dataclass(frozen=True)
class TrainConfig:
    """Training options (see ``wsi-nuclei train --help``)."""

    out: Path
    encoder: str = "tu-tf_efficientnet_lite0"
    pretrained: bool = True
    outputs: tuple[str, ...] = ("nucleus", "boundary", "distance")
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)
    working_mpp: float = 0.5
    crop: int = 256
    batch_size: int = 8
    epochs: int = 60
    steps_per_epoch: int = 20
    lr: float = 1e-3
    lr_drop_epoch: int = 50
    loss: str = "dice_bce"
    colour_augment: bool = True
    validation: tuple[str, ...] = DEFAULT_VALIDATION
    exclude_groups: tuple[str, ...] = ()
    #: (dataset, sampling weight) pairs; a crop's dataset is drawn with these weights.
    data: tuple[tuple[str, float], ...] = (("monuseg", 1.0),)
    stain_augment: str = "hed"
    #: A model folder whose weights start the training (fine-tuning); "" for a fresh model.
    init: str = ""
    val_every: int = 2
    seed: int = 0
    threads: int = 0
    postprocess: PostProcess = field(default_factory=PostProcess)
    #: Per-pixel nucleus types (CoNSeP's 4 groups) as extra logit channels, trained where known.
    types: bool = False
    #: Context-robust training: each crop seen whole and as a short window (:mod:`.robust`).
    context_pairs: bool = False
    context_box: int = 128
    context_margins: tuple[int, ...] = (32, 48, 64, 80, 96)
    consistency_weight: float = 10.0
    #: Batch-norm layers in eval mode while training (statistics as at inference).
    freeze_bn: bool = False
    #: Learning-rate schedule: step (÷10 from lr_drop_epoch) or cosine (to lr/100).
    schedule: str = "step"
    #: Checkpoint selection: worst_group, mean_minus_std or pooled (:mod:`.validation`).
    select: str = "pooled"
    #: Keep a copy of the model every this many epochs (0: none).
    snapshot_every: int = 0
    #: Log the tiled-vs-whole agreement at ``probe_context`` px every this many epochs (0: never).
    probe_every: int = 0
    probe_context: int = 96

    def check(self) -> None:
        for name in ("crop", "batch_size", "epochs", "steps_per_epoch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.crop % 32:
            raise ConfigError(f"--crop must be a multiple of 32 (UNet++ stride), got {self.crop}")
        if not self.working_mpp > 0:
            raise ConfigError(f"--mpp must be > 0, got {self.working_mpp}")
        if self.loss not in ("dice", "dice_bce"):
            raise ConfigError(f"--loss must be dice or dice_bce, got {self.loss!r}")
        if "nucleus" not in self.outputs:
            raise ConfigError("outputs must include 'nucleus'")
        if self.stain_augment not in STAIN_AUGMENTS:
            raise ConfigError(f"--stain-augment must be one of {', '.join(STAIN_AUGMENTS)}, got {self.stain_augment!r}")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"--schedule must be step or cosine, got {self.schedule!r}")
        from .validation import CRITERIA

        if self.select not in CRITERIA:
            raise ConfigError(f"--select must be one of {', '.join(CRITERIA)}, got {self.select!r}")
        if self.context_pairs:
            bad = [m for m in self.context_margins if (self.context_box + 2 * m) % 32 or self.context_box + 2 * m > self.crop]
            if not self.context_margins or bad:
                raise ConfigError(f"--context-margins {list(self.context_margins)}: each box ({self.context_box}) + 2 x margin must be a "
                                  f"multiple of 32 and fit the {self.crop} px crop; bad: {bad}")
        if not self.data or any(not w > 0 for _, w in self.data):
            raise ConfigError(f"--data needs at least one dataset, each with a weight > 0, got {list(self.data)}")


#: The seed paper: whole 1000x1000 MoNuSeg images resized to 256x256 (~0.98 µm/px), one output,
#: Dice loss, Adam 1e-4 then 1e-5 after epoch 25, batch 8, threshold 0.7, no instance separation.
#: Its encoder was ImageNet efficientnet-b5; offline only Lite0 has ImageNet weights, so the
#: default here is ImageNet Lite0 (pass --encoder efficientnet-b5 --scratch for the b5 network).
PAPER_RECIPE: dict[str, Any] = dict(
    encoder="tu-tf_efficientnet_lite0",
    pretrained=True,
    outputs=("nucleus",),
    decoder_channels=(256, 128, 64, 32, 16),
    working_mpp=0.25 * 1000 / 256,
    crop=256,
    lr=1e-4,
    lr_drop_epoch=25,
    loss="dice",
    postprocess=PostProcess(method="threshold", fg_threshold=0.7),
)


def validate(model: Any, card: ModelCard, samples: list[Sample], post: PostProcess | None = None) -> dict[str, float | int]:
    """Mean metrics of ``model`` on ``samples`` with the pipeline's post-processing."""
    from ..model.backends import make_predictor
    from ..model.infer import segment_image
    from .metrics import evaluate_pair, mean_metrics

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")  # the pipeline's torch path (the weights change every epoch)
    items = [evaluate_pair(s.labels, segment_image(predict, card, s.image, s.mpp, post)) for s in samples]
    return mean_metrics(items)


def tune_postprocess(
    model: Any, card: ModelCard, samples: list[Sample], tta: str | None = None
) -> tuple[PostProcess, dict[str, float]]:
    """Grid-search method and thresholds on ``samples`` (validation only), then the smallest
    nucleus area at the best thresholds (small pale specks on stroma are the commonest false
    detections); returns the best by mean AJI and the best AJI per method."""
    from ..model.backends import make_predictor
    from ..model.infer import predict_probabilities, resize_image, resize_labels, working_shape
    from ..nuclei.instances import probabilities_to_instances
    from .metrics import evaluate_pair

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")
    cached = []
    for s in samples:
        work = working_shape(s.image.shape[:2], s.mpp, card.working_mpp)
        cached.append((s, predict_probabilities(predict, card, resize_image(s.image, work), tta=tta)))
    methods: list[str] = [m for m in ("boundary", "distance") if m in card.outputs] or ["threshold"]
    grid: list[PostProcess] = []
    for method in methods:
        seeds = {"boundary": (0.2, 0.3, 0.4, 0.5, 0.6), "distance": (0.2, 0.3, 0.4, 0.5, 0.6)}.get(method, (0.5,))
        for fg in (0.3, 0.4, 0.5, 0.6, 0.7):
            for seed in seeds:
                grid.append(replace(card.postprocess, method=method, fg_threshold=fg, seed_threshold=seed))
    def score(post: PostProcess) -> float:
        ajis = []
        for s, probs in cached:
            labels = probabilities_to_instances(probs[: len(card.outputs)], card.outputs, post, card.working_mpp)
            ajis.append(evaluate_pair(s.labels, resize_labels(labels, s.labels.shape)).aji)
        return float(np.mean(ajis))

    best: tuple[float, PostProcess] = (-1.0, card.postprocess)
    per_method: dict[str, float] = {}
    for post in grid:
        value = score(post)
        per_method[post.method] = max(per_method.get(post.method, -1.0), value)
        log.info("tune %s fg=%.2f seed=%.2f: val AJI %.4f", post.method, post.fg_threshold, post.seed_threshold, value)
        if value > best[0]:
            best = (value, post)
    for area in (1.0, 3.0, 6.0, 10.0, 15.0):
        post = replace(best[1], min_area_um2=area)
        if post != best[1]:
            value = score(post)
            log.info("tune min_area_um2=%.1f: val AJI %.4f", area, value)
            if value > best[0]:
                best = (value, post)
    return best[1], per_method


def card_split(card: ModelCard, root: Path | str) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) images of the datasets a model card trained on, loaded from ``root``:
    validation is what the card names (``training.validation_images``, else ``validation``)."""
    from .trainset import load_training_samples, split_validation

    t = card.training
    names = tuple(t.get("validation_images") or t.get("validation") or DEFAULT_VALIDATION)
    cfg = TrainConfig(out=Path("."), data=tuple((str(n), float(w)) for n, w in t.get("data", [["monuseg", 1.0]])), validation=names)
    return split_validation(load_training_samples(cfg, root), cfg)


def validation_samples(card: ModelCard, root: Path | str) -> list[Sample]:
    """The validation images of a model card (see :func:`card_split`)."""
    return card_split(card, root)[1]


def tune_model(model_dir: Path | str, samples: list[Sample], tta: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Tune the post-processing of the model in ``model_dir`` on ``samples`` (its validation
    images, see :func:`validation_samples`) and store it in the card, for ``tta``
    (default: the card's). Test-set metrics recorded in the card are dropped: they were measured
    with the old setting. Returns what was chosen and the validation metrics."""
    from ..model.network import load_model, save_model

    if not samples:
        raise ConfigError(f"{model_dir}: no validation images to tune on")
    net, card = load_model(model_dir)
    card = replace(card, tta=tta or card.tta)
    post, per_method = tune_postprocess(net, card, samples, card.tta)
    val = validate(net, replace(card, postprocess=post), samples)
    metrics = {"epoch": card.metrics.get("epoch"), "val_aji": card.metrics.get("val_aji"), "val": val, "val_aji_by_method": per_method}
    training = {**card.training, "tune_command": command} if command else card.training
    save_model(net, replace(card, postprocess=post, metrics=metrics, training=training), model_dir)
    return {"postprocess": asdict(post), "tta": card.tta, "val": val, "val_aji_by_method": per_method}


def build_config(out: Path, options: dict[str, Any], recipe: str = "ours", data: str = "monuseg", init: Path | None = None,
                 validation: str | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig` from command-line style options: ``recipe`` (ours or
    paper) gives the defaults, ``options`` (None = not given) override them, ``data`` is a
    :func:`.trainset.parse_data` spec (or a MoNuSeg-layout folder), ``init`` a model folder to
    fine-tune (its encoder, outputs, decoder and post-processing are kept), ``validation`` a
    comma-separated list of held-out image ids (default: 5 MoNuSeg, plus 3 CoNSeP train images
    when CoNSeP trains)."""
    from dataclasses import fields

    from .trainset import CONSEP_VALIDATION, parse_data

    if recipe not in ("ours", "paper"):
        raise ConfigError(f"unknown --recipe {recipe!r}; use ours or paper")
    base: dict[str, Any] = dict(PAPER_RECIPE) if recipe == "paper" else {}
    base.update({k: v for k, v in options.items() if v is not None and k != "pretrained"})
    if options.get("pretrained") is not None:
        base["pretrained"] = options["pretrained"]
    elif "encoder" in base and not str(base["encoder"]).startswith("tu-tf_efficientnet_lite"):
        base["pretrained"] = False
    sources = (("monuseg", 1.0),) if Path(data).is_dir() else parse_data(data)
    base["data"] = sources
    if validation is not None:
        base["validation"] = tuple(v.strip() for v in validation.split(",") if v.strip())
    elif any(n == "consep" for n, _ in sources):
        base["validation"] = DEFAULT_VALIDATION + CONSEP_VALIDATION
    if init is not None:
        from ..model.network import load_card

        init_card = load_card(init)
        base["init"] = str(init)
        base.setdefault("encoder", init_card.encoder)
        base["outputs"] = tuple(init_card.outputs)
        base.setdefault("working_mpp", init_card.working_mpp)
        base["postprocess"] = init_card.postprocess
        if init_card.training.get("decoder_channels"):
            base["decoder_channels"] = tuple(init_card.training["decoder_channels"])
    valid = {f.name for f in fields(TrainConfig)}
    unknown = set(base) - valid
    if unknown:
        raise ConfigError(f"unknown training options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(out=Path(out), **base)
    cfg.check()
    return cfg


def _card(cfg: TrainConfig, extra: dict[str, Any]) -> ModelCard:
    from ..nuclei.classes import DEFAULT_TYPES, types_to_card

    training = {k: (_listify(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "postprocess"}
    training["out"] = str(cfg.out)
    training.update(extra)
    return ModelCard(encoder=cfg.encoder, outputs=cfg.outputs, working_mpp=cfg.working_mpp, postprocess=cfg.postprocess, training=training,
                     types=types_to_card(DEFAULT_TYPES) if cfg.types else ())


def _start_model(cfg: TrainConfig, extra: dict[str, Any]) -> Any:
    """A new model: the ``init`` folder's weights (its head widened for types), else ImageNet or random."""
    from ..model.network import IMAGENET_LITE, build_model, load_imagenet_lite, load_model
    from ..nuclei.classes import DEFAULT_TYPES
    from .steps import widen_head

    n_channels = len(cfg.outputs) + (len(DEFAULT_TYPES) if cfg.types else 0)
    model = build_model(cfg.encoder, n_channels, cfg.decoder_channels)
    if cfg.init:
        init_model, init_card = load_model(cfg.init)
        init_decoder = tuple(init_card.training.get("decoder_channels") or cfg.decoder_channels)
        if init_card.encoder != cfg.encoder or tuple(init_card.outputs) != tuple(cfg.outputs) or init_decoder != tuple(cfg.decoder_channels):
            raise ConfigError(f"--init {cfg.init}: its model is {init_card.encoder} with outputs {list(init_card.outputs)} and decoder {list(init_decoder)}, "
                              f"the training asks for {cfg.encoder} with {list(cfg.outputs)} and {list(cfg.decoder_channels)}; pass matching --encoder")
        widened = widen_head(model, init_model.state_dict())
        extra["init_sha256"] = init_card.weights_sha256
        if widened:
            extra["init_widened"] = widened
    elif cfg.pretrained:
        if cfg.encoder not in IMAGENET_LITE:
            raise ConfigError(f"ImageNet weights are available offline only for {', '.join(IMAGENET_LITE)}, not {cfg.encoder}; pass --scratch")
        load_imagenet_lite(model, cfg.encoder)
    return model


def train(
    cfg: TrainConfig,
    train_samples: list[Sample],
    val_samples: list[Sample],
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
) -> ModelCard:
    """Train and return the card of the best model (by ``cfg.select`` over validation groups; the
    last one without validation images). ``progress(step, total_steps, loss)`` is called after
    every step. A run stopped at any epoch and resumed (``resume``) continues bit for bit: the
    weights, the optimiser, both random generators and the best score are in ``state.pt``."""
    import torch

    from ..model.network import load_model
    from .steps import freeze_batchnorm, lr_at, step_loss
    from .trainset import type_weights

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    extra = dict(extra_card or {})
    extra["train_images"] = sorted(s.name for s in train_samples)

    start_epoch, best_score = 0, -1.0
    rng = np.random.default_rng(cfg.seed)
    state = None
    if resume and state_path.is_file():
        model, _ = load_model(out / "last", check_hash=False)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        start_epoch, best_score = int(state["epoch"]), float(state["best_aji"])
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        extra.update(json.loads(state.get("extra", "{}")))
        log.info("resuming %s at epoch %d (best %s %.4f)", out, start_epoch, cfg.select, best_score)
    else:
        model = _start_model(cfg, extra)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if state is not None:
        opt.load_state_dict(state["optimizer"])

    data = prepare(train_samples, cfg)
    card = _card(cfg, extra)
    weights = torch.from_numpy(type_weights(data, len(card.types))) if card.types else None
    probe = _probe_image(cfg, card)
    total = cfg.epochs * cfg.steps_per_epoch
    with open(out / "log.jsonl", "a", encoding="utf-8") as logf:
        for epoch in range(start_epoch, cfg.epochs):
            lr = lr_at(cfg, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            if cfg.freeze_bn:
                freeze_batchnorm(model)
            t0, losses = time.time(), []
            for step in range(cfg.steps_per_epoch):
                loss = step_loss(model, data, cfg, rng, card, weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if progress:
                    progress(epoch * cfg.steps_per_epoch + step + 1, total, losses[-1])
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr, "seconds": round(time.time() - t0, 1)}
            is_best, score = False, None
            if val_samples and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                score = _validate_row(model, card, val_samples, cfg, row)
                if score > best_score:
                    best_score, is_best = score, True
            if probe is not None and cfg.probe_every and (epoch + 1) % cfg.probe_every == 0:
                from .steps import probe_context

                row["probe"] = probe_context(model, card, cfg.probe_context, probe)
            _checkpoint(model, card, out, epoch + 1, cfg, is_best or not val_samples, best_score, row)
            torch.save(
                {"epoch": epoch + 1, "best_aji": best_score, "optimizer": opt.state_dict(),
                 "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state(),
                 "extra": json.dumps({k: v for k, v in extra.items() if k in ("init_sha256", "init_widened")})},
                state_path,
            )
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            log.info("epoch %s", row)
    from ..model.network import load_card

    return load_card(out / "best")


def _validate_row(model: Any, card: ModelCard, val_samples: list[Sample], cfg: TrainConfig, row: dict[str, Any]) -> float:
    """Validate, add the numbers to the log ``row`` and return the selection score."""
    from .steps import validate_groups
    from .validation import criterion

    res = validate_groups(model, card, val_samples)
    pooled = res["pooled"]
    row.update({f"val_{k}": v for k, v in pooled.items() if k in ("aji", "dice", "pq", "f1")})
    row["val_groups"] = {g: round(v.aji, 5) for g, v in res["groups"].items()}
    if "types" in res:
        row["val_types"] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in res["types"].items()}
    score = criterion(res["groups"], cfg.select, pooled=float(pooled["aji"]))
    row[f"val_{cfg.select}"] = round(score, 5)
    return score


def _checkpoint(model: Any, card: ModelCard, out: Path, epoch: int, cfg: TrainConfig, best: bool, best_score: float,
                row: dict[str, Any]) -> None:
    from ..model.network import save_model

    save_model(model, replace(card, metrics={"epoch": epoch}), out / "last")
    metrics = {"epoch": epoch, "val_aji": best_score, "select": cfg.select}
    if best:
        save_model(model, replace(card, metrics=metrics), out / "best")
    if cfg.snapshot_every and epoch % cfg.snapshot_every == 0:
        save_model(model, replace(card, metrics={"epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val")}}),
                   out / "snapshots" / f"epoch_{epoch:04d}")


def _probe_image(cfg: TrainConfig, card: ModelCard) -> np.ndarray | None:
    if not cfg.probe_every:
        return None
    from .steps import probe_image

    return probe_image(card, cfg.probe_context)


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v
