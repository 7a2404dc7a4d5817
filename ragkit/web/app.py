"""`ragkit serve`: a local web page and a JSON API over one index (Starlette; server-rendered HTML, a little plain
JavaScript, nothing loaded from elsewhere). A thin layer over `ragkit.service.Service`: no retrieval logic here."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from urllib.parse import urlencode
from pathlib import Path
from typing import Any, Callable, Sequence

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ragkit.cite import location
from ragkit.config import MODES
from ragkit.documents import CONTEXT_LINES, DocumentNotFound
from ragkit.errors import IndexNotFoundError, ModelLoadError, RagkitError
from ragkit.service import BusyError, RequestError, Service
from ragkit.web.openapi import OPENAPI
from ragkit.web.render import answer_html, citation_link, snippet_parts, split_marked

log = logging.getLogger("ragkit.web")
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
MAX_BODY_BYTES = 64 * 1024


def machine_names() -> set[str]:
    """The names and addresses of this machine, which requests reaching it on any address may name as their host
    (a DNS name pointed at it by a web page elsewhere is none of them)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return {n for n in names if n} | {f"[{n}]" for n in names if ":" in n}


def status_of(error: Exception) -> int:
    """The HTTP status a ragkit error stands for: the caller's mistake (400, 404, 429) or the server's state (503:
    a model that does not load, an index that is gone)."""
    if isinstance(error, (ModelLoadError, IndexNotFoundError)):
        return 503
    if isinstance(error, DocumentNotFound):
        return 404
    if isinstance(error, BusyError):
        return 429
    if isinstance(error, RequestError):
        return 400
    return 400 if isinstance(error, RagkitError) else 500


def create_app(service: Service, host: str = "127.0.0.1", allow_hosts: Sequence[str] = ()) -> Starlette:
    """The web app over `service`. Requests must name as their host a loopback name, `host` itself (with 0.0.0.0 or
    ::, this machine's names and addresses) or one of `allow_hosts`, so that a page of another site cannot reach
    this server through a DNS name it controls."""
    templates = Environment(loader=PackageLoader("ragkit.web", "templates"), autoescape=select_autoescape(),
                            trim_blocks=True, lstrip_blocks=True)
    templates.globals.update(modes=MODES, location=location)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def api(fn: Callable[[Request], Any]) -> Callable:
        """A JSON endpoint: its result as JSON; a ragkit error as {"error": message} with its status."""
        async def endpoint(request: Request) -> Response:
            try:
                params = await _params(request)
                result = await asyncio.to_thread(fn, params)
            except RagkitError as e:
                return JSONResponse({"error": str(e)}, status_code=status_of(e))
            return JSONResponse(result)
        return endpoint

    # --- pages ------------------------------------------------------------------------------------------------

    async def home(request: Request) -> HTMLResponse:
        q = request.query_params
        query, mode, path, action = q.get("q", ""), q.get("mode") or None, q.get("path", ""), q.get("do", "search")
        context: dict[str, Any] = {"query": query, "mode": mode or service.index.settings.mode, "path": path,
                                   "hits": None, "answer": None, "error": None}
        if query and action == "search":
            try:
                result = await asyncio.to_thread(service.search, query, _int(q.get("k")), mode,
                                                 [path] if path else None)
                context["hits"] = [{**h, "parts": snippet_parts(h["text"], h["evidence"]),
                                    "link": citation_link(h, h["evidence"])} for h in result["hits"]]
            except RagkitError as e:
                context["error"] = str(e)
                return page(request, "index.html", status_of(e), **context)
        elif query and action == "ask":  # the script streams answers; this page shows the whole answer at once
            try:
                hits: list[dict[str, Any]] = []
                answer = await asyncio.to_thread(service.ask, query, _int(q.get("k")), mode,
                                                 [path] if path else None, None, hits.extend)
                context["answer"] = {**answer, "html": answer_html(answer), "links": [
                    citation_link(c, _evidence_of(c, hits)) for c in answer["citations"]]}
            except RagkitError as e:
                context["error"] = str(e)
                return page(request, "index.html", status_of(e), **context)
        return page(request, "index.html", **context)

    async def document(request: Request) -> HTMLResponse:
        q = request.query_params
        try:
            window = await asyncio.to_thread(document_api, dict(q))
        except RagkitError as e:
            return page(request, "error.html", status_of(e), message=str(e))
        lines = [{**line, "parts": split_marked(line["text"], line["marks"])} for line in window["lines"]]
        return page(request, "document.html", doc=window, lines=lines, pdf=window["path"].lower().endswith(".pdf"),
                    above=_paging(q, window, up=True), below=_paging(q, window, up=False))

    async def status_page(request: Request) -> HTMLResponse:
        try:
            info = await asyncio.to_thread(service.status)
        except RagkitError as e:
            return page(request, "error.html", status_of(e), message=str(e))
        return page(request, "status.html", info=info, job=service.job.to_json())

    async def raw(request: Request) -> Response:
        """The indexed file itself (the PDF a citation's page link opens)."""
        try:
            path = await asyncio.to_thread(service.file_path, request.path_params["path"])
        except RagkitError as e:
            return page(request, "error.html", status_of(e), message=str(e))
        headers = {"X-Content-Type-Options": "nosniff"}
        if path.suffix.lower() != ".pdf":  # an indexed HTML file runs no script here; browsers show PDFs unsandboxed
            headers["Content-Security-Policy"] = "sandbox"
        return FileResponse(path, headers=headers)

    # --- the JSON API -----------------------------------------------------------------------------------------

    def search_api(p: dict[str, Any]) -> dict[str, Any]:
        return service.search(p.get("q", ""), _int(p.get("k")), p.get("mode") or None, _paths(p))

    def ask_api(p: dict[str, Any]) -> dict[str, Any]:
        return service.ask(p.get("q", ""), _int(p.get("k")), p.get("mode") or None, _paths(p))

    def document_api(p: dict[str, Any]) -> dict[str, Any]:
        return service.document(p.get("path", ""), _int(p.get("line")) or 1, _int(p.get("end")),
                                _int(p.get("page")), p.get("chunk") or None, _spans(str(p.get("ev", ""))),
                                _int(p.get("from")))

    def index_api(p: dict[str, Any]) -> dict[str, Any]:
        return service.start_index() if p.get("_method") == "POST" else service.job.to_json()

    async def ask_stream(request: Request) -> Response:
        """Server-sent events: "hits" (the hits read), "token" (each piece of the answer as it is written),
        "answer" (the whole answer, as /api/ask), or "failure" ({"error", "status"})."""
        try:
            p = await _params(request)
            service.check(p.get("q", ""), _int(p.get("k")), p.get("mode") or None, _paths(p))
        except RagkitError as e:
            return JSONResponse({"error": str(e)}, status_code=status_of(e))
        loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(event: str | None, data: Any = None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (event, data))

        def token(piece: str) -> None:
            if gone.is_set():  # the page closed the stream: stop writing, free the answer's slot
                raise _Closed
            put("token", piece)

        def work() -> None:
            try:
                answer = service.ask(p.get("q", ""), _int(p.get("k")), p.get("mode") or None, _paths(p),
                                     on_token=token, on_hits=lambda hits: put("hits", hits))
                put("answer", answer)
            except _Closed:
                pass
            except RagkitError as e:
                put("failure", {"error": str(e), "status": status_of(e)})
            except Exception:  # noqa: BLE001 - told to the page; the traceback goes to the server's log only
                log.exception("answering failed")
                put("failure", {"error": "the answer failed on the server (see its log)", "status": 500})
            finally:
                put(None)

        threading.Thread(target=work, daemon=True, name="ragkit-answer").start()

        async def events():
            try:
                while True:
                    event, data = await queue.get()
                    if event is None:
                        return
                    yield f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
            finally:
                gone.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", exc.status_code, message=exc.detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        message = "the request failed on the server (see its log)"
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=500)
        return page(request, "error.html", 500, message=message)

    routes = [
        Route("/", home), Route("/document", document), Route("/status", status_page),
        Route("/raw/{path:path}", raw),
        Route("/api/search", api(search_api), methods=["GET", "POST"]),
        Route("/api/ask", api(ask_api), methods=["GET", "POST"]),
        Route("/api/ask/stream", ask_stream, methods=["GET", "POST"]),
        Route("/api/status", api(lambda p: service.status())),
        Route("/api/document", api(document_api)),
        Route("/api/index", api(index_api), methods=["GET", "POST"]),
        Route("/api/openapi.json", openapi),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    hosts = sorted({*LOOPBACK_NAMES, host, *allow_hosts, *(machine_names() if host in ("0.0.0.0", "::") else ())})
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
                     exception_handlers={HTTPException: not_found, Exception: server_error})


async def _params(request: Request) -> dict[str, Any]:
    """The query string, and for a POST its JSON body (at most MAX_BODY_BYTES) on top. A POST must say it is JSON:
    a form on another site cannot send that without the browser asking this server first."""
    params: dict[str, Any] = dict(request.query_params)
    params["path_list"] = request.query_params.getlist("path")
    params["_method"] = request.method  # what the request is, whatever its parameters say
    if request.method == "POST":
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise RequestError("send the request body as JSON (Content-Type: application/json)")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over {MAX_BODY_BYTES:,} bytes")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        params.update(data)
        if "path" in data:
            params["path_list"] = data["path"] if isinstance(data["path"], list) else [data["path"]]
        params["_method"] = request.method
    return params


class _Closed(Exception):
    """The page that asked closed its stream."""


def _paths(params: dict[str, Any]) -> list[str] | None:
    paths = [p for p in params.get("path_list") or [] if p]  # the service refuses what is not text
    return paths or None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"expected a whole number, got {str(value)[:40]!r}") from None


def _spans(text: str) -> list[tuple[int, int]]:
    """ "3-9,20-25" → [(3, 9), (20, 25)] (evidence spans of a chunk, as the citation links carry them)."""
    spans = []
    for part in text.split(",")[:32]:
        start, _, end = part.partition("-")
        if start.isascii() and start.isdigit() and end.isascii() and end.isdigit() and int(start) < int(end):
            spans.append((int(start), int(end)))
    return spans


def _paging(query: Any, window: dict[str, Any], up: bool) -> tuple[str, str] | None:
    """(link, label) of the lines just above (or below) the window shown, the cited lines and evidence kept."""
    span = 2 * CONTEXT_LINES
    if up and window["first_line"] > 1:
        first = max(1, window["first_line"] - 1 - span)
        last = window["first_line"] - 1
    elif not up and window["last_line"] < window["total_lines"]:
        first = window["last_line"] + 1
        last = min(window["total_lines"], first + span)
    else:
        return None
    params = {key: query[key] for key in ("path", "line", "end", "page", "chunk", "ev") if query.get(key)}
    return f"/document?{urlencode({**params, 'from': first})}#L{first if not up else last}", f"lines {first}–{last}"


def _evidence_of(citation: dict[str, Any], hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return next((h["evidence"] for h in hits if h["chunk_id"] == citation["chunk_id"]), [])
