"""The pipeline, in stage order.

1. ``config``: the options (:class:`~.config.SegmentConfig`), checked once.
2. ``tiling``: chunk grid, halo and context in working px.
3. ``plan``: one slide opened, its tissue, its chunks and keys (:class:`~.plan.SlidePlan`).
4. ``chunk``: one Dask task per chunk, written as a chunk file (``chunkfile``: codec, version, check).
5. ``assemble``: one task per slide, chunk files -> outputs; ``summary``: the ``summary.json`` schema.
6. ``batch``: the driver loop over slides and tasks; ``results``: the values it passes on.
7. ``segment``: the public entry points (``segment_slide``, ``segment_many``); ``launch``: what
   ``wsi-nuclei segment`` prepares before a run (configs, model, dry run); ``worker_cache``: what a
   worker builds once.
"""
