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
]


class WsiNucleiError(Exception):
    """Base class: a problem with the user's input that the user can fix."""


class DatasetError(WsiNucleiError):
    """A dataset folder is missing files, or images and masks do not match."""


class ModelError(WsiNucleiError):
    """A weights file or model card is missing, corrupt, unsafe or inconsistent."""


class ConfigError(WsiNucleiError):
    """An option has an invalid value."""
