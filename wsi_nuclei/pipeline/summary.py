"""``summary.json``: one per slide, written last by the assembly. Its presence (with the sizes of
the outputs it lists) is what makes a slide finished for ``--resume`` (:func:`wsi_nuclei.outputs.folder.finished`).

:class:`Summary` is the file's schema: its fields are the file's keys, in the file's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["Summary", "SUMMARY_NAME"]

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class Summary:
    """One slide's ``summary.json``."""

    slide: str  #: the slide's path as given
    nuclei: int  #: nuclei written (after dropping the copies two chunks both kept)
    tissue_mm2: float  #: tissue area, from the tissue mask
    #: ``processed`` (chunks of the slide), ``grid`` (rows, cols), ``computed_this_run``, ``reused`` (from an earlier run)
    chunks: dict[str, Any]
    cut_nuclei: int  #: nuclei that reached the edge of their chunk's window (raise ``--halo`` if many)
    inferred_px: int  #: pixels given to the model, at its working resolution
    amplification: float  #: ``inferred_px`` per pixel of tissue
    overlaps_dropped: int  #: nuclei kept by two chunks; the later copy is dropped (``instances.overlapping``)
    #: how the chunk windows were inferred: ``tile_px``, ``core_px``, ``per_call``, ``chunks`` (memory.py plans them)
    forward_passes: list[dict[str, Any]]
    #: per stage: ``read``, ``waiting``, ``inference``, ``instances``, ``polygons`` (summed over chunks), ``write``, ``assemble``, ``wall``
    seconds: dict[str, float]
    parameters: dict[str, Any]  #: the options as given, ``context`` and ``tta`` resolved
    tiling: dict[str, Any]  #: the tiling (working px): chunk, halo, context, grid
    slide_info: dict[str, Any]  #: what the reader said about the slide (size, resolution, levels, vendor)
    model: Any  #: the model's id
    backend: str  #: the inference engine that ran, e.g. ``openvino`` or ``onnx-int8``
    versions: dict[str, str]  #: wsi-nuclei and its main dependencies
    nuclei_per_mm2: float  #: of tissue
    #: a typed model's nuclei per type (QuPath class name): ``nuclei`` and ``per_mm2``; None (absent) without types
    types: dict[str, dict[str, float]] | None
    density: dict[str, Any]  #: the density map's ``cell_um``, ``grid`` (rows, cols) and ``max_per_mm2``
    outputs: dict[str, str]  #: the slide's output files by kind (mask, geojson, parquet, overlay, density)
    slide_file: dict[str, Any]  #: the slide file's identity (size, mtime, head hash): --resume checks it
    output_key: str  #: a hash of the options that change the outputs: --resume checks it
    fingerprint: str  #: the chunk files' key (slide, model and options)
    run_id: str  #: the run that wrote it
    #: whether that run kept its chunk files (``--keep-chunks``); if not, ``--resume`` removes a work
    #: folder left beside the finished outputs (a run killed between this file and the removal)
    keep_chunks: bool = False
    output_bytes: dict[str, int] | None = None  #: each output's size, once installed: --resume checks them

    def as_dict(self) -> dict[str, Any]:
        """The file's content: the fields in order, ``types`` left out when None."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["types"] is None:
            del out["types"]
        if out["output_bytes"] is None:
            del out["output_bytes"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, default=str) + "\n"

    def with_output_bytes(self, sizes: dict[str, int]) -> Summary:
        return replace(self, output_bytes=sizes)

    @classmethod
    def keys(cls, typed: bool) -> list[str]:
        """The keys of a finished slide's file (``types`` only for a typed model)."""
        return [f.name for f in fields(cls) if typed or f.name != "types"]
