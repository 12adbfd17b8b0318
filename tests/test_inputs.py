"""Every input value checked once: resolutions, the model, the cache,
every pixel format a slide can carry, and memory of single-level slides. Each case is a class
(several examples), never read as something else and never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_nuclei.cli.main import app
from wsi_nuclei.errors import SlideError
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many
from wsi_nuclei.slides.reader import open_slide

from .slides import disc_image, disc_slide, write_pyramid

runner = CliRunner()
FLAGS = ["--chunk-size", "256", "--halo", "32", "--context", "64", "--workers", "0", "--quiet"]
OPTS = {"chunk_size": 256, "halo": 32, "context": 64}
CLI = [sys.executable, "-m", "wsi_nuclei.cli.main"]


def _errors(output: str) -> list[str]:
    assert "Traceback" not in output
    return [ln for ln in output.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return disc_slide(tmp_path_factory.mktemp("in") / "s.tif", (256, 256), seed=31)


# resolutions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mpp, words", [
    ("0.00025", ["outside", "mm or nm", "--unusual-mpp"]),  # mm typed for µm
    ("250", ["outside", "--unusual-mpp"]),  # nm typed for µm
    ("1e300", ["outside"]),
    ("inf", ["must be > 0"]),
    ("nan", ["must be > 0"]),
    ("-0.5", ["must be > 0"]),
])
def test_implausible_mpp_is_refused_at_once(slide, tmp_path, mpp, words):
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--mpp", mpp, *FLAGS])
    assert result.exit_code == 2
    errors = _errors(result.output)
    assert len(errors) == 1 and "--mpp" in errors[0], result.output
    for w in words:
        assert w in errors[0]
    assert not (tmp_path / "out").exists()


def test_unusual_mpp_is_accepted_when_asked_and_a_huge_plan_is_refused(slide, tmp_path):
    ok = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "a"), "--mpp", "0.04", "--unusual-mpp", *FLAGS])
    assert ok.exit_code == 0, ok.output
    # in a subprocess with a time limit: the planning loop once ran for ever here
    cmd = CLI + ["segment", str(slide), "-o", str(tmp_path / "b"), "--mpp", "1e300", "--unusual-mpp", *FLAGS]
    huge = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert huge.returncode == 1, huge.stderr  # the slide fails
    errors = _errors(huge.stderr)
    assert len(errors) == 1 and "more than any slide" in errors[0] and "--mpp" in errors[0]


@pytest.mark.parametrize("meta_mpp", [1e-5, 0.01, 30.0, 100.0])
def test_implausible_slide_metadata_is_refused_with_the_fix(tmp_path, meta_mpp):
    img = disc_image((256, 256), [(64, 64), (180, 150)], 8, seed=32)
    path = write_pyramid(tmp_path / "m.tif", img, meta_mpp, levels=1)
    (res,) = segment_many([path], tmp_path / "out", SegmentConfig(**OPTS))
    assert res.status == "failed" and "m.tif" in res.reason and "metadata" in res.reason
    assert "--mpp" in res.reason and "--unusual-mpp" in res.reason and "\n" not in res.reason
    (fixed,) = segment_many([path], tmp_path / "out2", SegmentConfig(**OPTS, level0_mpp=0.5))
    assert fixed.status == "ok"


def test_mpp_that_replaces_good_metadata_is_said(slide, tmp_path, caplog):
    """--mpp overrides a slide's own resolution: allowed (the metadata can be wrong), but never in
    silence. One warning names both values; the file's own value stays in summary.json."""
    import logging

    from wsi_nuclei.pipeline.plan import model_card, plan_slide

    card = model_card(SegmentConfig())
    with caplog.at_level(logging.WARNING, logger="wsi_nuclei"):
        plan, _, _ = plan_slide(slide, tmp_path / "a", SegmentConfig(**OPTS, level0_mpp=0.25), card)
        plan_slide(slide, tmp_path / "b", SegmentConfig(**OPTS, level0_mpp=0.5), card)  # the same value: nothing to say
    said = [r.getMessage() for r in caplog.records if "replaces the slide's own" in r.getMessage()]
    assert len(said) == 1 and "s.tif" in said[0] and "--mpp 0.25" in said[0] and "0.5 µm/px" in said[0]
    assert plan.info.level0_mpp == 0.25 and plan.info.as_dict()["metadata_mpp"] == pytest.approx(0.5)


def _anisotropic(path: Path, mpp_x: float, mpp_y: float) -> Path:
    import tifffile

    img = disc_image((256, 256), [(64, 64), (180, 150)], 8, seed=33)
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("reader", ["auto", "tiffslide"])
def test_pixels_that_are_not_square_are_refused_unless_mpp_is_given(tmp_path, reader):
    """Before: mpp-y was ignored, so a slide of 0.25 x 0.5 µm pixels was segmented with areas and
    shapes off by 2x."""
    path = _anisotropic(tmp_path / "a.tif", 0.25, 0.5)
    (res,) = segment_many([path], tmp_path / "out", SegmentConfig(**OPTS, reader=reader))
    assert res.status == "failed" and "a.tif" in res.reason and "not square" in res.reason and "0.25 x 0.5" in res.reason
    assert "\n" not in res.reason and "--mpp" in res.reason
    (ok,) = segment_many([path], tmp_path / "out2", SegmentConfig(**OPTS, reader=reader, level0_mpp=0.25))
    assert ok.status == "ok"
    with open_slide(_anisotropic(tmp_path / "b.tif", 0.25, 0.2512), reader) as s:  # metadata rounding is square
        assert s.info.level0_mpp == pytest.approx(0.25)


def _thumbnail_only(path: Path, tiled: bool) -> Path:
    """An Aperio file holding only the CMU sample's thumbnail page (as an export that lost the
    full-resolution image leaves it), with the thumbnail's own description ("2220x2967 -> 574x768")."""
    import tifffile

    src = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs"
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[1]
        img, description = page.asarray(), page.description
    assert "->" in description
    kw = {"tile": (256, 256)} if tiled else {"rowsperstrip": 16}
    tifffile.imwrite(path, img, description=description, photometric="rgb", compression="jpeg", metadata=None, **kw)
    return path


@pytest.mark.parametrize("reader", ["auto", "tiffslide"])
@pytest.mark.parametrize("tiled", [False, True], ids=["strip", "tiled"])
def test_a_slide_holding_only_its_thumbnail_is_refused(tmp_path, tiled, reader):
    """Before: tiffslide read such a file as a slide whose level 0 is the 574x768 thumbnail at the
    scan's 0.499 µm/px, and segmented it (as nuclei 4x too small)."""
    path = _thumbnail_only(tmp_path / "thumb.svs", tiled)
    with pytest.raises(SlideError) as err:
        open_slide(path, reader)
    msg = str(err.value)
    assert "thumb.svs" in msg and "574x768 px of a 2220x2967 scan" in msg and "full-resolution image is missing" in msg
    with open_slide(Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs", reader) as s:
        assert s.info.dimensions == (2220, 2967)  # a whole slide (its thumbnail page is an associated image) opens as before


def _without_root_file_access(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python without the capabilities that let root read any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): file permissions then apply, as for any user."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to drop root's file access")
    drop = "-dac_override,-dac_read_search"
    return subprocess.run([setpriv, "--bounding-set", drop, "--inh-caps", drop, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120)


def test_a_slide_without_read_permission_says_so(tmp_path):
    """Before: "cannot open as a slide (...); check that it is a whole-slide image"."""
    path = tmp_path / "locked.svs"
    shutil.copy(Path(__file__).resolve().parents[1] / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs", path)
    path.chmod(0)
    run = _without_root_file_access(
        "from wsi_nuclei.slides.reader import open_slide\n"
        f"try:\n    open_slide({str(path)!r})\nexcept Exception as err:\n    print(type(err).__name__, err)\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("SlideError") and "locked.svs: permission denied" in run.stdout and "read access" in run.stdout
    assert "whole-slide image" not in run.stdout


def test_a_folder_that_cannot_be_read_is_named_in_the_batch(tmp_path):
    """A sub-folder the user cannot list is reported, not skipped without a word."""
    root = tmp_path / "slides"
    (root / "locked").mkdir(parents=True)
    disc_slide(root / "locked" / "x.tif", (256, 256), seed=37)
    disc_slide(root / "y.tif", (256, 256), seed=38)
    (root / "locked").chmod(0)
    run = _without_root_file_access(
        "from wsi_nuclei.pipeline.segment import find_slides\n"
        f"slides, bad = find_slides([__import__('pathlib').Path({str(root)!r})])\n"
        "print([p.name for p in slides]); print([r for _, r in bad])\n"
    )
    (root / "locked").chmod(0o755)
    assert run.returncode == 0, run.stderr
    found, reasons = run.stdout.splitlines()[:2]
    assert found == "['y.tif']" and "locked" in reasons and "ermission" in reasons


def test_a_grid_of_more_chunks_than_ids_asks_for_larger_chunks(tmp_path):
    """Nucleus ids are chunk index x 2**16 + local id: a plan of more than 65,536 chunks is refused
    at planning (before any compute), pointing to a larger --chunk-size, not a smaller one."""
    path = disc_slide(tmp_path / "wide.tif", (1024, 1024), seed=33, mpp=12.0)  # 24,576 working px a side
    flags = ["--chunk-size", "64", "--halo", "32", "--context", "64", "--device", "cpu", "--dry-run"]
    result = runner.invoke(app, ["segment", str(path), "-o", str(tmp_path / "o"), *flags])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = next(ln for ln in result.output.splitlines() if "wide.tif" in ln and "chunks of 64 px" in ln)
    assert "more than 65,536" in line and "use a larger --chunk-size (at least 96)" in line


def test_a_chunk_larger_than_the_slide_is_clipped(slide, tmp_path):
    (res,) = segment_many([slide], tmp_path / "out", SegmentConfig(chunk_size=16384, halo=32, context=64))
    assert res.status == "ok"
    summary = json.loads((tmp_path / "out" / "s" / "summary.json").read_text())
    assert summary["tiling"]["chunk"] <= 256


# the model, checked once, up front ---------------------------------------------------------------

def _model(tmp_path: Path, card_change: dict | None = None, weights=None) -> Path:
    """A copy of the shipped model with ``card_change`` merged into its card and ``weights``
    (a function of the state dict) applied, the card's sha256 updated to match."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from wsi_nuclei.model.network import DEFAULT_MODEL_DIR

    dst = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, dst)
    card = json.loads((dst / "model.json").read_text())
    if weights is not None:
        state = load_file(str(dst / "model.safetensors"))
        save_file(weights(state), str(dst / "model.safetensors"))
        card["weights_sha256"] = hashlib.sha256((dst / "model.safetensors").read_bytes()).hexdigest()
    for key, value in (card_change or {}).items():
        if isinstance(value, dict):
            card[key] = {**card.get(key, {}), **value}
        elif value is None:
            card.pop(key, None)
        else:
            card[key] = value
    (dst / "model.json").write_text(json.dumps(card))
    return dst


def _nan(state):
    k = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 100)
    state[k] = state[k].clone()
    state[k].view(-1)[0] = float("nan")
    return state


def _zeros(state):
    return {k: v * 0 if v.is_floating_point() else v for k, v in state.items()}


@pytest.mark.parametrize("card_change, weights, words", [
    (None, _nan, ["NaN", "model.safetensors"]),
    (None, _zeros, ["does not depend on the image"]),
    ({"postprocess": {"fg_threshold": 2}}, None, ["fg_threshold", "model.json"]),
    ({"postprocess": {"seed_threshold": -1}}, None, ["seed_threshold"]),
    ({"postprocess": {"method": "magic"}}, None, ["postprocess.method", "magic"]),
    ({"postprocess": {"min_area_um2": float("nan")}}, None, ["min_area_um2"]),
    ({"input_std": [0, 0, 0]}, None, ["input_std", "> 0"]),
    ({"input_mean": ["a", "b", "c"]}, None, ["input_mean"]),
    ({"context_px": -32}, None, ["context_px"]),
    ({"working_mpp": 0}, None, ["working_mpp"]),
    ({"weights_sha256": None}, None, ["weights_sha256", "missing"]),
])
def test_a_broken_model_is_refused_once_naming_its_file(slide, tmp_path, card_change, weights, words):
    model = _model(tmp_path, card_change, weights)
    result = runner.invoke(app, ["segment", str(slide), "-o", str(tmp_path / "out"), "--model", str(model), *FLAGS])
    assert result.exit_code == 2, result.output
    errors = _errors(result.output)
    assert len(errors) == 1, result.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert not (tmp_path / "out").exists()


def test_nan_probabilities_are_an_error_not_zero_nuclei():
    from wsi_nuclei.errors import ModelError
    from wsi_nuclei.model.infer import check_finite

    probs = np.zeros((3, 64, 64), np.float32)
    check_finite(probs, "x")
    probs[1, 5, 5] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        check_finite(probs, "chunk 3")


# the model cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["a-file", "read-only"])
def test_an_unwritable_cache_falls_back_with_one_warning(slide, tmp_path, kind):
    cache = tmp_path / "cache"
    if kind == "a-file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        cache.chmod(0o500)
    env = {**os.environ, "WSI_NUCLEI_CACHE": str(cache / "sub" if kind == "a-file" else cache), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    cmd = [sys.executable, "-m", "wsi_nuclei.cli.main", "segment", str(slide), "-o", str(tmp_path / "out"), "--backend", "onnx",
           "--threads", "1", *FLAGS]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        cache.chmod(0o700) if cache.is_dir() else None
    if kind == "read-only" and os.access(cache, os.W_OK) and os.geteuid() == 0:
        # root writes anyway: the cache is usable, nothing to fall back from
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("cannot write the model cache") == 1 and "WSI_NUCLEI_CACHE" in done.stderr
    assert "Traceback" not in done.stderr
    assert list((tmp_path / "tmp").glob("wsi-nuclei-cache-*/onnx/*.onnx"))


# pixel formats: every class converted to RGB or refused with one line ---------------------------

def _rgb() -> np.ndarray:
    return disc_image((320, 320), [(x, y) for y in range(20, 320, 40) for x in range(20, 320, 40)], 7, seed=33)


def _write(path: Path, arr: np.ndarray, tiled: bool, **kw) -> Path:
    import tifffile

    extra = {"tile": (256, 256)} if tiled else {}
    tifffile.imwrite(path, arr, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **kw, **extra)
    return path


FORMATS = {
    # name: (samples from the RGB reference, tifffile options, what a reader must give)
    "rgb": (lambda c: c, {"photometric": "rgb"}, "rgb"),
    "rgba": (lambda c: np.dstack([c, np.full(c.shape[:2], 255, np.uint8)]), {"photometric": "rgb", "extrasamples": [2]}, "rgb"),
    "rgb16": (lambda c: c.astype(np.uint16) * 257, {"photometric": "rgb"}, "rgb"),
    "rgba16": (
        lambda c: np.dstack([c, np.full(c.shape[:2], 255, np.uint8)]).astype(np.uint16) * 257,
        {"photometric": "rgb", "extrasamples": [2]},
        "rgb",
    ),
    "rgb-float": (lambda c: c.astype(np.float32) / 255, {"photometric": "rgb"}, "rgb"),
    "cmyk": (lambda c: np.dstack([255 - c, np.zeros(c.shape[:2], np.uint8)]), {"photometric": "separated"}, "rgb"),
    "grey": (lambda c: c[:, :, 1], {"photometric": "minisblack"}, "grey"),
    "grey-alpha": (
        lambda c: np.dstack([c[:, :, 1], np.full(c.shape[:2], 255, np.uint8)]),
        {"photometric": "minisblack", "extrasamples": [2]},
        "grey",
    ),
    "grey16": (lambda c: c[:, :, 1].astype(np.uint16) * 257, {"photometric": "minisblack"}, "grey"),
    "min-is-white": (lambda c: 255 - c[:, :, 1], {"photometric": "miniswhite"}, "grey"),
    "five-samples": (lambda c: np.dstack([c, c[:, :, :2]]), {"photometric": "minisblack", "planarconfig": "contig"}, "refused"),
    "signed16": (lambda c: c[:, :, 1].astype(np.int16), {"photometric": "minisblack"}, "refused"),
    "rgb-two-alpha": (lambda c: np.dstack([c, c[:, :, :2]]), {"photometric": "rgb", "extrasamples": [2, 0]}, "refused"),
}


@pytest.mark.parametrize("tiled", [False, True], ids=["strip", "tiled"])
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("reader", ["auto", "tiffslide"])
def test_every_pixel_format_is_rgb_or_refused(tmp_path, name, tiled, reader):
    make, kw, expect = FORMATS[name]
    rgb = _rgb()
    path = _write(tmp_path / f"{name}.tif", make(rgb), tiled, **kw)
    if expect == "refused":
        with pytest.raises(SlideError) as err:
            with open_slide(path, reader) as s:
                s.read_working((0, 0, 64, 64), 1.0)
        msg = str(err.value)
        assert path.name in msg and "\n" not in msg and "convert it to 8-bit RGB" in msg
        return
    with open_slide(path, reader) as s:
        got = s.read_working((0, 0, 320, 320), 1.0)
        thumb, _ = s.thumbnail(128)
    assert got.shape == (320, 320, 3) and got.dtype == np.uint8 and thumb.dtype == np.uint8
    want = rgb if expect == "rgb" else np.repeat(rgb[:, :, 1:2], 3, axis=2)
    assert np.abs(got.astype(int) - want).max() <= 2  # the same pixels, whatever the container


def test_a_refused_format_is_one_line_in_a_batch(tmp_path):
    bad = _write(tmp_path / "five.tif", np.dstack([_rgb(), _rgb()[:, :, :2]]), False, photometric="minisblack", planarconfig="contig")
    good = disc_slide(tmp_path / "good.tif", (256, 256), seed=34)
    res = segment_many([bad, good], tmp_path / "out", SegmentConfig(**OPTS))
    assert [r.status for r in res] == ["failed", "ok"]
    assert "5 samples per pixel" in res[0].reason and "\n" not in res[0].reason


# damaged image data: never substitute pixels ---------------------------------------------------

def _damaged(src: Path, dst: Path, how: str, tile: int = 5) -> Path:
    """A copy of ``src`` with its level-0 ``tile`` damaged: ``zeros`` (4 KB of its JPEG data zeroed,
    as a failing disk or share leaves it) or ``cut`` (the file ends inside that tile)."""
    import tifffile

    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    data = bytearray(src.read_bytes())
    if how == "zeros":
        data[offset + count // 3 : offset + count // 3 + 4096] = bytes(4096)
    else:
        data = data[: offset + count // 2]
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("reader", ["auto", "tiffslide"])
@pytest.mark.parametrize("how", ["zeros", "cut"])
@pytest.mark.parametrize("kind", ["svs", "pyramid"])
def test_a_damaged_tile_fails_the_slide_with_one_line(tmp_path, kind, how, reader):
    """Before: tiffslide decoded a tile of zeroed JPEG data (libjpeg's warning ignored) as grey
    pixels, and a pyramid cut inside a tile, which OpenSlide refuses, was opened by tiffslide
    with a grey tile; both were segmented as ok."""
    root = Path(__file__).resolve().parents[1]
    if kind == "svs":
        src, box, tile = root / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs", (0, 0, 2220, 2967), 65
    else:
        src, box, tile = disc_slide(tmp_path / "src.tif", (1024, 1024), seed=3), (0, 0, 1024, 1024), 5
    path = _damaged(src, tmp_path / f"damaged{src.suffix}", how, tile)
    with pytest.raises(SlideError) as err:
        with open_slide(path, reader) as s:
            s.read_working(box, 1.0)
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg and "again" in msg
    assert ("damaged" in msg or "incomplete" in msg or "truncated" in msg)


def test_a_damaged_tile_is_a_failed_slide_in_a_batch_and_intact_tiles_still_read(tmp_path):
    good = disc_slide(tmp_path / "good.tif", (512, 512), seed=35)
    bad = _damaged(disc_slide(tmp_path / "src.tif", (512, 512), seed=36), tmp_path / "bad.tif", "zeros", tile=3)
    res = segment_many([bad, good], tmp_path / "out", SegmentConfig(**OPTS, reader="tiffslide"))
    assert [r.status for r in res] == ["failed", "ok"]
    assert "tile 3 of level 0" in res[0].reason and "Corrupt JPEG data" in res[0].reason
    with open_slide(bad, "tiffslide") as s:  # the tiles before the damaged one read as before
        assert s.read_working((0, 0, 256, 256), 1.0).shape == (256, 256, 3)


# single-level slides: memory flat --------------------------------------------------------------

def test_thumbnail_in_tiles_equals_one_read(tmp_path):
    img = disc_image((1500, 1300), [(x, y) for y in range(30, 1500, 90) for x in range(30, 1300, 90)], 12, seed=35)
    path = write_pyramid(tmp_path / "flat.tif", img, 0.25, levels=1)
    with open_slide(path) as s:
        whole, scale = s.thumbnail(300)
        tiled, scale2 = s.thumbnail(300, read_px=40_000)  # tiles of ~200 level px
    assert scale == scale2 and whole.shape == tiled.shape
    assert np.abs(whole.astype(int) - tiled).mean() < 1.0 and np.abs(whole.astype(int) - tiled).max() <= 40


@pytest.mark.slow
def test_thumbnail_of_a_slide_without_a_pyramid_has_bounded_memory(tmp_path):
    """A 12,288² single-level slide (604 MB as RGBA in one read): the thumbnail's peak memory
    stays near the tile budget (64 MB), not the level's size."""
    import tifffile

    tile = disc_image((512, 512), [(x, y) for y in range(16, 512, 48) for x in range(16, 512, 48)], 9, seed=36)
    n = 24
    with tifffile.TiffWriter(tmp_path / "flat.tif") as tif:
        tif.write((tile for _ in range(n * n)), shape=(512 * n, 512 * n, 3), dtype=np.uint8, tile=(512, 512), compression="jpeg",
                  photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    code = ("import resource, sys; from wsi_nuclei.slides.reader import open_slide\n"
            "s = open_slide(sys.argv[1]); s.read_working((0, 0, 64, 64), 1.0)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "t, _ = s.thumbnail(2048)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, t.shape)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "flat.tif")], capture_output=True, text=True, timeout=300, check=True)
    grown_mb = int(done.stdout.split()[0])
    assert grown_mb < 300, done.stdout  # one read of level 0 would take > 600 MB


@pytest.mark.parametrize("mpp", ["250", "0", "0.001"])
def test_evaluate_checks_the_resolution_too(tmp_path, mpp):
    from PIL import Image

    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    Image.fromarray(disc_image((64, 64), [(32, 32)], 8, seed=37)).save(tmp_path / "d" / "images" / "a.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 1
    Image.fromarray(mask).save(tmp_path / "d" / "masks" / "a.png")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "d"), "--dataset", "folder", "--mpp", mpp])
    assert result.exit_code == 2
    errors = _errors(result.output)
    assert len(errors) == 1 and "--mpp" in errors[0] and "--unusual-mpp" not in errors[0]


def test_segment_image_mpp_hint_names_no_missing_option(tmp_path):
    result = runner.invoke(app, ["segment-image", str(tmp_path), "--mpp", "250", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "outside" in result.output and "--unusual-mpp" not in result.output


def test_info_on_a_folder_says_what_to_give(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a file" in result.output and "one slide file" in result.output


def test_a_malformed_scheduler_address_does_not_claim_a_wait(tmp_path):
    result = runner.invoke(app, ["segment", str(tmp_path), "-o", str(tmp_path / "o"), "--scheduler", "foo", "--connect-timeout", "20",
                                 "--device", "cpu"])
    errors = _errors(result.output)
    assert result.exit_code == 2 and len(errors) == 1 and "cannot reach the Dask scheduler at foo" in errors[0]
    assert "within 20 s" not in errors[0] and "tcp://host:port" in errors[0]


def test_cluster_slurm_without_sbatch_is_one_line_not_a_hang(slide, tmp_path):
    """No sbatch on PATH. The rest (a rejected submission, jobs pending for too long) is tested on
    the real SLURM (test_slurm.py)."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no SLURM commands
    cmd = CLI + ["segment", str(slide), "-o", str(tmp_path / "o"), "--cluster", "slurm", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = _errors(done.stderr)
    assert len(errors) == 1 and "sbatch" in errors[0] and "--cluster local" in errors[0]
