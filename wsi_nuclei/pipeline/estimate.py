"""Time and memory a run will take, for ``segment --dry-run`` (and a SLURM ``--walltime``).

The estimate is the work the plan gives the model times a measured rate: wall seconds per
million pixels of model input (each chunk's tissue box and its context, at the working
resolution) for one worker of a given backend, device and thread count, measured on the bundled
slide by ``wsi-nuclei measure-rate --write`` and stored next to the model in ``rates.json``. The
pixels, not the tissue area, carry over between slides: scattered tissue costs more context per
mm² than one large piece (the bundled slide's model input is 5x its tissue, a resection's about
3x), so a rate per mm² from the small slide overstated a large slide's time twofold. ``--rate``
(seconds per mm² of tissue) overrides it, as do rates.json entries without ``s_per_mpx``. Workers
share the slides' chunks, so the compute part divides by the worker count; each slide adds its
fixed part (opening, planning, assembly), of which ``max_slides`` overlap. Peak memory per worker
is what the memory plan assumes (``model.memory``): the process with its model, the chunk tasks'
buffers and one forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ConfigError

__all__ = ["Rate", "Estimate", "RATES_FILE", "rate_key", "load_rate", "store_rate", "estimate", "model_mpx", "walltime", "measure_rate"]

RATES_FILE = "rates.json"
#: The slide the rate is measured on (the package's sample: CMU-1-Small-Region).
SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"
#: The walltime a dry run proposes: the estimate times this, rounded up to a quarter of an hour.
WALLTIME_MARGIN = 1.5


@dataclass(frozen=True)
class Rate:
    """``s_per_mm2``: wall seconds per mm² of tissue for one worker of ``threads`` threads (the
    bundled slide's run, fixed part excluded); ``s_per_mpx``: the same per million pixels of model
    input (0: not measured, the area is used); ``s_per_slide``: the fixed part of a slide;
    ``measured``: where and how (machine, date, command)."""

    s_per_mm2: float
    s_per_slide: float = 0.0
    threads: int = 2
    measured: str = ""
    s_per_mpx: float = 0.0


@dataclass(frozen=True)
class Estimate:
    """Seconds per slide (in input order) and for the run, and the peak memory per worker."""

    per_slide_s: tuple[float, ...]
    total_s: float
    worker_peak_bytes: int
    rate: Rate
    rate_from: str  # "--rate", or the rates.json key it came from


def rate_key(engine: str, device: str, threads: int) -> str:
    """The rates.json key of a concrete backend on a device class at a thread count, e.g. ``openvino:cpu:2``."""
    return f"{engine}:{'cpu' if device == 'cpu' else 'cuda'}:{threads}"


def _rates_path(model_dir: Path) -> Path:
    return Path(model_dir) / RATES_FILE


def load_rate(model_dir: Path, engine: str, device: str, threads: int) -> tuple[Rate, str] | None:
    """The stored rate for this backend and device: the same thread count, else the nearest one
    scaled by threads (an assumption: forward passes scale about linearly at few threads)."""
    try:
        data = json.loads(_rates_path(model_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    prefix = f"{engine}:{'cpu' if device == 'cpu' else 'cuda'}:"
    found: dict[int, Rate] = {}
    for key, value in (data.items() if isinstance(data, dict) else ()):
        if isinstance(key, str) and key.startswith(prefix) and isinstance(value, dict):
            try:
                found[int(key[len(prefix):])] = Rate(**value)
            except (TypeError, ValueError):
                continue
    if not found:
        return None
    nearest = min(found, key=lambda t: (abs(t - threads), -t))
    rate = found[nearest]
    if nearest != threads and threads > 0:
        rate = Rate(rate.s_per_mm2 * nearest / threads, rate.s_per_slide, threads, rate.measured + f" (scaled from {nearest} threads)",
                    rate.s_per_mpx * nearest / threads)
    return rate, prefix + str(nearest)


def store_rate(model_dir: Path, key: str, rate: Rate) -> Path:
    """Add (or replace) ``key`` in the model's rates.json."""
    path = _rates_path(model_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    data[key] = asdict(rate)
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def estimate(tissue_mm2: list[float], rate: Rate, rate_from: str, workers: int, max_slides: int, worker_peak_bytes: int,
             model_mpx: list[float] | None = None) -> Estimate:
    """The run's estimate for slides of ``tissue_mm2`` (and ``model_mpx``: million pixels of model
    input each, from their plans) on ``workers`` workers (0: this process, as one). The pixels are
    used when the rate has ``s_per_mpx``, else the tissue area."""
    if not (math.isfinite(rate.s_per_mm2) and rate.s_per_mm2 > 0):
        raise ConfigError(f"--rate must be a number of seconds per mm² > 0, got {rate.s_per_mm2}")
    n = max(1, workers)
    if rate.s_per_mpx > 0 and model_mpx is not None and len(model_mpx) == len(tissue_mm2):
        work = [m * rate.s_per_mpx for m in model_mpx]
    else:
        work = [a * rate.s_per_mm2 for a in tissue_mm2]
    per_slide = tuple(round(w / n + rate.s_per_slide, 1) for w in work)
    fixed = rate.s_per_slide * math.ceil(len(tissue_mm2) / max(1, max_slides))
    total = round(sum(work) / n + fixed, 1)
    return Estimate(per_slide, total, worker_peak_bytes, rate, rate_from)


def model_mpx(chunks: Any, window: int, context: int) -> float:
    """Million pixels of model input a plan's chunks give the model when each window is one forward
    pass (a CPU worker's usual plan): every chunk's tissue box (the whole window without one) with
    its context on every side."""
    total = 0
    for ch in chunks:
        if ch.infer is None:
            side = window + 2 * context
            total += side * side
        else:
            x0, y0, x1, y1 = ch.infer
            total += (x1 - x0 + 2 * context) * (y1 - y0 + 2 * context)
    return total / 1e6


def walltime(seconds: float) -> str:
    """A SLURM walltime (HH:MM:SS) for a run estimated at ``seconds``: with a margin, in quarter hours."""
    quarters = max(1, math.ceil(seconds * WALLTIME_MARGIN / 900))
    minutes = quarters * 15
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def describe_seconds(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; ``7300`` -> ``2 h 2 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def as_dict(est: Estimate) -> dict[str, Any]:
    return {"per_slide_s": list(est.per_slide_s), "total_s": est.total_s, "worker_peak_bytes": est.worker_peak_bytes,
            "rate": asdict(est.rate), "rate_from": est.rate_from}


def measure_rate(model_dir: Path | None, backend: str, device: str, threads: int, work: Path) -> tuple[str, Rate]:
    """(rates.json key, :class:`Rate`) of segmenting the bundled sample slide in this process,
    as one worker of ``threads`` threads: the slide's wall time after its last chunk is the fixed
    part (``s_per_slide``), the rest per mm² of tissue. ``work``: an empty folder for the outputs."""
    import platform
    import time

    from .config import SegmentConfig
    from .segment import segment_slide

    cfg = SegmentConfig(model_dir=str(model_dir) if model_dir else None, backend=backend, device=device, torch_threads=threads)
    cfg.check()
    res = segment_slide(SAMPLE_SLIDE, work / "rate", cfg)
    summary = json.loads((work / "rate" / "summary.json").read_text(encoding="utf-8"))
    wall, tail = float(summary["seconds"]["wall"]), float(summary["seconds"]["assemble"])
    area = float(res.extra.get("tissue_mm2", summary["tissue_mm2"]))
    if area <= 0 or wall <= 0:
        raise ConfigError("the bundled slide gave no tissue or no time to measure; its file may be damaged (reinstall wsi-nuclei)")
    when = time.strftime("%Y-%m-%d")
    mpx = float(summary.get("inferred_px", 0)) / 1e6
    rate = Rate(round((wall - tail) / area, 3), round(tail, 2), threads,
                f"{platform.node() or 'this machine'}, {when}, wsi-nuclei measure-rate --backend {backend} --threads {threads}",
                round((wall - tail) / mpx, 4) if mpx > 0 else 0.0)
    return rate_key(cfg.engine(), device, threads), rate
