"""QuPath GeoJSON: the only writer. Features are streamed, never held all in memory.

Format (checked against QuPath 0.4-0.8, see DESIGN.md): a FeatureCollection; each feature has a
UUID ``id``, a closed valid Polygon in level-0 px and ``properties`` with ``objectType``
"detection", a classification with name and colour, and flat numeric ``measurements``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from .. import atomic
from ..nuclei.polygons import Nucleus

__all__ = ["GeoJSONWriter", "feature", "encode_feature", "encode_nuclei", "feature_ids", "NUCLEUS_CLASS", "feature_id"]

NUCLEUS_CLASS = {"name": "Nucleus", "color": [200, 0, 0]}
#: gzip level of .geojson.gz: on the features of benchmarks/geojson_speed.py level 1 gives 0.23 of
#: the raw size, 3 gives 0.22, 9 (gzip's default) 0.17 at a tenth of the speed; level 1 keeps
#: writing (encoding + compression) above 100,000 nuclei/s per thread (README, Performance).
GZIP_LEVEL = 1
_NAMESPACE = uuid.UUID("5b4f2a2e-3c1d-4f0e-9a51-7e3d2c1b0a99")
_NAMESPACE_BYTES = _NAMESPACE.bytes


def feature_id(slide_key: str, label: int) -> str:
    """Deterministic UUID of a nucleus: the same slide and label give the same id in every run
    (the reference of :func:`feature_ids`)."""
    return str(uuid.uuid5(_NAMESPACE, f"{slide_key}/{label}"))


def _classification(nucleus: Nucleus, classes: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    return dict(classes[nucleus.kind - 1]) if classes and 0 < nucleus.kind <= len(classes) else NUCLEUS_CLASS


def feature(nucleus: Nucleus, slide_key: str, classes: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A QuPath detection feature for ``nucleus``: classified as its type (``classes[kind - 1]``,
    :func:`wsi_nuclei.nuclei.classes.qupath_classes`) or, untyped, as "Nucleus"."""
    measurements = {k: (float(v) if math.isfinite(v) else 0.0) for k, v in nucleus.measurements.items()}
    return {
        "type": "Feature",
        "id": feature_id(slide_key, nucleus.label),
        "geometry": {"type": "Polygon", "coordinates": [np.asarray(nucleus.ring, dtype=np.float64).tolist()]},
        "properties": {"objectType": "detection", "classification": _classification(nucleus, classes), "measurements": measurements},
    }


def encode_feature(feat: dict[str, Any]) -> bytes:
    """One feature as compact UTF-8 JSON (NaN and infinity refused: QuPath rejects them)."""
    _check_finite(feat)
    return bytes(orjson.dumps(feat))


def _check_finite(feat: dict[str, Any]) -> None:
    for v in feat.get("properties", {}).get("measurements", {}).values():
        if not math.isfinite(v):
            raise ValueError(f"non-finite measurement {v!r} in feature {feat.get('id')}")


# the constant parts of a nucleus feature, in the key order of :func:`feature`
_HEAD = b'{"type":"Feature","id":"'
_GEOMETRY = b'","geometry":{"type":"Polygon","coordinates":['
def _properties(classification: dict[str, Any]) -> bytes:
    return b']},"properties":' + orjson.dumps({"objectType": "detection", "classification": classification})[:-1] + b',"measurements":'


_PROPERTIES = _properties(NUCLEUS_CLASS)


def feature_ids(slide_key: str, labels: Sequence[int]) -> bytes:
    """:func:`feature_id` of every label, as one ASCII text of 36 bytes per id: the RFC 4122
    version-5 UUIDs computed from SHA-1 digests directly, with the hex formatting done by numpy on
    all ids at once (a test checks them against ``uuid.uuid5``)."""
    prefix = _NAMESPACE_BYTES + f"{slide_key}/".encode()
    digests = b"".join([hashlib.sha1(prefix + str(label).encode()).digest()[:16] for label in labels])
    d = np.frombuffer(digests, np.uint8).reshape(-1, 16).copy()
    d[:, 6] = (d[:, 6] & 0x0F) | 0x50  # version 5
    d[:, 8] = (d[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = np.empty((len(d), 36), np.uint8)
    hexed = np.empty((len(d), 32), np.uint8)
    hexed[:, 0::2], hexed[:, 1::2] = _HEX[d >> 4], _HEX[d & 15]
    text[:, [8, 13, 18, 23]] = ord("-")
    text[:, _ID_COLUMNS] = hexed
    return text.tobytes()


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_ID_COLUMNS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def drop_features(blob: bytes, slide_key: str, labels: Sequence[int]) -> tuple[bytes, int]:
    """``blob`` (encoded features joined by ",\\n", as a chunk file stores them) without the
    features of ``labels``; returns the new blob and how many features were removed. An encoded
    feature holds no newline, and its id is the 36-byte :func:`feature_id` of its label."""
    if not len(labels):
        return blob, 0
    ids = feature_ids(slide_key, [int(v) for v in labels])
    gone = {ids[36 * i : 36 * i + 36] for i in range(len(labels))}
    parts = blob.split(b",\n") if blob else []
    kept = [f for f in parts if f[len(_HEAD) : len(_HEAD) + 36] not in gone]
    return b",\n".join(kept), len(parts) - len(kept)


def encode_nuclei(nuclei: Sequence[Nucleus], slide_key: str, classes: Sequence[dict[str, Any]] | None = None) -> list[bytes]:
    """``[encode_feature(feature(n, slide_key, classes)) for n in nuclei]``, byte for byte (a test checks
    it), without building a dict per feature: the constant parts are encoded once, the ids are
    formatted together (:func:`feature_ids`), and the rings of all nuclei go through one orjson
    call whose text is cut at the vertex brackets. The slide pipeline's encoder."""
    if not nuclei:
        return []
    rings = [np.asarray(nu.ring, dtype=np.float64).reshape(-1, 2) for nu in nuclei]
    counts = np.array([len(r) for r in rings], np.int64)
    values = list(itertools.chain.from_iterable(nu.measurements.values() for nu in nuclei))
    # plain finite floats everywhere (what label_polygons gives): else the reference, which converts
    if not counts.all() or set(map(type, values)) != {float} or not np.isfinite(np.array(values)).all():
        return [encode_feature(feature(nu, slide_key, classes)) for nu in nuclei]
    # "[[x,y],[x,y],...]": the i-th "[" after the first opens vertex i, the i-th "]" closes it
    text = orjson.dumps(np.concatenate(rings), option=orjson.OPT_SERIALIZE_NUMPY)
    buf = np.frombuffer(text, np.uint8)
    opens = np.flatnonzero(buf == ord("["))[1:]
    closes = np.flatnonzero(buf == ord("]"))
    last = np.cumsum(counts) - 1
    begin, stop = opens[last - counts + 1].tolist(), (closes[last] + 1).tolist()
    ids = feature_ids(slide_key, [nu.label for nu in nuclei])
    props = [_PROPERTIES] + ([_properties(dict(c)) for c in classes] if classes else [])
    return [b"".join((_HEAD, ids[36 * i : 36 * i + 36], _GEOMETRY, b"[", text[a:b], b"]",
                      props[nu.kind] if 0 < nu.kind < len(props) else _PROPERTIES, orjson.dumps(nu.measurements), b"}}"))
            for i, (nu, a, b) in enumerate(zip(nuclei, begin, stop))]


class GeoJSONWriter(atomic.CommitOnSuccess):
    """Stream features to ``path`` (``gzipped``: default when it ends with .gz); the file appears under its final
    name only when the writer is closed without error (temporary name, then rename)."""

    def __init__(self, path: Path | str, gzipped: bool | None = None) -> None:
        self.path = Path(path)
        gzipped = self.path.suffix == ".gz" if gzipped is None else gzipped
        self._tmp = atomic.temp_path(self.path)
        raw: IO[bytes] = open(self._tmp, "wb")
        self._fh: IO[bytes] = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=GZIP_LEVEL) if gzipped else raw  # type: ignore[assignment]
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
