"""int8 on a CPU: the quantised export, its cache, its distance from fp32, and ``--precision``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.errors import ConfigError
from wsi_nuclei.model.backends import (
    INT8_BACKEND,
    make_predictor,
    onnx_available,
    onnx_path,
    resolve_backend,
)

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnx/onnxruntime not installed (extra [onnx])")
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    from wsi_nuclei.model.network import load_model

    return load_model()


@pytest.fixture(scope="module")
def tissue(shared_data) -> np.ndarray:
    """Two 512 px crops of a TNBC test image (held out from training and calibration)."""
    from wsi_nuclei.training.datasets import load_tnbc

    images = [s.image for s in load_tnbc(shared_data / "tnbc", limit=2)]
    return np.stack([im[:512, :512] for im in images])


def test_precision_resolves_to_onnx_runtime_only():
    assert resolve_backend("auto", "cpu", "int8") == resolve_backend("onnx", "cpu", "int8") == INT8_BACKEND
    assert resolve_backend(INT8_BACKEND, "cpu") == INT8_BACKEND  # a plan's resolved name resolves to itself
    for backend, device, fix in (("openvino", "cpu", "--backend auto or onnx"), ("torch", "cpu", "--backend auto or onnx"),
                                 ("auto", "cuda", "--precision fp32")):
        with pytest.raises(ConfigError, match=fix):
            resolve_backend(backend, device, "int8")
    with pytest.raises(ConfigError, match="fp32, bf16, int8"):
        resolve_backend("auto", "cpu", "fp16")


def test_int8_is_cached_per_weights_and_repaired(model, tissue, monkeypatch):
    from wsi_nuclei.model import quantize
    from wsi_nuclei.model.backends import int8_path

    net, card = model
    make_predictor(net, card, "onnx", "cpu", 2, "int8")
    path = int8_path(card)
    assert path.parent == onnx_path(card).parent and path.name.startswith(card.weights_sha256[:16]) and "-int8-" in path.name
    stamp = path.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("quantised again although the cached model is there")

    with monkeypatch.context() as m:
        m.setattr(quantize, "quantize", must_not_run)
        make_predictor(net, card, "onnx", "cpu", 2, "int8")
    assert path.stat().st_mtime_ns == stamp
    path.write_bytes(b"not a model")  # a damaged cache is quantised again
    predict, name = make_predictor(net, card, "auto", "cpu", 2, "int8")
    assert name == INT8_BACKEND and predict(tissue[:1]).shape == (1, 3, 512, 512)
    assert not list(path.parent.glob("*.tmp"))


def test_int8_stays_close_to_fp32(model, tissue):
    """The parity bound of the recipe on held-out tissue: per-pixel probabilities within 0.01 on
    average and the same foreground decision on >= 99 % of the pixels (fp32 backends agree within
    1e-4; docs/performance.md has what this costs in AJI and PQ)."""
    net, card = model
    fp32, _ = make_predictor(net, card, "onnx", "cpu", 2)
    int8, _ = make_predictor(net, card, "onnx", "cpu", 2, "int8")
    a, b = fp32(tissue), int8(tissue)
    assert a.shape == b.shape and b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).mean() < 0.01
    assert ((a[:, 0] > 0.5) == (b[:, 0] > 0.5)).mean() > 0.99
    assert not np.array_equal(a, b)  # it is a different model, not the fp32 one under another name


def test_calibration_crops_are_training_images_only():
    from wsi_nuclei.model.network import load_card
    from wsi_nuclei.model.quantize import CALIBRATION_IMAGE, calibration_tiles

    tiles = calibration_tiles()
    assert tiles.shape == (32, 256, 256, 3)
    names = [line.split("\t")[1] for line in CALIBRATION_IMAGE.with_suffix(".txt").read_text().splitlines()[4:]]
    validation = set(load_card(Path(__import__("wsi_nuclei").__file__).parent / "weights").training["validation_images"])
    assert len(names) == 32 and not {Path(n).stem for n in names} & validation
    assert all(n.startswith("TCGA-") for n in names)  # MoNuSeg 2018 training images


@pytest.mark.slow
def test_segment_precision_int8(tmp_path):
    from .slides import cmu_crop_slide

    slide = cmu_crop_slide(tmp_path / "crop.tif", (900, 700, 640, 640))
    counts, keys = {}, {}
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        result = runner.invoke(app, ["segment", str(slide), "-o", str(out), "--workers", "0", "--precision", precision, "--quiet"])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "crop" / "summary.json").read_text())
        assert summary["parameters"]["precision"] == precision
        counts[precision], keys[precision] = summary["nuclei"], summary["output_key"]
    assert keys["fp32"] != keys["int8"]  # --resume never takes fp32 outputs for int8 ones
    assert counts["fp32"] > 100 and abs(counts["int8"] - counts["fp32"]) <= 0.05 * counts["fp32"]


def test_images_precision_int8(tissue, tmp_path):
    """The notebook API and ``segment-image`` take ``precision`` as ``segment`` does, and say which
    model ran in the image's summary."""
    from PIL import Image

    import wsi_nuclei

    fp32 = wsi_nuclei.segment_image(tissue[0], mpp=0.5)
    int8 = wsi_nuclei.segment_image(tissue[0], mpp=0.5, precision="int8")
    assert fp32.max() > 20 and abs(int(int8.max()) - int(fp32.max())) <= 0.1 * fp32.max()
    with pytest.raises(ConfigError, match="fp32, bf16, int8"):
        wsi_nuclei.segment_image(tissue[0], mpp=0.5, precision="fp16")
    Image.fromarray(tissue[1]).save(tmp_path / "tile.png")
    result = runner.invoke(app, ["segment-image", str(tmp_path / "tile.png"), "--mpp", "0.5", "-o", str(tmp_path / "out"),
                                 "--precision", "int8"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "tile_summary.json").read_text())
    assert summary["precision"] == "int8" and summary["backend"] == INT8_BACKEND and summary["nuclei"] > 20
    bad = runner.invoke(app, ["segment-image", str(tmp_path / "tile.png"), "--mpp", "0.5", "-o", str(tmp_path / "bad"),
                              "--precision", "fp16"])
    assert bad.exit_code != 0 and "fp32, bf16, int8" in bad.output and "Traceback" not in bad.output
