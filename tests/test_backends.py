"""Inference backends: ONNX Runtime equals torch within 1e-4 on real tissue; the export is cached."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_nuclei.errors import ConfigError
from wsi_nuclei.model.backends import (
    make_predictor,
    onnx_available,
    onnx_path,
    openvino_available,
    resolve_backend,
)

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnx/onnxruntime not installed (extra [onnx])")


@pytest.fixture(scope="module")
def tiles(shared_data) -> np.ndarray:
    from wsi_nuclei.slides.reader import open_slide

    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as s:
        scale = 0.5 / s.info.level0_mpp
        return np.stack([s.read_working((x, 300, 448, 448), scale) for x in (100, 600)])


def test_onnx_equals_torch(tiles):
    from wsi_nuclei.model.network import load_model

    model, card = load_model()
    torch_predict, a = make_predictor(model, card, "torch", "cpu")
    onnx_predict, b = make_predictor(model, card, "onnx", "cpu")
    assert (a, b) == ("torch", "onnx")
    p_torch, p_onnx = torch_predict(tiles), onnx_predict(tiles)
    assert p_torch.shape == p_onnx.shape == (2, 3, 448, 448)
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    assert p_torch[:, 0].max() > 0.9 and p_torch[:, 0].min() < 0.1  # real nuclei and background


def test_export_is_cached_and_repaired(tiles):
    from wsi_nuclei.model.network import load_model

    model, card = load_model()
    make_predictor(model, card, "onnx", "cpu")
    path = onnx_path(card)
    stamp = path.stat().st_mtime_ns
    make_predictor(model, card, "onnx", "cpu")
    assert path.stat().st_mtime_ns == stamp  # reused, not exported again
    path.write_bytes(b"half a file")
    predict, _ = make_predictor(model, card, "onnx", "cpu")  # a damaged cache is exported again
    assert predict(tiles[:1]).shape == (1, 3, 448, 448)


@pytest.mark.skipif(not openvino_available(), reason="openvino not installed (extra [openvino])")
def test_openvino_equals_onnx_runtime_and_torch(tiles):
    from wsi_nuclei.model.network import load_model

    model, card = load_model()
    ort_predict, _ = make_predictor(model, card, "onnx", "cpu", 2)
    ov_predict, name = make_predictor(model, card, "openvino", "cpu", 2)
    torch_predict, _ = make_predictor(model, card, "torch", "cpu")
    assert name == "openvino"
    p_ov, p_ort, p_torch = ov_predict(tiles), ort_predict(tiles), torch_predict(tiles)
    assert p_ov.shape == p_ort.shape == (2, 3, 448, 448) and p_ov.dtype == np.float32
    assert np.abs(p_ov - p_ort).max() < 1e-4 and np.abs(p_ov - p_torch).max() < 1e-4
    rect = tiles[:1, :320, :192]  # a tissue box: any size on the 32 px grid
    assert np.abs(ov_predict(rect) - ort_predict(rect)).max() < 1e-4


def test_auto_and_invalid_choices():
    assert resolve_backend("auto", "cpu") == ("openvino" if openvino_available() else "onnx")
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("onnx", "cuda")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(ConfigError, match="unknown --backend"):
        resolve_backend("tensorrt", "cpu")


def test_two_threads_building_the_predictor_at_once(tmp_path, monkeypatch):
    """A Dask worker runs two chunk tasks at once: the first ONNX export must not race."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_nuclei.pipeline import worker_cache

    monkeypatch.setenv("WSI_NUCLEI_CACHE", str(tmp_path))  # nothing exported yet
    monkeypatch.setattr(worker_cache, "_CACHE", {})
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: worker_cache.cached_predictor(None, "cpu", "onnx", 1), range(2)))
    assert got[0] is got[1] and got[0][2] == "onnx"
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_cpu_forward_passes_take_turns(backend):
    """Chunk tasks of one process overlap, but a CPU forward pass waits for MODEL_GATE (the model
    already uses every core), and the wait is counted apart from the inference time."""
    import threading
    import time

    from wsi_nuclei.model.backends import MODEL_GATE, gate_wait_seconds
    from wsi_nuclei.model.network import load_model

    model, card = load_model()
    predict, _ = make_predictor(model, card, backend, "cpu")
    tiles = np.full((1, 64, 64, 3), 200, np.uint8)
    predict(tiles)  # first-call set-up outside the measurement
    seen: dict[str, float] = {}
    mine = gate_wait_seconds()

    def run() -> None:
        before = gate_wait_seconds()
        seen["out"] = float(predict(tiles).mean())
        seen["waited"] = gate_wait_seconds() - before

    with MODEL_GATE:
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and "out" not in seen  # blocked while another forward pass holds the gate
    worker.join(30)
    assert "out" in seen and seen["waited"] >= 0.4
    assert gate_wait_seconds() == mine  # counted per thread: this one never waited
