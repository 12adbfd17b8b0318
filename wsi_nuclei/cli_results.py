"""Commands on finished outputs: ``report`` (OUT/report.html)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import app, fail
from .errors import WsiNucleiError


@app.command()
def report(out: Path = typer.Argument(..., help="The -o folder of a wsi-nuclei segment run.")) -> None:
    """Write OUT/report.html again from OUT/run.json and each slide's summary.json."""
    from .report import write_report

    try:
        path = write_report(out)
    except WsiNucleiError as err:
        fail(err)
        return
    typer.echo(str(path))
