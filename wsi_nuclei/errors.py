"""One exception hierarchy for wsi-nuclei.

Every message names the offending value (file, option, shape) and says how to fix it, so the CLI
can print it on one line.
"""

from __future__ import annotations

__all__ = [
    "WsiNucleiError",
    "DatasetError",
    "ModelError",
    "ConfigError",
    "SlideError",
    "OutputError",
]


class WsiNucleiError(Exception):
    """Base class: a problem with the user's input that the user can fix."""


class DatasetError(WsiNucleiError):
    """A dataset folder is missing files, or images and masks do not match."""


class ModelError(WsiNucleiError):
    """A weights file or model card is missing, corrupt, unsafe or inconsistent."""


class ConfigError(WsiNucleiError):
    """An option has an invalid value."""


class SlideError(WsiNucleiError):
    """A slide cannot be opened or read, or lacks what the pipeline needs (e.g. its resolution)."""


class OutputError(WsiNucleiError):
    """Outputs cannot be written, or exist already without --resume/--overwrite."""


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a name that is not UTF-8 (Python's surrogate escapes,
    U+DC80-U+DCFF, as ``os.fsdecode`` gives them) as ``\\xNN``; any other text unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(path: object) -> str:
    """``path`` for a one-line message: the bytes of a name that is not UTF-8 as ``\\xNN``
    (:func:`utf8_text`) and control characters (a newline in a file name) escaped."""
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in utf8_text(text))