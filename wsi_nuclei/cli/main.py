"""Command line: thin wrappers that parse options, call one library function and set the exit code.

Heavy imports (torch, smp) happen inside the commands so that ``wsi-nuclei --help`` is instant.
The commands are in :mod:`.models`, :mod:`.slides` and :mod:`.results`; importing them registers them.
"""

from __future__ import annotations

from . import models, results, slides  # noqa: F401  (importing them registers the commands)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
