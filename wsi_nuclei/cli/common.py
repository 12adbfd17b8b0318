"""The command line's shared parts: the Typer app, the global options, one-line errors.

The commands live in :mod:`.models` (train, tune, evaluate, measure-context, segment-image)
and :mod:`.slides` (info, segment); :mod:`.main` assembles them.
"""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Nuclei segmentation for H&E images with EfficientUnet++.")
_state = {"debug": False}
DATA_ROOT_HELP = "Folder holding monuseg/train and consep (default: $WSI_NUCLEI_DATA)."


def fail(err: BaseException) -> None:
    if _state["debug"]:
        raise err
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    _state["debug"] = debug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    if not verbose:  # Dask's scheduler and workers log every start and stop at INFO
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def set_threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)
