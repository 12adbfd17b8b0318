"""A tiny real training run on MoNuSeg crops: the loss goes down, checkpoints resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from wsi_nuclei.errors import ConfigError
from wsi_nuclei.training.datasets import load_monuseg
from wsi_nuclei.training.train import PAPER_RECIPE, TrainConfig, train
from wsi_nuclei.training.trainset import split_validation

pytestmark = pytest.mark.slow  # real training steps and tuning

TRAIN_ID = "TCGA-A7-A13E-01Z-00-DX1"
VAL_ID = "TCGA-AR-A1AS-01Z-00-DX1"


@pytest.fixture(scope="module")
def samples(shared_data):
    return load_monuseg(shared_data / "monuseg" / "train", names=[TRAIN_ID, VAL_ID])


def _cfg(tmp_path, **kw):
    base = dict(out=tmp_path / "run", crop=128, batch_size=4, epochs=4, steps_per_epoch=4, lr=1e-3,
                colour_augment=False, validation=(VAL_ID,), val_every=4, threads=2,
                decoder_channels=(32, 32, 16, 16, 16))
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_and_resume_continues(tmp_path, samples):
    cfg = _cfg(tmp_path)
    train_s, val_s = split_validation(samples, cfg)
    assert [s.name for s in train_s] == [TRAIN_ID] and [s.name for s in val_s] == [VAL_ID]
    card = train(cfg, train_s, val_s)
    rows = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns from real crops
    assert 0.0 <= rows[-1]["val_aji"] <= 1.0
    assert card.encoder == "tu-tf_efficientnet_lite0" and card.training["train_images"] == [TRAIN_ID]
    assert (cfg.out / "best" / "model.safetensors").is_file()

    # Resume: 2 more epochs continue the epoch count instead of starting again.
    cfg2 = replace(cfg, epochs=6)
    train(cfg2, train_s, val_s, resume=True)
    rows = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_paper_recipe_trains_a_binary_model(tmp_path, samples):
    cfg = _cfg(tmp_path, **{**PAPER_RECIPE, "encoder": "tu-tf_efficientnet_lite0", "pretrained": True,
                            "decoder_channels": (32, 32, 16, 16, 16), "crop": 128}, epochs=1, steps_per_epoch=2)
    card = train(cfg, [samples[0]], [samples[1]])
    assert card.outputs == ("nucleus",) and card.postprocess.method == "threshold"
    assert card.postprocess.fg_threshold == 0.7
    assert abs(card.working_mpp - 0.9765625) < 1e-9


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 32"):
        _cfg(tmp_path, crop=100).check()
    with pytest.raises(ConfigError, match="batch-size"):
        _cfg(tmp_path, batch_size=0).check()


def test_scratch_only_for_encoders_without_offline_weights(tmp_path, samples):
    cfg = _cfg(tmp_path, encoder="efficientnet-b0", pretrained=True, epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="--scratch"):
        train(cfg, [samples[0]], [])


# ---------------------------------------------------------------- several datasets


def _fake(name: str, dataset: str):
    import numpy as np

    from wsi_nuclei.training.datasets import Sample

    lab = np.zeros((64, 64), np.int32)
    lab[20:30, 20:30] = 1
    img = np.full((64, 64, 3), 220, np.uint8)
    img[lab > 0] = (80, 40, 140)
    return Sample(name, img, lab, 0.5, "", dataset)


def test_sampler_draws_datasets_by_weight():
    import numpy as np

    from wsi_nuclei.training.trainset import draw_image, prepare

    samples = [_fake(f"m{i}", "monuseg") for i in range(3)] + [_fake(f"c{i}", "consep") for i in range(9)]
    cfg = TrainConfig(out=None, data=(("monuseg", 3.0), ("consep", 1.0)), outputs=("nucleus",), stain_augment="none")  # type: ignore[arg-type]
    data = prepare(samples, cfg)
    rng = np.random.default_rng(0)
    drawn = np.array([draw_image(data, rng) for _ in range(8000)])
    share = float((drawn < 3).mean())  # MoNuSeg images are 0..2: 3/4 of the crops despite 3 of 12 images
    assert abs(share - 0.75) < 0.02
    counts = np.bincount(drawn, minlength=12)
    assert counts[:3].min() > 0.8 * counts[:3].max() and counts[3:].min() > 0.7 * counts[3:].max()  # uniform within


def test_data_spec_and_missing_dataset_are_checked():
    from wsi_nuclei.training.trainset import parse_data, prepare

    assert parse_data("monuseg,consep:0.5") == (("monuseg", 1.0), ("consep", 0.5))
    with pytest.raises(ConfigError, match="unknown dataset 'tnbc'"):
        parse_data("monuseg,tnbc")  # an evaluation set can never be a training source
    with pytest.raises(ConfigError, match="weight"):
        parse_data("consep:x")
    cfg = TrainConfig(out=None, data=(("monuseg", 1.0), ("consep", 1.0)), outputs=("nucleus",), stain_augment="none")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="consep"):
        prepare([_fake("m", "monuseg")], cfg)


def test_training_never_loads_a_test_split(shared_data):
    from wsi_nuclei.training.trainset import (
        CONSEP_VALIDATION,
        DEFAULT_VALIDATION,
        load_training_samples,
    )

    cfg = TrainConfig(out=None, data=(("consep", 1.0),), validation=DEFAULT_VALIDATION + CONSEP_VALIDATION)  # type: ignore[arg-type]
    samples = load_training_samples(cfg, shared_data)
    assert len(samples) == 27 and all(s.name.startswith("train_") for s in samples)
    train_s, val_s = split_validation(samples, cfg)
    assert sorted(s.name for s in val_s) == sorted(CONSEP_VALIDATION) and len(train_s) == 24


def test_tune_cli_stores_post_processing_chosen_on_validation(tmp_path, shared_data):
    """`wsi-nuclei tune` on a copy of the shipped model: it reads the validation images from the
    card, and the grid (which holds the card's own setting) can only match or beat it."""
    import shutil

    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card, load_model

    model_dir = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    before = load_card(model_dir)
    val_names = ["TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1"]
    from wsi_nuclei.model.network import update_card

    update_card(model_dir, training={**before.training, "validation_images": val_names})
    net, card = load_model(model_dir)
    val_s = load_monuseg(shared_data / "monuseg" / "train", names=val_names)
    from wsi_nuclei.training.steps import validate_groups

    old_worst = min(g.aji for g in validate_groups(net, card, val_s)["groups"].values())
    result = CliRunner().invoke(app, ["tune", "--model", str(model_dir), "--data-root", str(shared_data), "--threads", "2"])
    assert result.exit_code == 0, result.output
    after = load_card(model_dir)
    tune = after.metrics["tune"]
    assert after.metrics["val"]["n_images"] == 2 and tune["select"] == "worst_group"
    # the grid holds the card's own setting: the chosen one's worst group is at least as good
    assert tune["score"] >= min(tune["groups"].values()) - 1e-9 and tune["score"] == min(tune["groups"].values())
    assert old_worst <= tune["score"] + 1e-9
    assert 1 <= tune["plateau_width"] <= tune["grid_size"] and set(tune["group_optima"]) == set(tune["groups"])
    assert after.training["tune_command"].startswith("wsi-nuclei tune")
    _, reloaded = load_model(model_dir)  # weights and card still belong together
    assert reloaded.postprocess == after.postprocess


def test_training_data_folder_is_explicit(tmp_path, monkeypatch):
    """No hidden default: --data-root, else $WSI_NUCLEI_DATA, else one line saying both."""
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app
    from wsi_nuclei.training.trainset import DATA_ROOT_ENV, data_root

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(ConfigError, match="--data-root DIR .* or set WSI_NUCLEI_DATA"):
        data_root(None)
    with pytest.raises(ConfigError, match="not found"):
        data_root(tmp_path / "missing")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert data_root(None) == tmp_path
    assert data_root(tmp_path / ".") == tmp_path
    monkeypatch.delenv(DATA_ROOT_ENV)
    result = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 2 and "WSI_NUCLEI_DATA" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written before the data are found


def test_build_config_from_options():
    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_card
    from wsi_nuclei.training.train import build_config
    from wsi_nuclei.training.trainset import CONSEP_VALIDATION, DEFAULT_VALIDATION

    cfg = build_config(Path("o"), {"epochs": 3, "lr": None})
    assert cfg.epochs == 3 and cfg.lr == TrainConfig(out=Path("o")).lr and cfg.validation == DEFAULT_VALIDATION
    assert build_config(Path("o"), {}, data="monuseg,consep:0.5").validation == DEFAULT_VALIDATION + CONSEP_VALIDATION
    assert build_config(Path("o"), {}, data="consep", validation="train_1, train_3").validation == ("train_1", "train_3")
    paper = build_config(Path("o"), {"epochs": 2}, recipe="paper")
    assert paper.outputs == ("nucleus",) and paper.loss == "dice" and paper.epochs == 2
    assert build_config(Path("o"), {"encoder": "efficientnet-b0"}).pretrained is False  # no offline ImageNet weights
    card = load_card(DEFAULT_MODEL_DIR)
    tuned = build_config(Path("o"), {}, init=DEFAULT_MODEL_DIR)
    assert tuned.encoder == card.encoder and tuned.postprocess == card.postprocess and tuned.init == str(DEFAULT_MODEL_DIR)
    with pytest.raises(ConfigError, match="recipe"):
        build_config(Path("o"), {}, recipe="mine")
    with pytest.raises(ConfigError, match="crop"):
        build_config(Path("o"), {"crop": 100})
