"""What Dask's defaults cost the model on a small CPU node, with and without cluster.QUIET_DASK.

Three measurements, each printed side by side (Dask defaults vs the settings wsi-nuclei uses):
  idle      CPU seconds an idle LocalCluster (1 worker) burns in 10 s, in the driver (scheduler +
            client) and in the worker: every such second is taken from the model on 2 cores;
  forward   median seconds of the shipped model's forward pass (ONNX Runtime, 2 threads) on one
            1792 px chunk window, in this process and inside the Dask worker;
  malloc    an in-process `segment` of the bundled CMU sample, with and without the
            MALLOC_TRIM_THRESHOLD_=65536 that Dask's nanny puts in its workers' environment
            (a fresh process each; --skip-malloc to leave it out, it takes ~1 min).
Run: .venv/bin/python benchmarks/dask_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def forward_seconds(n: int = 5) -> float:
    """Median forward time of one 1792 px window in the calling process (after one warm-up)."""
    import numpy as np

    from wsi_nuclei.pipeline import worker_cache

    predict, _, _ = worker_cache.cached_predictor(None, "cpu", "onnx", 2)
    x = np.random.default_rng(0).integers(0, 255, (1, 1792, 1792, 3), dtype=np.uint8)
    predict(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cluster_costs(quiet: bool) -> dict[str, float]:
    import dask
    import psutil
    from dask.distributed import Client, LocalCluster

    from wsi_nuclei.cluster.client import _PRELOAD, CPU_TASKS, QUIET_DASK

    settings = QUIET_DASK if quiet else {}
    with dask.config.set(settings):
        cluster = LocalCluster(n_workers=1, threads_per_worker=CPU_TASKS, processes=True, dashboard_address=":0", preload=[_PRELOAD])
        client = Client(cluster)
    try:
        me = psutil.Process()
        worker = next(p for p in me.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline()))
        time.sleep(3)
        before = {p.pid: sum(p.cpu_times()[:2]) for p in (me, worker)}
        time.sleep(10)
        idle = {name: sum(p.cpu_times()[:2]) - before[p.pid] for name, p in (("driver", me), ("worker", worker))}
        in_worker = client.submit(forward_seconds, pure=False).result()
    finally:
        client.close()
        cluster.close()
    return {
        "idle_driver_cpu_s": round(idle["driver"], 3),
        "idle_worker_cpu_s": round(idle["worker"], 3),
        "forward_in_worker_s": round(in_worker, 3),
    }


_SEGMENT = """
import json, sys, time
from pathlib import Path
from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many
cfg = SegmentConfig(backend="onnx", torch_threads=2, overwrite=True)
slide = Path(sys.argv[1])
segment_many([slide], Path(sys.argv[2]) / "warm", cfg)
t0 = time.perf_counter()
segment_many([slide], Path(sys.argv[2]) / "timed", cfg)
print(json.dumps(time.perf_counter() - t0))
"""


def segment_seconds(malloc_trim: bool, work: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    if malloc_trim:
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    slide = ROOT / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs"
    out = subprocess.run([sys.executable, "-c", _SEGMENT, str(slide), str(work)], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-malloc", action="store_true")
    args = ap.parse_args()
    import tempfile

    in_process = forward_seconds()
    default, quiet = cluster_costs(False), cluster_costs(True)
    rows = [("idle driver, CPU-s per 10 s", default["idle_driver_cpu_s"], quiet["idle_driver_cpu_s"]),
            ("idle worker, CPU-s per 10 s", default["idle_worker_cpu_s"], quiet["idle_worker_cpu_s"]),
            (f"forward in worker, s (in process {in_process:.3f})", default["forward_in_worker_s"], quiet["forward_in_worker_s"])]
    result = {"forward_in_process_s": round(in_process, 3), "dask_defaults": default, "quiet": quiet}
    if not args.skip_malloc:
        with tempfile.TemporaryDirectory() as tmp:
            trim, no_trim = segment_seconds(True, Path(tmp) / "a"), segment_seconds(False, Path(tmp) / "b")
        rows.append(("segment CMU sample in process, s (MALLOC_TRIM_THRESHOLD_ set / not)", round(trim, 2), round(no_trim, 2)))
        result.update({"segment_malloc_trim_s": round(trim, 2), "segment_default_malloc_s": round(no_trim, 2)})
    print(f"\nDask's defaults vs wsi-nuclei's (cluster.QUIET_DASK) — {os.cpu_count()} cores, ONNX Runtime, 2 threads")
    print(f"{'measure':<72} {'defaults':>9} {'ours':>9} {'ratio':>6}")
    for name, a, b in rows:
        print(f"{name:<72} {a:>9.3f} {b:>9.3f} {a / b if b else float('inf'):>6.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
