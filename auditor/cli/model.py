"""What the commands that load the model share: the model host behind progress bars and a
loading spinner, concept names resolved before the model loads, `--layer` parsing, and the
`--method` / `--pooling` options.

`workers` and `probes` are imported inside the functions: they pull in torch, and
`auditor --help` must not wait for it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from auditor.cli.app import clear_errors, err_console
from auditor.errors import InvalidInputError
from auditor.settings import Settings, get_settings

Method = Annotated[
    str | None,
    typer.Option(help="mean_diff (article), logistic, pca or lda (shrinkage covariance); default from settings"),
]
Pooling = Annotated[str | None, typer.Option(help="mean (sink excluded) or last token; default from settings")]


def resolve_concepts(names: list[str]) -> list:
    """Resolve concept names (or JSON files) before the model loads, so a typo fails fast."""
    from probes.concepts import load_concept

    with clear_errors():
        return [load_concept(name) for name in names]


@contextmanager
def model_host(settings: Settings | None = None):
    from workers.serving.host import ModelHost

    settings = settings or get_settings()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal and "pytest" in sys.modules,
    ) as progress:

        def start_task(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        host = ModelHost(settings, progress=start_task)
        with clear_errors():
            with err_console.status(f"loading model {settings.model}…"):
                host.model  # noqa: B018 - load now, so the spinner covers it
            yield host


def parse_layer(layer: str, host) -> int | None:
    if layer == "auto":
        return None
    try:
        value = int(layer)
    except ValueError:
        raise InvalidInputError(f"--layer must be an integer or 'auto', got {layer!r}") from None
    from probes.validation import check_layer

    return check_layer(value, host.model.n_layers)
