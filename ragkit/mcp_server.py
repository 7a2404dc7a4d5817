"""An MCP server over one index (`ragkit mcp`): search, ask and status as read-only tools, and each indexed
document as a text resource `ragkit://<path>`. Served over stdio; stdout carries only the protocol."""

from __future__ import annotations

import io
import sys
from typing import Any, Callable, TypeVar
from urllib.parse import quote

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.types import Resource, ToolAnnotations

from ragkit.documents import DocumentNotFound
from ragkit.errors import RagkitError
from ragkit.service import Service

SCHEME = "ragkit://"
INSTRUCTIONS = (
    "Searches the user's indexed documents (read-only: nothing is changed, added or deleted). Use `search` to find "
    "passages with their file, lines and pages, `ask` for a short answer with numbered citations, and `status` for "
    "what the index holds. Each indexed document can be read as the resource ragkit://<path>, its path relative to "
    "the indexed folder."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

T = TypeVar("T")


def document_uri(path: str) -> str:
    """The resource URI of an indexed document (`path` relative to the indexed folder).

    >>> document_uri("sub/my notes#1.md")
    'ragkit://sub/my%20notes%231.md'
    """
    return SCHEME + quote(path, safe="/")


def _tool_call(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, with a RagkitError turned into a tool error carrying its plain message."""
    try:
        return fn(*args)
    except RagkitError as e:
        raise ToolError(str(e)) from None


class RagkitServer(MCPServer):
    """The MCP server of one Service; its resource list follows the index as it changes."""

    def __init__(self, service: Service, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    async def list_resources(self) -> list[Resource]:
        """Every document the index records, as a text resource."""
        files = await anyio.to_thread.run_sync(self.service.files)
        return [Resource(uri=document_uri(p), name=p, title=p, mime_type="text/plain") for p in files]


def build_server(service: Service) -> MCPServer:
    """The MCP server over `service`: tools search, ask and status; resources ragkit://<path>."""
    server = RagkitServer(service, name="ragkit", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(annotations=READ_ONLY)
    def search(query: str, k: int = 10, mode: str = "hybrid", path: str | None = None) -> dict[str, Any]:
        """Search the indexed documents for passages matching `query`; returns {"hits": [...]}, best first, each
        with path, start_line, end_line, page, end_page, heading, score, text, evidence (char spans of the text that
        match best), chunk_id and ranks (its rank in each retriever).

        k: how many hits (1 to 50). mode: "dense" (meaning: embeddings of query and passages), "bm25" (exact words,
        best for names, codes and rare terms), "late" (token-level late interaction, ColBERT-style, when the index
        has it), "hybrid" (the rankings fused: the default and best general choice). path: only files matching
        this path or glob, relative to the indexed folder (e.g. "contracts/*.pdf", "notes/todo.md").
        """
        return _tool_call(service.search, query, k, mode, [path] if path else None)

    @server.tool(annotations=READ_ONLY)
    def ask(question: str, k: int = 5, mode: str | None = None, path: str | None = None) -> dict[str, Any]:
        """Answer `question` from the indexed documents: {"answer", "citations": [{n, path, start_line, end_line,
        page, ...}], "reader", "model", ...}; the answer cites its sources as [n].

        k: how many passages to read (1 to 50). mode: how they are found, as for `search` (dense, bm25, late or
        hybrid; default: the index's). path: only files matching this path or glob (e.g. "contracts/*.pdf").
        """
        return _tool_call(service.ask, question, k, mode, [path] if path else None)

    @server.tool(annotations=READ_ONLY)
    def status() -> dict[str, Any]:
        """What the index holds: folder, files, chunks, tokens, models, settings, last run and the reader that
        answers `ask`."""
        return _tool_call(service.status)

    @server.resource(SCHEME + "{+path}", name="document", title="Indexed document", mime_type="text/plain",
                     description="The text of an indexed document, as ragkit parsed it; path relative to the "
                                 "indexed folder.")
    def document(path: str) -> str:
        """The parsed text of the indexed document `path`."""
        try:
            return service.document_text(path)
        except DocumentNotFound as e:
            raise ResourceNotFoundError(str(e)) from None
        except RagkitError as e:
            raise ResourceError(str(e)) from None

    return server


def run_stdio(service: Service) -> None:
    """Serve `service` over stdin/stdout until the client closes the connection (blocking).

    While it serves, the SDK points file descriptor 1 at stderr and keeps the protocol on a copy of it; sys.stdout
    writes through unbuffered meanwhile, so a print (or a ragkit warning) lands on stderr at once, never on the
    protocol stream after the server has stopped.
    """
    server = build_server(service)
    saved = sys.stdout
    saved.flush()
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), encoding="utf-8", errors="replace",
                                  write_through=True)
    try:
        server.run("stdio")
    finally:
        sys.stdout = saved
