"""What every `ragkit` command shares: the consoles, one clear message per user error, --json output."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@contextmanager
def user_errors(as_json: bool) -> Iterator[None]:
    """Print a RagkitError as one clear message (or a JSON error object) and exit 1; no traceback."""
    from ragkit.errors import RagkitError, RagkitWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", RagkitWarning)
            warnings.showwarning = show_warning
            yield
    except RagkitError as e:
        if as_json:
            print(json.dumps({"error": str(e)}))
        err.print(f"[bold red]Error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/] The index is as it was before this run.")
        raise typer.Exit(130) from None


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ragkit's warnings as one line on stderr; other libraries' as Python prints them."""
    from ragkit.errors import RagkitWarning

    if issubclass(category, RagkitWarning):
        err.print(f"[yellow]Warning:[/] {escape(str(message))}", soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, ensure_ascii=False))
