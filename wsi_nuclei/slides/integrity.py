"""Checks that a slide file can be read and that its pixels are the scanner's, not a substitute.

Before any reader: :func:`check_readable` (no permission, an I/O error), :func:`check_square`
(anisotropic pixels), :func:`reduced_only` (an Aperio file whose full-resolution image is missing).

Two kinds of damage decode without an error in some readers:

- a file cut short (an interrupted copy): its last tiles lie past the end of the file, and a reader
  that opens it anyway returns grey or white tiles there. :func:`check_extent` finds it at open,
  from the tile offsets, before any work is done;
- corrupt JPEG data in a tile (zeros or garbage from a failing disk or share): libjpeg warns
  ("Corrupt JPEG data: premature end of data segment") and fills the rest of the tile with grey.
  OpenSlide treats the warning as an error; tiffslide's decoder ignores it. :class:`TileCheck`
  decodes each JPEG tile a tiffslide read touches once more, strictly, and fails on a warning.

Damage that leaves a valid JPEG stream (a flipped bit) decodes to wrong pixels in every reader and
cannot be found from the file alone.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import SlideError, shown

__all__ = ["check_readable", "check_extent", "check_square", "reduced_only", "TileCheck"]

log = logging.getLogger(__name__)

JPEG = 7  #: TIFF compression code of JPEG ("new-style", with JPEGTables)


def check_readable(path: Path) -> None:
    """One line for a file this process cannot read at all (the readers would call it "not a
    slide"): no permission, or an I/O error of the disk or share."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise SlideError(f"{shown(path)}: permission denied; ask for read access to the file (and its folders), "
                         "or copy it somewhere you can read") from None
    except OSError as err:
        raise SlideError(
            f"{shown(path)}: cannot be read ({err.strerror or err}); check the disk or share, or copy the file again"
        ) from None


def reduced_only(description: str, dims: tuple[int, int]) -> str | None:
    """For an Aperio level 0 whose description says it was reduced from a larger scan
    (``46920x33014 -> 1024x768``: the thumbnail or a pyramid level, with the full-resolution image
    missing), the reason to refuse it; None otherwise."""
    found = re.search(r"(\d+)x(\d+)\s*->\s*(\d+)x(\d+)", description.split(";")[0] if description.startswith("Aperio") else "")
    if found is None:
        return None
    full_w, full_h, w, h = (int(v) for v in found.groups())
    if (w, h) != dims or full_w * full_h <= w * h:
        return None
    return (f"holds only a reduced image ({w}x{h} px of a {full_w}x{full_h} scan: its thumbnail or a lower level), "
            "the full-resolution image is missing; export or copy the whole slide again")


#: mpp-y may differ from mpp-x by this fraction (rounding in the metadata) before pixels are not square
SQUARE_TOLERANCE = 0.01


def check_square(path: Path, mpp_x: float | None, mpp_y: float | None) -> None:
    """Refuse pixels that are not square (mpp-y ≠ mpp-x): the pipeline resamples both axes by one
    factor, so areas and shapes would be off by their ratio."""
    if mpp_x and mpp_y and abs(mpp_y / mpp_x - 1) > SQUARE_TOLERANCE:
        raise SlideError(
            f"{shown(path)}: its pixels are not square ({mpp_x:g} x {mpp_y:g} µm); resample it to square pixels "
            "(e.g. vips resize with --vscale), or pass --mpp if the metadata is wrong and they are square"
        )


def check_extent(tif: Any, path: Path) -> None:
    """Raise :class:`SlideError` when a tile or strip of any page of the open ``tifffile.TiffFile``
    ``tif`` ends past the end of the file ``path``."""
    size = os.path.getsize(path)
    for i, page in enumerate(tif.pages):
        offsets, counts = page.dataoffsets, page.databytecounts
        if not len(offsets):
            continue
        end = max(int(o) + int(c) for o, c in zip(offsets, counts) if c) if any(counts) else 0
        if end > size:
            raise SlideError(
                f"{shown(path)}: the file ends at {size:,} bytes but its image data (page {i}) reaches {end:,}: "
                "the copy is incomplete; copy or download it again"
            )


def _checkable(page: Any, w: int, h: int) -> bool:
    return bool(
        page.compression == JPEG and page.is_tiled and int(page.planarconfig) == 1 and (page.imagewidth, page.imagelength) == (w, h)
    )


class TileCheck:
    """Strict decoding of the JPEG tiles of the levels of a TIFF slide, each tile once.

    ``pages`` holds one ``tifffile`` page per pyramid level (None where a level is not a JPEG-tiled
    page this can check)."""

    def __init__(self, path: Path, pages: list[Any]) -> None:
        self.path = path
        self._pages = pages
        # the tile table, read once here (threads share a slide handle; tifffile may load it lazily)
        self._tiles = [(p.dataoffsets, p.databytecounts, p.jpegtables) if p is not None else None for p in pages]
        self._done: set[tuple[int, int]] = set()

    @classmethod
    def for_levels(cls, path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> TileCheck | None:
        """The check for the levels of the TIFF ``path`` (each level's page found by its size, in
        the first series' levels or the top-level pages), or None when it has no JPEG-tiled level
        or is no TIFF."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                candidates = [level.keyframe for level in tif.series[0].levels] + list(tif.pages)
                pages = [next((p for p in candidates if _checkable(p, w, h)), None) for w, h in level_dimensions]
                check = cls(path, pages) if any(p is not None for p in pages) else None
        except Exception:  # not a TIFF tifffile parses: the reader's own decoding is all there is
            return None
        return check

    def verify(self, level: int, x: int, y: int, w: int, h: int) -> None:
        """Decode strictly every tile of ``level`` under the region (level px) not yet checked."""
        page = self._pages[level] if level < len(self._pages) else None
        if page is None:
            return
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(int(page.imagewidth) / tw)
        todo = [
            ty * across + tx
            for ty in range(max(0, y) // th, (max(0, y) + h - 1) // th + 1)
            for tx in range(max(0, x) // tw, min(across - 1, (max(0, x) + w - 1) // tw) + 1)
            if (level, ty * across + tx) not in self._done
        ]
        if todo:
            self._decode(level, page, todo)

    def _decode(self, level: int, page: Any, tiles: list[int]) -> None:
        import simplejpeg

        offsets, counts, tables = self._tiles[level]  # type: ignore[misc]
        with open(self.path, "rb") as fh:
            for k in tiles:
                if k >= len(offsets):
                    continue
                offset, count = int(offsets[k]), int(counts[k])
                if count:
                    fh.seek(offset)
                    raw = fh.read(count)
                    data = tables[:-2] + raw[2:] if tables and raw[:2] == b"\xff\xd8" else raw
                    try:
                        if len(raw) < count:
                            raise ValueError(f"the file ends {count - len(raw):,} bytes into it")
                        colorspace = "GRAY" if simplejpeg.decode_jpeg_header(data)[2] == "Gray" else "RGB"
                        simplejpeg.decode_jpeg(data, colorspace=colorspace, strict=True)
                    except ValueError as err:
                        raise SlideError(
                            f"{shown(self.path)}: tile {k} of level {level} (at byte {offset:,}) is damaged ({err}); "
                            "copy the file again, or re-export or re-scan it"
                        ) from None
                self._done.add((level, k))
