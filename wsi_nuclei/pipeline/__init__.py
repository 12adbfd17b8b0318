"""The pipeline, in stage order: config, tiling, plan, chunk, assemble, batch, segment."""
