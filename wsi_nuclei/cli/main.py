"""Command line: thin wrappers that parse options, call one library function and set the exit code.

Heavy imports (torch, smp) happen inside the commands so that ``wsi-nuclei --help`` is instant.
The commands are in :mod:`.models`, :mod:`.slides` and :mod:`.results`; importing them registers them.
"""

from __future__ import annotations

from typing import Any

from . import models, results, slides  # noqa: F401  (importing them registers the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    """The ``wsi-nuclei`` command. It ends without the interpreter's teardown once nothing is left
    running (:func:`_exit`): with torch and OpenVINO loaded that teardown takes over a second on 2
    cores, after every output is closed and on disk."""
    try:
        app()
        code: Any = 0
    except SystemExit as done:
        code = done.code
    _exit(code)


def _exit(code: Any) -> None:
    """Exit with ``code`` (SystemExit's), skipping the interpreter's teardown when none of this
    package's threads and no child process is alive (else the normal exit, which waits for them).
    Other libraries' idle thread pools (OpenVINO's telemetry, torch's prefetcher) hold no work of ours."""
    import logging
    import multiprocessing
    import os
    import sys
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    ours = [t for t in threading.enumerate() if t.name.startswith("wsi-nuclei") and t.is_alive()]
    if ours or multiprocessing.active_children():
        sys.exit(code)
    logging.shutdown()  # flushes and closes every log handler (a --log-file)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to flush
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
