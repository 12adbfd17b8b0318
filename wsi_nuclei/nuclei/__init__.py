"""Nuclei: probabilities to instances, ownership, polygons, the per-nucleus table, nucleus types."""
