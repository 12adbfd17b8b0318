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

from .config import check_mpp

if TYPE_CHECKING:
    from .backends import Predictor
    from .model import ModelCard

__all__ = ["segment_image", "segment_image_files", "ImageResult", "predictor", "SAMPLE_SLIDE"]

#: The bundled sample slide (OpenSlide test data CMU-1-Small-Region, CC0, 2220 x 2967 px at 0.499 µm/px).
SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"

def predictor(model: Path | str | None = None, device: str = "auto", backend: str = "auto") -> tuple[Predictor, ModelCard]:
    """The backend predictor (what the slide pipeline runs) and card of a model folder (default:
    the shipped model), built once per process, device and backend: the chunk tasks' own cache
    (:func:`wsi_nuclei.worker_cache.predictor`)."""
    from .infer import select_device
    from .worker_cache import predictor as cached

    predict, card, _ = cached(str(model) if model is not None else None, select_device(device), backend, 0)
    return predict, card


def segment_image(
    image: np.ndarray, mpp: float, model: Path | str | None = None, device: str = "auto", tta: str | None = None, backend: str = "auto",
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
    backend : {"auto", "torch", "onnx"}
        As ``wsi-nuclei segment --backend`` (auto: ONNX Runtime on a CPU when installed).

    Returns
    -------
    np.ndarray
        (H, W) int32 labels: 0 background, 1..N one id per nucleus.
    """
    from .errors import ConfigError
    from .infer import segment_image as _segment

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"image must be an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', type(image))} "
                          f"{getattr(image, 'dtype', '')}; convert it with np.asarray(PIL.Image.open(f).convert('RGB'))")
    check_mpp(mpp, "mpp")
    if tta is not None:
        from .tta import check_tta

        check_tta(tta)
    predict, card = predictor(model, device, backend)
    return _segment(predict, card, image, mpp, tta=tta)


@dataclass(frozen=True)
class ImageResult:
    """One image segmented by :func:`segment_image_files`."""

    image: str
    nuclei: int
    seconds: float
    overlay: str


def segment_image_files(
    paths: Sequence[Path | str], mpp: float, out: Path | str, model: Path | str | None = None, device: str = "auto",
    tta: str | None = None, backend: str = "auto",
) -> Iterator[ImageResult]:
    """Segment image files (PNG, JPEG, TIFF) at ``mpp`` µm/px into ``out``: per image
    ``<name>_labels.png`` (16-bit ids), ``<name>_overlay.png`` and ``<name>_summary.json``, each
    written atomically; yields one :class:`ImageResult` per image as it is done."""
    import numpy as np
    from PIL import Image

    from . import atomic
    from .datasets import read_rgb
    from .errors import ConfigError
    from .infer import select_device
    from .overlay import draw_outlines

    check_mpp(mpp, "--mpp")
    if tta is not None:
        from .tta import check_tta

        check_tta(tta)
    dev = select_device(device)
    _, card = predictor(model, dev, backend)  # a broken model fails before any image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"{path}: file not found; check the path")
        image = read_rgb(path)
        t0 = time.perf_counter()
        labels = segment_image(image, mpp, model, dev, tta, backend)
        seconds = time.perf_counter() - t0
        n = int(labels.max())
        if n >= 2**16:
            raise ConfigError(f"{path}: {n} nuclei do not fit a 16-bit label PNG; split the image")
        for suffix, pixels in (("labels", labels.astype(np.uint16)), ("overlay", draw_outlines(image, labels))):
            with atomic.replacing(out / f"{path.stem}_{suffix}.png") as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
        summary = {"image": str(path), "mpp": mpp, "nuclei": n, "seconds": round(seconds, 3), "model": card.model_id, "device": dev}
        atomic.write_text(out / f"{path.stem}_summary.json", json.dumps(summary, indent=2) + "\n")
        yield ImageResult(str(path), n, round(seconds, 3), str(out / f"{path.stem}_overlay.png"))
