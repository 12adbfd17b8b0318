"""Train EfficientUnet++ on one or more datasets at the working resolution, with resume.

The data side (which images, resampling, weighted crops, augmentation) is :mod:`.trainset`.
Validation runs the exact post-processing of the
pipeline (:func:`wsi_nuclei.model.infer.segment_array`) on held-out training images and the best
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model.network import ModelCard
from .datasets import Sample
from .options import PAPER_RECIPE, STAIN_AUGMENTS, TrainConfig, build_config
from .trainset import prepare
from .tuning import card_split, tune_model, tune_postprocess, validate, validation_samples

__all__ = ["TrainConfig", "PAPER_RECIPE", "STAIN_AUGMENTS", "train", "validate", "tune_postprocess", "tune_model",
           "build_config", "card_split", "validation_samples"]

log = logging.getLogger(__name__)

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
        if (
            init_card.encoder != cfg.encoder
            or tuple(init_card.outputs) != tuple(cfg.outputs)
            or init_decoder != tuple(cfg.decoder_channels)
        ):
            raise ConfigError(
                f"--init {cfg.init}: its model is {init_card.encoder} with outputs {list(init_card.outputs)} and decoder "
                f"{list(init_decoder)}, "
                f"the training asks for {cfg.encoder} with {list(cfg.outputs)} and {list(cfg.decoder_channels)}; pass matching --encoder"
            )
        widened = widen_head(model, init_model.state_dict())
        extra["init_sha256"] = init_card.weights_sha256
        if widened:
            extra["init_widened"] = widened
    elif cfg.pretrained:
        if cfg.encoder not in IMAGENET_LITE:
            raise ConfigError(
                f"ImageNet weights are available offline only for {', '.join(IMAGENET_LITE)}, not {cfg.encoder}; pass --scratch"
            )
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
