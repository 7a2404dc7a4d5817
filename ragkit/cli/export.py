"""`ragkit export qdrant`: the index's vectors copied into a Qdrant collection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ragkit.cli.common import CollectionOpt, IndexOpt, JsonOpt, out, print_json, user_errors

export_app = typer.Typer(help="Copy the index's vectors to a vector database.", no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@export_app.command()
def qdrant(
    path: Annotated[Optional[Path], typer.Option(
        "--path", help="Folder of a Qdrant collection in local mode (no server) [default: the qdrant_path "
                       "setting].")] = None,
    url: Annotated[Optional[str], typer.Option(
        "--url", help="URL of a Qdrant server [default: the qdrant_url setting].")] = None,
    collection: CollectionOpt = None,
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy each chunk's dense vector and ColBERT token vectors (a MAX_SIM multivector) with its path, lines,
    page, heading and text into a Qdrant collection; a second run upserts new chunks and deletes removed ones.
    `ragkit search --backend qdrant` then searches them there."""
    with user_errors(as_json):
        from ragkit.api import Index
        from ragkit.config import load_settings

        settings = load_settings(index=str(index) if index else None)
        idx = Index(settings.index, settings)
        report = idx.export_qdrant(str(path) if path else None, url, collection)
        if as_json:
            print_json(report.to_json())
            return
        if report.recreated:
            out.print(f"[yellow]Made the collection afresh:[/] {escape(report.recreated)}")
        out.print(f"[bold green]Exported[/] to {escape(report.collection)}: {report.upserted} upserted, "
                  f"{report.deleted} deleted, {report.unchanged} unchanged; {report.points} points "
                  f"({report.seconds:.1f} s)")
