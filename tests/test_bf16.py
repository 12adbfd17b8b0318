"""bf16 on a CPU: ``--precision bf16`` runs OpenVINO in bf16, only where the CPU has it natively."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.errors import ConfigError
from wsi_nuclei.model import backends
from wsi_nuclei.model.backends import (
    BF16_BACKEND,
    make_predictor,
    openvino_available,
    resolve_backend,
)

pytestmark = pytest.mark.skipif(not openvino_available(), reason="onnx/openvino not installed (extra [openvino])")
runner = CliRunner()
native = pytest.mark.skipif(not openvino_available() or not backends.cpu_has_bf16(),
                            reason="this CPU has no native bf16 (AVX512_BF16 or AMX)")


@pytest.fixture(scope="module")
def model():
    from wsi_nuclei.model.network import load_model

    return load_model()


@pytest.fixture(scope="module")
def tissue(shared_data) -> np.ndarray:
    """Two 512 px crops of TNBC test images (held out from training)."""
    from wsi_nuclei.training.datasets import load_tnbc

    return np.stack([s.image[:512, :512] for s in load_tnbc(shared_data / "tnbc", limit=2)])


def test_bf16_resolves_to_openvino_on_a_cpu_that_has_it(monkeypatch):
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: True)
    assert resolve_backend("auto", "cpu", "bf16") == resolve_backend("openvino", "cpu", "bf16") == BF16_BACKEND
    assert resolve_backend(BF16_BACKEND, "cpu") == BF16_BACKEND  # what a worker is given in the plan
    for backend, device, words in (("onnx", "cpu", "--backend auto or openvino"), ("torch", "cpu", "--backend auto or openvino"),
                                   ("auto", "cuda", "bf16 autocast")):
        with pytest.raises(ConfigError, match=words):
            resolve_backend(backend, device, "bf16")


def test_a_cpu_without_bf16_is_told_so_and_never_quietly_runs_fp32(model, monkeypatch):
    """On such a CPU OpenVINO would take the bf16 hint and compute in fp32: a slide planned in bf16
    would then mix precisions across workers. The driver refuses, and so does a worker."""
    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="native bf16.*use --precision fp32"):
        resolve_backend("auto", "cpu", "bf16")
    net, card = model
    with pytest.raises(ConfigError, match="native bf16"):
        make_predictor(net, card, BF16_BACKEND, "cpu", 2)
    result = runner.invoke(app, ["segment-image", "nothing.png", "--mpp", "0.5", "-o", "unused", "--precision", "bf16"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "native bf16" in result.output and "--precision fp32" in result.output


@native
def test_bf16_stays_close_to_fp32(model, tissue):
    """The parity bound on held-out tissue: per-pixel probabilities within 0.005 on average, the
    same foreground decision on >= 99.5 % of the pixels (fp32 backends agree within 1e-4;
    docs/performance.md has what bf16 costs in AJI and PQ), and faster is not tested here."""
    net, card = model
    fp32, _ = make_predictor(net, card, "openvino", "cpu", 2)
    bf16, name = make_predictor(net, card, "auto", "cpu", 2, "bf16")
    a, b = fp32(tissue), bf16(tissue)
    assert name == BF16_BACKEND and a.shape == b.shape and b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).mean() < 0.005
    assert ((a[:, 0] > 0.5) == (b[:, 0] > 0.5)).mean() > 0.995
    assert np.abs(a - b).max() > 1e-3  # bf16 arithmetic, not the fp32 model under another name


@native
def test_segment_precision_bf16(tmp_path):
    """The slide pipeline in bf16: summary.json says so, and the output key differs from fp32's
    (``--resume`` never takes one for the other)."""
    from wsi_nuclei.pipeline.config import SegmentConfig
    from wsi_nuclei.pipeline.plan import model_card, plan_keys

    from .slides import cmu_crop_slide

    slide = cmu_crop_slide(tmp_path / "crop.tif", (900, 700, 512, 512))
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(slide), "-o", str(out), "--workers", "0", "--precision", "bf16", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "crop" / "summary.json").read_text())
    assert summary["parameters"]["precision"] == "bf16" and summary["backend"] == BF16_BACKEND and summary["nuclei"] > 50
    card = model_card(SegmentConfig())
    keys = {p: plan_keys(slide, SegmentConfig(precision=p), card, resolve_backend("auto", "cpu", p))[1] for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]


def test_bf16_on_remote_workers_is_checked_by_the_workers_not_the_driver(tmp_path, monkeypatch):
    """A SLURM login node (or a notebook beside a scheduler) may lack bf16 while the compute nodes
    have it: then only the workers check. A local run keeps the driver's check, and a worker
    without bf16 fails its slide with the line that names the node, never a quiet fp32 run."""
    from wsi_nuclei.pipeline.config import SegmentConfig
    from wsi_nuclei.pipeline.launch import configs
    from wsi_nuclei.pipeline.segment import segment_many

    from .slides import disc_slide

    monkeypatch.setattr(backends, "cpu_has_bf16", lambda: False)  # this driver: a CPU without bf16
    with pytest.raises(ConfigError, match="native bf16"):
        configs({"precision": "bf16", "device": "cpu"}, cluster="local", dry_run=True)
    slurm = {"cores": 4, "memory": "8GB", "processes": 1}
    for where in ({"cluster": "slurm", "slurm": slurm}, {"cluster": "local", "scheduler": "tcp://127.0.0.1:1"}):
        cfg, _ = configs({"precision": "bf16", "device": "cpu"}, dry_run=True, **where)
        assert cfg.remote_workers and cfg.engine() == BF16_BACKEND, where
    # the "worker" here is this process, which has no bf16: the slide fails with one line
    slide = disc_slide(tmp_path / "s.tif", (256, 256), seed=3)
    cfg = SegmentConfig(precision="bf16", remote_workers=True, chunk_size=256, halo=32, context=64)
    (res,) = segment_many([slide], tmp_path / "out", cfg)
    assert res.status == "failed" and "native bf16" in res.reason and "--precision fp32" in res.reason
    assert "\n" not in res.reason and "Traceback" not in res.reason
