"""The one typer `app`, the consoles every command prints on, and how known errors become
exit codes (bad input 2, other known failures 1), one line each instead of a traceback.

The commands live in the sibling modules; `auditor/cli/__init__.py` registers them on `app`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from auditor.errors import AuditorError, InvalidInputError
from auditor.reports.safe_text import visible_controls

app = typer.Typer(
    help="Auditor: concept vectors, probes and steering on a served language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error lines stay whole and greppable


@contextmanager
def clear_errors() -> Iterator[None]:
    """Bad input and known failures print one line, not a traceback."""
    try:
        yield
    except InvalidInputError as exc:
        err_console.print(f"[bold red]error:[/] {_plain(exc)}")
        raise typer.Exit(2) from None
    except AuditorError as exc:
        err_console.print(f"[bold red]error:[/] {_plain(exc)}")
        raise typer.Exit(1) from None


def _plain(exc: Exception) -> str:
    """An error message as text: it may quote input (a name, a path), which must not be read as
    rich markup or reach the terminal as control characters."""
    return escape(visible_controls(str(exc)))
