"""Do the reduced precisions pass their accuracy gate? fp32, int8 and bf16 side by side, accuracy and speed.

1. Accuracy: the shipped model's AJI and PQ with ONNX Runtime fp32, int8 (``--precision int8``,
   ONNX Runtime on the quantised export) and bf16 (``--precision bf16``, OpenVINO in bf16; only on
   a CPU with native bf16) on the validation images cut from the training sets (5 MoNuSeg + 3
   CoNSeP train images, the card's ``validation_images``: the only set a recipe was chosen on),
   then for reporting TNBC and MoNuSeg 2018 test. The gate (issue 15): a precision may become the
   CPU default only if AJI and PQ drop by < 0.005 on both TNBC and MoNuSeg test.
2. Forward passes on the same tiles (4 crops of 448 px from the validation images): ms per call
   and agreement of the foreground decision with ONNX Runtime fp32, for ONNX Runtime and OpenVINO
   running the fp32 and the int8 export, and OpenVINO in bf16.
3. Chunk-size invariance per precision: ``segment`` of the bundled slide with 1024 and 1536 px
   chunks; AJI between the two label maps and the nuclei of either without an IoU > 0.5 partner
   in the other (fp32: the same nuclei, the pipeline's stated invariant).

Run: .venv/bin/python benchmarks/precision_gate.py [--threads 2] [--repeat 10]; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GATE = 0.005


def _sets(card: Any, data: Path) -> dict[str, list[Any]]:
    from wsi_nuclei.training.consep import load_consep
    from wsi_nuclei.training.datasets import load_monuseg, load_tnbc

    val = set(card.training["validation_images"])
    validation = load_monuseg(data / "monuseg" / "train", names=sorted(n for n in val if n.startswith("TCGA-")))
    validation += [s for s in load_consep(data / "consep", "train") if s.name in val]
    return {"validation": validation, "tnbc": load_tnbc(data / "tnbc"), "monuseg-test": load_monuseg(data / "monuseg" / "test")}


def _score(predict: Any, card: Any, samples: list[Any]) -> dict[str, float]:
    from wsi_nuclei.model.infer import segment_array
    from wsi_nuclei.training.metrics import evaluate_pair, mean_metrics

    t0 = time.perf_counter()
    means = mean_metrics([evaluate_pair(s.labels, segment_array(predict, card, s.image, s.mpp)) for s in samples])
    return {"aji": round(means["aji"], 4), "pq": round(means["pq"], 4), "n": len(samples), "s": round(time.perf_counter() - t0, 1)}


def _openvino(path: Path, threads: int, card: Any) -> Any:
    import openvino as ov

    from wsi_nuclei.model.backends import _normalise

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads)}
    )
    request = compiled.create_infer_request()
    mean, std = np.asarray(card.input_mean, np.float32), np.asarray(card.input_std, np.float32)
    return lambda tiles: np.array(request.infer({0: _normalise(tiles, mean, std)})[compiled.output(0)], dtype=np.float32)


def _invariance(threads: int, precisions: list[str]) -> dict[str, dict[str, float | int]]:
    """Part 3: the bundled slide at 1024 and 1536 px chunks, per precision (the default backend)."""
    import tempfile

    from wsi_nuclei.api import SAMPLE_SLIDE
    from wsi_nuclei.outputs.store import open_array
    from wsi_nuclei.pipeline.segment import SegmentConfig, segment_many
    from wsi_nuclei.training.metrics import evaluate_pair

    rows: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory() as td:
        for p in precisions:
            labels = []
            for chunk in (1024, 1536):
                cfg = SegmentConfig(chunk_size=chunk, precision=p, torch_threads=threads, overwrite=True)
                res = segment_many([SAMPLE_SLIDE], Path(td) / f"{p}_{chunk}", cfg)[0]
                labels.append(np.asarray(open_array(Path(res.out_dir) / "mask.zarr", "labels", 0)[:]).astype(np.int64))
            m = evaluate_pair(labels[0], labels[1])
            rows[p] = {"nuclei_1024": m.n_true, "nuclei_1536": m.n_pred, "aji": round(m.aji, 4), "unmatched": m.unmatched}
    print(f"\nchunk-size invariance: the bundled slide with 1024 vs 1536 px chunks, {threads} threads")
    print(f"{'precision':<10}{'nuclei 1024':>12}{'nuclei 1536':>12}{'AJI':>8}{'unmatched':>10}")
    for p, row in rows.items():
        print(f"{p:<10}{row['nuclei_1024']:>12}{row['nuclei_1536']:>12}{row['aji']:>8.4f}{row['unmatched']:>10}")
    return rows


def main() -> None:
    from wsi_nuclei.model.backends import (
        cpu_has_bf16,
        int8_path,
        make_predictor,
        onnx_path,
        openvino_available,
    )
    from wsi_nuclei.model.infer import resize_image, working_shape
    from wsi_nuclei.model.network import load_model
    from wsi_nuclei.model.quantize import RECIPE

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    net, card = load_model()
    backends = {"fp32": make_predictor(net, card, "onnx", "cpu", args.threads)[0],
                "int8": make_predictor(net, card, "onnx", "cpu", args.threads, "int8")[0]}
    if openvino_available() and cpu_has_bf16():
        backends["bf16"] = make_predictor(net, card, "openvino", "cpu", args.threads, "bf16")[0]
    else:
        print("bf16: skipped (no OpenVINO, or this CPU has no native bf16)")
    low = [p for p in backends if p != "fp32"]
    sets = _sets(card, args.data)

    scores: dict[str, dict[str, dict[str, float]]] = {}
    head = f"{'set':<14}{'n':>4}{'AJI fp32':>10}" + "".join(f"{'AJI ' + p:>10}{'dAJI':>9}" for p in low)
    head += f"{'PQ fp32':>9}" + "".join(f"{'PQ ' + p:>9}{'dPQ':>9}" for p in low)
    print(head)
    for name, samples in sets.items():
        scores[name] = {p: _score(fn, card, samples) for p, fn in backends.items()}
        a = scores[name]["fp32"]
        line = f"{name:<14}{a['n']:>4}{a['aji']:>10.4f}" + "".join(
            f"{scores[name][p]['aji']:>10.4f}{scores[name][p]['aji'] - a['aji']:>+9.4f}" for p in low)
        line += f"{a['pq']:>9.4f}" + "".join(f"{scores[name][p]['pq']:>9.4f}{scores[name][p]['pq'] - a['pq']:>+9.4f}" for p in low)
        print(line)
    drops = {p: {s: {m: round(scores[s]["fp32"][m] - scores[s][p][m], 4) for m in ("aji", "pq")} for s in sets} for p in low}
    passed = {p: all(drops[p][s][m] < GATE for s in ("tnbc", "monuseg-test") for m in ("aji", "pq")) for p in low}
    for p in low:
        print(f"{p} gate (AJI and PQ drop < {GATE} on TNBC and MoNuSeg test): {'PASS' if passed[p] else 'FAIL'}")

    # forward passes on the same tiles
    crops = []
    for s in sets["validation"][:4]:
        work = resize_image(s.image, working_shape(s.image.shape[:2], s.mpp, card.working_mpp))
        crops.append(work[:448, :448])
    tiles = np.stack(crops)
    fns = {"onnxruntime fp32": backends["fp32"], "onnxruntime int8": backends["int8"]}
    if openvino_available():
        fns["openvino fp32"] = _openvino(onnx_path(card), args.threads, card)
        fns["openvino int8"] = _openvino(int8_path(card), args.threads, card)
        if "bf16" in backends:
            fns["openvino bf16"] = backends["bf16"]
    ref = backends["fp32"](tiles)
    times: dict[str, list[float]] = {k: [] for k in fns}
    agree = {}
    for k, fn in fns.items():
        out = fn(tiles)  # warm-up
        agree[k] = float(((out[:, 0] > 0.5) == (ref[:, 0] > 0.5)).mean())
    for _ in range(args.repeat):  # round-robin: drift in CPU speed hits every row alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(tiles)
            times[k].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    base = ms["onnxruntime fp32"]
    print(f"\nforward of {tiles.shape[0]} x {tiles.shape[1]} px tiles, {args.threads} threads")
    print(f"{'backend':<20}{'ms':>9}{'x ORT fp32':>12}{'fg agreement':>14}")
    for k in fns:
        print(f"{k:<20}{ms[k]:>9.0f}{base / ms[k]:>12.2f}{agree[k]:>14.4f}")
    invariance = _invariance(args.threads, list(backends))
    print(
        json.dumps(
            {
                "recipe": RECIPE,
                "invariance": invariance,
                "threads": args.threads,
                "scores": scores,
                "drops": drops,
                "gate": GATE,
                "passed": passed,
                "forward_ms": {k: round(v, 1) for k, v in ms.items()},
                "speedup_vs_ort_fp32": {k: round(base / v, 2) for k, v in ms.items()},
                "fg_agreement": {k: round(v, 4) for k, v in agree.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
