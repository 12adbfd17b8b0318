"""Clusters: Dask clients, SLURM through dask-jobqueue, worker preloads."""
