"""int8 inference on a CPU: ONNX Runtime static quantisation of the exported model.

The recipe (:data:`RECIPE`), chosen on the validation images cut from the training sets:

- QDQ format, signed 8-bit activations and weights (ONNX Runtime's advice for x86 CPUs), weights
  per output channel;
- only ``Conv`` nodes, and not the first three nor the last three (the stem sees raw normalised
  RGB, the heads give the probabilities the instance step thresholds: quantising them cost the most
  accuracy for the least time);
- activation ranges from the 99.999th percentile of their histograms, over
  :data:`CALIBRATION_IMAGE`: 32 crops of 256 x 256 px at the model's 0.5 µm/px, cut from MoNuSeg
  2018 *training* images that are not validation images (``int8_calibration.txt`` says which).

The quantised model is written once per weights hash, torch version and recipe, next to the fp32
export in the model cache (``<sha16>-torch<version>-int8-<recipe>.onnx``), under a temporary name
and renamed, like the fp32 export. int8 is opt-in (``--precision int8``): docs/performance.md has
its accuracy and speed beside fp32, from ``benchmarks/precision_gate.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

__all__ = ["RECIPE", "CALIBRATION_IMAGE", "calibration_tiles", "int8_name", "quantize"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGE = Path(__file__).parent.parent / "data" / "int8_calibration.jpg"
CALIBRATION_TILE = 256
RECIPE: dict[str, Any] = {"format": "QDQ", "activations": "int8", "weights": "int8-per-channel", "ops": ["Conv"],
                          "skip_first": 3, "skip_last": 3, "calibration": "percentile-99.999", "batch": 4}


def calibration_tiles(path: Path = CALIBRATION_IMAGE, tile: int = CALIBRATION_TILE) -> np.ndarray:
    """The calibration crops: (N, tile, tile, 3) uint8 cut from the mosaic ``path``."""
    from PIL import Image

    with Image.open(path) as im:
        mosaic = np.asarray(im.convert("RGB"))
    rows, cols = mosaic.shape[0] // tile, mosaic.shape[1] // tile
    return np.stack([mosaic[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)])


def _recipe_key() -> str:
    data = json.dumps(RECIPE, sort_keys=True).encode() + hashlib.sha256(CALIBRATION_IMAGE.read_bytes()).digest()
    return hashlib.sha256(data).hexdigest()[:8]


def int8_name(fp32: Path) -> Path:
    """Where the int8 model of the fp32 export ``fp32`` is cached (beside it)."""
    return fp32.with_name(f"{fp32.stem}-int8-{_recipe_key()}.onnx")


class _Reader:
    """ONNX Runtime's calibration data reader over the calibration crops, normalised as the model's
    input (``normalise``: (N, H, W, 3) uint8 -> (N, 3, H, W) float32)."""

    def __init__(self, tiles: np.ndarray, normalise: Callable[[np.ndarray], np.ndarray], batch: int) -> None:
        self._batches: Iterator[np.ndarray] = (normalise(tiles[i:i + batch]) for i in range(0, len(tiles), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {"input": x}


def _conv_names(model_path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type == "Conv"]


@contextlib.contextmanager
def _root_logger_quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(fp32: Path, out: Path, name: str, normalise: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray | None = None) -> Path:
    """Quantise the fp32 ONNX model ``fp32`` (of the model ``name``) to ``out`` with :data:`RECIPE`,
    calibrating on ``tiles`` (default: :func:`calibration_tiles`) through ``normalise``; atomic."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .. import atomic

    tiles = calibration_tiles() if tiles is None else tiles
    convs = _conv_names(fp32)
    skip = convs[:RECIPE["skip_first"]] + convs[len(convs) - RECIPE["skip_last"]:]
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("quantising %s to int8 (%d of %d convolutions, %d calibration crops; once per model)", name,
             len(convs) - len(skip), len(convs), len(tiles))
    try:
        # the calibrator prints its progress and logs each rescaled bias on the root logger
        with atomic.replacing(out) as tmp, contextlib.redirect_stdout(io.StringIO()), _root_logger_quiet():
            quantize_static(str(fp32), str(tmp), _Reader(tiles, normalise, RECIPE["batch"]), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=RECIPE["ops"], per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=skip, calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibPercentile": 99.999, "CalibTensorRangeSymmetric": False},
                            calibration_providers=["CPUExecutionProvider"], use_external_data_format=False)
    except Exception as err:
        raise ModelError(f"cannot quantise the model to int8 ({type(err).__name__}: {err}); use --precision fp32") from err
    return out
