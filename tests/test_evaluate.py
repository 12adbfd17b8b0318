"""`wsi-nuclei evaluate` and the shipped model: the numbers in the model card are reproducible."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card, load_model
from wsi_nuclei.training.evaluate import evaluate_dataset

runner = CliRunner()
KEYS = ("dice", "iou", "aji", "pq", "dq", "sq", "f1", "n_images")


def test_shipped_model_loads_with_a_complete_card():
    model, card = load_model()
    assert card.outputs[0] == "nucleus" and card.working_mpp == 0.5
    assert card.weights_sha256 and card.training.get("command", "").startswith("wsi-nuclei train")
    assert {"tnbc", "monuseg-test", "consep-test"} <= set(card.metrics)
    assert card.context_px is not None and card.tta in ("none", "flip4", "dihedral8")
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 30 * 2**20


def test_evaluate_cli_json_on_two_tnbc_images(shared_data):
    result = runner.invoke(app, ["evaluate", str(shared_data / "tnbc"), "--dataset", "tnbc", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert all(k in report for k in KEYS)
    assert report["n_images"] == 2 and len(report["images"]) == 2
    for k in ("dice", "iou", "aji", "pq", "f1"):
        assert 0.0 <= report[k] <= 1.0
    # A trained model, not noise: TNBC nuclei are found.
    assert report["dice"] > 0.6 and report["aji"] > 0.3
    # The CLI is a thin wrapper: same numbers as the library call.
    lib = evaluate_dataset("tnbc", shared_data / "tnbc", limit=2)
    assert lib["aji"] == pytest.approx(report["aji"], abs=1e-9)


def test_evaluate_table_output(shared_data):
    result = runner.invoke(app, ["evaluate", str(shared_data / "tnbc"), "--dataset", "tnbc", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "aji" in result.stdout and "mean" in result.stdout


def test_evaluate_folder_per_image_rows(shared_data, tmp_path):
    """A user's own annotated images (folder layout): means and groups by default, a row per
    image with --per-image; the JSON always has both, and a group's AJI is nucleus-weighted."""
    import shutil

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for name in ("01_1.png", "02_1.png"):
            shutil.copy(shared_data / "tnbc" / sub / name, tmp_path / sub / name)
    unsaid = runner.invoke(app, ["evaluate", str(tmp_path), "--dataset", "folder"])  # no resolution is guessed
    assert unsaid.exit_code == 2 and "needs --mpp" in unsaid.output and "Traceback" not in unsaid.output
    args = ["evaluate", str(tmp_path), "--dataset", "folder", "--mpp", "0.25"]
    plain = runner.invoke(app, args)
    rows = runner.invoke(app, [*args, "--per-image"])
    assert plain.exit_code == 0 and rows.exit_code == 0, plain.output + rows.output
    assert "01_1" in rows.stdout and "02_1" in rows.stdout and "mean" in rows.stdout
    assert "01_1" not in plain.stdout and "mean" in plain.stdout
    report = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert [r["name"] for r in report["images"]] == ["01_1", "02_1"] and set(report["groups"]) == {"folder"}
    n = [r["n_true"] for r in report["images"]]
    weighted = sum(r["aji"] * k for r, k in zip(report["images"], n)) / sum(n)
    assert report["groups"]["folder"]["aji"] == pytest.approx(weighted)


@pytest.mark.slow
@pytest.mark.parametrize("kind,sub", [("tnbc", "tnbc"), ("monuseg-test", "monuseg/test"), ("consep-test", "consep")])
def test_model_card_metrics_are_reproduced(shared_data, kind, sub):
    """The numbers in the shipped card (and README) are what `evaluate` measures now."""
    card = load_card(DEFAULT_MODEL_DIR)
    report = evaluate_dataset(kind, shared_data / sub)
    for k in ("dice", "aji", "pq", "f1"):
        assert report[k] == pytest.approx(card.metrics[kind][k], abs=2e-3), k
    assert report["n_images"] == card.metrics[kind]["n_images"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "/nonexistent/tnbc", "--dataset", "tnbc"], "/nonexistent/tnbc"),
        (["evaluate", ".", "--dataset", "kaggle"], "unknown --dataset"),
        (["evaluate", ".", "--dataset", "tnbc", "--model", "/nonexistent/model"], "model card not found"),
    ],
)
def test_evaluate_errors_are_one_line(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in result.output
