"""wsi-nuclei: nuclei segmentation for H&E whole-slide images with EfficientUnet++.

The public API is listed in ``__all__``; importing the package does not import torch.
"""

from __future__ import annotations

from .errors import ConfigError, DatasetError, ModelError, WsiNucleiError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "WsiNucleiError",
    "DatasetError",
    "ModelError",
    "ConfigError",
]
