"""segment --dry-run's time and memory estimate: per slide and in total, from tissue area and a
measured rate (the model's rates.json, or --rate); for SLURM a proposed --walltime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.pipeline.estimate import RATES_FILE, Rate, estimate, load_rate, store_rate, walltime

from .slides import disc_slide

runner = CliRunner()
FLAGS = ["--device", "cpu", "--dry-run", "--chunk-size", "256", "--halo", "32", "--context", "64"]
WEIGHTS = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "weights"


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    disc_slide(folder / "small.tif", (256, 256), seed=61)
    disc_slide(folder / "large.tif", (768, 768), seed=62)
    return folder


def _rows(output: str) -> dict[str, tuple[float, float]]:
    """slide name -> (tissue mm², estimated s) from the dry run's table."""
    lines = output.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("slide\t"))
    cols = lines[head].split("\t")
    out = {}
    for ln in lines[head + 1 :]:
        if ln.startswith("total:"):
            break
        cells = dict(zip(cols, ln.split("\t")))
        out[Path(cells["slide"]).name] = (float(cells["tissue_mm2"]), float(cells["estimate_s"]))
    return out


def _model_copy(tmp_path: Path, rates: dict | None) -> Path:
    model = tmp_path / "model"
    shutil.copytree(WEIGHTS, model)
    (model / RATES_FILE).unlink(missing_ok=True)
    if rates is not None:
        (model / RATES_FILE).write_text(json.dumps(rates))
    return model


def test_the_estimate_grows_with_tissue_and_follows_rate(slides, tmp_path):
    one = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--rate", "10", *FLAGS])
    two = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--rate", "20", *FLAGS])
    assert one.exit_code == 0 and two.exit_code == 0, one.output
    a, b = _rows(one.output), _rows(two.output)
    assert a["large.tif"][0] > a["small.tif"][0] > 0 and a["large.tif"][1] > a["small.tif"][1]  # monotone in tissue
    for name, (area, seconds) in a.items():
        assert seconds == pytest.approx(10 * area, abs=0.6)  # --rate, one worker, no fixed part
        assert b[name][1] == pytest.approx(2 * seconds, abs=1.1)
    assert "# estimate:" in one.output and "10.00 s/mm² per worker from --rate" in one.output
    assert "peak memory" in one.output and "GB per worker" in one.output
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_the_model_rate_is_used_and_its_absence_said(slides, tmp_path):
    model = _model_copy(tmp_path, {"openvino:cpu:2": {"s_per_mm2": 8.0, "s_per_slide": 3.0, "threads": 2, "measured": "test"},
                                   "onnx:cpu:2": {"s_per_mm2": 99.0, "s_per_slide": 0.0, "threads": 2, "measured": "other"}})
    res = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--model", str(model), "--backend", "openvino",
                              "--threads", "2", "--workers", "2", *FLAGS])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    for area, seconds in rows.values():
        assert seconds == pytest.approx(8.0 * area / 2 + 3.0, abs=0.6)  # two workers share the compute; the fixed part per slide
    assert "from openvino:cpu:2 (test)" in res.output and "2 local workers" in res.output
    bare = _model_copy(tmp_path / "bare", None)
    res = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--model", str(bare), "--backend", "openvino", *FLAGS])
    assert res.exit_code == 0 and "# estimate: none (no measured rate for openvino:cpu:2: run wsi-nuclei measure-rate" in res.output


def test_slurm_dry_run_proposes_a_walltime(slides, tmp_path):
    res = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--cluster", "slurm", "--cores", "2", "--memory", "8GB",
                              "--walltime", "00:10:00", "--rate", "5000", *FLAGS])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("# proposed --walltime"))
    assert "now 00:10:00" in line
    total_area = sum(area for area, _ in _rows(res.output).values())
    # all on one job (the fewest that may start), times 1.5, up in quarter hours
    assert line.split()[3] == walltime(total_area * 5000)


def test_estimate_and_walltime_units():
    rate = Rate(10.0, 2.0, 2)
    est = estimate([1.0, 3.0], rate, "x", workers=2, max_slides=2, worker_peak_bytes=5)
    assert est.per_slide_s == (7.0, 17.0) and est.total_s == 22.0  # 40 s / 2 workers + one round of fixed parts
    assert estimate([1.0, 3.0, 5.0], rate, "x", 1, 1, 0).total_s > estimate([1.0, 3.0], rate, "x", 1, 1, 0).total_s
    assert walltime(1) == "00:15:00" and walltime(600) == "00:15:00" and walltime(601) == "00:30:00" and walltime(3 * 3600) == "04:30:00"
    with pytest.raises(Exception, match="--rate"):
        estimate([1.0], Rate(0.0), "--rate", 1, 1, 0)


def test_stored_rates_round_trip_and_scale_by_threads(tmp_path):
    store_rate(tmp_path, "openvino:cpu:2", Rate(10.0, 1.0, 2, "m"))
    store_rate(tmp_path, "openvino:cpu:8", Rate(3.0, 1.0, 8, "m"))
    assert load_rate(tmp_path, "openvino", "cpu", 2) == (Rate(10.0, 1.0, 2, "m"), "openvino:cpu:2")
    rate, key = load_rate(tmp_path, "openvino", "cpu", 4)  # the nearest thread count (2), scaled to 4
    assert key == "openvino:cpu:2" and rate.s_per_mm2 == pytest.approx(5.0) and "scaled from 2 threads" in rate.measured
    assert load_rate(tmp_path, "torch", "cpu", 2) is None
    (tmp_path / RATES_FILE).write_text("{not json")
    assert load_rate(tmp_path, "openvino", "cpu", 2) is None  # a damaged file: no rate, said by the dry run


@pytest.mark.slow
def test_measure_rate_writes_what_the_dry_run_reads(tmp_path):
    model = _model_copy(tmp_path, None)
    res = runner.invoke(app, ["measure-rate", "--model", str(model), "--backend", "openvino", "--threads", "2", "--write"])
    assert res.exit_code == 0, res.output
    stored = json.loads((model / RATES_FILE).read_text())
    assert set(stored) == {"openvino:cpu:2"} and 0 < stored["openvino:cpu:2"]["s_per_mm2"] < 1000
    assert stored["openvino:cpu:2"]["s_per_slide"] >= 0 and "measure-rate" in stored["openvino:cpu:2"]["measured"]


def test_the_estimate_follows_the_model_input_when_the_rate_has_it(slides, tmp_path):
    """A rate per Mpx of model input carries over between slides (scattered tissue takes more
    context per mm²); the dry run sums each plan's pixels."""
    model = _model_copy(tmp_path, {"openvino:cpu:2": {"s_per_mm2": 8.0, "s_per_slide": 0.0, "threads": 2, "measured": "test",
                                                      "s_per_mpx": 200.0}})
    res = runner.invoke(app, ["segment", str(slides), "-o", str(tmp_path / "o"), "--model", str(model), "--backend", "openvino",
                              "--threads", "2", *FLAGS])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("# estimate:"))
    assert "200.00 s per Mpx of model input" in line
    rows = _rows(res.output)
    # 256 px chunks with 64 px context: each chunk's box and its context; more chunks, more pixels
    assert rows["large.tif"][1] > rows["small.tif"][1] > 0
    unit = estimate([1.0, 1.0], Rate(8.0, 1.0, 2, "", 2.0), "t", 2, 2, 0, model_mpx=[10.0, 30.0])
    assert unit.per_slide_s == (11.0, 31.0) and unit.total_s == 41.0  # 2 s/Mpx over 2 workers, 1 s fixed (both slides at once)
    area_only = estimate([1.0, 1.0], Rate(8.0, 1.0, 2, ""), "t", 2, 2, 0, model_mpx=[10.0, 30.0])
    assert area_only.per_slide_s == (5.0, 5.0)  # a rate without s_per_mpx (older rates.json, --rate) uses the tissue area


def test_planned_model_pixels_are_what_the_run_gives_the_model(tmp_path):
    """estimate.model_mpx from a plan equals the pixels the chunks gave the model (summary.json's
    inferred_px) when each window is one forward pass, as on a CPU worker."""
    from wsi_nuclei.pipeline.config import SegmentConfig
    from wsi_nuclei.pipeline.estimate import model_mpx
    from wsi_nuclei.pipeline.plan import model_card, plan_slide
    from wsi_nuclei.pipeline.segment import segment_slide

    slide = disc_slide(tmp_path / "s.tif", (900, 700), seed=63)
    cfg = SegmentConfig(chunk_size=256, halo=32, context=64, forward_memory=3 * 2**30)
    plan, _, _ = plan_slide(slide, tmp_path / "plan", cfg, model_card(cfg))
    segment_slide(slide, tmp_path / "out", cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert model_mpx(plan.chunks, plan.tiling.window, plan.tiling.context) == pytest.approx(summary["inferred_px"] / 1e6)
