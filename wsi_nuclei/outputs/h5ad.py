"""AnnData (``.h5ad``) from ``nuclei.parquet``: a thin layer for scanpy, squidpy and SpatialData users.

One observation per nucleus, in the Parquet file's order: ``X`` the measurements (float32, one
variable per measurement column, ``var["qupath_name"]`` and ``var["unit"]`` from the column
metadata), ``obs`` indexed by the nucleus id with ``label`` and ``chunk``, ``obsm["spatial"]``
the centroids (x, y) in level-0 px, and ``uns["wsi_nuclei"]`` the file's slide record
(resolution, frame, model). The outlines stay in the Parquet file (AnnData has no place for
them). Needs the ``anndata`` package (the ``[anndata]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputError, shown

__all__ = ["nuclei_anndata", "write_h5ad", "H5AD_NAME"]

#: the export's default file in a slide folder
H5AD_NAME = "nuclei.h5ad"

_NOT_MEASUREMENTS = ("id", "label", "chunk", "centroid_x", "centroid_y", "bbox", "geometry", "type")


def nuclei_anndata(parquet: Path | str) -> Any:
    """The ``anndata.AnnData`` of a ``nuclei.parquet`` file (see the module docstring)."""
    try:
        import anndata
        import pandas as pd
    except ImportError:
        raise ConfigError("the AnnData export needs the anndata package: pip install 'wsi-nuclei[anndata]'") from None
    import pyarrow.parquet as pq

    path = Path(parquet)
    try:
        table = pq.read_table(path, columns=None)
    except (OSError, ValueError) as err:  # pyarrow's errors are OSError / ArrowInvalid (a ValueError)
        raise OutputError(f"{shown(path)}: not a readable nuclei.parquet ({err}); segment the slide again") from None
    schema = table.schema
    if not {"id", "label", "chunk", "centroid_x", "centroid_y"} <= set(schema.names):
        raise OutputError(f"{shown(path)}: not a wsi-nuclei nuclei.parquet (no id, label, chunk or centroid columns)")
    names = [n for n in schema.names if n not in _NOT_MEASUREMENTS]
    meta = {n: {k.decode(): v.decode() for k, v in (schema.field(n).metadata or {}).items()} for n in names}
    x = (
        np.column_stack([table.column(n).to_numpy() for n in names]).astype(np.float32)
        if names
        else np.zeros((table.num_rows, 0), np.float32)
    )
    ids = table.column("id").to_pylist()
    obs = pd.DataFrame({"label": table.column("label").to_numpy(), "chunk": table.column("chunk").to_numpy()},
                       index=pd.Index(ids, name="id"))
    if "type" in schema.names:  # a typed model's nuclei: their QuPath class as a categorical
        obs["type"] = pd.Categorical(table.column("type").to_pandas().astype(object).values)
    var = pd.DataFrame({"qupath_name": [meta[n].get("qupath_name", n) for n in names], "unit": [meta[n].get("unit", "") for n in names]},
                       index=pd.Index(names, name="measurement"))
    spatial = np.column_stack([table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()])
    record = json.loads((schema.metadata or {}).get(b"wsi_nuclei", b"{}"))
    adata = anndata.AnnData(X=x, obs=obs, var=var, obsm={"spatial": spatial})
    adata.uns["wsi_nuclei"] = {k: v for k, v in record.items() if v is not None}
    return adata


def write_h5ad(slide_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the AnnData of ``slide_dir/nuclei.parquet`` to ``out`` (default
    ``slide_dir/nuclei.h5ad``), atomically; returns the path."""
    from .. import atomic

    folder = Path(slide_dir)
    parquet = folder / "nuclei.parquet" if folder.is_dir() else folder
    if not parquet.is_file():
        if not folder.exists():
            raise ConfigError(f"{shown(folder)}: not found; give a slide's output folder (OUT/<slide>)")
        raise OutputError(f"{shown(folder)}: holds no nuclei.parquet; segment the slide with --formats including parquet (the default)")
    target = Path(out) if out is not None else parquet.parent / H5AD_NAME
    if target.suffix.lower() != ".h5ad" or target.is_dir():  # -o onto nuclei.parquet, a GeoJSON, a folder: never replaced
        raise ConfigError(f"{shown(target)}: -o must name a .h5ad file (it would replace what is there); "
                          f"e.g. -o {shown(target.with_suffix('.h5ad') if not target.is_dir() else target / 'nuclei.h5ad')}")
    if target.exists() and not _exported_by_us(target):
        raise OutputError(f"{shown(target)}: exists and was not written by wsi-nuclei export anndata; "
                          "choose another -o, or move that file")
    adata = nuclei_anndata(parquet)
    try:
        with atomic.replacing(target) as tmp:
            adata.write_h5ad(tmp)
    except OSError as err:
        raise OutputError(f"{shown(target)}: cannot write ({err.strerror or err}); choose another -o") from None
    return target


def _exported_by_us(path: Path) -> bool:
    """Whether ``path`` is an AnnData file this module wrote (its ``uns`` holds ``wsi_nuclei``): an
    export is replaced by the next one, a user's own analysis never is."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "uns" in f and "wsi_nuclei" in f["uns"]
    except (ImportError, OSError):
        return False
