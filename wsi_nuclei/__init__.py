"""wsi-nuclei: nuclei segmentation for H&E whole-slide images with EfficientUnet++.

The public API is ``__all__``. Names are imported on first use, so ``import wsi_nuclei`` is
quick and does not import torch.

>>> import wsi_nuclei as wn
>>> with wn.open_slide(wn.SAMPLE_SLIDE) as slide:
...     print(slide.info.dimensions, round(slide.info.level0_mpp, 3))
(2220, 2967) 0.499
>>> result = wn.segment_slide(wn.SAMPLE_SLIDE, "out/CMU-1", wn.SegmentConfig(overwrite=True))
>>> result.status, result.nuclei > 1000
('ok', True)
>>> import numpy as np
>>> from PIL import Image
>>> image = np.asarray(Image.open("out/CMU-1/overlay.png").convert("RGB"))[:256, :256]
>>> labels = wn.segment_image(image, mpp=2.0)  # any RGB array with its µm/px
>>> labels.shape == image.shape[:2]
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import ConfigError, DatasetError, ModelError, OutputError, SlideError, WsiNucleiError

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "open_slide": "slides.reader",
    "Slide": "slides.reader",
    "SlideInfo": "slides.reader",
    "segment_slide": "pipeline.segment",
    "segment_many": "pipeline.segment",
    "find_slides": "pipeline.segment",
    "SegmentConfig": "pipeline.config",
    "SlideResult": "pipeline.results",
    "ClusterConfig": "cluster.client",
    "make_client": "cluster.client",
    "close_client": "cluster.client",
    "segment_image": "api",
    "SAMPLE_SLIDE": "api",
    "evaluate_dataset": "training.evaluate",
    "load_model": "model.network",
    "load_card": "model.network",
    "ModelCard": "model.network",
    "PostProcess": "model.network",
    "TrainConfig": "training.train",
    "measure_on_slide": "training.context",
    "write_report": "outputs.report",
    "nuclei_anndata": "outputs.h5ad",
}

__all__ = [
    "__version__",
    # slides
    "open_slide", "Slide", "SlideInfo", "SAMPLE_SLIDE",
    # segmentation
    "segment_slide", "segment_many", "find_slides", "segment_image", "SegmentConfig", "SlideResult",
    # results
    "write_report", "nuclei_anndata",
    # clusters
    "ClusterConfig", "make_client", "close_client",
    # models
    "load_model", "load_card", "ModelCard", "PostProcess", "evaluate_dataset", "TrainConfig", "measure_on_slide",
    # errors
    "WsiNucleiError", "DatasetError", "ModelError", "ConfigError", "SlideError", "OutputError",
]

if TYPE_CHECKING:
    from .api import SAMPLE_SLIDE, segment_image
    from .cluster.client import ClusterConfig, close_client, make_client
    from .model.network import ModelCard, PostProcess, load_card, load_model
    from .outputs.h5ad import nuclei_anndata
    from .outputs.report import write_report
    from .pipeline.config import SegmentConfig
    from .pipeline.results import SlideResult
    from .pipeline.segment import find_slides, segment_many, segment_slide
    from .slides.reader import Slide, SlideInfo, open_slide
    from .training.context import measure_on_slide
    from .training.evaluate import evaluate_dataset
    from .training.train import TrainConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_nuclei' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
