"""QuPath GeoJSON: the only writer. Features are streamed, never held all in memory.

Format (checked against QuPath 0.4-0.8, see DESIGN.md): a FeatureCollection; each feature has a
UUID ``id``, a closed valid Polygon in level-0 px and ``properties`` with ``objectType``
"detection", a classification with name and colour, and flat numeric ``measurements``.
"""

from __future__ import annotations

import gzip
import math
import os
import uuid
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from .polygons import Nucleus

__all__ = ["GeoJSONWriter", "feature", "encode_feature", "NUCLEUS_CLASS", "feature_id"]

NUCLEUS_CLASS = {"name": "Nucleus", "color": [200, 0, 0]}
#: gzip level of .geojson.gz: 3 wrote 132k features/s at 0.22 of the raw size, 9 (gzip's default)
#: 12.6k/s at 0.17 (benchmarks/geojson_speed.py, README Performance).
GZIP_LEVEL = 3
_NAMESPACE = uuid.UUID("5b4f2a2e-3c1d-4f0e-9a51-7e3d2c1b0a99")


def feature_id(slide_key: str, label: int) -> str:
    """Deterministic UUID of a nucleus: the same slide and label give the same id in every run."""
    return str(uuid.uuid5(_NAMESPACE, f"{slide_key}/{label}"))


def feature(nucleus: Nucleus, slide_key: str) -> dict[str, Any]:
    """A QuPath detection feature for ``nucleus``."""
    measurements = {k: (float(v) if math.isfinite(v) else 0.0) for k, v in nucleus.measurements.items()}
    return {
        "type": "Feature",
        "id": feature_id(slide_key, nucleus.label),
        "geometry": {"type": "Polygon", "coordinates": [np.asarray(nucleus.ring, dtype=np.float64).tolist()]},
        "properties": {"objectType": "detection", "classification": NUCLEUS_CLASS, "measurements": measurements},
    }


def encode_feature(feat: dict[str, Any]) -> bytes:
    """One feature as compact UTF-8 JSON (NaN and infinity refused: QuPath rejects them)."""
    _check_finite(feat)
    return bytes(orjson.dumps(feat))


def _check_finite(feat: dict[str, Any]) -> None:
    for v in feat.get("properties", {}).get("measurements", {}).values():
        if not math.isfinite(v):
            raise ValueError(f"non-finite measurement {v!r} in feature {feat.get('id')}")


class GeoJSONWriter:
    """Stream features to ``path`` (gzip when it ends with .gz); the file appears under its final
    name only when the writer is closed without error (temporary name, then rename)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        raw: IO[bytes] = open(self._tmp, "wb")
        self._fh: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=GZIP_LEVEL) if self.path.suffix == ".gz" else raw  # type: ignore[assignment]
        self._raw = raw
        self.count = 0
        self._fh.write(b'{"type":"FeatureCollection","features":[')

    def write(self, feat: dict[str, Any]) -> None:
        self.write_encoded(encode_feature(feat), 1)

    def write_encoded(self, blob: bytes, count: int) -> None:
        """Append ``count`` features already encoded by :func:`encode_feature` and joined by
        ``b",\\n"`` (how chunk files carry them)."""
        if count <= 0:
            return
        self._fh.write((b"\n" if self.count == 0 else b",\n") + blob)
        self.count += count

    def close(self) -> None:
        self._fh.write(b"\n]}\n")
        self._fh.close()
        if self._fh is not self._raw:
            self._raw.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        for fh in (self._fh, self._raw):
            try:
                fh.close()
            except Exception:
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
