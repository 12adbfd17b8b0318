"""nuclei.parquet: the writer's speed on one thread, and its peak memory against the nucleus count.

A synthetic slide of ``--nuclei`` nuclei (default 100,000): label windows like the pipeline's
(1152 x 1152 working px, one nucleus-like disc per 32 x 32 px, ~1,300 nuclei each, as
benchmarks/geojson_speed.py) go through ``label_polygons`` once; their nucleus tables are then
replayed as consecutive chunks (labels moved to each chunk's id range) until the slide holds
``--nuclei``. Timed: :class:`wsi_nuclei.outputs.parquet.ParquetWriter`, one row group per chunk, from the
tables to a closed file (ids, centroids, boxes, WKB, zstd) — what assembly does per slide.

Beside it, the same nuclei as .geojson.gz, split as the pipeline splits the work: the chunk task
turns nuclei into what its chunk file holds (``encode_nuclei`` for the GeoJSON,
``NucleusTable.from_nuclei`` for the table) and assembly writes the file (``GeoJSONWriter`` on the
encoded chunks: gzip; ``ParquetWriter`` on the tables).

Memory: for each count of ``--memory-sizes`` a fresh process writes a slide of that many nuclei
and reports the process's peak resident memory (everything: Arrow's C++ buffers, imports and the
tables to replay included) and the peak of Python's allocations while the writer runs
(tracemalloc); flat peaks mean the writer's memory does not grow with the nucleus count.

Run: .venv/bin/python benchmarks/parquet_speed.py          (part of make bench; ~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

WINDOWS = 4  # distinct windows; the slide replays them
KEY = "bench:1x1"


def _windows() -> list:
    """The nuclei of WINDOWS label windows (lists of wsi_nuclei.nuclei.polygons.Nucleus)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from geojson_speed import windows

    from wsi_nuclei.nuclei.polygons import PolygonFrame, label_polygons

    labs = windows(WINDOWS)
    rng = np.random.default_rng(1)
    prob = rng.random(labs[0].shape).astype(np.float32)
    rgb = (rng.random((*labs[0].shape, 3)) * 255).astype(np.uint8)
    # window i sits at column i of a slide (level-0 px = 2 working px)
    return [label_polygons(lab % 65536, PolygonFrame(i * 1152, 0, 2.0, 0.25), prob, rgb) for i, lab in enumerate(labs)]


def _tables(nuclei: list | None = None) -> list:
    from wsi_nuclei.nuclei.table import NucleusTable

    return [NucleusTable.from_nuclei(w) for w in (nuclei if nuclei is not None else _windows())]


def _chunks(tables: list, nuclei: int):  # noqa: ANN202
    """(chunk index, table) until ``nuclei`` nuclei: table k of the replay gets chunk k's labels."""
    from dataclasses import replace

    left, k = nuclei, 0
    while left > 0:
        t = tables[k % len(tables)]
        if len(t) > left:
            t, _ = t.without(t.labels[left:])
        yield k, replace(t, labels=(t.labels % 65536) + k * 65536)
        left -= len(t)
        k += 1


def write_slide(tables: list, nuclei: int, path: Path, compression: str | None = None) -> tuple[float, int, int]:
    """Seconds to write ``nuclei`` nuclei; nuclei and row groups written."""
    from wsi_nuclei.outputs.parquet import COMPRESSION, ParquetWriter

    t0 = time.perf_counter()
    with ParquetWriter(path, KEY, {"slide": "synthetic"}, compression=compression or COMPRESSION) as w:
        for k, t in _chunks(tables, nuclei):
            w.write(t, k)
    return time.perf_counter() - t0, w.count, w.row_groups


def _geojson(nuclei: list, count: int, repeat: int) -> tuple[float, float, float]:
    """The same slide as .geojson.gz: (nuclei/s of GeoJSONWriter on encoded chunks, bytes per
    nucleus, seconds per nucleus of encode_nuclei)."""
    from wsi_nuclei.outputs.geojson import GeoJSONWriter, encode_nuclei

    t0 = time.perf_counter()
    blobs = [encode_nuclei(w, KEY) for w in nuclei]
    t_encode = (time.perf_counter() - t0) / sum(len(w) for w in nuclei)
    joined = [(b",\n".join(b), len(b)) for b in blobs]
    best = float("inf")
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "nuclei.geojson.gz"
        for _ in range(repeat):
            t0 = time.perf_counter()
            written = 0
            with GeoJSONWriter(path) as w:
                k = 0
                while written < count:
                    blob, n = joined[k % len(joined)]  # the ids repeat: the same bytes per nucleus as a real slide
                    w.write_encoded(blob, n)
                    written += n
                    k += 1
            best = min(best, time.perf_counter() - t0)
        size = path.stat().st_size
    return written / best, size / written, t_encode


def _memory(nuclei: int) -> None:
    """Child process: print the writer's peak memory for ``nuclei`` nuclei as JSON."""
    import tracemalloc

    tables = _tables()
    with tempfile.TemporaryDirectory() as td:
        write_slide(tables, 2000, Path(td) / "warm.parquet")  # imports and first allocations, not measured
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        _, count, groups = write_slide(tables, nuclei, Path(td) / "slide.parquet")
        peak_py = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        size = (Path(td) / "slide.parquet").stat().st_size
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "nuclei": count,
                "row_groups": groups,
                "process_peak_rss_mb": round(rss, 1),
                "python_peak_mb": round(peak_py / 2**20, 1),
                "file_mb": round(size / 2**20, 1),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nuclei", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="timed writes; the fastest is reported")
    ap.add_argument("--memory-sizes", default="25000,100000,400000,1600000", help="nucleus counts of the memory rows ('' to skip)")
    ap.add_argument("--compression", default=None, help="Parquet codec (default: the writer's, wsi_nuclei.outputs.parquet.COMPRESSION)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _memory(args.child)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    nuclei = _windows()
    t0 = time.perf_counter()
    tables = _tables(nuclei)
    t_table = (time.perf_counter() - t0) / sum(len(w) for w in nuclei)
    per_window = sum(len(t) for t in tables) / len(tables)
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "nuclei.parquet"
        write_slide(tables, 2000, path, args.compression)  # warm-up
        times = []
        for _ in range(args.repeat):
            seconds, count, groups = write_slide(tables, args.nuclei, path, args.compression)
            times.append(seconds)
        best = min(times)
        size = path.stat().st_size
        assert pq.ParquetFile(path).metadata.num_rows == count
    geo_rate, geo_size, t_encode = _geojson(nuclei, args.nuclei, args.repeat)
    print(f"\n{count:,} nuclei in {groups} chunks (~{per_window:,.0f} per 1152² window), one thread")
    from wsi_nuclei.outputs.parquet import COMPRESSION

    print(f"writer ({args.compression or COMPRESSION}): {count / best:,.0f} nuclei/s (best of {args.repeat}: {best:.3f} s), "
          f"{size / count:.0f} bytes per nucleus on disk")
    print("\nbeside the GeoJSON, per nucleus (chunk task: nuclei -> what the chunk file holds; assembly: -> the file)")
    print(f"{'':<14} {'chunk task':>12} {'assembly':>12} {'on disk':>9}")
    print(
        f"{'parquet':<14} {t_table * 1e6:>9.1f} µs {1e6 / (count / best):>9.1f} µs {size / count:>7.0f} B   "
        f"(NucleusTable.from_nuclei; ParquetWriter)"
    )
    print(f"{'geojson.gz':<14} {t_encode * 1e6:>9.1f} µs {1e6 / geo_rate:>9.1f} µs {geo_size:>7.0f} B   (encode_nuclei; GeoJSONWriter)")
    rows = []
    for n in [int(s) for s in args.memory_sizes.split(",") if s.strip()]:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if rows:
        print(f"\n{'nuclei':>9} {'row groups':>10} {'process peak RSS MB':>19} {'writer: Python MB':>17} {'file MB':>8}")
        for r in rows:
            print(f"{r['nuclei']:>9,} {r['row_groups']:>10} {r['process_peak_rss_mb']:>19} {r['python_peak_mb']:>17} {r['file_mb']:>8}")
        print("(process peak RSS: everything, Arrow's C++ buffers, imports and the tables to replay included;\n"
              " writer: the peak of Python's allocations while the writer runs, tracemalloc)")
    print(
        json.dumps(
            {
                "nuclei": count,
                "writer_per_s": round(count / best),
                "bytes_per_nucleus": round(size / count),
                "table_us": round(t_table * 1e6, 2),
                "geojson_writer_per_s": round(geo_rate),
                "geojson_bytes_per_nucleus": round(geo_size),
                "encode_us": round(t_encode * 1e6, 2),
                "memory": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
