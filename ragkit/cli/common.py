"""What every `ragkit` command shares: the consoles, one clear message per user error, --json output."""

from __future__ import annotations

import json
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
IndexOpt = Annotated[Optional[Path], typer.Option(
    "--index", help="Index folder [default: ./.ragkit, or RAGKIT_INDEX].")]
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", help="Qdrant collection [default: ragkit].")]


@contextmanager
def user_errors(as_json: bool, writes_index: bool = False) -> Iterator[None]:
    """Print a RagkitError as one clear message (or a JSON error object) and exit 1; no traceback. Ctrl-C exits 130,
    saying (for a command that `writes_index`) that the index is as it was."""
    from ragkit.errors import RagkitError, RagkitWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", RagkitWarning)
            warnings.showwarning = show_warning
            yield
    except RagkitError as e:
        message = with_flags(str(e), e.settings)
        if as_json:
            print(json.dumps({"error": message}))
        err.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        message = "interrupted" + ("; the index is as it was before this run" if writes_index else "")
        if as_json:
            print(json.dumps({"error": message}))
        err.print(f"[yellow]{message[0].upper() + message[1:]}.[/]")
        raise typer.Exit(130) from None


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ragkit's warnings as one line on stderr; other libraries' as Python prints them."""
    from ragkit.errors import RagkitWarning

    if issubclass(category, RagkitWarning):
        text = with_flags(str(message), getattr(message, "settings", ()))
        err.print(f"[yellow]Warning:[/] {escape(text)}", soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def flag(setting: str) -> str:
    """The command-line flag of a setting: dense_model → --dense-model."""
    return "--" + setting.replace("_", "-")


def with_flags(message: str, settings: Sequence[str]) -> str:
    """A library message as the CLI shows it: each of `settings` that it names with a value, `dense_model=PATH`,
    written as the flag, `--dense-model PATH` (see ragkit.errors)."""
    for name in settings:
        message = re.sub(rf"(?<![\w-]){re.escape(name)}=", flag(name) + " ", message)
    return message


def print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, ensure_ascii=False))
