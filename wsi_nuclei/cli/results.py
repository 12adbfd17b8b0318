"""Commands on finished outputs: ``report`` (OUT/report.html) and ``export anndata`` (a slide's .h5ad)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import WsiNucleiError, shown
from .common import app, fail

export_app = typer.Typer(no_args_is_help=True, help="Convert a slide's outputs for other tools.")
app.add_typer(export_app, name="export")


@app.command()
def report(out: Path = typer.Argument(..., help="The -o folder of a wsi-nuclei segment run.")) -> None:
    """Write OUT/report.html again from OUT/run.json and each slide's summary.json."""
    from ..outputs.report import write_report

    try:
        path = write_report(out)
    except WsiNucleiError as err:
        fail(err)
        return
    typer.echo(shown(path))


@export_app.command("anndata")
def export_anndata(
    slide_dir: Path = typer.Argument(..., help="A slide's output folder (OUT/<slide>) or its nuclei.parquet."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The .h5ad file (default: OUT/<slide>/nuclei.h5ad)."),
) -> None:
    """nuclei.parquet -> AnnData (.h5ad): measurements in X, centroids in obsm["spatial"]."""
    from ..outputs.h5ad import write_h5ad

    try:
        path = write_h5ad(slide_dir, out)
    except WsiNucleiError as err:
        fail(err)
        return
    typer.echo(shown(path))
