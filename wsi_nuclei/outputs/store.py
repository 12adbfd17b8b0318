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

__all__ = ["create_store", "LabelCanvas", "Pyramid", "Sample", "build_pyramids", "open_array", "pyramid_levels"]

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

    def __init__(self, path: Path, chunk: int, pyramid: Pyramid | None = None) -> None:
        self.arr = open_array(path, "labels", 0, mode="r+")
        self.chunk = chunk
        self.rows, self.cols = int(-(-self.arr.shape[0] // chunk)), int(-(-self.arr.shape[1] // chunk))
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.last = -1
        self.pyramid = pyramid

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
        self._flush(lambda r, k: self.final_after(r, k) <= order)

    def final_after(self, r: int, k: int) -> int:
        """The grid index of the last chunk whose window reaches block (r, k): (r+1, k+1), clipped to
        the grid, so blocks of the last row and column are final as soon as the grid ends there."""
        return min(r + 1, self.rows - 1) * self.cols + min(k + 1, self.cols - 1)

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
            if self.pyramid is not None:
                self.pyramid.add(r, k, block)
        if self.pyramid is not None:
            self.pyramid.flush(done)


class Pyramid:
    """Levels 1… of one array of a new store, written while level 0 is: :meth:`add` takes each
    final level-0 block (grid position (r, k), chunk-sized, clipped at the edge), :meth:`flush`
    writes every block of the levels above whose level-0 blocks are all final. Gives what
    :func:`build_pyramids` gives after the fact (×2 nearest: level k+1 pixel (i, j) is level k
    pixel (2i, 2j); a test), each Zarr chunk written once and nothing read back.

    Level k+1 block (R, K) covers exactly the level-k blocks 2R..2R+1 × 2K..2K+1 (the chunk is
    the same at every level), so each block downsampled lands in one block above. Finality goes
    up the same way: ``done(r, k)``, asked of level-0 grid positions (monotone in r and in k, as
    row-major order gives), is final at level k+1 when the last of its four blocks is final.
    Holds about one grid row of blocks per level (a quarter of the one below).
    """

    def __init__(self, path: Path, name: str, chunk: int) -> None:
        self.chunk = chunk
        self.sample: Sample | None = None  # a level sampled as its blocks are written (the overlay's)
        self.arrays: list[Any] = []
        for k in range(1, 8):
            try:
                self.arrays.append(open_array(path, name, k, mode="r+"))
            except Exception:  # no such level
                break
        base = open_array(path, name, 0).shape
        self.base = (int(base[0]), int(base[1]))
        self.grids = [(-(-base[0] // chunk), -(-base[1] // chunk))] + [(-(-a.shape[0] // chunk), -(-a.shape[1] // chunk))
                                                                        for a in self.arrays]
        self.blocks: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in self.arrays]

    def shapes(self) -> list[tuple[int, int]]:
        """(H, W) of every level, level 0 first."""
        return [self.base, *(tuple(a.shape) for a in self.arrays)]

    def sample_level(self, level: int, shape: tuple[int, int]) -> Sample:
        """Sample ``level`` at ``shape`` while it is written (:class:`Sample`); returns the sample."""
        self.sample = Sample(level, self.shapes()[level], shape, self.chunk)
        return self.sample

    def add(self, r: int, k: int, block: np.ndarray, level: int = 0) -> None:
        """Level-``level`` block (r, k), final: its every other pixel into the block above it."""
        if self.sample is not None and self.sample.level == level:
            self.sample.add(r, k, block)
        if level >= len(self.arrays):
            return
        c = self.chunk
        y, x = r * c, k * c  # the block's origin at its level; the pixels kept sit at even positions
        part = block[y % 2 :: 2, x % 2 :: 2]
        if not part.any():
            return
        above = self.arrays[level]
        rr, kk = r // 2, k // 2
        key = (rr, kk)
        dst = self.blocks[level].get(key)
        if dst is None:
            shape = (min(c, above.shape[0] - rr * c), min(c, above.shape[1] - kk * c))
            dst = self.blocks[level][key] = np.zeros(shape, block.dtype)
        y0, x0 = (y + y % 2) // 2 - rr * c, (x + x % 2) // 2 - kk * c
        h, w = min(part.shape[0], dst.shape[0] - y0), min(part.shape[1], dst.shape[1] - x0)
        if h > 0 and w > 0:
            dst[y0 : y0 + h, x0 : x0 + w] = part[:h, :w]

    def flush(self, done: Any) -> None:
        """Write the blocks above level 0 that ``done`` (of level-0 grid positions) makes final."""
        for level in range(len(self.arrays)):
            for rr, kk in sorted(key for key in self.blocks[level] if self._final(level + 1, *key, done)):
                block = self.blocks[level].pop((rr, kk))
                c = self.chunk
                self.arrays[level][rr * c : rr * c + block.shape[0], kk * c : kk * c + block.shape[1]] = block
                self.add(rr, kk, block, level + 1)

    def close(self) -> None:
        """Write every block still held (level 0 is complete)."""
        self.flush(lambda r, k: True)

    def _final(self, level: int, r: int, k: int, done: Any) -> bool:
        """Block (r, k) of ``level`` (≥ 1): final when its last (bottom-right) block below is."""
        while level > 0:
            rows, cols = self.grids[level - 1]
            r, k, level = min(2 * r + 1, rows - 1), min(2 * k + 1, cols - 1), level - 1
        return bool(done(r, k))


class Sample:
    """A nearest-neighbour sample of one pyramid level at ``shape`` (pixel-centre sampling: what
    ``model.infer.resize_labels`` of the whole level gives, a test), filled block by block as the
    level is written, so nothing is read back for it (the overlay's labels)."""

    def __init__(self, level: int, source: tuple[int, int], shape: tuple[int, int], chunk: int) -> None:
        self.level, self.chunk = level, chunk
        self.rows = np.minimum(((np.arange(shape[0]) + 0.5) * source[0] / shape[0]).astype(np.int64), source[0] - 1)
        self.cols = np.minimum(((np.arange(shape[1]) + 0.5) * source[1] / shape[1]).astype(np.int64), source[1] - 1)
        self.image = np.zeros(shape, np.uint32)

    def add(self, r: int, k: int, block: np.ndarray) -> None:
        y0, x0 = r * self.chunk, k * self.chunk
        ti = np.flatnonzero((self.rows >= y0) & (self.rows < y0 + block.shape[0]))
        tj = np.flatnonzero((self.cols >= x0) & (self.cols < x0 + block.shape[1]))
        if len(ti) and len(tj):
            self.image[np.ix_(ti, tj)] = block[np.ix_(self.rows[ti] - y0, self.cols[tj] - x0)]


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
