"""The nuclei of one chunk as columns: labels, outlines and measurements (numpy in, numpy out).

A :class:`NucleusTable` holds what the GeoJSON features of a chunk hold, as arrays: the slide-unique
label of each nucleus (its id in ``mask.zarr``'s ``labels``), its outline (a closed ring of level-0
px, x right, y down, in the GeoJSON's frame) and its measurements (QuPath's names, with units). The
chunk task stores it in its chunk file beside the encoded features (:mod:`wsi_nuclei.pipeline.chunk`);
assembly hands it to the Parquet writer (:mod:`wsi_nuclei.outputs.parquet`) and the density grid
(:mod:`wsi_nuclei.outputs.density`), so no JSON is parsed back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .polygons import Nucleus

__all__ = ["NucleusTable", "PIPELINE_MEASUREMENTS"]

#: The measurements of every nucleus of the slide pipeline, in order (``label_polygons`` with a
#: probability and an image): the columns of a table that has no nucleus.
PIPELINE_MEASUREMENTS = ("Area µm^2", "Perimeter µm", "Circularity", "Solidity", "Eccentricity", "Nucleus probability",
                         "Hematoxylin OD mean")


@dataclass(frozen=True)
class NucleusTable:
    """``n`` nuclei as columns.

    Attributes
    ----------
    labels : np.ndarray
        (n,) int64 slide-unique labels (chunk index x 2^16 + local rank), ascending within a chunk.
    offsets : np.ndarray
        (n + 1,) int64: the ring of nucleus i is ``xy[offsets[i]:offsets[i + 1]]``.
    xy : np.ndarray
        (m, 2) float64 vertices (x, y) in level-0 px, each ring closed (first vertex repeated last):
        exactly the GeoJSON's coordinates.
    names : tuple of str
        The measurement names (QuPath's, units in the name: "Area µm^2").
    values : np.ndarray
        (n, len(names)) float64 measurements; a value that is not finite is 0.0, as in the GeoJSON.
    kinds : np.ndarray or None
        (n,) int8 type of each nucleus (0: none, k: ``type_names[k - 1]``); None: an untyped table.
    type_names : tuple of str
        The types' QuPath names (empty for an untyped model).
    """

    labels: np.ndarray
    offsets: np.ndarray
    xy: np.ndarray
    names: tuple[str, ...]
    values: np.ndarray
    kinds: np.ndarray | None = None
    type_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, names: Sequence[str] = PIPELINE_MEASUREMENTS, type_names: Sequence[str] = ()) -> NucleusTable:
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 2)), tuple(names), np.zeros((0, len(names))),
                   np.zeros(0, np.int8) if type_names else None, tuple(type_names))

    def type_counts(self) -> dict[str, int]:
        """Nuclei per type name (empty for an untyped table)."""
        if not self.type_names or self.kinds is None:
            return {}
        counts = np.bincount(self.kinds.astype(np.int64), minlength=len(self.type_names) + 1)
        return {name: int(counts[k + 1]) for k, name in enumerate(self.type_names)}

    @classmethod
    def from_nuclei(cls, nuclei: Sequence[Nucleus], names: Sequence[str] | None = None, type_names: Sequence[str] = ()) -> NucleusTable:
        """The table of ``nuclei`` (in their order); ``names``: the measurement names when there
        are no nuclei (default :data:`PIPELINE_MEASUREMENTS`). Every nucleus must have the same
        measurement names, in the same order. ``type_names``: the types of a typed model."""
        if not nuclei:
            return cls.empty(PIPELINE_MEASUREMENTS if names is None else names, type_names)
        keys = tuple(nuclei[0].measurements)
        if any(tuple(nu.measurements) != keys for nu in nuclei):
            raise ValueError("nuclei with different measurement names cannot share a table")
        rings = [np.asarray(nu.ring, np.float64).reshape(-1, 2) for nu in nuclei]
        counts = np.array([len(r) for r in rings], np.int64)
        values = np.array([[v if math.isfinite(v) else 0.0 for v in nu.measurements.values()] for nu in nuclei], np.float64)
        kinds = np.array([nu.kind for nu in nuclei], np.int8) if type_names else None
        return cls(np.array([nu.label for nu in nuclei], np.int64), np.r_[0, np.cumsum(counts)].astype(np.int64),
                   np.concatenate(rings), keys, values.reshape(len(nuclei), len(keys)), kinds, tuple(type_names))

    def without(self, labels: Sequence[int] | np.ndarray) -> tuple[NucleusTable, int]:
        """This table without the nuclei of ``labels``, and how many were removed."""
        gone = np.isin(self.labels, np.asarray(labels, np.int64))
        if not gone.any():
            return self, 0
        keep = ~gone
        counts = np.diff(self.offsets)
        vertex_keep = np.repeat(keep, counts)
        return (NucleusTable(self.labels[keep], np.r_[0, np.cumsum(counts[keep])].astype(np.int64), self.xy[vertex_keep], self.names,
                             self.values[keep], None if self.kinds is None else self.kinds[keep], self.type_names), int(gone.sum()))

    def bounds(self) -> np.ndarray:
        """(n, 4) float64 (xmin, ymin, xmax, ymax) of each ring."""
        if not len(self):
            return np.zeros((0, 4))
        starts = self.offsets[:-1]
        x, y = self.xy[:, 0], self.xy[:, 1]
        return np.column_stack([np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts),
                                np.maximum.reduceat(x, starts), np.maximum.reduceat(y, starts)])

    def centroids(self) -> np.ndarray:
        """(n, 2) float64 area centroids (x, y) of the polygons, level-0 px: the shoelace sums taken
        relative to each ring's first vertex (as GEOS does, so they equal ``shapely.centroid``
        to rounding; a test). A ring of zero area gets the mean of its vertices."""
        n = len(self)
        if not n:
            return np.zeros((0, 2))
        counts = np.diff(self.offsets)
        ring = np.repeat(np.arange(n), counts)
        first = self.xy[self.offsets[:-1]]
        d = self.xy - first[ring]
        # vertex pairs (j, j + 1) inside one ring (the ring is closed, so this includes its last edge)
        same = ring[1:] == ring[:-1]
        a, b, r = d[:-1][same], d[1:][same], ring[1:][same]
        cross = a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]
        area2 = np.bincount(r, cross, n)
        cx = np.bincount(r, (a[:, 0] + b[:, 0]) * cross, n)
        cy = np.bincount(r, (a[:, 1] + b[:, 1]) * cross, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.column_stack([cx, cy]) / (3.0 * area2[:, None])
        flat = area2 == 0
        if flat.any():
            mean = np.column_stack([np.bincount(ring, d[:, 0], n), np.bincount(ring, d[:, 1], n)]) / counts[:, None]
            out[flat] = mean[flat]
        return np.asarray(out + first)

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as named arrays (how a chunk file stores them); :meth:`from_arrays` reads them."""
        out = {"nuclei_labels": self.labels, "nuclei_offsets": self.offsets, "nuclei_xy": self.xy, "nuclei_values": self.values}
        if self.kinds is not None:
            out["nuclei_kinds"] = self.kinds
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], names: Sequence[str], type_names: Sequence[str] = ()) -> NucleusTable:
        """The table of :meth:`arrays` (a dict or an open ``.npz``) with measurement ``names``
        (and ``type_names`` for a typed table, whose ``nuclei_kinds`` it then reads)."""
        get = arrays.__getitem__
        labels, offsets = np.asarray(get("nuclei_labels"), np.int64), np.asarray(get("nuclei_offsets"), np.int64)
        xy, values = np.asarray(get("nuclei_xy"), np.float64), np.asarray(get("nuclei_values"), np.float64)
        n = len(labels)
        if offsets.shape != (n + 1,) or xy.ndim != 2 or xy.shape[1] != 2 or int(offsets[-1]) != len(xy) or values.shape != (n, len(names)):
            raise ValueError(f"inconsistent nucleus columns: {n} labels, offsets {offsets.shape}, xy {xy.shape}, values {values.shape}")
        kinds = np.asarray(get("nuclei_kinds"), np.int8) if type_names else None
        if kinds is not None and kinds.shape != (n,):
            raise ValueError(f"inconsistent nucleus types: {n} labels, {kinds.shape} types")
        return cls(labels, offsets, xy, tuple(names), values, kinds, tuple(type_names))
