"""Tests for wsi_nuclei.training.datasets on the real MoNuSeg/TNBC files and on synthetic folders."""

from __future__ import annotations

import csv
import gzip
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from wsi_nuclei.errors import ConfigError, DatasetError
from wsi_nuclei.training.datasets import (
    MONUSEG_MPP,
    TNBC_MPP,
    load_folder,
    load_monuseg,
    load_tnbc,
    read_aperio_xml,
    tcga_organ,
)
from wsi_nuclei.training.evaluate import load_dataset

TRAIN_IDS = ["TCGA-A7-A13F-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"]  # instances only / instances + XML
TEST_ID = "TCGA-HT-8564-01Z-00-DX1"  # the test image with the fewest nuclei (249)


def _manifest_counts(csv_path: Path) -> dict[str, int]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return {row["image_id"]: int(row["n_instances"]) for row in csv.DictReader(fh)}


def _xml_polygons(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], float | None]:
    """Independent parse: (xs, ys) of every region with >= 3 vertices, and MicronsPerPixel."""
    root = ET.parse(gzip.open(path)).getroot()
    polys = []
    for region in root.iter("Region"):
        verts = region.findall("./Vertices/Vertex")
        if len(verts) >= 3:
            polys.append(
                (np.array([float(v.get("X")) for v in verts]), np.array([float(v.get("Y")) for v in verts]))
            )
    mpp = root.get("MicronsPerPixel")
    return polys, float(mpp) if mpp else None


def _assert_consecutive(labels: np.ndarray) -> None:
    ids = np.unique(labels)
    assert ids[0] == 0
    assert np.array_equal(ids, np.arange(len(ids)))


# ---------------------------------------------------------------- MoNuSeg


def test_monuseg_train_instances(shared_data: Path) -> None:
    root = shared_data / "monuseg" / "train"
    expected = _manifest_counts(root / "instances" / "MANIFEST.csv")
    samples = load_monuseg(root, names=TRAIN_IDS)
    assert sorted(s.name for s in samples) == sorted(TRAIN_IDS)
    by_name = {s.name: s for s in samples}
    for name in TRAIN_IDS:
        s = by_name[name]
        assert s.image.dtype == np.uint8 and s.image.shape == (1000, 1000, 3)
        assert s.labels.dtype == np.int32 and s.labels.shape == (1000, 1000)
        assert int(s.labels.max()) == expected[name]
        _assert_consecutive(s.labels)
        # nuclei are darker than the background (the label map is aligned with the image)
        grey = s.image.mean(axis=2)
        assert grey[s.labels > 0].mean() < grey[s.labels == 0].mean()
    assert by_name["TCGA-A7-A13F-01Z-00-DX1"].group == "breast"
    assert by_name["TCGA-B0-5698-01Z-00-DX1"].group == "kidney"
    # no XML -> the 40x default; XML beside the instance map -> its MicronsPerPixel
    assert by_name["TCGA-A7-A13F-01Z-00-DX1"].mpp == MONUSEG_MPP
    _, xml_mpp = _xml_polygons(root / "annotations" / "TCGA-B0-5698-01Z-00-DX1.xml.gz")
    assert by_name["TCGA-B0-5698-01Z-00-DX1"].mpp == pytest.approx(xml_mpp)


def test_monuseg_test_split_from_xml(shared_data: Path) -> None:
    root = shared_data / "monuseg" / "test"
    xml = root / "annotations" / f"{TEST_ID}.xml.gz"
    polys, xml_mpp = _xml_polygons(xml)
    (s,) = load_monuseg(root, names=[TEST_ID])
    assert s.name == TEST_ID and s.group == "brain"
    assert s.image.dtype == np.uint8 and s.image.shape == (1000, 1000, 3)
    assert s.labels.dtype == np.int32 and s.labels.shape == (1000, 1000)
    n = int(s.labels.max())
    assert len(polys) - 3 <= n <= len(polys)  # a region may be wholly painted over by later ones
    _assert_consecutive(s.labels)
    assert xml_mpp is not None and s.mpp == pytest.approx(xml_mpp)
    assert s.mpp == pytest.approx(0.25, abs=0.01)
    # orientation: X is the column and Y the row, so vertex centroids fall on nuclei
    h, w = s.labels.shape
    hits = [
        s.labels[min(int(round(ys.mean())), h - 1), min(int(round(xs.mean())), w - 1)] > 0 for xs, ys in polys
    ]
    assert np.mean(hits) > 0.9
    # read_aperio_xml is what load_monuseg used
    assert np.array_equal(read_aperio_xml(xml, (h, w)), s.labels)


def test_monuseg_names_not_found(shared_data: Path) -> None:
    with pytest.raises(DatasetError, match="TCGA-ZZ-0000-01Z-00-DX1"):
        load_monuseg(shared_data / "monuseg" / "train", names=["TCGA-ZZ-0000-01Z-00-DX1"])


# ---------------------------------------------------------------- TNBC


def test_tnbc(shared_data: Path) -> None:
    root = shared_data / "tnbc"
    samples = load_tnbc(root, limit=3)
    assert len(samples) == 3
    for s in samples:
        with Image.open(root / "images" / f"{s.name}.png") as im:
            raw = np.asarray(im)
        with Image.open(root / "masks" / f"{s.name}.png") as im:
            mask = np.asarray(im)
        assert raw.shape[2] == 4  # these files are RGBA; the loader drops alpha
        assert s.image.dtype == np.uint8 and s.image.shape == (512, 512, 3)
        assert np.array_equal(s.image, raw[:, :, :3])
        expected, n = ndi.label(mask > 0, structure=ndi.generate_binary_structure(2, 1))
        assert s.labels.dtype == np.int32
        assert int(s.labels.max()) == n
        assert np.array_equal(s.labels > 0, mask > 0)
        assert np.array_equal(s.labels, expected)
        assert s.group == s.name.split("_")[0] == "01"
        assert s.mpp == TNBC_MPP


def test_load_dataset_tnbc_limit(shared_data: Path) -> None:
    samples = load_dataset("tnbc", shared_data / "tnbc", limit=1)
    assert [s.name for s in samples] == ["01_1"]


# ---------------------------------------------------------------- tcga_organ


@pytest.mark.parametrize(
    ("name", "organ"),
    [
        ("TCGA-A7-A13E-01Z-00-DX1", "breast"),
        ("TCGA-B0-5698-01Z-00-DX1", "kidney"),
        ("TCGA-HT-8564-01Z-00-DX1", "brain"),
        ("TCGA-21-5784-01Z-00-DX1", "liver"),
        ("tcga-g9-6362-01z-00-dx1", "prostate"),
        ("/data/images/TCGA-KB-A93J-01A-01-TS1.tif", "stomach"),
        ("TCGA-ZZ-0000-01Z-00-DX1", "unknown"),
        ("01_1", "unknown"),
        ("TCGA", "unknown"),
        ("", "unknown"),
    ],
)
def test_tcga_organ(name: str, organ: str) -> None:
    assert tcga_organ(name) == organ


# ---------------------------------------------------------------- generic folder


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """images/a.png + 16-bit instance mask, images/b.tif + binary 0/255 mask with 2 blobs."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    inst = np.zeros((20, 24), np.uint16)
    inst[2:8, 2:8] = 1
    inst[2:8, 8:14] = 2  # touches 1: must stay a separate instance
    inst[12:18, 15:22] = 300  # an id above 255 survives the 16-bit PNG
    Image.fromarray(_rgb(20, 24, 1)).save(root / "images" / "a.png")
    Image.fromarray(inst).save(root / "masks" / "a.png")
    binary = np.zeros((16, 18), np.uint8)
    binary[1:5, 1:5] = 255
    binary[9:14, 10:16] = 255
    Image.fromarray(_rgb(16, 18, 2)).save(root / "images" / "b.tif")
    Image.fromarray(binary).save(root / "masks" / "b.png")
    return root, inst, binary


def test_load_folder(tmp_path: Path) -> None:
    root, inst, binary = _folder(tmp_path)
    samples = load_folder(root, mpp=0.5)
    assert [s.name for s in samples] == ["a", "b"]
    a, b = samples
    assert a.image.shape == (20, 24, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, _rgb(20, 24, 1))
    assert a.labels.dtype == np.int32 and a.labels.shape == (20, 24)
    # same partition as the mask: one label per mask id, background stays 0
    assert np.array_equal(a.labels == 0, inst == 0)
    pairs = {(int(m), int(lab)) for m, lab in zip(inst.ravel(), a.labels.ravel())}
    assert len(pairs) == 4 and len({m for m, _ in pairs}) == 4 and len({lab for _, lab in pairs}) == 4
    assert b.image.shape == (16, 18, 3)
    assert b.labels.dtype == np.int32
    assert int(b.labels.max()) == 2 and set(np.unique(b.labels)) == {0, 1, 2}
    assert np.array_equal(b.labels > 0, binary > 0)
    assert a.mpp == b.mpp == 0.5 and a.group == b.group == ""
    assert [s.name for s in load_folder(root, mpp=0.5, limit=1)] == ["a"]
    assert all(s.mpp == MONUSEG_MPP for s in load_dataset("folder", root, mpp=MONUSEG_MPP))
    with pytest.raises(ConfigError, match="needs --mpp"):  # never a guessed resolution
        load_dataset("folder", root)


def test_folder_missing_masks_dir(tmp_path: Path) -> None:
    root, _, _ = _folder(tmp_path)
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    with pytest.raises(DatasetError, match="masks"):
        load_folder(root, mpp=0.5)
    with pytest.raises(DatasetError, match="masks"):
        load_tnbc(root)


def test_folder_image_without_mask(tmp_path: Path) -> None:
    root, _, _ = _folder(tmp_path)
    Image.fromarray(_rgb(8, 8)).save(root / "images" / "c_orphan.png")
    with pytest.raises(DatasetError, match="c_orphan.png"):
        load_folder(root, mpp=0.5)


def test_folder_mask_without_image(tmp_path: Path) -> None:
    root, _, _ = _folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "d_extra.png")
    with pytest.raises(DatasetError, match="d_extra"):
        load_folder(root, mpp=0.5)


def test_folder_size_mismatch(tmp_path: Path) -> None:
    root, _, _ = _folder(tmp_path)
    Image.fromarray(np.zeros((16, 17), np.uint8)).save(root / "masks" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png"):
        load_folder(root, mpp=0.5)


def test_folder_bad_mpp(tmp_path: Path) -> None:
    root, _, _ = _folder(tmp_path)
    with pytest.raises(DatasetError, match="mpp"):
        load_folder(root, mpp=0.0)


def test_folder_no_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_folder(tmp_path, mpp=0.5)


def test_load_dataset_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="pannuke"):
        load_dataset("pannuke", tmp_path)


def test_monuseg_image_without_annotation(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "images" / "TCGA-A7-0000-01Z-00-DX1.png")
    with pytest.raises(DatasetError, match="TCGA-A7-0000-01Z-00-DX1"):
        load_monuseg(tmp_path)


def test_monuseg_missing_images_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images"):
        load_monuseg(tmp_path)


def test_read_aperio_xml_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xml.gz"
    bad.write_bytes(gzip.compress(b"<Annotations><Region>"))
    with pytest.raises(DatasetError, match="broken.xml.gz"):
        read_aperio_xml(bad, (10, 10))
    not_gz = tmp_path / "plain.xml.gz"
    not_gz.write_bytes(b"<Annotations/>")
    with pytest.raises(DatasetError, match="plain.xml.gz"):
        read_aperio_xml(not_gz, (10, 10))


def test_read_aperio_xml_small(tmp_path: Path) -> None:
    """Later regions overwrite earlier ones, 2-vertex regions are skipped, labels end up 1..N."""
    xml = tmp_path / "tiny.xml"
    xml.write_text(
        '<Annotations MicronsPerPixel="0.5"><Annotation><Regions>'
        '<Region><Vertices><Vertex X="1" Y="1"/><Vertex X="6" Y="1"/><Vertex X="6" Y="4"/>'
        '<Vertex X="1" Y="4"/></Vertices></Region>'
        '<Region><Vertices><Vertex X="2" Y="2"/><Vertex X="8" Y="2"/></Vertices></Region>'
        '<Region><Vertices><Vertex X="10" Y="5"/><Vertex X="14" Y="5"/><Vertex X="14" Y="9"/>'
        '<Vertex X="10" Y="9"/></Vertices></Region>'
        "</Regions></Annotation></Annotations>",
        encoding="utf-8",
    )
    labels = read_aperio_xml(xml, (12, 16))
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == {0, 1, 2}
    assert labels[2, 3] == 1  # row = Y, column = X
    assert labels[7, 12] == 2
    assert labels[3, 12] == 0


# ---------------------------------------------------------------- CoNSeP (256² tiles stitched back)


def test_consep_stitching_equals_the_tiles(shared_data: Path) -> None:
    from wsi_nuclei.training.consep import CONSEP_MPP, CONSEP_TILE_ORIGINS, load_consep

    root = shared_data / "consep"
    (s,) = load_consep(root, "test", names=["test_2"])
    assert s.image.shape == (1000, 1000, 3) and s.labels.shape == (1000, 1000) and s.mpp == CONSEP_MPP
    assert s.dataset == "consep"
    for i, (y, x) in enumerate(CONSEP_TILE_ORIGINS):
        tile = np.asarray(Image.open(root / "images" / "test" / f"test_2_{i:03d}.jpg").convert("RGB"))
        inst = np.asarray(Image.open(root / "instances" / "test" / f"test_2_{i:03d}.png")).astype(np.int64)
        # JPEG tiles disagree a little where they overlap (24 px strips): the later tile wins there
        later = np.zeros((1000, 1000), bool)
        for yy, xx in CONSEP_TILE_ORIGINS[i + 1 :]:
            later[yy : yy + 256, xx : xx + 256] = True
        own = ~later[y : y + 256, x : x + 256]
        assert own.any() and np.array_equal(s.image[y : y + 256, x : x + 256][own], tile[own]), i
        # same partition: one stitched id per tile id, and background where the tile has none
        crop = s.labels[y : y + 256, x : x + 256]
        assert np.array_equal(crop == 0, inst == 0), i
        pairs = np.unique(np.stack([inst[inst > 0], crop[inst > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])), i
    assert s.labels.max() == len(np.unique(s.labels)) - 1 == 245  # the README: test_2 has 245 nuclei


@pytest.mark.slow
def test_consep_counts(shared_data: Path) -> None:
    from wsi_nuclei.training.consep import load_consep

    train = load_consep(shared_data / "consep", "train")
    test = load_dataset("consep-test", shared_data / "consep")
    assert [s.name for s in train][:3] == ["train_1", "train_2", "train_3"] and len(train) == 27
    assert len(test) == 14 and all(s.name.startswith("test_") for s in test)
    assert sum(int(s.labels.max()) for s in train) == 15555
    assert sum(int(s.labels.max()) for s in test) == 8777
    assert [int(s.labels.max()) for s in test][:4] == [865, 245, 394, 418]


def test_consep_errors(tmp_path: Path, shared_data: Path) -> None:
    from wsi_nuclei.training.consep import load_consep

    with pytest.raises(DatasetError, match="consep folder"):
        load_consep(tmp_path, "test")
    with pytest.raises(DatasetError, match="train or test"):
        load_consep(shared_data / "consep", "val")
    with pytest.raises(DatasetError, match="test_99"):
        load_consep(shared_data / "consep", "test", names=["test_99"])
    # a missing tile is named
    for sub in ("images/test", "instances/test"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(15):
        for sub, ext in (("images/test", "jpg"), ("instances/test", "png")):
            (tmp_path / sub / f"test_1_{i:03d}.{ext}").write_bytes(b"")
    with pytest.raises(DatasetError, match="test_1 has tiles"):
        load_consep(tmp_path, "test")


def test_images_are_read_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """Transparent pixels become white (black would read as nuclei), EXIF orientation is applied,
    a file of several images is refused with one line, and so is a lossy (JPEG) mask."""
    from wsi_nuclei.training.datasets import read_label_image, read_rgb

    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :6] = (200, 100, 150, 255)  # opaque tissue; the right half fully transparent (RGB 0)
    rgba[:, 6:9, 3] = 128  # half transparent black
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = read_rgb(tmp_path / "a.png")
    assert got.shape == (8, 12, 3)
    assert (got[:, :6] == (200, 100, 150)).all() and (got[:, 9:] == 255).all() and (got[:, 6:9] == 127).all()
    la = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)]), mode="LA")
    la.save(tmp_path / "la.png")
    assert (read_rgb(tmp_path / "la.png") == 255).all()
    # EXIF orientation 6 (rotate 90° clockwise to display): a 4 x 6 file shows as 6 x 4
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.png", exif=exif)
    shown = read_rgb(tmp_path / "r.png")
    assert shown.shape == (6, 4, 3) and tuple(shown[0, -1]) == (255, 0, 0)
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "two.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DatasetError, match="holds 2 images"):
        read_rgb(tmp_path / "two.tif")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(DatasetError, match="JPEG mask"):
        read_label_image(tmp_path / "m.jpg")
