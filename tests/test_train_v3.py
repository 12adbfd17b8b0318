"""Model-v3 training parts: the context-robust sampler, the type head, bit-identical resume,
grouped validation and the per-type F1, on hand-made inputs with known answers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.errors import ConfigError
from wsi_nuclei.training.datasets import Sample
from wsi_nuclei.training.train import TrainConfig


def _disc_sample(name: str, dataset: str, typed: bool, side: int = 192, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.int32)
    img = np.full((side, side, 3), 225, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for k in range(1, 40):
        cy, cx = rng.integers(8, side - 8, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        lab[disc & (lab == 0)] = k
    img[lab > 0] = (70, 40, 130)
    types = ((lab % 4) + 1).astype(np.uint8) * (lab > 0) if typed else None
    return Sample(name, img, lab, 0.5, dataset, dataset, types)


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=out, crop=192, batch_size=4, epochs=2, steps_per_epoch=2, lr=1e-3, colour_augment=False, pretrained=False,
                decoder_channels=(16, 16, 16, 16, 16), data=(("monuseg", 1.0), ("consep", 1.0)), stain_augment="none",
                types=True, context_pairs=True, context_box=64, context_margins=(32, 48, 64), freeze_bn=True, schedule="cosine",
                select="worst_group", val_every=1, threads=1, validation=("v_m", "v_c"))
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_context_view_is_a_window_that_ends_where_the_tensor_ends():
    """View B is box + 2·margin px cut from A at the drawn origin; its loss box is A's box there."""
    import torch

    from wsi_nuclei.training.robust import cut_box, cut_window, draw_view

    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (3, 192, 192, 3), dtype=np.uint8)
    view = draw_view(192, 64, (32, 48, 64), 3, rng)
    assert view.margin in (32, 48, 64) and view.window == 64 + 2 * view.margin and view.window % 32 == 0
    win = cut_window(x, view, channels_first=False)
    assert win.shape == (3, view.window, view.window, 3)
    for k, (y0, x0) in enumerate(view.origins):
        assert 0 <= y0 <= 192 - view.window and 0 <= x0 <= 192 - view.window
        np.testing.assert_array_equal(win[k], x[k, y0 : y0 + view.window, x0 : x0 + view.window])
    t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    box_a = cut_box(t, view, in_window=False)
    box_b = cut_box(torch.from_numpy(win.transpose(0, 3, 1, 2).copy()), view, in_window=True)
    assert box_a.shape == (3, 3, 64, 64) and torch.equal(box_a, box_b)  # the same pixels, less context in B
    with pytest.raises(ValueError, match="does not fit"):
        draw_view(128, 64, (64,), 1, rng)


def test_consistency_is_zero_for_equal_views_and_types_only_where_known():
    import torch

    from wsi_nuclei.training.robust import consistency_loss, supervised_loss

    outputs = ("nucleus", "boundary", "distance")
    logits = torch.randn(2, 7, 16, 16)
    assert float(consistency_loss(logits, logits.clone(), outputs, 4, torch.ones(2, 16, 16))) == 0.0
    assert float(consistency_loss(logits + 1, logits, outputs, 4, torch.ones(2, 16, 16))) > 0
    target = torch.zeros(2, 4, 16, 16)
    base = supervised_loss(logits, target, outputs, 4)
    target[:, 3, 4:8, 4:8] = 2.0  # known type on a few pixels: the cross-entropy adds to the loss
    assert float(supervised_loss(logits, target, outputs, 4)) > float(base)


def test_bad_context_margins_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="context-margins"):
        _cfg(tmp_path, context_margins=(40,)).check()
    with pytest.raises(ConfigError, match="context-margins"):
        _cfg(tmp_path, context_margins=(96,)).check()  # 64 + 192 > the 192 px crop
    with pytest.raises(ConfigError, match="select"):
        _cfg(tmp_path, select="best").check()


@pytest.mark.slow
def test_typed_robust_training_resumes_bit_for_bit(tmp_path):
    """Two epochs straight equal one epoch, a stop, and --resume for the second: same weights,
    same log, same optimiser state. The card lists the types and the new training fields."""
    import torch
    from safetensors.torch import load_file

    from wsi_nuclei.model.network import load_card, load_model
    from wsi_nuclei.nuclei.classes import DEFAULT_TYPES

    train_s = [_disc_sample("t_m", "monuseg", False, seed=1), _disc_sample("t_c", "consep", True, seed=2)]
    val_s = [_disc_sample("v_m", "monuseg", False, seed=3), _disc_sample("v_c", "consep", True, seed=4)]
    from wsi_nuclei.training.train import train

    straight = _cfg(tmp_path / "a")
    train(straight, train_s, val_s)
    stopped = _cfg(tmp_path / "b", epochs=1)
    train(stopped, train_s, val_s)
    train(replace(stopped, epochs=2), train_s, val_s, resume=True)
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    row = rows(tmp_path / "a")[-1]
    assert set(row["val_groups"]) == {"consep", "monuseg:monuseg"} and row["val_worst_group"] == min(row["val_groups"].values())
    assert "f_d" in row["val_types"]
    card = load_card(tmp_path / "a" / "best")
    assert [t["qupath"] for t in card.types] == [t.qupath for t in DEFAULT_TYPES] and card.channels == 7
    assert card.training["context_pairs"] is True and card.training["select"] == "worst_group"
    net, _ = load_model(tmp_path / "a" / "best")
    assert net.segmentation_head[0].out_channels == 7


def test_head_widened_from_a_model_without_types(tmp_path):
    """--init from the shipped 3-output model: its tensors are copied, the type channels are new."""
    import torch

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR, load_model
    from wsi_nuclei.training.train import _start_model, build_config

    cfg = build_config(tmp_path, {"types": True}, init=DEFAULT_MODEL_DIR)
    extra: dict = {}
    model = _start_model(cfg, extra)
    old, _ = load_model(DEFAULT_MODEL_DIR)
    new_w, old_w = model.state_dict(), old.state_dict()
    head = "segmentation_head.0.weight"
    assert new_w[head].shape[0] == 7 and torch.equal(new_w[head][:3], old_w[head])
    assert all(torch.equal(new_w[k], v) for k, v in old_w.items() if not k.startswith("segmentation_head"))
    assert extra["init_widened"] and extra["init_sha256"]


def test_vote_gives_the_majority_type_and_its_probability():
    from wsi_nuclei.nuclei.classes import vote_types

    labels = np.zeros((4, 6), np.int32)
    labels[:, :3], labels[:, 3:5] = 1, 2
    logit = np.full((4, 4, 6), -4.0)
    logit[2, :, :3] = 4.0  # nucleus 1: type 3 everywhere
    logit[1, :, 3:5] = 4.0  # nucleus 2: type 2 ...
    logit[0, 0, 3:5] = 9.0  # ... but for one row that says type 1
    probs = 1 / (1 + np.exp(-logit))
    kinds, p = vote_types(labels, probs)
    assert kinds.tolist() == [3, 2]
    assert p[0] == pytest.approx(np.exp(8) / (np.exp(8) + 3), rel=1e-4)  # softmax of the logits, not the sigmoids
    assert 0.5 < p[1] < p[0]


def test_type_f1_on_a_hand_made_case():
    """3 true nuclei, 3 predicted: two pair within the radius (one with the right type), one of
    each side is unpaired. F_d = 2*2/(2*2+1+1) = 2/3; type 1: tp 1, tn 0, fp 0, fn 1 (pair 2 is
    true 1, predicted 2), fp_d 0, fn_d 1 -> 2/(2+2+1) = 0.4; type 2: tp 0, tn 1 (pair 1), fp 1
    (pair 2), fn 0, fp_d 1 (the unpaired prediction), fn_d 0 -> 2/(2+2+1) = 0.4; type 3: tn 2 -> 1."""
    from wsi_nuclei.training.type_metrics import TypedNuclei, type_scores

    true = TypedNuclei(np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 90.0]]), np.array([1, 1, 1]))
    pred = TypedNuclei(np.array([[12.0, 11.0], [55.0, 52.0], [10.0, 90.0]]), np.array([1, 2, 2]))
    s = type_scores([(true, pred)], n_types=3, radius=12.0)
    assert s["paired"] == 2 and s["unpaired_pred"] == 1 and s["unpaired_true"] == 1
    assert s["f_d"] == pytest.approx(2 / 3)
    assert s["f_c_1"] == pytest.approx(2 / 5)
    assert s["f_c_2"] == pytest.approx(2 / 5)
    assert s["f_c_3"] == pytest.approx(1.0)
    far = type_scores([(true, TypedNuclei(true.centroids + 13, true.types))], 3, radius=12.0)
    assert far["paired"] == 0 and far["f_d"] == 0.0  # 13*sqrt(2) px apart: no pair


def test_worst_group_selection_on_a_toy_table():
    """Checkpoint 0 has the best pooled mean (one big easy group), checkpoint 1 the best worst group."""
    from wsi_nuclei.training.validation import best_row, group_scores

    table = [{"breast": 0.80, "kidney": 0.78, "consep": 0.30}, {"breast": 0.70, "kidney": 0.68, "consep": 0.45}]
    assert best_row(table, "pooled") == 0
    assert best_row(table, "worst_group") == 1
    assert best_row(table, "mean_minus_std") == 1
    g = group_scores([("a", 0.5, 0.8, 100), ("a", 0.8, 0.9, 300), ("b", 0.6, 0.7, 10)])
    assert g["a"].aji == pytest.approx((0.5 * 100 + 0.8 * 300) / 400) and g["a"].n_images == 2 and g["b"].n_true == 10


def test_grouped_validation_split_of_the_shipped_recipe(shared_data):
    """No image in both splits or twice, every group non-empty: MoNuSeg organs and CoNSeP."""
    from wsi_nuclei.training.trainset import (
        CONSEP_VALIDATION,
        DEFAULT_VALIDATION,
        load_training_samples,
        split_validation,
    )
    from wsi_nuclei.training.validation import check_groups

    cfg = TrainConfig(out=Path("."), data=(("monuseg", 1.0), ("consep", 1.0)), validation=DEFAULT_VALIDATION + CONSEP_VALIDATION)
    train_s, val_s = split_validation(load_training_samples(cfg, shared_data), cfg)
    groups = check_groups(train_s, val_s)
    assert set(groups) == {"consep", "monuseg:breast", "monuseg:kidney", "monuseg:liver", "monuseg:prostate", "monuseg:stomach"}
    assert all(groups.values()) and sum(len(v) for v in groups.values()) == len(val_s) == 8
    with pytest.raises(ConfigError, match="both in training and validation"):
        check_groups(train_s + val_s[:1], val_s)
    consep = [s for s in train_s if s.dataset == "consep"]
    assert all(s.types is not None and ((s.types > 0) == (s.labels > 0)).all() for s in consep)


@pytest.mark.slow
def test_train_cli_card_records_the_criterion_and_the_groups(tmp_path, shared_data):
    from typer.testing import CliRunner

    from wsi_nuclei.cli.main import app
    from wsi_nuclei.model.network import load_card

    val = "TCGA-AR-A1AS-01Z-00-DX1,TCGA-B0-5710-01Z-00-DX1"
    result = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "run"), "--data-root", str(shared_data), "--epochs", "1",
                                      "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "128", "--validation", val,
                                      "--val-every", "1", "--threads", "2", "--no-tune"])
    assert result.exit_code == 0, result.output
    card = load_card(tmp_path / "run" / "best")
    assert card.training["selection"] == "worst_group"
    assert card.training["validation_groups"] == {
        "monuseg:breast": ["TCGA-AR-A1AS-01Z-00-DX1"],
        "monuseg:kidney": ["TCGA-B0-5710-01Z-00-DX1"],
    }
