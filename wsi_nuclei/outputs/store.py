"""``mask.zarr``: the only module that touches Zarr.

Layout (Zarr v2 format, OME-NGFF 0.4 multiscales so napari / ome-zarr-py open each group)::

    mask.zarr/                 attrs: wsi_nuclei = {slide, working_mpp, scale, tiling, model card, version}
      probability/0, 1, …      uint8 nucleus probability × 255, (y, x) at the working mpp, ×2 pyramid
      labels/0, 1, …           uint32 nucleus ids (globally unique), same grid; NGFF "image-label"

Arrays are chunked like the pipeline's chunk grid, so each chunk's core is one Zarr chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["create_store", "LabelCanvas", "build_pyramids", "open_array", "pyramid_levels"]

ARRAYS = {"probability": "uint8", "labels": "uint32"}


def pyramid_levels(shape: tuple[int, int], min_side: int = 256) -> int:
    """Number of ×2 levels (level 0 included) until the smaller side drops below ``min_side``."""
    n, h, w = 1, shape[0], shape[1]
    while min(h, w) // 2 >= min_side and n < 8:
        h, w, n = h // 2, w // 2, n + 1
    return n


def _multiscales(name: str, levels: int, mpp: float) -> list[dict[str, Any]]:
    return [{
        "version": "0.4",
        "name": name,
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [mpp * 2**k, mpp * 2**k]}]}
            for k in range(levels)
        ],
    }]


def _codec() -> Any:
    """Zstandard level 1: faster to write than zarr's default (level 3) for labels and probabilities."""
    import numcodecs

    return numcodecs.Zstd(level=1)


def create_store(path: Path, shape: tuple[int, int], chunk: int, mpp: float, attrs: dict[str, Any]) -> None:
    """Create ``mask.zarr`` with empty arrays of ``shape`` (H, W) for every pyramid level."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["wsi_nuclei"] = attrs
    levels = pyramid_levels(shape)
    for name, dtype in ARRAYS.items():
        group = root.create_group(name)
        h, w = shape
        for k in range(levels):
            group.create_array(str(k), shape=(h, w), chunks=(min(chunk, max(h, 1)), min(chunk, max(w, 1))), dtype=dtype, fill_value=0,
                               compressors=_codec())
            h, w = max(1, h // 2), max(1, w // 2)
        group.attrs["multiscales"] = _multiscales(name, levels, mpp)
        if name == "labels":
            group.attrs["image-label"] = {"version": "0.4", "source": {"image": "../probability"}}


def open_array(path: Path, name: str, level: int = 0, mode: str = "r") -> Any:
    import zarr

    return zarr.open_array(str(Path(path) / name / str(level)), mode=mode, zarr_format=2)


class LabelCanvas:
    """Composes label windows into ``labels/0`` of a new store so that every Zarr chunk is written
    once and never read back (a read-modify-write of the array per window gives the same, a test).

    Windows of the chunk grid arrive in row-major order; the window of grid chunk (R, C) starts
    ``halo`` px before its core (``halo`` < ``chunk``), so it reaches only blocks R-1..R+1,
    C-1..C+1. A block is therefore final once the window of chunk (r+1, c+1) has been pasted (or a
    later one): it is written then. Non-zero pixels of a later window win.
    Holds about one grid row of blocks.
    """

    def __init__(self, path: Path, chunk: int) -> None:
        self.arr = open_array(path, "labels", 0, mode="r+")
        self.chunk = chunk
        self.cols = -(-self.arr.shape[1] // chunk)
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.last = -1

    def paste(self, row: int, col: int, y: int, x: int, window: np.ndarray) -> None:
        """Paste ``window`` (top-left (y, x), may be negative) of grid chunk (``row``, ``col``)."""
        order = row * self.cols + col
        if order <= self.last:
            raise ValueError(f"chunk ({row}, {col}) pasted out of row-major order")
        self.last = order
        h, w = self.arr.shape
        c = self.chunk
        for r in range(max(0, y // c), min(-(-h // c), -(-(y + window.shape[0]) // c))):
            for k in range(max(0, x // c), min(self.cols, -(-(x + window.shape[1]) // c))):
                y0, x0 = max(y, r * c), max(x, k * c)
                y1, x1 = min(y + window.shape[0], (r + 1) * c, h), min(x + window.shape[1], (k + 1) * c, w)
                if y1 <= y0 or x1 <= x0:
                    continue
                part = window[y0 - y : y1 - y, x0 - x : x1 - x]
                if not part.any():
                    continue
                block = self.blocks.get((r, k))
                if block is None:
                    block = self.blocks[(r, k)] = np.zeros((min(c, h - r * c), min(c, w - k * c)), np.uint32)
                view = block[y0 - r * c : y1 - r * c, x0 - k * c : x1 - k * c]
                np.copyto(view, part, where=part > 0)
        self._flush(lambda r, k: (r + 1) * self.cols + (k + 1) <= order)

    def under(self, y: int, x: int, shape: tuple[int, int]) -> np.ndarray:
        """What earlier windows painted on the region (top-left (y, x), may be negative) of a window
        about to be pasted (0 outside the array and where nothing is). Every block such a window
        reaches is still held (see the class docstring), so nothing is read back from disk."""
        out = np.zeros(shape, np.uint32)
        h, w = self.arr.shape
        c = self.chunk
        for r in range(max(0, y // c), min(-(-h // c), -(-(y + shape[0]) // c))):
            for k in range(max(0, x // c), min(self.cols, -(-(x + shape[1]) // c))):
                block = self.blocks.get((r, k))
                if block is None:
                    continue
                y0, x0 = max(y, r * c), max(x, k * c)
                y1, x1 = min(y + shape[0], r * c + block.shape[0]), min(x + shape[1], k * c + block.shape[1])
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = block[y0 - r * c : y1 - r * c, x0 - k * c : x1 - k * c]
        return out

    def close(self) -> None:
        """Write every block still held."""
        self._flush(lambda r, k: True)

    def _flush(self, done: Any) -> None:
        for r, k in sorted(key for key in self.blocks if done(*key)):
            block = self.blocks.pop((r, k))
            c = self.chunk
            self.arr[r * c : r * c + block.shape[0], k * c : k * c + block.shape[1]] = block


def build_pyramids(path: Path, chunk: int) -> None:
    """Fill levels 1… of every array from the level below (×2 nearest), chunk by chunk."""
    for name in ARRAYS:
        k = 1
        while True:
            try:
                dst = open_array(path, name, k, mode="r+")
            except Exception:
                break
            src = open_array(path, name, k - 1)
            h, w = dst.shape
            for y in range(0, h, chunk):
                for x in range(0, w, chunk):
                    block = src[2 * y : 2 * min(h, y + chunk), 2 * x : 2 * min(w, x + chunk)][::2, ::2]
                    dst[y : y + block.shape[0], x : x + block.shape[1]] = block
            k += 1
