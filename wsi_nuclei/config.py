"""The options of a segmentation run, checked once (``wsi-nuclei segment`` builds one)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["SegmentConfig", "WORK_DIR"]

#: Per-slide folder of an unfinished slide: plan, thumbnail, chunk files. Removed when finished.
WORK_DIR = ".partial"


@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``wsi-nuclei segment`` (sizes in working px; None = derived from the model)."""

    model_dir: str | None = None
    level0_mpp: float | None = None  # --mpp: overrides the slide's µm per level-0 px
    chunk_size: int = 1024
    halo: int | None = None
    context: int | None = None
    batch_size: int | None = None  # tiles per model call when a window is split; None: as many as fit
    forward_memory: int | None = None  # bytes a forward pass may use; None: from the worker's limits
    device: str = "cpu"
    tissue_mask: bool = True
    reader: str = "auto"  # slide reader: auto, openslide, tiffslide
    backend: str = "auto"  # inference: auto, torch, onnx (see backends.py)
    geojson_format: str = "geojson.gz"
    raw_coordinates: bool = False
    resume: bool = False
    overwrite: bool = False
    torch_threads: int = 0
    keep_chunks: bool = False
    tta: str | None = None  # test-time augmentation: none, flip4, dihedral8; None: the model card's

    def check(self) -> None:
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.forward_memory is not None and self.forward_memory <= 0:
            raise ConfigError(f"--forward-memory must be > 0, got {self.forward_memory}")
        if self.level0_mpp is not None and not self.level0_mpp > 0:
            raise ConfigError(f"--mpp must be > 0 µm/px, got {self.level0_mpp}")
        if self.geojson_format not in ("geojson.gz", "geojson"):
            raise ConfigError(f"--format must be geojson.gz or geojson, got {self.geojson_format!r}")
        if self.tta is not None:
            from .tta import check_tta

            check_tta(self.tta)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.reader not in ("auto", "openslide", "tiffslide"):
            raise ConfigError(f"unknown --reader {self.reader!r}; use auto, openslide or tiffslide")
        from .backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; use {', '.join(BACKENDS)}")
