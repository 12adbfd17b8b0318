"""``nuclei.parquet``: one row per nucleus, GeoParquet 1.1, streamed one row group per chunk.

The same nuclei as ``nuclei.geojson.gz``, as a table for pandas, GeoPandas, DuckDB, QGIS:

========================  ==========================================================================
column                    content
========================  ==========================================================================
``id``                    the GeoJSON feature id (UUID string)
``label``                 the nucleus' id in ``mask.zarr``'s ``labels`` (uint32)
``chunk``                 the index of the chunk that owns it (``label >> 16``)
``centroid_x/_y``         area centroid of the outline, level-0 px (the GeoJSON's frame)
``bbox``                  struct xmin, ymin, xmax, ymax of the outline (GeoParquet 1.1 covering)
``area_um2``, …           the measurements, named from QuPath's ("Area µm^2" -> ``area_um2``), units
                          in the name; each field's metadata keeps QuPath's name
``geometry``              the outline: a WKB Polygon (little endian), the GeoJSON's coordinates exactly
========================  ==========================================================================

Coordinates are pixels, not a map projection: the GeoParquet metadata says ``"crs": null``
(undefined), so no reader takes them for longitude and latitude. The writer holds one chunk's
rows at a time (its memory does not grow with the slide) and builds the WKB with numpy; the file
appears under its final name only when it is closed without error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..nuclei.table import PIPELINE_MEASUREMENTS, NucleusTable
from .geojson import feature_ids

__all__ = ["ParquetWriter", "column_name", "wkb_polygons", "GEOPARQUET_VERSION", "COMPRESSION"]

GEOPARQUET_VERSION = "1.1.0"
#: zstd (level 1, Arrow's default): on benchmarks/parquet_speed.py's nuclei 124 bytes per nucleus
#: against snappy's 212, at 0.8-0.9 of snappy's speed (``--compression snappy``; docs/results.md).
COMPRESSION = "zstd"
_UNITS = {"µm^2": "um2", "µm": "um"}


def column_name(measurement: str) -> str:
    """The column of a QuPath measurement name: lower case, units spelled in ASCII, words joined
    by ``_`` ("Area µm^2" -> "area_um2", "Nucleus probability" -> "nucleus_probability")."""
    text = measurement
    for unit, ascii_unit in _UNITS.items():
        text = text.replace(unit, ascii_unit)
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _unit(measurement: str) -> str:
    for unit in _UNITS:
        if measurement.endswith(unit):
            return unit
    return ""


def wkb_polygons(offsets: np.ndarray, xy: np.ndarray) -> Any:
    """A ``pyarrow.BinaryArray`` of one little-endian WKB Polygon (one ring) per ring of
    ``xy[offsets[i]:offsets[i + 1]]``: 13 header bytes (byte order 1, type 3, 1 ring, the vertex
    count) and the vertices as float64 pairs, laid out for all rings at once (a test checks them
    against ``shapely.to_wkb``)."""
    import pyarrow as pa

    counts = np.diff(np.asarray(offsets, np.int64))
    n = len(counts)
    sizes = 13 + 16 * counts
    starts = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    if starts[-1] >= 2**31:
        raise ValueError(f"{n} polygons of {int(counts.sum())} vertices do not fit one Arrow binary array (2 GiB)")
    header = np.zeros((n, 13), np.uint8)
    header[:, 0] = 1  # little endian
    header[:, 1:5] = np.frombuffer(np.uint32(3).astype("<u4").tobytes(), np.uint8)  # Polygon
    header[:, 5:9] = np.frombuffer(np.uint32(1).astype("<u4").tobytes(), np.uint8)  # one ring
    header[:, 9:13] = counts.astype("<u4").view(np.uint8).reshape(n, 4)
    buf = np.empty(int(starts[-1]), np.uint8)
    head_at = (starts[:-1, None] + np.arange(13)).ravel()
    is_head = np.zeros(len(buf), bool)
    is_head[head_at] = True
    buf[head_at] = header.ravel()
    buf[~is_head] = np.ascontiguousarray(xy, "<f8").view(np.uint8).ravel()
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(starts.astype(np.int32)), pa.py_buffer(buf)])


def _ids(slide_key: str, labels: np.ndarray) -> Any:
    import pyarrow as pa

    n = len(labels)
    text = feature_ids(slide_key, labels.tolist())
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer((np.arange(n + 1) * 36).astype(np.int32)), pa.py_buffer(text)])


def _schema(names: Sequence[str], meta: dict[str, Any], type_names: Sequence[str] = ()) -> Any:
    import pyarrow as pa

    px = {b"unit": b"px (level 0)"}
    fields = [pa.field("id", pa.string(), nullable=False, metadata={b"description": b"GeoJSON feature id (UUID)"}),
              pa.field("label", pa.uint32(), nullable=False, metadata={b"description": b"id in mask.zarr labels"}),
              pa.field("chunk", pa.int32(), nullable=False, metadata={b"description": b"index of the owning chunk"}),
              pa.field("centroid_x", pa.float64(), nullable=False, metadata=px),
              pa.field("centroid_y", pa.float64(), nullable=False, metadata=px),
              pa.field("bbox", pa.struct([pa.field(k, pa.float64(), nullable=False) for k in ("xmin", "ymin", "xmax", "ymax")]),
                       nullable=False, metadata=px)]
    if type_names:
        fields.append(
            pa.field(
                "type",
                pa.dictionary(pa.int32(), pa.string()),
                nullable=True,
                metadata={b"description": b"nucleus type (QuPath class name); null: none", b"types": json.dumps(list(type_names)).encode()},
            )
        )
    for name in names:
        fields.append(pa.field(column_name(name), pa.float64(), nullable=False,
                               metadata={b"qupath_name": name.encode(), b"unit": _unit(name).encode()}))
    fields.append(pa.field("geometry", pa.binary(), nullable=False, metadata={b"encoding": b"WKB"}))
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None,
                                    "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}}
    return pa.schema(
        fields, metadata={b"geo": json.dumps(geo).encode(), b"wsi_nuclei": json.dumps(meta, sort_keys=True, default=str).encode()}
    )


class ParquetWriter(atomic.CommitOnSuccess):
    """Stream nucleus tables to ``path`` as GeoParquet, one row group per :meth:`write`.

    ``meta`` (JSON) is stored under the schema key ``wsi_nuclei`` (slide, resolution, frame);
    ``names``: the measurement names when nothing is written (default: the pipeline's);
    ``type_names``: a typed model's QuPath class names (a ``type`` column then holds them). The
    file gets its final name only when the writer is closed without error; ids are
    :func:`wsi_nuclei.outputs.geojson.feature_id` of ``slide_key`` and the label, as in the GeoJSON.
    """

    def __init__(self, path: Path | str, slide_key: str, meta: dict[str, Any] | None = None,
                 names: Sequence[str] = PIPELINE_MEASUREMENTS, compression: str = COMPRESSION, type_names: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.type_names = tuple(type_names)
        self.compression = compression
        self.slide_key = slide_key
        self.meta = dict(meta or {})
        self.names = tuple(names)
        self.count = 0
        self.row_groups = 0
        self._tmp = atomic.temp_path(self.path)
        self._writer: Any = None

    def _open(self, names: tuple[str, ...]) -> Any:
        import pyarrow.parquet as pq

        self.names = names
        self._schema = _schema(names, self.meta, self.type_names)
        stats = ["label", "chunk", "centroid_x", "centroid_y", "bbox.xmin", "bbox.ymin", "bbox.xmax", "bbox.ymax",
                 *(column_name(n) for n in names)]
        self._writer = pq.ParquetWriter(self._tmp, self._schema, compression=self.compression, use_dictionary=["chunk"],
                                        write_statistics=stats)
        return self._writer

    def write(self, table: NucleusTable, chunk: int) -> None:
        """Append the nuclei of ``table`` (owned by chunk ``chunk``) as one row group; an empty
        table writes nothing."""
        import pyarrow as pa

        if self._writer is None:
            self._open(table.names if len(table) else self.names)
        if not len(table):
            return
        if table.names != self.names:
            raise ValueError(f"chunk {chunk}: measurements {table.names} differ from the file's {self.names}")
        if table.type_names != self.type_names:
            raise ValueError(f"chunk {chunk}: types {table.type_names} differ from the file's {self.type_names}")
        n = len(table)
        box, centre = table.bounds(), table.centroids()
        columns = [_ids(self.slide_key, table.labels), pa.array(table.labels.astype(np.uint32)), pa.array(np.full(n, chunk, np.int32)),
                   pa.array(centre[:, 0]), pa.array(centre[:, 1]),
                   pa.StructArray.from_arrays([pa.array(box[:, k]) for k in range(4)],
                                              fields=list(self._schema.field("bbox").type))]
        if self.type_names:
            kinds = np.zeros(n, np.int8) if table.kinds is None else table.kinds
            columns.append(pa.DictionaryArray.from_arrays(pa.array(kinds.astype(np.int32) - 1, mask=kinds == 0),
                                                          pa.array(list(self.type_names), pa.string())))
        columns += [pa.array(np.ascontiguousarray(table.values[:, k])) for k in range(len(self.names))]
        columns.append(wkb_polygons(table.offsets, table.xy))
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema), row_group_size=n)
        self.count += n
        self.row_groups += 1

    def close(self) -> None:
        if self._writer is None:
            self._open(self.names)
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
        self._tmp.unlink(missing_ok=True)
