"""Atomic writes: a file appears under its final name only when it is complete.

Every writer of the package goes through here. A file is written under a temporary name in the
same folder (``<name>.<random hex>.tmp``: two writers never share one) and renamed over the
final name with :func:`os.replace`, which is atomic on POSIX file systems. On any error the
temporary file is removed and the error is raised; the final name keeps its old content.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

_W = TypeVar("_W", bound="CommitOnSuccess")

__all__ = ["temp_path", "replacing", "write_bytes", "write_text", "CommitOnSuccess"]


def temp_path(path: Path | str) -> Path:
    """A fresh temporary name beside ``path``: ``<name>.<32 hex>.tmp``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block it replaces ``path``. On an error
    inside the block the temporary file is removed and ``path`` is untouched."""
    target = Path(path)
    tmp = temp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str, sync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``sync``: on disk (fsync) before the rename."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())


class CommitOnSuccess:
    """A writer used as a context manager: ``close()`` (which puts the file under its final name)
    when the block ends normally, ``abort()`` (which removes the temporary file) when it raises."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: object, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


#: The name prefix of :func:`probe_write`'s file (a kill between its two steps leaves one behind;
#: ``outputs.folder.remove_leftovers`` removes it).
PROBE_PREFIX = ".write-test-"


def probe_write(folder: Path | str) -> None:
    """Create ``folder`` (and parents) and write and remove an empty file in it: the one test that
    this process can write there (a read-only mount, a full disk or a quota all fail it). Raises OSError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
