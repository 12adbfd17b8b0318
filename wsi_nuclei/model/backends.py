"""Inference backends behind one interface: a batch of RGB tiles in, sigmoid probabilities out.

- ``torch``: the model in eval mode, channels_last, ``inference_mode``; on CUDA with bf16 autocast
  and ``cudnn.benchmark``.
- ``onnx``: ONNX Runtime on the CPU (2-2.8x faster than eager torch on this kind of CPU). The
  model is exported once per weights file (sigmoid included) and cached as
  ``<cache>/<weights sha256[:16]>-<torch version>.onnx`` (``WSI_NUCLEI_CACHE``, default
  ``~/.cache/wsi-nuclei``), written under a temporary name and renamed, so concurrent workers
  never read a half-written file. Outputs equal torch's within 1e-4 (a test).
- ``openvino``: Intel's OpenVINO Runtime on the CPU, running the same cached ONNX export (outputs
  equal ONNX Runtime's within 1e-4, a test; faster on this CPU, docs/performance.md).
- ``auto``: torch on a GPU; on a CPU OpenVINO when it is installed, else ONNX Runtime, else torch.
- ``openvino-bf16``: what ``--precision bf16`` resolves to: OpenVINO on the same fp32 export with
  bf16 arithmetic, only on a CPU with native bf16 (AVX512_BF16 or AMX; about twice as fast a
  forward pass as fp32 on a Zen 4 VM, within the accuracy gate, docs/performance.md). A worker whose CPU lacks it stops
  with a clear error instead of quietly computing in fp32 (a slide's chunks never mix precisions).
- ``onnx-int8``: what ``--precision int8`` resolves to: ONNX Runtime on the statically quantised
  export (:mod:`wsi_nuclei.model.quantize`), cached beside the fp32 one. ONNX Runtime only: OpenVINO ran
  the same int8 model with less agreement with fp32 (docs/performance.md).

A predictor takes (N, H, W, 3) uint8 tiles (H, W multiples of 32) and returns (N, C, H, W) float32.

On a CPU, forward passes take turns through :data:`MODEL_GATE`: one at a time per process. The
model already uses every core it is given, so a second forward pass only competes with it, but a
second chunk task can read its region, find instances and write polygons while the first holds
the gate (see ``CPU_TASKS`` in :mod:`wsi_nuclei.cluster.client`).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..errors import ConfigError, ModelError

__all__ = [
    "Predictor",
    "make_predictor",
    "to_tensor",
    "onnx_available",
    "openvino_available",
    "resolve_backend",
    "BACKENDS",
    "cache_dir",
    "usable_cache_dir",
    "MODEL_GATE",
    "gate_wait_seconds",
    "PRECISIONS",
    "INT8_BACKEND",
    "BF16_BACKEND",
    "REDUCED",
    "backend_precision",
    "cpu_has_bf16",
    "int8_path",
    "ensure_int8",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
#: the concrete backends of ``--precision int8`` / ``bf16`` (the names in plans, summaries and reports)
INT8_BACKEND = "onnx-int8"
BF16_BACKEND = "openvino-bf16"
#: each reduced precision: (the one --backend it runs on besides auto, its concrete backend name)
REDUCED = {"int8": ("onnx", INT8_BACKEND), "bf16": ("openvino", BF16_BACKEND)}
Predictor = Callable[[np.ndarray], np.ndarray]
#: held by a CPU forward pass: one at a time per process (the pre- and post-processing around it is not)
MODEL_GATE = threading.Lock()
_WAITED = threading.local()


@contextmanager
def _model_turn() -> Iterator[None]:
    """Hold :data:`MODEL_GATE`; the time spent waiting for it adds to this thread's total."""
    t0 = time.perf_counter()
    with MODEL_GATE:
        _WAITED.seconds = gate_wait_seconds() + time.perf_counter() - t0
        yield


def gate_wait_seconds() -> float:
    """Seconds this thread has waited for :data:`MODEL_GATE` so far."""
    return float(getattr(_WAITED, "seconds", 0.0))


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    try:
        import onnx  # noqa: F401  (the export)
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether OpenVINO finds native bf16 arithmetic on this CPU (AVX512_BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def backend_precision(name: str) -> tuple[str, str]:
    """(``--backend``, ``--precision``) of a backend name: ``onnx-int8`` -> ("onnx", "int8"),
    ``openvino-bf16`` -> ("openvino", "bf16"), any other name -> (name, "fp32")."""
    return next(((runs_on, p) for p, (runs_on, concrete) in REDUCED.items() if concrete == name), (name, "fp32"))


def resolve_backend(backend: str, device: str, precision: str = "fp32", check_cpu: bool = True) -> str:
    """The concrete backend for ``backend`` on ``device`` at ``precision`` (``onnx-int8`` for int8,
    ``openvino-bf16`` for bf16; a concrete name resolves to itself, checked on this machine).
    ``check_cpu=False``: do not ask this CPU for bf16 (the work runs on other machines, which check
    their own when they build the predictor)."""
    if backend in (concrete for _, concrete in REDUCED.values()):
        backend, precision = backend_precision(backend)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision in REDUCED:
        runs_on, concrete = REDUCED[precision]
        if device != "cpu":
            raise ConfigError(f"--precision {precision} runs on the CPU; use --precision fp32 with --device {device} "
                              "(on a GPU the torch backend runs in bf16 autocast)")
        if backend not in ("auto", runs_on):
            raise ConfigError(f"--precision {precision} runs on --backend {runs_on}; use --backend auto or {runs_on}, not {backend}")
        resolve_backend(runs_on, device)  # installed? (that backend's own check and message)
        if precision == "bf16" and check_cpu and not cpu_has_bf16():
            raise ConfigError(f"--precision bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX), and this one "
                              f"({platform.node() or 'this machine'}) has none; use --precision fp32")
        return concrete
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "auto":
        if device != "cpu":
            return "torch"
        return "openvino" if openvino_available() else "onnx" if onnx_available() else "torch"
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError(f"--backend openvino runs on the CPU; use --backend torch with --device {device}")
        if not openvino_available():
            raise ConfigError("--backend openvino needs onnx and openvino: pip install 'wsi-nuclei[openvino]'")
    if backend == "onnx":
        if device != "cpu":
            raise ConfigError(f"--backend onnx runs on the CPU; use --backend torch with --device {device}")
        if not onnx_available():
            raise ConfigError("--backend onnx needs onnx and onnxruntime: pip install 'wsi-nuclei[onnx]'")
    return backend


def cache_dir() -> Path:
    """The folder of exported models: ``$WSI_NUCLEI_CACHE``, else ``~/.cache/wsi-nuclei``."""
    return Path(os.environ.get("WSI_NUCLEI_CACHE") or Path.home() / ".cache" / "wsi-nuclei")


_usable: dict[str, Path] = {}


def usable_cache_dir() -> Path:
    """:func:`cache_dir` if this process can write it, else a folder under the system's temporary
    folder (with one warning that names the cause and the fix). A read-only ``$HOME`` is common on
    compute nodes: the run goes on, exporting the model once per node instead of once."""
    import tempfile

    wanted = cache_dir()
    if str(wanted) in _usable:
        return _usable[str(wanted)]
    try:
        atomic.probe_write(wanted / "onnx")
        found = wanted
    except OSError as err:
        found = Path(tempfile.gettempdir()) / f"wsi-nuclei-cache-{os.getuid()}"
        (found / "onnx").mkdir(parents=True, exist_ok=True)
        log.warning("cannot write the model cache %s (%s); using %s instead (set WSI_NUCLEI_CACHE to a writable folder to keep it)",
                    wanted, err.strerror or err, found)
        os.environ["WSI_NUCLEI_CACHE"] = str(found)  # workers started from here inherit it
        _usable[str(found)] = found
    _usable[str(wanted)] = found
    return found


def _normalise(tiles: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    x = tiles.astype(np.float32) * np.float32(1 / 255.0)
    x -= mean
    x /= std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_tensor(images: np.ndarray, card: Any) -> Any:
    """(N, H, W, 3) uint8 -> the model's input: normalised (N, 3, H, W) float32 torch tensor
    (the one input normalisation; ONNX Runtime gets the same values from ``_normalise``)."""
    import torch

    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(card.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(card.input_std).view(1, 3, 1, 1)
    return (x - mean) / std


def _torch_predictor(model: Any, card: Any, device: str) -> Predictor:
    import torch

    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    model = model.to(device).to(memory_format=torch.channels_last).eval()

    def forward(tiles: np.ndarray) -> np.ndarray:
        x = to_tensor(tiles, card).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x)
            else:
                logits = model(x)
            return torch.sigmoid(logits.float()).cpu().numpy()

    if device.startswith("cuda"):
        return forward

    def predict(tiles: np.ndarray) -> np.ndarray:
        # on a CPU the normalisation and sigmoid run on torch's thread pool too: all inside the turn
        with _model_turn():
            return forward(tiles)

    return predict


def export_onnx(model: Any, card: Any, path: Path) -> Path:
    """Export ``model`` (+ sigmoid) to ONNX with dynamic batch and size; atomic."""
    import torch

    class _WithSigmoid(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.net(x))

    path.parent.mkdir(parents=True, exist_ok=True)
    import copy
    import warnings

    # a copy in the default memory format: exporting a channels_last module gives wrong outputs
    net = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    wrapped = _WithSigmoid(net)
    dummy = torch.zeros(1, 3, 256, 256)
    axes = {"input": {0: "n", 2: "h", 3: "w"}, "prob": {0: "n", 2: "h", 3: "w"}}
    try:
        with atomic.replacing(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (dummy,), str(tmp), input_names=["input"], output_names=["prob"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
    except Exception as err:
        raise ModelError(f"cannot export the model to ONNX ({type(err).__name__}: {err}); use --backend torch") from err
    log.info("exported %s to %s", card.name, path)
    return path


def onnx_path(card: Any) -> Path:
    import torch

    key = card.weights_sha256[:16] or "unhashed"
    return usable_cache_dir() / "onnx" / f"{key}-torch{torch.__version__.split('+')[0]}.onnx"


def int8_path(card: Any) -> Path:
    """Where the int8 model of ``card``'s weights is cached: beside the fp32 export."""
    from .quantize import int8_name

    return int8_name(onnx_path(card))


def ensure_int8(model: Any, card: Any) -> Path:
    """The cached int8 model of ``model``/``card``, exported and quantised first when missing."""
    from .quantize import quantize

    path = int8_path(card)
    if path.exists() and card.weights_sha256:
        return path
    fp32 = onnx_path(card)
    if not fp32.exists() or not card.weights_sha256:
        export_onnx(model, card, fp32)
    mean, std = np.asarray(card.input_mean, np.float32), np.asarray(card.input_std, np.float32)
    return quantize(fp32, path, card.name, lambda tiles: _normalise(tiles, mean, std))


def _onnx_predictor(model: Any, card: Any, threads: int, int8: bool = False) -> Predictor:
    import onnxruntime as ort

    def prepare() -> Path:
        if int8:
            return ensure_int8(model, card)
        path = onnx_path(card)
        if not path.exists() or not card.weights_sha256:
            export_onnx(model, card, path)
        return path

    path = prepare()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # a damaged cache file: export again once
        log.warning("re-exporting the ONNX model (%s)", err)
        path.unlink(missing_ok=True)
        if int8:
            onnx_path(card).unlink(missing_ok=True)
        path = prepare()
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    mean = np.asarray(card.input_mean, np.float32)
    std = np.asarray(card.input_std, np.float32)

    def predict(tiles: np.ndarray) -> np.ndarray:
        with _model_turn():
            out = session.run(None, {"input": _normalise(tiles, mean, std)})[0]
        return np.asarray(out, dtype=np.float32)

    return predict


def _openvino_predictor(model: Any, card: Any, threads: int, bf16: bool = False) -> Predictor:
    import openvino as ov

    path = onnx_path(card)
    if not path.exists() or not card.weights_sha256:
        export_onnx(model, card, path)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", **({"INFERENCE_NUM_THREADS": str(threads)} if threads else {})}
    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as err:  # a damaged cache file: export again once
        log.warning("re-exporting the ONNX model (%s)", err)
        export_onnx(model, card, path)
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    mean = np.asarray(card.input_mean, np.float32)
    std = np.asarray(card.input_std, np.float32)

    def predict(tiles: np.ndarray) -> np.ndarray:
        with _model_turn():  # one request per process: the gate serialises its use
            out = request.infer({0: _normalise(tiles, mean, std)})
            return np.array(out[compiled.output(0)], dtype=np.float32)

    return predict


def make_predictor(model: Any, card: Any, backend: str = "auto", device: str = "cpu", threads: int = 0,
                   precision: str = "fp32") -> tuple[Predictor, str]:
    """A predictor for ``model`` and the name of the backend it uses."""
    name = resolve_backend(backend, device, precision)
    if name in ("onnx", INT8_BACKEND):
        return _onnx_predictor(model, card, threads, int8=name == INT8_BACKEND), name
    if name in ("openvino", BF16_BACKEND):
        return _openvino_predictor(model, card, threads, bf16=name == BF16_BACKEND), name
    return _torch_predictor(model, card, device), name
