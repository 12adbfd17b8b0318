"""The notebook-sized entry points: segment an image array with the shipped model in one call.

Slides go through :func:`wsi_nuclei.segment_slide` / :func:`wsi_nuclei.segment_many` (the same
pipeline as ``wsi-nuclei segment``); this module adds what a plain image needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import WsiNucleiError, shown
from .pipeline.config import check_mpp

if TYPE_CHECKING:
    from .model.backends import Predictor
    from .model.network import ModelCard

__all__ = ["segment_image", "segment_image_files", "ImageResult", "predictor", "SAMPLE_SLIDE"]

#: The bundled sample slide (OpenSlide test data CMU-1-Small-Region, CC0, 2220 x 2967 px at 0.499 µm/px).
SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"

def predictor(model: Path | str | None = None, device: str = "auto", backend: str = "auto",
              precision: str = "fp32") -> tuple[Predictor, ModelCard]:
    """The backend predictor (what the slide pipeline runs) and card of a model folder (default:
    the shipped model), built once per process, device, backend and precision: the chunk tasks' own
    cache (:func:`wsi_nuclei.pipeline.worker_cache.cached_predictor`). ``precision="int8"`` runs ONNX Runtime on
    the quantised model (quantised once and cached, as ``segment --precision int8``);
    ``precision="bf16"`` OpenVINO in bf16 (CPUs with native bf16 only)."""
    from .model.backends import resolve_backend
    from .model.infer import select_device
    from .pipeline.worker_cache import cached_predictor as cached

    dev = select_device(device)
    predict, card, _ = cached(str(model) if model is not None else None, dev, resolve_backend(backend, dev, precision), 0)
    return predict, card


def segment_image(
    image: np.ndarray, mpp: float, model: Path | str | None = None, device: str = "auto", tta: str | None = None, backend: str = "auto",
    precision: str = "fp32",
) -> np.ndarray:
    """Nucleus instances of one RGB image (as ``wsi-nuclei segment-image``).

    Parameters
    ----------
    image : np.ndarray
        (H, W, 3) uint8 RGB (an RGBA or greyscale image: convert it first).
    mpp : float
        µm per pixel of ``image`` (0.25 at 40x, 0.5 at 20x); it is resampled to the model's.
    model : path, optional
        A model folder (default: the shipped model); loaded once per process and device.
    device : {"auto", "cpu", "cuda"}
    tta : {"none", "flip4", "dihedral8"}, optional
        Test-time augmentation (default: the model card's).
    backend : {"auto", "torch", "onnx", "openvino"}
        As ``wsi-nuclei segment --backend`` (auto: OpenVINO, else ONNX Runtime on a CPU; torch on a GPU).
    precision : {"fp32", "bf16", "int8"}
        As ``wsi-nuclei segment --precision`` (bf16: OpenVINO in bf16 on a CPU that has it natively;
        int8: ONNX Runtime on the quantised model; both opt-in, see docs/performance.md for what
        they cost in accuracy).

    Returns
    -------
    np.ndarray
        (H, W) int32 labels: 0 background, 1..N one id per nucleus.
    """
    from .errors import ConfigError
    from .model.infer import segment_array as _segment

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"image must be an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', type(image))} "
                          f"{getattr(image, 'dtype', '')}; convert it with np.asarray(PIL.Image.open(f).convert('RGB'))")
    check_mpp(mpp, "mpp", override="")
    if tta is not None:
        from .model.tta import check_tta

        check_tta(tta)
    predict, card = predictor(model, device, backend, precision)
    return _segment(predict, card, image, mpp, tta=tta)


@dataclass(frozen=True)
class ImageResult:
    """One image segmented by :func:`segment_image_files`."""

    image: str
    nuclei: int
    seconds: float
    overlay: str
    error: str = ""  # why the image was not segmented (one line); the others go on


def segment_image_files(
    paths: Sequence[Path | str], mpp: float, out: Path | str, model: Path | str | None = None, device: str = "auto",
    tta: str | None = None, backend: str = "auto", precision: str = "fp32", overwrite: bool = False,
) -> Iterator[ImageResult]:
    """Segment image files (PNG, JPEG, TIFF) at ``mpp`` µm/px into ``out``: per image
    ``<name>_labels.png`` (16-bit ids), ``<name>_overlay.png`` and ``<name>_summary.json``, each
    written atomically; yields one :class:`ImageResult` per image as it is done (with ``error`` set
    for an image that could not be segmented: the next one goes on). Images whose names collide
    get ``<name>_<extension>``. Files of those names that this tool did not write for the same
    image (e.g. a user's own ``<name>_labels.png`` masks) are never replaced without ``overwrite``:
    that image fails with one line, and the others go on."""
    from .errors import ConfigError
    from .model.infer import select_device

    check_mpp(mpp, "--mpp", override="")
    if tta is not None:
        from .model.tta import check_tta

        check_tta(tta)
    dev = select_device(device)
    _, card = predictor(model, dev, backend, precision)  # a broken model (or --precision) fails before any image
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{shown(out)}: cannot write outputs ({err.strerror or err}); choose a writable -o folder") from None
    for path in map(Path, paths):  # a path that is not there is a command-line error: nothing starts
        if not path.exists():
            raise ConfigError(f"{shown(path)}: file not found; check the path")
    used: set[str] = set()
    for path in map(Path, paths):
        name = path.stem if path.stem not in used else f"{path.stem}_{path.suffix.lstrip('.') or 'image'}"
        while name in used:
            name += "_"
        used.add(name)
        try:
            if not overwrite:
                _check_not_theirs(path, name, out)
            yield _one_image(path, name, mpp, out, model, dev, tta, backend, precision, card.model_id)
        except WsiNucleiError as err:  # the next image goes on
            yield ImageResult(str(path), 0, 0.0, "", error=str(err))


IMAGE_OUTPUTS = ("labels.png", "overlay.png", "summary.json")


def _check_not_theirs(path: Path, name: str, out: Path) -> None:
    """Refuse to replace ``out/<name>_*`` files that an earlier run of this tool did not write for
    ``path`` (its summary names the image): they may be the user's own."""
    from .errors import OutputError

    existing = [out / f"{name}_{suffix}" for suffix in IMAGE_OUTPUTS if (out / f"{name}_{suffix}").exists()]
    if not existing:
        return
    try:
        ours = json.loads((out / f"{name}_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ours = None
    if isinstance(ours, dict) and "model" in ours and Path(str(ours.get("image", ""))).name == path.name:
        return  # a rerun over our own outputs of this image (given by another path, perhaps)
    raise OutputError(f"{shown(existing[0])}: exists and was not written by wsi-nuclei for {shown(path)}; "
                      "pass --overwrite to replace it, or choose another -o folder")


def _one_image(path: Path, name: str, mpp: float, out: Path, model: Path | str | None, dev: str, tta: str | None, backend: str,
               precision: str, model_id: str) -> ImageResult:
    from PIL import Image

    from . import atomic
    from .errors import ConfigError
    from .outputs.overlay import draw_outlines
    from .training.datasets import read_rgb

    if path.is_dir():
        raise ConfigError(f"{shown(path)}: is a folder; give the image files (e.g. {shown(path)}/*.png)")
    if not path.is_file():
        raise ConfigError(f"{shown(path)}: file not found; check the path")
    image = read_rgb(path)
    t0 = time.perf_counter()
    labels = segment_image(image, mpp, model, dev, tta, backend, precision)
    seconds = time.perf_counter() - t0
    n = int(labels.max())
    if n >= 2**16:
        raise ConfigError(f"{shown(path)}: {n} nuclei do not fit a 16-bit label PNG; split the image")
    for suffix, pixels in (("labels", labels.astype(np.uint16)), ("overlay", draw_outlines(image, labels))):
        with atomic.replacing(out / f"{name}_{suffix}.png") as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    from .model.backends import resolve_backend

    summary = {"image": str(path), "mpp": mpp, "nuclei": n, "seconds": round(seconds, 3), "model": model_id, "device": dev,
               "backend": resolve_backend(backend, dev, precision), "precision": precision}
    atomic.write_text(out / f"{name}_summary.json", json.dumps(summary, indent=2) + "\n")
    return ImageResult(str(path), n, round(seconds, 3), str(out / f"{name}_overlay.png"))
