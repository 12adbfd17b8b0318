"""A slide's pixel format, decided once per file, and its conversion to 8-bit RGB(A).

TIFF files carry their samples in many forms: 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA, or
CMYK) samples, 8- or 16-bit integers or floats, min-is-white grey. :func:`pixel_format` reads what
the file's tags say and either returns a :class:`PixelFormat` that :func:`to_rgba8` converts
exactly (a fixed scale per format, never one per region) or refuses the file with the reason.
Pure numpy: the tags are read by :mod:`wsi_nuclei.slides.reader`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PixelFormat", "UnsupportedPixels", "pixel_format", "to_rgba8"]


class UnsupportedPixels(ValueError):
    """The file's pixels are not an RGB(-convertible) image; the message says what they are."""


@dataclass(frozen=True)
class PixelFormat:
    """How to turn a region read as raw samples into RGB(A) uint8."""

    kind: str  # "rgb", "grey", "grey-inverted" (min-is-white) or "cmyk"
    alpha: bool  # one extra sample is transparency
    scale: float  # multiplies a sample to 0..255 (uint8: 1, uint16: 1/257, float in 0..1: 255)
    dtype: str
    note: str = ""  # the format in words, for messages

    @property
    def plain(self) -> bool:
        """Already 8-bit RGB or RGBA: nothing to convert."""
        return self.kind == "rgb" and self.scale == 1.0


_PHOTOMETRIC = {"MINISBLACK": "grey", "MINISWHITE": "grey-inverted", "RGB": "rgb", "YCBCR": "rgb", "SEPARATED": "cmyk"}
_COLOUR_SAMPLES = {"grey": 1, "grey-inverted": 1, "rgb": 3, "cmyk": 4}


def pixel_format(photometric: str, samples: int, extra: int, dtype: np.dtype | str, bits: int) -> PixelFormat:
    """The :class:`PixelFormat` of a TIFF page (its ``photometric`` name, samples per pixel,
    number of extra samples, sample ``dtype`` and bits per sample); raises
    :class:`UnsupportedPixels` for anything that would be read as something else."""
    dt = np.dtype(dtype)
    words = f"{samples} sample{'s' if samples != 1 else ''} per pixel of {dt.name} ({photometric.lower()})"
    kind = _PHOTOMETRIC.get(photometric.upper())
    if kind is None:
        raise UnsupportedPixels(f"its pixels are {words}, which is not an RGB or grey image (palette, Lab and masks are not read)")
    colour = samples - extra
    if colour != _COLOUR_SAMPLES[kind] or extra > 1:
        raise UnsupportedPixels(f"its pixels are {words} with {extra} extra; only grey, RGB and CMYK with at most one alpha "
                                "sample are read (a multispectral or fluorescence image is not H&E)")
    if dt.kind == "u" and bits in (8, 16, 32) and dt.itemsize * 8 == bits:
        scale = 255.0 / float(np.iinfo(dt).max)
    elif dt.kind == "f":
        scale = 255.0  # floating-point samples are light intensities in 0..1 (clipped)
    else:
        raise UnsupportedPixels(f"its pixels are {words} at {bits} bits; only unsigned 8/16/32-bit or floating-point samples are read")
    return PixelFormat(kind, extra == 1, scale, dt.name, words)


def to_rgba8(arr: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """(H, W, 3 or 4) uint8 RGB(A) of a region ``arr`` of raw samples, (H, W) or (H, W, S)."""
    a = arr[:, :, None] if arr.ndim == 2 else arr
    if fmt.scale == 1.0 and a.dtype == np.uint8:
        v = a
    else:
        v = np.clip(np.rint(a.astype(np.float32) * np.float32(fmt.scale)), 0, 255).astype(np.uint8)
    colour, alpha = v[:, :, : _COLOUR_SAMPLES[fmt.kind]], v[:, :, _COLOUR_SAMPLES[fmt.kind] :]
    if fmt.kind in ("grey", "grey-inverted"):
        g = colour[:, :, 0] if fmt.kind == "grey" else 255 - colour[:, :, 0]
        rgb = np.repeat(g[:, :, None], 3, axis=2)
    elif fmt.kind == "cmyk":
        c = colour.astype(np.float32) / 255.0
        rgb = np.rint(255.0 * (1.0 - c[:, :, :3]) * (1.0 - c[:, :, 3:4])).astype(np.uint8)
    else:
        rgb = colour
    if fmt.alpha and alpha.shape[2]:
        return np.ascontiguousarray(np.concatenate([rgb, alpha[:, :, :1]], axis=2))
    return np.ascontiguousarray(rgb)
