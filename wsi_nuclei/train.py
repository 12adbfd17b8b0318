"""Train EfficientUnet++ on one or more datasets at the working resolution, with resume.

The data side (which images, resampling, weighted crops, augmentation) is :mod:`.trainset`.
Validation runs the exact post-processing of the
pipeline (:func:`wsi_nuclei.infer.segment_image`) on held-out training images and the best
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

from .datasets import Sample
from .errors import ConfigError
from .model import ModelCard, PostProcess
from .trainset import DEFAULT_VALIDATION, make_batch, prepare

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


def _loss(logits: Any, target: Any, cfg: TrainConfig) -> Any:
    import torch
    import torch.nn.functional as F

    total = logits.new_zeros(())
    for i, name in enumerate(cfg.outputs):
        lg, tg = logits[:, i], target[:, i]
        prob = torch.sigmoid(lg)
        if name == "distance":
            total = total + F.mse_loss(prob, tg) * 5.0
            continue
        inter = (prob * tg).sum()
        dice = 1 - (2 * inter + 1) / (prob.sum() + tg.sum() + 1)
        total = total + dice
        if cfg.loss == "dice_bce":
            pos_weight = torch.tensor(3.0 if name == "boundary" else 1.0, device=lg.device)
            total = total + F.binary_cross_entropy_with_logits(lg, tg, pos_weight=pos_weight)
    return total


def validate(model: Any, card: ModelCard, samples: list[Sample], post: PostProcess | None = None) -> dict[str, float | int]:
    """Mean metrics of ``model`` on ``samples`` with the pipeline's post-processing."""
    from .backends import make_predictor
    from .infer import segment_image
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
    from .backends import make_predictor
    from .infer import predict_probabilities, resize_image, resize_labels, working_shape
    from .instances import probabilities_to_instances
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
            labels = probabilities_to_instances(probs, card.outputs, post, card.working_mpp)
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
    from .model import load_model, save_model

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
        from .model import load_card

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
    training = {k: (_listify(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "postprocess"}
    training["out"] = str(cfg.out)
    training.update(extra)
    return ModelCard(encoder=cfg.encoder, outputs=cfg.outputs, working_mpp=cfg.working_mpp, postprocess=cfg.postprocess, training=training)


def train(
    cfg: TrainConfig,
    train_samples: list[Sample],
    val_samples: list[Sample],
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    extra_card: dict[str, Any] | None = None,
) -> ModelCard:
    """Train and return the card of the best model (by validation AJI; the last one without
    validation images). ``progress(step, total_steps, loss)`` is called after every step."""
    import torch

    from .model import build_model, load_imagenet_lite, load_model, save_model

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    extra = dict(extra_card or {})
    extra["train_images"] = sorted(s.name for s in train_samples)

    start_epoch, best_aji = 0, -1.0
    rng = np.random.default_rng(cfg.seed)
    if resume and state_path.is_file():
        model, _ = load_model(out / "last", check_hash=False)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        start_epoch, best_aji = int(state["epoch"]), float(state["best_aji"])
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s at epoch %d (best val AJI %.4f)", out, start_epoch, best_aji)
    elif cfg.init:
        model, init_card = load_model(cfg.init)
        init_decoder = tuple(init_card.training.get("decoder_channels") or cfg.decoder_channels)
        if init_card.encoder != cfg.encoder or tuple(init_card.outputs) != tuple(cfg.outputs) or init_decoder != tuple(cfg.decoder_channels):
            raise ConfigError(f"--init {cfg.init}: its model is {init_card.encoder} with outputs {list(init_card.outputs)} and decoder {list(init_decoder)}, "
                              f"the training asks for {cfg.encoder} with {list(cfg.outputs)} and {list(cfg.decoder_channels)}; pass matching --encoder")
        extra["init_sha256"] = init_card.weights_sha256
        state = None
    else:
        model = build_model(cfg.encoder, len(cfg.outputs), cfg.decoder_channels)
        if cfg.pretrained:
            from .model import IMAGENET_LITE

            if cfg.encoder not in IMAGENET_LITE:
                raise ConfigError(f"ImageNet weights are available offline only for {', '.join(IMAGENET_LITE)}, not {cfg.encoder}; pass --scratch")
            load_imagenet_lite(model, cfg.encoder)
        state = None
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if state is not None:
        opt.load_state_dict(state["optimizer"])

    data = prepare(train_samples, cfg)
    card = _card(cfg, extra)
    total = cfg.epochs * cfg.steps_per_epoch
    with open(out / "log.jsonl", "a", encoding="utf-8") as logf:
        for epoch in range(start_epoch, cfg.epochs):
            lr = cfg.lr if epoch < cfg.lr_drop_epoch else cfg.lr * 0.1
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            t0, losses = time.time(), []
            for step in range(cfg.steps_per_epoch):
                x, y = make_batch(data, cfg, rng)
                xt = _to_input(x, card).contiguous(memory_format=torch.channels_last)
                loss = _loss(model(xt), torch.from_numpy(y), cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if progress:
                    progress(epoch * cfg.steps_per_epoch + step + 1, total, losses[-1])
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr, "seconds": round(time.time() - t0, 1)}
            is_best = False
            if val_samples and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                metrics = validate(model, card, val_samples)
                row.update({f"val_{k}": v for k, v in metrics.items() if k in ("aji", "dice", "pq", "f1")})
                if metrics["aji"] > best_aji:
                    best_aji, is_best = float(metrics["aji"]), True
            save_model(model, replace(card, metrics={"epoch": epoch + 1}), out / "last")
            if is_best or not val_samples:
                save_model(model, replace(card, metrics={"epoch": epoch + 1, "val_aji": best_aji}), out / "best")
            torch.save(
                {"epoch": epoch + 1, "best_aji": best_aji, "optimizer": opt.state_dict(),
                 "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state()},
                state_path,
            )
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            log.info("epoch %s", row)
    from .model import load_card

    return load_card(out / "best")


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def _to_input(x: np.ndarray, card: ModelCard) -> Any:
    from .backends import to_tensor

    return to_tensor(x, card)
