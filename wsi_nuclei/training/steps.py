"""The parts of a training run that :func:`wsi_nuclei.training.train.train` strings together: the model
to start from, one optimiser step's loss, the learning-rate schedule, grouped validation and the
context probe. Frames: working px; see :mod:`.robust` for the two views of a crop."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..model.network import ModelCard, PostProcess
from .datasets import Sample

if TYPE_CHECKING:
    from .options import TrainConfig
    from .trainset import Prepared

__all__ = ["lr_at", "freeze_batchnorm", "widen_head", "step_loss", "validate_groups", "probe_context", "probe_image"]

log = logging.getLogger(__name__)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``step`` (÷10 from ``lr_drop_epoch``) or ``cosine``
    (from ``lr`` down to ``lr / 100`` at the last epoch)."""
    if cfg.schedule == "cosine":
        t = epoch / max(cfg.epochs - 1, 1)
        return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    return cfg.lr if epoch < cfg.lr_drop_epoch else cfg.lr * 0.1


def freeze_batchnorm(model: Any) -> int:
    """Put every batch-norm layer in eval mode (running statistics fixed, affine still trained),
    so training normalises as inference does; returns how many layers."""
    import torch

    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def widen_head(model: Any, state: dict[str, Any]) -> list[str]:
    """Load ``state`` (a model with fewer output channels) into ``model``: every tensor that fits
    is copied; the segmentation head's first channels are copied and the new ones keep their
    random initialisation. Returns the names of the widened tensors."""
    import torch

    own = model.state_dict()
    widened = []
    for name, tensor in state.items():
        if name not in own:
            raise ConfigError(f"--init: tensor {name} has no place in the new model; pass an --init of the same encoder and decoder")
        if own[name].shape == tensor.shape:
            own[name] = tensor
        elif name.startswith("segmentation_head") and own[name].shape[1:] == tensor.shape[1:] and own[name].shape[0] > tensor.shape[0]:
            own[name] = torch.cat([tensor, own[name][tensor.shape[0]:]])
            widened.append(name)
        else:
            raise ConfigError(f"--init: tensor {name} is {tuple(tensor.shape)}, the new model needs {tuple(own[name].shape)}")
    model.load_state_dict(own, strict=True)
    return widened


def step_loss(model: Any, data: Prepared, cfg: TrainConfig, rng: np.random.Generator, card: ModelCard, weights: Any) -> Any:
    """One step's loss: a plain batch, or (``cfg.context_pairs``) two views of each crop with
    their supervised and consistency losses (:mod:`.robust`)."""
    import torch

    from ..model.backends import to_tensor
    from .robust import consistency_loss, cut_box, cut_window, make_pair_batch, supervised_loss
    from .trainset import make_batch

    n_types = len(card.types)

    def run(images: np.ndarray) -> Any:
        return model(to_tensor(images, card).contiguous(memory_format=torch.channels_last))

    if not cfg.context_pairs:
        x, y = make_batch(data, cfg, rng)
        return supervised_loss(run(x), torch.from_numpy(y), cfg.outputs, n_types, cfg.loss, weights)
    x, y, view = make_pair_batch(data, cfg, rng)
    yt = torch.from_numpy(y)
    logits_a = run(x)
    logits_b = run(cut_window(x, view, channels_first=False))
    box_b = cut_box(logits_b, view, in_window=True)
    box_a = cut_box(logits_a, view, in_window=False)
    box_y = cut_box(yt, view, in_window=False)
    loss = supervised_loss(logits_a, yt, cfg.outputs, n_types, cfg.loss, weights)
    loss = loss + supervised_loss(box_b, box_y, cfg.outputs, n_types, cfg.loss, weights)
    return loss + cfg.consistency_weight * consistency_loss(box_b, box_a, cfg.outputs, n_types, box_y[:, 0])


def validate_groups(model: Any, card: ModelCard, samples: list[Sample], post: PostProcess | None = None) -> dict[str, Any]:
    """Pooled means, per-group scores (:mod:`.validation`) and, on typed samples, the detection
    and per-type F1 (:mod:`.type_metrics`) of ``model`` with the pipeline's post-processing."""
    from ..model.backends import make_predictor
    from ..model.infer import segment_array, segment_array_typed
    from .metrics import evaluate_pair, mean_metrics
    from .type_metrics import TypeCounts, typed_nuclei
    from .validation import group_scores, sample_group

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")
    items, rows, counts = [], [], TypeCounts()
    for s in samples:
        if card.types and s.types is not None:
            labels, kinds = segment_array_typed(predict, card, s.image, s.mpp, post)
            counts.add(typed_nuclei(s.labels, s.types), typed_nuclei(labels, kinds), radius=3.0 / s.mpp)  # 3 µm: HoVer-Net's 12 px at 0.25
        else:
            labels = segment_array(predict, card, s.image, s.mpp, post)
        m = evaluate_pair(s.labels, labels)
        items.append(m)
        rows.append((sample_group(s), m.aji, m.dice, m.n_true))
    out: dict[str, Any] = {"pooled": mean_metrics(items), "groups": group_scores(rows)}
    if card.types and counts.true_paired:
        out["types"] = counts.scores(len(card.types))
    return out


def probe_context(model: Any, card: ModelCard, context: int, image: np.ndarray) -> dict[str, float | int]:
    """Tiled (256 px tiles, ``context`` px) against whole on ``image`` (working px, side
    n·256 + 2·context): measure-context's three numbers at one context."""
    from ..model.backends import make_predictor
    from .context import measure_context

    model.eval()
    predict, _ = make_predictor(model, card, "torch", "cpu")
    row = measure_context(predict, card, image, candidates=(context,))[0]
    return {"context": context, "p999": round(row.p999_abs, 5), "aji": round(row.aji, 5), "unmatched": row.unmatched, "ok": row.ok}


def probe_image(card: ModelCard, context: int, tiles: int = 3) -> np.ndarray:
    """The centre of measure-context's default region on the bundled sample, with ``context`` px
    around it: the square the context probe runs on."""
    from .context import CANDIDATES, DEFAULT_REGION, region_image

    x, y = (v + max(CANDIDATES) - context for v in DEFAULT_REGION)
    return region_image(card, None, x, y, tiles * 256 + 2 * context)
