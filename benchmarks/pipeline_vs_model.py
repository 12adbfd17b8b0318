"""The whole slide pipeline versus the bare model on exactly the tiles it infers.

For each slide (the bundled CMU sample and a larger synthetic slide with glass around its tissue)
and each inference backend:
  (a) model_s:    the backend's forward pass alone over every tile of every planned chunk, same
                  batches (the RGB windows are read beforehand, not timed);
  (b) pipeline_s: `segment` of the same slide, in this process after a warm-up run of that slide
                  (model loaded, ONNX export cached, every input shape seen once: first_s is that
                  run): read/decode, inference, instances, polygons, assembly;
  ratio = (b) / (a), and the stage seconds from summary.json, seconds per mm² of tissue at
0.5 µm/px, the tissue fraction and the time a run without the tissue mask takes (synthetic slide);
  limit_s: the physical limit, the bare forward pass over only the 256 px tiles that touch the
           tissue mask, no context, no halo, batched (8 per call), same backend and threads;
  ratio_to_limit = pipeline_s / limit_s; amplification = pixels given to the model / tissue pixels
  (summary.json ``amplification``).
The last line is a JSON object with model_s, pipeline_s, ratio, limit_s, ratio_to_limit,
amplification and s_per_mm2 of the default backend (auto) on the real slide, then every row.

Run: .venv/bin/python benchmarks/pipeline_vs_model.py [--threads 2] [--backends torch,onnx,openvino,openvino-bf16,onnx-int8]
(onnx-int8 is ``segment --precision int8``, openvino-bf16 ``segment --precision bf16``, skipped on a
CPU without native bf16; their limit_s is the forward pass at their own precision over the tissue tiles)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def model_only(plan, cfg, predict, n_outputs: int) -> float:  # noqa: ANN001
    """Seconds of ``predict`` alone over exactly the model calls the pipeline makes for ``plan``:
    the same function (infer.window_probabilities) with the same arguments, only ``predict`` timed;
    the reads are done first and not timed. The calls are made twice and the second pass is timed:
    a backend's first call on a new input shape costs extra (OpenVINO's most, when the shape is the
    largest yet), and the pipeline is timed after a warm-up on the same slide too."""
    from wsi_nuclei.model.infer import window_probabilities
    from wsi_nuclei.pipeline.worker_cache import forward_plan
    from wsi_nuclei.slides.reader import open_slide

    t = plan.tiling
    margin = t.halo + t.context
    fp = forward_plan(cfg, t)  # the pipeline's own plan: the same forward passes
    read = fp.read_size(t.window, t.context)
    spent = [0.0]

    def timed(batch):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = predict(batch)
        spent[0] += time.perf_counter() - t0
        return out

    with open_slide(plan.path, cfg.reader, cfg.level0_mpp) as slide:
        windows = [slide.read_working((ch.x - margin, ch.y - margin, read, read), plan.scale) for ch in plan.chunks]
    for _ in range(2):
        spent[0] = 0.0
        for ch, rgb in zip(plan.chunks, windows):
            window_probabilities(timed, n_outputs, rgb, fp.tile, t.context, fp.batch, ch.infer)
    return spent[0]


def limit_only(plan, tissue, thumb_scale: float, cfg, predict, tile: int = 256, batch: int = 8) -> tuple[float, int]:  # noqa: ANN001
    """The physical limit: seconds of ``predict`` over the 256 px tiles of the working grid whose
    area touches the tissue mask, without context or halo, ``batch`` tiles per call (the reads are
    done first and not timed). Returns (seconds, tiles)."""
    import math

    import numpy as np

    from wsi_nuclei.slides.reader import open_slide

    h, w = plan.size
    per = thumb_scale / plan.scale  # working px per tissue-mask pixel
    boxes = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            part = tissue[int(y / per) : int(math.ceil((y + tile) / per)), int(x / per) : int(math.ceil((x + tile) / per))]
            if part.any():
                boxes.append((x, y))
    spent = 0.0
    with open_slide(plan.path, cfg.reader, cfg.level0_mpp) as slide:
        tiles = [slide.read_working((x, y, tile, tile), plan.scale) for x, y in boxes]
        predict(np.stack(tiles[:batch]))  # the first call on this shape is not the steady state
        for i in range(0, len(tiles), batch):
            group = np.stack(tiles[i : i + batch])
            t0 = time.perf_counter()
            predict(group)
            spent += time.perf_counter() - t0
    return spent, len(boxes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="torch,onnx,openvino,openvino-bf16,onnx-int8",
                    help="comma-separated; onnx-int8 = --precision int8, openvino-bf16 = --precision bf16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: torch backend only)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=None, help="working px (default: segment's default)")
    ap.add_argument("--dask", action="store_true", help="also time the default `segment` set-up: a LocalCluster of 1 worker x threads")
    ap.add_argument("--synthetic-side", type=int, default=12288, help="level-0 px of the synthetic slide (0.25 µm/px)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-nuclei-pipeline-bench")
    args = ap.parse_args()

    import torch
    from memory_scaling import build_slide

    from wsi_nuclei.model.backends import backend_precision, cpu_has_bf16, make_predictor
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.pipeline.plan import plan_slide
    from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    slides = {"CMU-1-Small-Region (real)": ROOT / "wsi_nuclei" / "data" / "CMU-1-Small-Region.svs",
              f"synthetic {args.synthetic_side}² @0.25 (glass around)": build_slide(args.work / f"syn_{args.synthetic_side}_t25.tif",
                                                                             args.synthetic_side, tissue=0.25)}
    model, card = load_model()
    rows = []
    for spec in args.backends.split(","):
        # onnx-int8: `segment --precision int8` (ONNX Runtime on the quantised export)
        backend, precision = backend_precision(spec)
        if precision == "bf16" and not cpu_has_bf16():
            print(f"{spec}: skipped, this CPU has no native bf16", file=sys.stderr)
            continue
        chunk = {"chunk_size": args.chunk_size, "precision": precision} if args.chunk_size else {"precision": precision}
        cfg = SegmentConfig(
            backend=backend, torch_threads=args.threads, overwrite=True, device=args.device, batch_size=args.batch_size, **chunk
        )
        predict, name = make_predictor(model, card, backend, args.device, args.threads, precision)
        for label, path in slides.items():
            # warm-up on the same slide: the pipeline's own model cache (the first slide: loading the
            # model, the ONNX export), first-call allocations, each input shape seen once
            t0 = time.perf_counter()
            segment_many([path], args.work / "warmup", cfg)
            first_s = time.perf_counter() - t0
            plan, thumb, tissue = plan_slide(path, args.work / "plan", cfg)
            model_s = model_only(plan, cfg, predict, len(card.outputs))
            from wsi_nuclei.slides.reader import open_slide

            with open_slide(path) as sl:
                _, thumb_scale = sl.thumbnail(2048)
            limit_s, limit_tiles = limit_only(plan, tissue, thumb_scale, cfg, predict)
            out = args.work / f"out_{name}"
            t0 = time.perf_counter()
            res = segment_many([path], out, cfg)[0]
            pipeline_s = time.perf_counter() - t0
            summary = json.loads((Path(res.out_dir) / "summary.json").read_text())
            row = {
                "slide": label,
                "backend": name,
                "chunks": len(plan.chunks),
                "nuclei": res.nuclei,
                "tissue_mm2": summary["tissue_mm2"],
                "model_s": round(model_s, 2),
                "pipeline_s": round(pipeline_s, 2),
                "ratio": round(pipeline_s / model_s, 3),
                "s_per_mm2": round(pipeline_s / max(summary["tissue_mm2"], 1e-9), 2),
                "first_s": round(first_s, 2),
                "limit_s": round(limit_s, 2),
                "limit_tiles": limit_tiles,
                "ratio_to_limit": round(pipeline_s / limit_s, 3),
                "amplification": summary["amplification"],
                "stages": summary["seconds"],
            }
            if args.dask:
                from wsi_nuclei.cluster.client import ClusterConfig, close_client, make_client

                client = make_client(ClusterConfig(workers=1, threads=args.threads))
                try:
                    segment_many([path], args.work / "warmup_dask", cfg, client)
                    t0 = time.perf_counter()
                    segment_many([path], args.work / f"dask_{name}", cfg, client)
                    row["dask_s"] = round(time.perf_counter() - t0, 2)
                    row["dask_ratio"] = round(row["dask_s"] / model_s, 3)
                finally:
                    close_client(client)
            if label.startswith("synthetic"):
                t0 = time.perf_counter()
                full = segment_many([path], args.work / f"full_{name}", SegmentConfig(backend=backend, torch_threads=args.threads,
                                                                                     overwrite=True, tissue_mask=False, device=args.device,
                                                                                     batch_size=args.batch_size, **chunk))[0]
                row["all_chunks_s"] = round(time.perf_counter() - t0, 2)
                row["all_chunks"] = json.loads((Path(full.out_dir) / "summary.json").read_text())["chunks"]["processed"]
            rows.append(row)
            print(f"done {label} {name}: ratio {row['ratio']}", file=sys.stderr, flush=True)

    gpu = f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""
    print(f"\npipeline vs bare model — {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, "
          f"{args.threads} threads, chunk {cfg.chunk_size} px, torch {torch.__version__}, in-process (no Dask)")
    print(
        f"{'slide':<36} {'backend':>13} {'chunks':>6} {'nuclei':>7} {'tissue mm²':>10} {'limit s':>7} {'model s':>8} "
        f"{'pipeline s':>10} {'first s':>7} "
        f"{'ratio':>6} {'to limit':>8} {'ampl.':>6} {'s/mm²':>6}  stages (s): read / inference / instances / polygons / assembly"
    )
    for r in rows:
        st = r["stages"]
        print(
            f"{r['slide']:<36} {r['backend']:>13} {r['chunks']:>6} {r['nuclei']:>7} {r['tissue_mm2']:>10.3f} {r['limit_s']:>7.1f} "
            f"{r['model_s']:>8.1f} {r['pipeline_s']:>10.1f} {r['first_s']:>7.1f} {r['ratio']:>6.2f} "
            f"{r['ratio_to_limit']:>8.2f} {r['amplification']:>6.2f} "
            f"{r['s_per_mm2']:>6.1f}  {st['read']:.1f} / {st['inference']:.1f} / {st['instances']:.1f} / {st['polygons']:.1f} / "
            f"{st['assemble']:.1f}"
        )
    print("limit s: the bare model over the 256 px tiles touching tissue (no context, no halo); to limit = pipeline s / limit s; "
          "ampl. = pixels given to the model / tissue pixels; first s: the slide's first run in this process (the first slide's "
          "also loads and exports the model), pipeline s: the next one")
    for r in rows:
        if "dask_s" in r:
            print(f"{r['slide']} ({r['backend']}), default set-up (LocalCluster, 1 worker, 2 chunks whose forward passes take turns, "
                  f"{args.threads} model threads): {r['dask_s']:.1f} s, ratio {r['dask_ratio']:.2f}")
    for r in rows:
        if "all_chunks_s" in r:
            print(f"tissue only ({r['backend']}): {r['chunks']} of {r['all_chunks']} chunks, {r['pipeline_s']:.1f} s "
                  f"vs {r['all_chunks_s']:.1f} s for every chunk ({1 - r['pipeline_s'] / r['all_chunks_s']:.0%} saved)")
    from wsi_nuclei.model.backends import resolve_backend

    default = resolve_backend("auto", args.device)  # the backend `segment` uses here
    main_row = next((r for r in rows if r["slide"].startswith("CMU") and r["backend"] == default), rows[0])
    print(json.dumps({"model_s": main_row["model_s"], "pipeline_s": main_row["pipeline_s"], "ratio": main_row["ratio"],
                      "limit_s": main_row["limit_s"], "ratio_to_limit": main_row["ratio_to_limit"],
                      "amplification": main_row["amplification"], "s_per_mm2": main_row["s_per_mm2"],
                      "backend": main_row["backend"], "rows": rows}))


if __name__ == "__main__":
    main()
