"""The validation curve of a training run, from its log.jsonl: one row per validated epoch with
the pooled and worst-group AJI, each group's AJI, the type F1s and the tiled-vs-whole probe.
Run: .venv/bin/python benchmarks/training_curve.py runs/v3/log.jsonl [--every 10] [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", type=Path)
    ap.add_argument("--every", type=int, default=1, help="only every N-th validated epoch (and the last)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    probes = {r["epoch"]: r["probe"] for r in rows if "probe" in r}
    val = [r for r in rows if "val_aji" in r]
    keep = [r for i, r in enumerate(val) if i % args.every == 0 or r is val[-1]]
    groups = sorted({g for r in val for g in r.get("val_groups", {})})
    short = [g.replace("monuseg:", "") for g in groups]
    head = [
        "epoch",
        "step",
        "loss",
        "pooled AJI",
        "worst group",
        *short,
        "F_d",
        "F_c infl.",
        "F_c epi.",
        "F_c spindle",
        "probe 96 px p99.9 / unmatched",
    ]
    lines = []
    for r in keep:
        t = r.get("val_types", {})
        steps = r["epoch"] * rows[0].get("steps", 20) if "steps" in rows[0] else r["epoch"] * 20
        near = max((e for e in probes if e <= r["epoch"]), default=None)
        probe = f"{probes[near]['p999']:.3f} / {probes[near]['unmatched']} (ep {near})" if near else ""
        cells = [str(r["epoch"]), str(steps), f"{r['loss']:.3f}", f"{r['val_aji']:.4f}",
                 f"{r.get('val_worst_group', min(r.get('val_groups', {0: r['val_aji']}).values())):.4f}",
                 *(f"{r.get('val_groups', {}).get(g, float('nan')):.4f}" for g in groups),
                 *(f"{t[k]:.3f}" if k in t else "" for k in ("f_d", "f_c_2", "f_c_3", "f_c_4")), probe]
        lines.append(cells)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for c in lines:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for c in lines:
            print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


if __name__ == "__main__":
    main()
