"""What a worker process keeps between tasks (pipeline.worker_cache) follows the files on disk:
a model folder or a slide replaced in place is never served from the old copy, and a chunk task
whose inputs changed after the run planned it fails its slide with one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from wsi_nuclei.pipeline import worker_cache
from wsi_nuclei.pipeline.chunk import chunk_task
from wsi_nuclei.pipeline.plan import model_card, plan_slide, start_slide
from wsi_nuclei.pipeline.segment import SegmentConfig

from .slides import disc_slide

WEIGHTS = Path(__file__).resolve().parents[1] / "wsi_nuclei" / "weights"


def _bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_model_changed_in_place_is_loaded_again(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(WEIGHTS, model)
    _, card, _ = worker_cache.cached_predictor(str(model), "cpu", "torch", 1)
    again = worker_cache.cached_predictor(str(model), "cpu", "torch", 1)
    assert again[1] is card  # unchanged files: the cached one
    data = json.loads((model / "model.json").read_text())
    data["postprocess"]["fg_threshold"] = 0.45
    (model / "model.json").write_text(json.dumps(data, indent=2) + "\n")
    _bump(model / "model.json")
    _, new_card, _ = worker_cache.cached_predictor(str(model), "cpu", "torch", 1)
    assert new_card.postprocess.fg_threshold == 0.45 != card.postprocess.fg_threshold
    kept = [k for k in worker_cache._CACHE if k[:5] == ("model", str(model), "cpu", "torch", 1)]
    assert len(kept) == 1  # the old version is dropped, not kept beside the new one


def test_a_slide_replaced_at_its_path_is_read_anew_and_a_planned_chunk_refuses_it(tmp_path):
    path = disc_slide(tmp_path / "s.tif", (256, 256), seed=71)
    first = worker_cache.slide_handle(str(path), "auto", None)
    assert worker_cache.slide_handle(str(path), "auto", None) is first
    cfg = SegmentConfig(chunk_size=256, halo=32, context=64)
    plan, thumb, tissue = plan_slide(path, tmp_path / "out", cfg, model_card(cfg))
    todo = start_slide(plan, thumb, tissue, cfg)
    disc_slide(path, (320, 320), seed=72)  # re-exported at the same path, while the run is planned
    _bump(path)
    second = worker_cache.slide_handle(str(path), "auto", None)
    assert second is not first and second.info.dimensions == (320, 320)
    done = chunk_task(plan, todo[0], cfg)
    assert done.error and "s.tif: the slide file changed" in done.error and "--resume" in done.error
    assert not plan.chunk_file(todo[0]).exists() and np.isfinite(done.seconds)
