"""The options of a segmentation run, checked once (``wsi-nuclei segment`` builds one)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..outputs.folder import WORK_DIR
from ..slides.reader import PLAUSIBLE_MPP, check_mpp

__all__ = ["SegmentConfig", "DEFAULT_CHUNK", "WORK_DIR", "PLAUSIBLE_MPP", "check_mpp", "FORMATS", "parse_formats"]

#: Largest chunk core (working px): a chunk window and its arrays are held in memory whole.
MAX_CHUNK = 16384
#: The default chunk core (working px), chosen by ``benchmarks/chunk_size.py`` (docs/performance.md):
#: 0.55-0.78x the time of 1024 px on the benchmark slides, 0.83x per core px of a tissue-filled
#: chunk, for ~1.3 GB more peak memory; 2048 px was 0.73-0.77x (no better than 1536 taken
#: together) and peaked at 6.2 GB.
DEFAULT_CHUNK = 1536


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be {'> 0' if low == 1 else f'>= {low}'} (a whole number), got {value!r}")

#: The nucleus files ``--formats`` chooses from: nuclei.geojson(.gz) for QuPath, nuclei.parquet
#: (GeoParquet) for Python, R, DuckDB and QGIS. Both by default: each serves one group of users, and
#: the Parquet file costs about what the GeoJSON costs to write and to store (docs/results.md).
FORMATS = ("geojson", "parquet")


def parse_formats(text: str) -> tuple[str, ...]:
    """``--formats`` as typed ("geojson,parquet") -> the formats, checked (one-line ConfigError)."""
    names = tuple(p.strip().lower() for p in str(text).split(","))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"--formats must name geojson and/or parquet once each, comma-separated (e.g. geojson,parquet), got {text!r}")
    return names




@dataclass(frozen=True)
class SegmentConfig:
    """Options of ``wsi-nuclei segment`` (sizes in working px; None = derived from the model)."""

    model_dir: str | None = None
    level0_mpp: float | None = None  # --mpp: overrides the slide's µm per level-0 px
    chunk_size: int = DEFAULT_CHUNK
    # the chunk size was chosen by `segment` (launch.fitting_chunk), not given: under --resume a slide
    # keeps the chunk size of its earlier run (plan.slide_config), so none of its work is lost
    chunk_auto: bool = False
    halo: int | None = None
    context: int | None = None
    batch_size: int | None = None  # tiles per model call when a window is split; None: as many as fit
    forward_memory: int | None = None  # bytes a forward pass may use; None: from the worker's limits
    device: str = "cpu"
    tissue_mask: bool = True
    reader: str = "auto"  # slide reader: auto, openslide, tiffslide
    backend: str = "auto"  # inference: auto, torch, onnx, openvino (see backends.py)
    precision: str = "fp32"  # fp32; bf16 (OpenVINO in bf16); int8 (ONNX Runtime on the quantised model, see quantize.py)
    geojson_format: str = "geojson.gz"
    formats: tuple[str, ...] = FORMATS  # nucleus files to write: geojson and/or parquet
    raw_coordinates: bool = False
    resume: bool = False
    overwrite: bool = False
    torch_threads: int = 0
    keep_chunks: bool = False
    tta: str | None = None  # test-time augmentation: none, flip4, dihedral8; None: the model card's
    types: bool = True  # --types on|off: a typed model's nucleus types as QuPath classes (off: one class "Nucleus")
    unusual_mpp: bool = False  # accept resolutions outside PLAUSIBLE_MPP (--mpp and slide metadata)
    whole_windows: bool = False  # infer every chunk window whole, glass included (default: its tissue box)
    # every chunk task runs on another machine (SLURM jobs, an existing scheduler): CPU features
    # (bf16) are checked by the workers, not by this driver (a login node may lack them)
    remote_workers: bool = False
    # the tissue box a chunk infers in one pass is grown to a multiple of this (px): fewer input
    # shapes for a backend that prepares per shape (benchmarks/shape_cost.py); 32: as it is
    box_step: int = 32
    # where the outputs are written: "stream" on the driver while the chunks finish (the tail after
    # the last chunk stays short); "worker": one task on a worker after the last chunk
    assemble: str = "stream"

    def engine(self) -> str:
        """The concrete inference backend (``backends.resolve_backend``) as the driver sees it."""
        from ..model.backends import resolve_backend

        return resolve_backend(self.backend, self.device, self.precision, check_cpu=not self.remote_workers)

    def check(self) -> None:
        """Every option for type, finiteness and range; raises ConfigError with one line."""
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0 or self.chunk_size % 32:
            raise ConfigError(f"--chunk-size must be > 0 and a multiple of 32, got {self.chunk_size!r}")
        if self.chunk_size > MAX_CHUNK:
            raise ConfigError(
                f"--chunk-size {self.chunk_size} is larger than {MAX_CHUNK} px: a chunk is held in memory whole; use the "
                f"default {DEFAULT_CHUNK}"
            )
        for name, value in (("--halo", self.halo), ("--context", self.context)):
            if value is not None:
                _int(name, value, 0)
                if value > MAX_CHUNK // 4:
                    raise ConfigError(f"{name} {value} px is larger than any model or nucleus needs (at most {MAX_CHUNK // 4}); "
                                      "leave it unset to use the model's")
        if self.batch_size is not None:
            _int("--batch-size", self.batch_size, 1)
        if self.forward_memory is not None:
            _int("--forward-memory", self.forward_memory, 1)
        _int("--threads", self.torch_threads, 0)
        _int("--box-step", self.box_step, 32)
        if self.box_step % 32:
            raise ConfigError(f"--box-step must be a multiple of 32, got {self.box_step}")
        if self.level0_mpp is not None:
            check_mpp(self.level0_mpp, "--mpp", self.unusual_mpp)
        if self.geojson_format not in ("geojson.gz", "geojson"):
            raise ConfigError(f"--format must be geojson.gz or geojson, got {self.geojson_format!r}")
        if isinstance(self.formats, str) or not isinstance(self.formats, (tuple, list)):
            raise ConfigError(f"formats must be a tuple of geojson and/or parquet, got {self.formats!r}")
        parse_formats(",".join(map(str, self.formats)))
        if self.tta is not None:
            from ..model.tta import check_tta

            check_tta(self.tta)
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.assemble not in ("stream", "worker"):
            raise ConfigError(f"unknown --assemble {self.assemble!r}; use stream or worker")
        if self.reader not in ("auto", "openslide", "tiffslide"):
            raise ConfigError(f"unknown --reader {self.reader!r}; use auto, openslide or tiffslide")
        from ..model.backends import BACKENDS, PRECISIONS

        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown --backend {self.backend!r}; use {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}; use {', '.join(PRECISIONS)}")
