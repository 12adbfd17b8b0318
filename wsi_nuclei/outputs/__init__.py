"""Outputs: the output folder and its lock, the Zarr store, GeoJSON, Parquet, density, overlay, report, AnnData."""
