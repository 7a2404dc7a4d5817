"""`ragkit serve` (the web page) and `ragkit mcp` (the MCP server for assistants), both over one index."""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ragkit.cli.common import IndexOpt, err, user_errors
from ragkit.errors import RagkitError

ReaderOpt = Annotated[Optional[str], typer.Option(
    "--reader", help="generate | extractive | infini | hmt, as for `ragkit ask` [default: generate; extractive when "
                     "no reader model can be loaded].")]
ReaderModelOpt = Annotated[Optional[str], typer.Option(
    "--reader-model", help="Reader language model, as for `ragkit ask` [default: Qwen/Qwen2.5-0.5B-Instruct; the "
                           "embedded model when that cannot be loaded].")]


def open_service(index: Optional[Path], reader: Optional[str] = None, reader_model: Optional[str] = None,
                 max_answers: int = 2):
    """The service over an existing index (a clear error when there is none)."""
    from ragkit.api import Index
    from ragkit.config import load_settings
    from ragkit.errors import IndexNotFoundError
    from ragkit.service import Service

    settings = load_settings(index=str(index) if index else None, reader=reader, reader_model=reader_model)
    idx = Index(settings.index, settings)
    if not idx.exists():
        raise IndexNotFoundError(f"there is no index at {idx.path}; build one with `ragkit index FOLDER` "
                                 "(or pass --index DIR)")
    idx.status()  # reads the manifest: an index of another schema stops here, with its message
    return Service(idx, max_answers=max_answers)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    index: IndexOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but a loopback address lets other "
                                           "machines read your documents.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser once it is up.")] = False,
    reader: ReaderOpt = None,
    reader_model: ReaderModelOpt = None,
    max_answers: Annotated[int, typer.Option(
        help="Answers that may be waiting or being written at once; one more is refused.", min=1)] = 2,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", help="Another name clients may reach this server by (repeatable) [default: loopback names, "
                             "--host, and with 0.0.0.0 this machine's names and addresses].")] = None,
) -> None:
    """Serve a local web page to search the index and ask questions, with highlighted evidence."""
    with user_errors(False):
        service = open_service(index, reader, reader_model, max_answers)
        if not is_loopback(host):
            err.print(f"[yellow]Warning:[/] listening on {escape(host)}: anyone who can reach this machine on port "
                      f"{port} can search and read the indexed documents.", soft_wrap=True)
        _check_port(host, port)
        import uvicorn

        from ragkit.web.app import create_app

        url = f"http://{'localhost' if is_loopback(host) else host}:{port}/"
        err.print(f"ragkit: serving {escape(str(service.index.path))} at {url} (Ctrl+C to stop)", soft_wrap=True)
        if open_browser:
            import webbrowser

            threading.Timer(1.0, webbrowser.open, args=(url,)).start()
        uvicorn.run(create_app(service, host, allow_host or ()), host=host, port=port, log_level="warning")


def mcp(index: IndexOpt = None, reader: ReaderOpt = None, reader_model: ReaderModelOpt = None) -> None:
    """Serve the index to AI assistants over MCP (stdio): tools search, ask and status; documents as resources
    ragkit://PATH. Read-only."""
    with user_errors(False):
        service = open_service(index, reader, reader_model, max_answers=1)
        from ragkit.mcp_server import run_stdio

        run_stdio(service)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise RagkitError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port") from None
