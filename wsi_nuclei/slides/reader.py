"""Whole-slide reading: the only module that imports openslide or tiffslide.

Frames: ``level-0`` pixels are the slide's full-resolution grid, (x, y), origin top-left;
``working`` pixels are the model's grid, one working pixel = ``scale`` level-0 pixels, where
``scale = working_mpp / slide_mpp``. :meth:`Slide.read_working` returns RGB at the working grid,
read from the pyramid level just above the working resolution and resampled (area average),
with white (glass) outside the slide.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, SlideError, shown
from .integrity import TileCheck, check_extent, check_readable, check_square, reduced_only
from .pixels import PixelFormat, UnsupportedPixels, pixel_format, to_rgba8

__all__ = ["PLAUSIBLE_MPP", "check_mpp", "SlideInfo", "Slide", "open_slide", "composite_on_white", "SLIDE_EXTENSIONS"]

#: µm per level-0 px a slide plausibly has (0.25 at 40x, 0.5 at 20x; 10 would be a 1x overview):
#: outside it, mm or nm were most likely typed for µm. ``--unusual-mpp`` accepts any finite value.
PLAUSIBLE_MPP = (0.05, 20.0)


def check_mpp(value: float, where: str, unusual: bool = False, override: str = "--unusual-mpp") -> None:
    """Refuse a resolution that is not a finite number > 0, or (unless ``unusual``) outside
    :data:`PLAUSIBLE_MPP`; ``where`` names its source in the message ("--mpp", a slide file)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise ConfigError(f"{where} must be > 0 µm/px and finite, got {value!r}; e.g. --mpp 0.25 for 40x or 0.5 for 20x")
    lo, hi = PLAUSIBLE_MPP
    if not unusual and not lo <= value <= hi:
        raise ConfigError(
            f"{where}: {value:g} µm/px is outside the {lo:g}-{hi:g} µm/px of slides (0.25 at 40x, 0.5 at 20x; "
            "was it typed in mm or nm?); pass the right --mpp" + (f", or {override} if the value is right" if override else "")
        )


log = logging.getLogger(__name__)

#: Extensions searched in folders (what OpenSlide or tiffslide read).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".czi")


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: sizes per level (level-0 px), resolution and metadata.

    ``level0_mpp`` is µm per level-0 pixel (None when the file has no resolution metadata); ``bounds`` is
    the non-empty region (x, y, width, height) in level-0 px that QuPath crops to, or None.
    """

    path: str
    reader: str  #: the library that opened it: openslide or tiffslide
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    level0_mpp: float | None
    objective: float | None
    bounds: tuple[int, int, int, int] | None
    associated: tuple[str, ...]
    metadata_mpp: float | None = None  #: the file's own µm/px (``level0_mpp`` is --mpp when given)

    def as_dict(self) -> dict[str, Any]:
        """The record in ``summary.json`` and the Zarr attributes; ``backend`` repeats ``reader``
        (its name before 0.2, kept for readers of older files)."""
        from dataclasses import asdict

        out = asdict(self)
        out["backend"] = self.reader
        return out


def _prop(props: Any, *keys: str) -> str | None:
    for key in keys:
        value = props.get(key)
        if value not in (None, ""):
            return str(value)
    return None


def _float(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) and out > 0 else None


#: Level pixels a thumbnail reads at once (64 MB as RGBA): larger levels are read in tiles.
THUMBNAIL_READ_PX = 16_000_000
#: Working px read beyond a part of a window (:meth:`Slide.read_working_part`): more than the
#: support of the resampling filters (BOX and BILINEAR reach under 2 px at any downsample).
PART_MARGIN = 8


class Slide:
    """An open slide. Use :func:`open_slide`; close with :meth:`close` or a ``with`` block."""

    def __init__(self, handle: Any, info: SlideInfo, pixels: PixelFormat | None = None, raw: bool = False) -> None:
        self._h = handle
        self.info = info
        self._pixels = pixels  # the file's pixel format (TIFF), decided once
        self._raw = raw  # the handle returns raw samples (tiffslide), converted with ``_pixels``
        # tiffslide's JPEG decoder, and libtiff's behind OpenSlide's generic TIFF reader, ignore
        # libjpeg's corrupt-data warnings (OpenSlide's own JPEG decoding fails on them)
        strict = info.reader == "openslide" and info.vendor != "generic-tiff"
        self._check = None if strict else TileCheck.for_levels(Path(info.path), info.level_dimensions)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h.close()

    def best_level(self, downsample: float) -> int:
        """Index of the level with the largest downsample that is ≤ ``downsample`` (level 0 if none)."""
        best = 0
        for i, ds in enumerate(self.info.level_downsamples):
            if ds <= downsample * (1 + 1e-6) and ds >= self.info.level_downsamples[best]:
                best = i
        return best

    def thumbnail(self, max_size: int = 2048, read_px: int = THUMBNAIL_READ_PX) -> tuple[np.ndarray, float]:
        """RGB thumbnail (H, W, 3) uint8 no larger than ``max_size`` and its level-0 px per thumbnail px.

        Read from the pyramid level nearest above its resolution; when that level is far larger
        (a slide without a pyramid), it is read in tiles of at most ``read_px`` level pixels, each
        downsampled as it comes, so memory stays flat in the slide's size."""
        w0, h0 = self.info.dimensions
        scale = max(w0, h0) / max_size if max(w0, h0) > max_size else 1.0
        out_h, out_w = max(1, int(round(h0 / scale))), max(1, int(round(w0 / scale)))
        ratio = scale / self.info.level_downsamples[self.best_level(scale)]  # level px per thumbnail px
        if out_w * out_h * ratio * ratio <= read_px:
            return self.read_working((0, 0, out_w, out_h), scale), scale
        step = max(8, int(math.sqrt(read_px) / ratio))  # thumbnail px per tile side
        out = np.empty((out_h, out_w, 3), np.uint8)
        for ty in range(0, out_h, step):
            for tx in range(0, out_w, step):
                th, tw = min(step, out_h - ty), min(step, out_w - tx)
                out[ty : ty + th, tx : tx + tw] = self.read_working((tx, ty, tw, th), scale)
        return out, scale

    def read_working(self, box: tuple[int, int, int, int], scale: float) -> np.ndarray:
        """Read ``box`` = (x, y, width, height) in working px, one working px = ``scale`` level-0 px.

        Returns (height, width, 3) uint8 RGB; pixels outside the slide are white.
        """
        from PIL import Image

        x, y, w, h = box
        level = self.best_level(scale)
        ds = self.info.level_downsamples[level]
        lw, lh = self.info.level_dimensions[level]
        # the box in level-`level` pixel coordinates (floats)
        fx0, fy0 = x * scale / ds, y * scale / ds
        fx1, fy1 = (x + w) * scale / ds, (y + h) * scale / ds
        ix0, iy0 = max(0, math.floor(fx0)), max(0, math.floor(fy0))
        ix1, iy1 = min(lw, math.ceil(fx1)), min(lh, math.ceil(fy1))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        region = self._read(level, ds, ix0, iy0, ix1 - ix0, iy1 - iy0)
        # working-pixel extent of the part that was read, then resample exactly that part
        ox0, oy0 = max(0, math.ceil(ix0 * ds / scale - x - 1e-9)), max(0, math.ceil(iy0 * ds / scale - y - 1e-9))
        ox1, oy1 = min(w, math.floor(ix1 * ds / scale - x + 1e-9)), min(h, math.floor(iy1 * ds / scale - y + 1e-9))
        if ox1 <= ox0 or oy1 <= oy0:
            return out
        src_box = (
            (x + ox0) * scale / ds - ix0,
            (y + oy0) * scale / ds - iy0,
            (x + ox1) * scale / ds - ix0,
            (y + oy1) * scale / ds - iy0,
        )
        size = (ox1 - ox0, oy1 - oy0)
        img = Image.fromarray(region)
        same = abs(scale - ds) < 1e-9 and all(abs(v - round(v)) < 1e-6 for v in src_box)
        if same:
            left, top, right, bottom = (int(round(v)) for v in src_box)
            part = np.asarray(img.crop((left, top, right, bottom)))
        else:
            resample = Image.Resampling.BOX if scale > ds else Image.Resampling.BILINEAR
            part = np.asarray(img.resize(size, resample=resample, box=src_box))
        out[oy0:oy1, ox0:ox1] = part[:, :, :3]
        return out

    def read_working_part(self, box: tuple[int, int, int, int], scale: float, part: tuple[int, int, int, int]) -> np.ndarray:
        """:meth:`read_working` of ``box`` where only ``part`` = (x0, y0, x1, y1), in px of the box,
        is read; the rest is white. ``part`` is read with :data:`PART_MARGIN` px more on every side
        (clipped to the box), so the resampling filter at its edges sees the same source pixels as a
        read of the whole box: inside ``part`` the result equals the whole read."""
        x, y, w, h = box
        x0, y0 = max(0, part[0] - PART_MARGIN), max(0, part[1] - PART_MARGIN)
        x1, y1 = min(w, part[2] + PART_MARGIN), min(h, part[3] + PART_MARGIN)
        if (x0, y0, x1, y1) == (0, 0, w, h):
            return self.read_working(box, scale)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = self.read_working((x + x0, y + y0, x1 - x0, y1 - y0), scale)
        return out

    def _read(self, level: int, ds: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB of a level region (level px), transparent pixels composited onto white."""
        if self._check is not None:
            self._check.verify(level, x, y, w, h)
        try:
            at = (int(round(x * ds)), int(round(y * ds)))
            if self._raw and self._pixels is not None and not self._pixels.plain:
                region = to_rgba8(np.asarray(self._h.read_region(at, level, (w, h), as_array=True)), self._pixels)
            else:
                region = self._h.read_region(at, level, (w, h))
        except MemoryError:
            raise
        except Exception as err:  # the backends raise their own error types
            raise SlideError(
                f"{self.info.path}: cannot read region x={int(x * ds)} y={int(y * ds)} w={w} h={h} at level {level} "
                f"({type(err).__name__}: {err}); the file is damaged: copy it again, or re-export or re-scan it"
            ) from err
        arr = np.asarray(region)
        if arr.ndim == 2 or arr.dtype != np.uint8 or arr.shape[2] not in (3, 4):  # a format the file check let through
            raise SlideError(
                f"{shown(self.info.path)}: read {arr.shape} {arr.dtype} pixels where RGB was expected; convert the slide to 8-bit RGB"
            )
        return composite_on_white(arr)


def composite_on_white(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of (H, W, 3 or 4) uint8 RGB(A): transparent pixels (outside the scanned
    area) composited onto white, round(c·a + 255·(1 − a)) with a = alpha / 255."""
    rgb = np.ascontiguousarray(arr[:, :, :3])
    if arr.shape[2] == 4:
        # only the pixels that are not opaque: a read inside tissue has none, and compositing
        # every pixel in float is a large part of a read's time
        alpha = arr[:, :, 3]
        clear = alpha < 255
        if clear.any():
            a = alpha[clear].astype(np.float32)[:, None] / 255.0
            rgb[clear] = (rgb[clear].astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)
    return rgb


def _open_openslide(path: Path) -> tuple[Any, Any, str]:
    import openslide

    handle = openslide.OpenSlide(str(path))
    return handle, handle.properties, "openslide"


def _open_tiffslide(path: Path) -> tuple[Any, Any, str]:
    import tiffslide

    handle = tiffslide.TiffSlide(str(path))
    return handle, handle.properties, "tiffslide"


def _open_hint(path: Path) -> str:
    """What to do about a file no backend opens, from its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        head = b""
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "it is a plain PNG/JPEG image, not a slide: use `wsi-nuclei segment-image --mpp ...`"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "it is a TIFF that no reader accepts: the file is probably truncated or damaged; copy it again"
    return "check that it is a whole-slide image that OpenSlide or tiffslide reads"


def open_slide(path: Path | str, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : path
        Slide file.
    backend : {"auto", "openslide", "tiffslide"}
        ``auto`` tries OpenSlide first and falls back to tiffslide.
    mpp : float, optional
        µm per level-0 pixel, overriding (or supplying missing) metadata.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise SlideError(f"{shown(path)}: not a file (a folder?); give one slide file here (`segment` also takes folders)")
    if backend not in ("auto", "openslide", "tiffslide"):
        raise SlideError(f"unknown slide backend {backend!r}; use auto, openslide or tiffslide")
    check_readable(path)
    openers = {"openslide": [_open_openslide], "tiffslide": [_open_tiffslide], "auto": [_open_openslide, _open_tiffslide]}[backend]
    errors = []
    for opener in openers:
        try:
            handle, props, name = opener(path)
            break
        except ImportError as err:
            errors.append(f"{opener.__name__[6:]} not installed ({err})")
        except Exception as err:  # each backend has its own exception types
            errors.append(f"{opener.__name__[6:]}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    else:
        raise SlideError(f"{path}: cannot open as a slide ({'; '.join(errors)}); {_open_hint(path)}")
    try:
        pixels = _tiff_pixels(path)
    except UnsupportedPixels as err:
        handle.close()
        raise SlideError(f"{shown(path)}: {err}; convert it to 8-bit RGB (e.g. vips, QuPath or Fiji) and segment that") from None
    except SlideError:
        handle.close()
        raise
    if name == "openslide" and pixels is not None and not pixels.plain:
        # libtiff's RGBA reader, behind OpenSlide, misreads some of these (tiled grey + alpha and
        # 16-bit grey lose rows; float cannot be read): tiffslide reads the samples, converted here
        handle.close()
        if backend != "auto":
            raise SlideError(f"{shown(path)}: OpenSlide does not read {pixels.note} correctly; use --reader tiffslide (or auto)")
        handle, props, name = _open_tiffslide(path)
    prefix = name
    meta_mpp = _float(_prop(props, f"{prefix}.mpp-x", "openslide.mpp-x", "tiffslide.mpp-x"))
    if mpp is None:  # an --mpp says the pixels are square at that size
        try:
            check_square(path, meta_mpp, _float(_prop(props, f"{prefix}.mpp-y", "openslide.mpp-y", "tiffslide.mpp-y")))
        except SlideError:
            handle.close()
            raise
    slide_mpp = mpp or meta_mpp
    bx, by = _prop(props, f"{prefix}.bounds-x", "openslide.bounds-x"), _prop(props, f"{prefix}.bounds-y", "openslide.bounds-y")
    bw, bh = (
        _prop(props, f"{prefix}.bounds-width", "openslide.bounds-width"),
        _prop(props, f"{prefix}.bounds-height", "openslide.bounds-height"),
    )
    dims = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
    bounds = (int(bx or 0), int(by or 0), int(bw or dims[0][0]), int(bh or dims[0][1])) if (bx or by) else None
    try:
        associated = tuple(handle.associated_images.keys())
    except Exception:
        associated = ()
    info = SlideInfo(
        path=str(path),
        reader=name,
        vendor=_prop(props, f"{prefix}.vendor", "openslide.vendor", "tiffslide.vendor") or "unknown",
        dimensions=dims[0],
        level_dimensions=dims,
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        level0_mpp=slide_mpp,
        objective=_float(_prop(props, f"{prefix}.objective-power", "openslide.objective-power", "tiffslide.objective-power")),
        bounds=bounds,
        associated=associated,
        metadata_mpp=meta_mpp,
    )
    if min(info.dimensions) <= 0:
        handle.close()
        raise SlideError(f"{path}: slide has an empty level 0 {info.dimensions}")
    return Slide(handle, info, pixels, raw=name == "tiffslide")


def _tiff_pixels(path: Path) -> PixelFormat | None:
    """The pixel format of a TIFF's level 0 from its tags (None for other files: their reader
    returns RGB(A)); raises UnsupportedPixels for samples that are not an RGB or grey image, and
    SlideError for a file cut short (its image data reaches past its end)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            check_extent(tif, path)
            page = tif.series[0].keyframe
            why = reduced_only(page.description or "", (int(page.imagewidth), int(page.imagelength)))
            if why:
                raise SlideError(f"{shown(path)}: {why}")
            photometric = tifffile.PHOTOMETRIC(page.photometric).name
            samples, extra, dtype, bits = int(page.samplesperpixel), len(page.extrasamples), page.dtype, int(page.bitspersample)
    except SlideError:
        raise
    except Exception:  # not a TIFF (or not one tifffile parses): the slide reader decides
        return None
    if dtype is None:
        return None
    return pixel_format(photometric, samples, extra, dtype, bits)
