"""Training options: :class:`TrainConfig`, the recipes, the datasets ``--data`` names and the
held-out validation images, and :func:`build_config` from command-line style options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.network import PostProcess

__all__ = ["TrainConfig", "PAPER_RECIPE", "STAIN_AUGMENTS", "DEFAULT_VALIDATION", "CONSEP_VALIDATION", "DATA_SOURCES",
           "parse_data", "build_config"]

#: Held-out MoNuSeg training images for model selection: one per organ (5 organs).
DEFAULT_VALIDATION = (
    "TCGA-AR-A1AS-01Z-00-DX1",  # breast
    "TCGA-B0-5710-01Z-00-DX1",  # kidney
    "TCGA-21-5786-01Z-00-DX1",  # liver
    "TCGA-G9-6363-01Z-00-DX1",  # prostate
    "TCGA-RD-A8N9-01A-01-TS1",  # stomach
)
#: Held-out CoNSeP *train* images (293, 749 and 1242 nuclei), validation when CoNSeP trains.
CONSEP_VALIDATION = ("train_2", "train_13", "train_23")
#: Datasets ``--data`` names, their folders under the data root, and their loaders' split.
DATA_SOURCES = {"monuseg": "monuseg/train", "consep": "consep"}
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
    select: str = "worst_group"
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


def build_config(out: Path, options: dict[str, Any], recipe: str = "ours", data: str = "monuseg", init: Path | None = None,
                 validation: str | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig` from command-line style options: ``recipe`` (ours or
    paper) gives the defaults, ``options`` (None = not given) override them, ``data`` is a
    :func:`.trainset.parse_data` spec (or a MoNuSeg-layout folder), ``init`` a model folder to
    fine-tune (its encoder, outputs, decoder and post-processing are kept), ``validation`` a
    comma-separated list of held-out image ids (default: 5 MoNuSeg, plus 3 CoNSeP train images
    when CoNSeP trains)."""
    from dataclasses import fields


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




def parse_data(spec: str) -> tuple[tuple[str, float], ...]:
    """``"monuseg,consep:0.5"`` -> ``(("monuseg", 1.0), ("consep", 0.5))``: dataset names of
    :data:`DATA_SOURCES`, each with an optional sampling weight (default 1)."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, weight = item.partition(":")
        if name not in DATA_SOURCES:
            raise ConfigError(f"--data: unknown dataset {name!r}; use {', '.join(DATA_SOURCES)} (e.g. --data monuseg,consep:0.5)")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--data: weight of {name} must be a number, got {weight!r}") from None
        out.append((name, w))
    if not out or len({n for n, _ in out}) != len(out):
        raise ConfigError(f"--data must name each dataset once, got {spec!r}")
    return tuple(out)
