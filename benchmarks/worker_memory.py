"""A worker with little memory: one forward pass per chunk window regardless, vs forward passes planned from the worker's limit.

Segments the bundled CMU sample with one local Dask worker (two chunk tasks, as by default) whose
memory limit is ``--limit`` (Dask's nanny pauses a worker at 80 % of it and kills it at 95 %), twice:
  fixed    --forward-memory 64GB: every 1792 px window in one forward pass, whatever the worker has
           (what the pipeline did before wsi_nuclei/model/memory.py);
  planned  the default: the worker sizes its forward passes from its memory limit.
For each it prints how the run ended (ok, failed, or no chunk finished for --stall s), the wall
time, the worker's peak RSS (sampled every 0.2 s), whether the worker was ever paused, and the
forward passes from summary.json.
Run: .venv/bin/python benchmarks/worker_memory.py [--limit 2.5GB] [--stall 90]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs"


def run(limit: str, forward_memory: int | None, stall_s: float) -> dict:
    import dask
    import psutil
    from dask.distributed import Client, LocalCluster

    from wsi_nuclei.cluster.client import CPU_TASKS, QUIET_DASK
    from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many

    out = Path(tempfile.mkdtemp()) / "out"
    cfg = SegmentConfig(forward_memory=forward_memory, torch_threads=2)
    with dask.config.set(QUIET_DASK):
        cluster = LocalCluster(n_workers=1, threads_per_worker=CPU_TASKS, memory_limit=limit, processes=True,
                               dashboard_address=":0", preload=["wsi_nuclei.cluster.worker_setup"])
    client = Client(cluster)
    done: dict = {}
    progress = [time.perf_counter()]

    def on_chunk(*_: object) -> None:
        progress[0] = time.perf_counter()

    def work() -> None:
        try:
            done["results"] = segment_many([SLIDE], out, cfg, client, on_chunk=on_chunk)
        except Exception as err:  # noqa: BLE001 - reported in the table
            done.setdefault("error", f"{type(err).__name__}: {err}")

    t0 = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    peak, paused, pids = 0, False, set()
    while thread.is_alive():
        try:
            info = client.run(lambda dask_worker: (os.getpid(), str(dask_worker.status)))
        except Exception:  # noqa: BLE001 - a worker being restarted
            info = {}
        for pid, status in info.values():
            pids.add(pid)
            paused |= "paused" in status
            try:
                peak = max(peak, psutil.Process(pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        if time.perf_counter() - progress[0] > stall_s:
            done.setdefault("error", f"no chunk finished for {stall_s:.0f} s")
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    try:
        client.close(timeout=10)
        cluster.close(timeout=10)
    except Exception:  # noqa: BLE001
        pass
    result = (done.get("results") or [None])[0]
    status = done.get("error") or (f"{result.status}" + (f": {result.reason}" if result and result.reason else ""))
    summary = out / SLIDE.stem / "summary.json"
    forward = json.loads(summary.read_text())["forward_passes"] if summary.exists() else []
    return {"status": status, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2), "paused": paused,
            "worker_processes": len(pids), "forward_passes": forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", default="2.5GB")
    ap.add_argument("--stall", type=float, default=90.0)
    args = ap.parse_args()
    rows = {"fixed": run(args.limit, 64 * 10**9, args.stall), "planned": run(args.limit, None, args.stall)}
    print(f"\nCMU-1-Small-Region, one local worker x 2 chunk tasks, memory limit {args.limit} (pause at 80 %, kill at 95 %)")
    print(f"{'forward':<8} {'ended':<7} {'wall s':>7} {'peak RSS GB':>12} {'paused':>7} {'worker processes':>17}  forward passes")
    for name, r in rows.items():
        plan = ", ".join(f"{f['tile_px']} px, {f['per_call']} per call ({f['chunks']} chunks)" for f in r["forward_passes"]) or "-"
        ended = "stalled" if r["status"].startswith("no chunk") else r["status"].split(":")[0]
        print(f"{name:<8} {ended:<7} {r['wall_s']:>7} {r['peak_rss_gb']:>12} {str(r['paused']):>7} {r['worker_processes']:>17}  {plan}")
    for name, r in rows.items():
        if not r["status"].startswith("ok"):
            print(f"{name}: {r['status'].replace(str(SLIDE), SLIDE.name)}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
