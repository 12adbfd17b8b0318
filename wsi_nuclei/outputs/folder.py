"""A slide's output folder: one writer at a time, finished only when verified, replaced only on success.

- :class:`SlideLock`: ``OUT/<slide>/.lock``, created with ``O_EXCL`` and holding the pid, host and
  process start time of the run that writes the folder. A second run fails at once with one line
  naming the first; a lock left by a dead process on this host is taken over.
- :func:`finished`: a slide counts as finished only when its ``summary.json`` parses, names the
  same slide file (name, size, mtime) and the same output key (model and every option that changes
  the outputs), and every output it lists is there.
- :func:`folder_owner`: which slide file a folder's outputs belong to (so another slide with the
  same name gets its own folder instead of being skipped or overwriting them).
- :func:`install`: move the new outputs over the old ones once all of them are written; the old
  ``summary.json`` goes first, so no moment shows old and new outputs as one finished set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import OutputError, shown

__all__ = [
    "LOCK_NAME",
    "SlideLock",
    "slide_file",
    "same_file",
    "Verdict",
    "finished",
    "output_size",
    "folder_owner",
    "install",
    "remove_leftovers",
    "shown",
    "read_json",
]

#: Per-slide folder of an unfinished slide: plan, thumbnail, chunk files. Removed when finished.
WORK_DIR = ".partial"

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: A lock file still empty after this long was left by a run killed while creating it.
EMPTY_LOCK_S = 10.0
_TEMP = re.compile(r"\.[0-9a-f]{32}\.tmp$")


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (Linux: clock ticks since boot), "" where unknown: it tells
    a live lock holder from a new process that reuses a dead holder's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return not (started and now and now != started)


class SlideLock:
    """The lock of one output folder; ``acquire`` raises :class:`OutputError` when another live run
    holds it. Use as a context manager or call :meth:`release`."""

    def __init__(self, out_dir: Path | str, name: str = LOCK_NAME) -> None:
        self.path = Path(out_dir) / name
        self.held = False

    def acquire(self) -> SlideLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{shown(self.path.parent)}: cannot write outputs ({err.strerror}); choose a writable -o folder") from err
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputError(self._held_message()) from None
            except OSError as err:
                raise OutputError(f"{shown(self.path.parent)}: cannot write outputs ({err.strerror}); choose a writable -o folder") from err
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(me) + "\n")
            self.held = True
            return self
        raise OutputError(self._held_message())

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self) -> bool:
        holder = self._holder()
        if holder is None:  # empty or unreadable: stale once old (a writer may be filling it right now)
            try:
                return time.time() - self.path.stat().st_mtime > EMPTY_LOCK_S
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False  # another node's process: we cannot tell whether it still runs
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return True
        return pid <= 0 or not _alive(pid, str(holder.get("started", "")))

    def _held_message(self) -> str:
        h = self._holder() or {}
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}"
        return (f"{shown(self.path.parent)}: another run is writing this slide's outputs ({who}); wait for it to finish, "
                f"or delete {shown(self.path)} if that run is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> SlideLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def slide_file(path: Path | str) -> dict[str, Any]:
    """What identifies a slide file: its name, size and mtime (and where it was)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "name": p.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


#: bytes read from each end of a slide file for :func:`content_digest`
DIGEST_BYTES = 256 * 1024


def content_digest(path: Path | str) -> str:
    """16 hex of sha256 over a slide file's size and its first and last :data:`DIGEST_BYTES`: the
    same for a copy (any name, path or mtime), different for another scan or export of the same
    name and size (its header, first tiles and directory differ). Reads at most 512 KB."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.sha256(str(size).encode())
        digest.update(fh.read(DIGEST_BYTES))
        if size > DIGEST_BYTES:
            fh.seek(max(DIGEST_BYTES, size - DIGEST_BYTES))
            digest.update(fh.read(DIGEST_BYTES))
    return digest.hexdigest()[:16]


def same_file(a: Any, b: dict[str, Any]) -> bool:
    """Whether two :func:`slide_file` records are one slide: same name, size and mtime (a slide
    copied to node-local scratch with its mtime is the same slide; another file with the same name is not)."""
    return isinstance(a, dict) and all(a.get(k) == b[k] for k in ("name", "bytes", "mtime_ns"))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_owner(out_dir: Path) -> dict[str, Any] | None:
    """The :func:`slide_file` record of the slide whose outputs (finished or not) are in ``out_dir``;
    None when it holds none or they name no slide file (outputs of an older version)."""
    for f in (out_dir / "summary.json", out_dir / WORK_DIR / "plan.json"):
        data = read_json(f)
        owner = data.get("slide_file") if data is not None else None
        if isinstance(owner, dict):
            return owner
    return None


@dataclass(frozen=True)
class Verdict:
    """Whether ``out_dir`` holds finished outputs of a slide: ``done``, else ``why`` not."""

    done: bool
    why: str = ""
    nuclei: int = 0


def output_size(path: Path) -> int:
    """Bytes of an output: a file's size, or a folder's files summed (a Zarr store); -1 if missing."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    except OSError:
        return -1


def _output_ok(path: Path, size: Any) -> bool:
    if path.is_dir() and not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
        return False  # a Zarr group: its metadata file must be there
    have = output_size(path)
    return have > 0 and (not isinstance(size, int) or have == size)  # truncated or changed: not finished


def finished(out_dir: Path, ident: dict[str, Any], output_key: str) -> Verdict:
    """Verify ``out_dir/summary.json`` against the slide file ``ident`` and the ``output_key``."""
    summary = read_json(out_dir / "summary.json")
    if summary is None:
        return Verdict(False, "its summary.json is missing or unreadable")
    if not same_file(summary.get("slide_file"), ident):
        return Verdict(False, "it was made from another version of the slide file (size or modification time differ)")
    if summary.get("output_key") != output_key:
        return Verdict(False, "it was made with another model or other options")
    outputs = summary.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return Verdict(False, "its summary.json lists no outputs")
    recorded = summary.get("output_bytes")
    sizes: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    missing = [str(name) for name in outputs.values() if not _output_ok(out_dir / str(name), sizes.get(str(name)))]
    if missing:
        return Verdict(False, f"outputs are missing, empty or changed in size: {', '.join(missing)}")
    try:
        nuclei = int(summary.get("nuclei", 0))
    except (TypeError, ValueError):
        return Verdict(False, "its summary.json has no nucleus count")
    return Verdict(True, nuclei=nuclei)


#: What an output folder holds for a slide, as ``--resume`` and ``--dry-run`` see it.
SLIDE_STATES = ("finished", "outdated", "interrupted", "new")


@dataclass(frozen=True)
class SlideState:
    """``state``: "finished" (verified outputs of this slide file with these settings), "outdated"
    (a summary.json that is not: another model, options or slide version, or outputs missing;
    ``why`` says which), "interrupted" (chunk files of an unfinished run) or "new" (nothing).
    ``nuclei``: the count of a finished slide."""

    state: str
    why: str = ""
    nuclei: int = 0


def slide_state(out_dir: Path, ident: dict[str, Any], output_key: str | Callable[[], str] | None) -> SlideState:
    """The one answer to "is this slide finished?" (``ident``: :func:`slide_file` of the slide;
    ``output_key``: what its outputs depend on, see ``pipeline.plan.plan_keys``; a function is
    called only when there is a summary to verify; None: outputs are not verified, so a summary
    means "outdated" whatever it holds)."""
    if (out_dir / "summary.json").exists():
        if output_key is None:
            return SlideState("outdated", "not verified")
        verdict = finished(out_dir, ident, output_key() if callable(output_key) else output_key)
        if verdict.done:
            return SlideState("finished", nuclei=verdict.nuclei)
        return SlideState("outdated", verdict.why)
    if (out_dir / WORK_DIR).exists():
        return SlideState("interrupted", "an interrupted run left unfinished outputs")
    return SlideState("new")


def check_writable(folder: Path, create: bool = True) -> None:
    """Raise OutputError (one line naming ``folder`` and the fix) unless this process can write
    there. ``create``: make the folder and write a probe file (the real test: a full or read-only
    file system fails it); else only ask the nearest existing parent (a dry run creates nothing)."""
    if not create:
        where = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            raise OutputError(
                f"{shown(folder)}: cannot write outputs ({shown(where)} is not a writable folder); choose a writable -o folder"
            )
        return
    try:
        atomic.probe_write(folder)
    except OSError as err:
        raise OutputError(f"{shown(folder)}: cannot write outputs ({err.strerror or err}); choose a writable -o folder") from None


def remove_leftovers(out_dir: Path) -> None:
    """Remove temporary files of earlier runs killed while writing (``<name>.<32 hex>.tmp``);
    call only while holding the folder's lock."""
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if _TEMP.search(entry.name) or entry.name.startswith(atomic.PROBE_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def install(out_dir: Path, new: dict[str, Path], stale: Sequence[str] = ()) -> None:
    """Move each written temporary ``new[name]`` to ``out_dir/name`` (files and folders), after
    removing the old ``summary.json``; ``stale`` names old outputs the new set does not replace
    (e.g. a ``nuclei.geojson`` when the new run writes ``.geojson.gz``), removed at the end.
    The caller writes the new ``summary.json`` afterwards."""
    (out_dir / "summary.json").unlink(missing_ok=True)
    for name, tmp in new.items():
        target = out_dir / name
        if tmp.is_dir():
            old = atomic.temp_path(target) if target.exists() else None
            if old is not None:
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    for name in stale:
        if name in new:
            continue
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
