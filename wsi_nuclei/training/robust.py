"""Context-robust training: a crop seen whole and cut short, and the losses that join the two.

Inference gives every forward pass only ``context_px`` of real tissue around what it keeps; past
that the window ends and the convolutions pad with zeros. A model whose output there depends on
tissue further away gives tiled outputs that differ from whole-image outputs, so it needs a wide
context. Here every crop is used twice:

- view **A**: the whole ``crop`` × ``crop`` image (ordinary supervised training);
- view **B**: a window cut out of A: a loss box of ``box`` px plus ``margin`` px of tissue on every
  side, where the tensor ends, exactly as an inference window ends (same zero padding).

B is supervised on its box, and a consistency loss pulls B's box towards A's (A's side detached):
the box must come out the same with ``margin`` px of context as with the whole crop. Margins are
drawn per step from ``TrainConfig.context_margins`` (windows must be multiples of 32 px).

Frames: working px; images (N, H, W, 3) uint8, targets (N, C, H, W) float32 as in :mod:`.targets`,
with the type index (0 = unknown, 1..n) as the last channel when the model has types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .options import TrainConfig
    from .trainset import Prepared

__all__ = ["ContextView", "draw_view", "make_pair_batch", "cut_window", "cut_box", "supervised_loss", "consistency_loss"]


@dataclass(frozen=True)
class ContextView:
    """Where view B lies in each crop of a batch.

    Attributes
    ----------
    margin : int
        Tissue kept around the loss box on every side (px).
    box : int
        Side of the loss box (px).
    origins : tuple of (int, int)
        Top-left (y, x) of each crop's window (box + 2·margin) inside the crop.
    """

    margin: int
    box: int
    origins: tuple[tuple[int, int], ...]

    @property
    def window(self) -> int:
        return self.box + 2 * self.margin


def draw_view(crop: int, box: int, margins: tuple[int, ...], n: int, rng: np.random.Generator) -> ContextView:
    """A margin from ``margins`` and a uniformly placed window per crop."""
    margin = int(margins[int(rng.integers(len(margins)))])
    win = box + 2 * margin
    if win > crop:
        raise ValueError(f"window {win} px (box {box} + 2 x margin {margin}) does not fit the {crop} px crop")
    origins = tuple((int(rng.integers(0, crop - win + 1)), int(rng.integers(0, crop - win + 1))) for _ in range(n))
    return ContextView(margin, box, origins)


def make_pair_batch(data: Prepared, cfg: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, ContextView]:
    """``cfg.batch_size // 2`` augmented crops (view A) with their targets and view B's placement:
    the two views of a crop make two of the batch's ``cfg.batch_size`` forward passes."""
    from .trainset import make_batch

    n = max(1, cfg.batch_size // 2)
    x, y = make_batch(data, cfg, rng, n=n)
    view = draw_view(cfg.crop, cfg.context_box, cfg.context_margins, n, rng)
    return x, y, view


def cut_window(arr: Any, view: ContextView, channels_first: bool) -> Any:
    """Each crop's window (box + margins), stacked: (N, w, w, 3) images or (N, C, w, w) arrays."""
    w = view.window
    parts = [(a[:, y : y + w, x : x + w] if channels_first else a[y : y + w, x : x + w]) for a, (y, x) in zip(arr, view.origins)]
    if isinstance(arr, np.ndarray):
        return np.ascontiguousarray(np.stack(parts))
    import torch

    return torch.stack(parts)


def cut_box(arr: Any, view: ContextView, in_window: bool) -> Any:
    """Each crop's loss box from (N, C, H, W): of a window (``in_window``) or of the whole crop."""
    import torch

    m, b = view.margin, view.box
    if in_window:
        return arr[:, :, m : m + b, m : m + b]
    return torch.stack([a[:, y + m : y + m + b, x + m : x + m + b] for a, (y, x) in zip(arr, view.origins)])


def supervised_loss(logits: Any, target: Any, outputs: tuple[str, ...], n_types: int, loss: str = "dice_bce",
                    type_weights: Any = None) -> Any:
    """Dice (+ BCE) on nucleus and boundary, 5 × MSE on the distance map, and a cross-entropy on
    the type logits over the pixels whose type is known (none when the batch has none)."""
    import torch
    import torch.nn.functional as F

    total = logits.new_zeros(())
    for i, name in enumerate(outputs):
        lg, tg = logits[:, i], target[:, i]
        prob = torch.sigmoid(lg)
        if name == "distance":
            total = total + F.mse_loss(prob, tg) * 5.0
            continue
        inter = (prob * tg).sum()
        total = total + 1 - (2 * inter + 1) / (prob.sum() + tg.sum() + 1)
        if loss == "dice_bce":
            pos_weight = torch.tensor(3.0 if name == "boundary" else 1.0, device=lg.device)
            total = total + F.binary_cross_entropy_with_logits(lg, tg, pos_weight=pos_weight)
    if n_types:
        k = len(outputs)
        kind = target[:, k].long()
        known = kind > 0
        if bool(known.any()):
            type_logits = logits[:, k : k + n_types].permute(0, 2, 3, 1)[known]
            total = total + F.cross_entropy(type_logits, kind[known] - 1, weight=type_weights)
    return total


def consistency_loss(logits_b: Any, logits_a: Any, outputs: tuple[str, ...], n_types: int, nucleus: Any) -> Any:
    """Mean squared difference of the two views' probabilities on the loss box: sigmoid outputs
    everywhere, type probabilities (softmax) on true nucleus pixels. ``logits_a`` is detached."""
    import torch

    k = len(outputs)
    a = logits_a.detach()
    total = ((torch.sigmoid(logits_b[:, :k]) - torch.sigmoid(a[:, :k])) ** 2).mean()
    if n_types:
        mask = nucleus > 0.5
        if bool(mask.any()):
            pb = torch.softmax(logits_b[:, k : k + n_types], dim=1).permute(0, 2, 3, 1)[mask]
            pa = torch.softmax(a[:, k : k + n_types], dim=1).permute(0, 2, 3, 1)[mask]
            total = total + ((pb - pa) ** 2).sum(dim=1).mean()
    return total
