"""The chunk file: one finished chunk, ``OUT/<slide>/.partial/chunks/<index>.npz`` (the resume point).

Its codec (:func:`encode_chunk_file`, :func:`read_chunk_file`), its format version (part of the
plan fingerprint, so files of another format are recomputed, never misread) and the one check
(:func:`chunk_file_problem`) that both the start of a slide (which reuses good files) and its
assembly (which must not assemble a bad one) ask.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ..nuclei.instances import IDS_PER_CHUNK
from ..nuclei.table import NucleusTable

__all__ = ["CHUNK_FILE_VERSION", "ChunkMeta", "StoredChunk", "encode_chunk_file", "read_chunk_file", "chunk_file_problem"]

#: The chunk-file format; part of the fingerprint, so files of another format are recomputed.
CHUNK_FILE_VERSION = 4


@dataclass(frozen=True)
class ChunkMeta:
    """What a chunk file says about itself (its ``meta`` member, JSON)."""

    chunk: dict[str, Any]  #: the chunk (``tiling.Chunk`` as a dict): index, row, col, x, y, infer box
    nuclei: int  #: nuclei the chunk owns (features and table rows)
    cut: int  #: nuclei that reached the edge of the chunk's window
    times: dict[str, float]  #: seconds per stage: read, waiting, inference, instances, polygons
    forward: tuple[int, ...]  #: how the window was inferred: (core px, tiles per call, ...)
    fingerprint: str  #: the plan's fingerprint: a file of other settings is never reused
    inferred_px: int  #: pixels given to the model
    measurements: tuple[str, ...]  #: the nucleus table's measurement columns
    types: tuple[str, ...] = ()  #: a typed model's class names (empty: untyped)

    @property
    def index(self) -> int:
        return int(self.chunk["index"])

    def to_json(self) -> str:
        out: dict[str, Any] = {"chunk": self.chunk, "nuclei": self.nuclei, "cut": self.cut, "times": self.times,
                               "forward": list(self.forward), "fingerprint": self.fingerprint, "inferred_px": self.inferred_px,
                               "measurements": list(self.measurements)}
        if self.types:
            out["types"] = list(self.types)
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str | bytes) -> ChunkMeta:
        """Raises ValueError, KeyError or TypeError for meta that is not a chunk file's."""
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("chunk"), dict):
            raise ValueError("the meta is not a chunk file's")
        return cls(chunk=d["chunk"], nuclei=int(d["nuclei"]), cut=int(d["cut"]), times={k: float(v) for k, v in d["times"].items()},
                   forward=tuple(int(v) for v in d["forward"]), fingerprint=str(d["fingerprint"]),
                   inferred_px=int(d.get("inferred_px", 0)), measurements=tuple(d["measurements"]), types=tuple(d.get("types", ())))


@dataclass(frozen=True)
class StoredChunk:
    """A chunk file read back (:func:`read_chunk_file`)."""

    probability: np.ndarray
    owned: np.ndarray
    features: bytes  # the encoded features joined by ",\n"
    meta: ChunkMeta
    table: NucleusTable  # the same nuclei as columns, in the same order


def encode_chunk_file(probability: np.ndarray, owned_local: np.ndarray, features: bytes, meta: ChunkMeta,
                      table: NucleusTable) -> bytes:
    """The bytes of a chunk file: the core's probability (uint8), the owned labels' local ids
    (uint16), the encoded features, the meta (JSON) and the nucleus table's columns."""
    return _npz_bytes(
        {
            "probability": probability,
            "owned_local": owned_local,
            "features": np.frombuffer(features, dtype=np.uint8),
            "meta": np.frombuffer(meta.to_json().encode(), dtype=np.uint8),
            **table.arrays(),
        }
    )


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (what ``np.load`` reads) deflated at level 1: a temporary file, written once and
    read once, so compressing it harder (``np.savez_compressed``: level 6) is not worth the time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def read_chunk_file(path: Path) -> StoredChunk:
    """A chunk file as written by :func:`chunk_task`; ``owned`` with global ids (uint32)."""
    try:
        with np.load(path) as z:
            meta = ChunkMeta.from_json(bytes(z["meta"]).decode())
            local = z["owned_local"]
            base = np.uint32(meta.index * IDS_PER_CHUNK)
            owned = np.where(local > 0, local.astype(np.uint32) + base, np.uint32(0))
            table = NucleusTable.from_arrays(z, list(meta.measurements), meta.types)
            if len(table) != meta.nuclei:
                raise ValueError(f"{len(table)} nuclei in the table, {meta.nuclei} features")
            return StoredChunk(z["probability"], owned, bytes(z["features"]), meta, table)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise OutputError(f"{path}: unreadable chunk file ({type(err).__name__}: {err})") from err


def chunk_file_problem(path: Path, fingerprint: str, index: int, meta: ChunkMeta | None = None) -> str | None:
    """Why the chunk file at ``path`` cannot be used for chunk ``index`` of a plan with
    ``fingerprint`` (None: it can): unreadable, a member failing its CRC, or made with other
    settings or for another chunk. ``meta``: the file's meta when it was already read."""
    try:
        if meta is None:
            with zipfile.ZipFile(path) as zf:
                member = zf.testzip()  # reads every member, checking its CRC
            if member is not None:
                return f"bad CRC in {member}"
            with np.load(path) as z:
                meta = ChunkMeta.from_json(bytes(z["meta"]).decode())
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    if meta.fingerprint != fingerprint or meta.chunk.get("index") != index:
        return "made with other settings or for another chunk"
    return None
