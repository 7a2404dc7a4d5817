"""What the web page and the MCP server offer, over one index: search, ask, status, documents and an index run, with
the same JSON shapes as `--json`, inputs checked and limited, safe to call from several threads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ragkit.api import Index
from ragkit.config import MODES
from ragkit.documents import DocumentNotFound, DocumentReader, chunk_marks, document_window, indexed_file
from ragkit.errors import RagkitError

MAX_QUERY_CHARS = 2_000
MAX_K = 50
MAX_PATHS = 20


class RequestError(RagkitError):
    """A request with a bad or out-of-limit value (HTTP 400)."""


class BusyError(RagkitError):
    """More answers are asked for than the limit, or an index run is already going (HTTP 429)."""


@dataclass
class IndexJob:
    """The state of the last index run started here."""

    state: str = "idle"  # idle | running | done | failed
    stage: str = ""
    done: int = 0
    total: int = 0
    started: float | None = None
    finished: float | None = None
    message: str = ""
    report: dict[str, Any] | None = None
    stages: dict[str, list[int]] = field(default_factory=dict)  # stage → [done, total]

    def to_json(self) -> dict[str, Any]:
        elapsed = ((self.finished or time.time()) - self.started) if self.started else None
        return {"state": self.state, "stage": self.stage, "done": self.done, "total": self.total,
                "stages": self.stages, "seconds": round(elapsed, 1) if elapsed is not None else None,
                "message": self.message, "report": self.report}


class Service:
    """One index served to many callers.

    Searches run one at a time (they share the encoders); answers too, and at most `max_answers` may be waiting
    or running at once: one more is refused with BusyError rather than queued without end.
    """

    def __init__(self, index: Index, max_answers: int = 2) -> None:
        self.index = index
        self.documents = DocumentReader()
        self._search_lock = threading.RLock()
        self._answer_lock = threading.Lock()
        self._answer_slots = threading.BoundedSemaphore(max_answers)
        self.max_answers = max_answers
        self._job_lock = threading.Lock()
        self.job = IndexJob()

    # --- queries -----------------------------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None, mode: str | None = None,
               paths: Sequence[str] | None = None) -> dict[str, Any]:
        """{"hits": [hit, ...]} as `ragkit search --json`."""
        query, k, mode, paths = self._checked(query, k, mode, paths, default_k=self.index.settings.k)
        with self._search_lock:
            hits = self.index.search(query, k, mode, paths)
        return {"hits": [h.to_json() for h in hits]}

    def ask(self, question: str, k: int | None = None, mode: str | None = None,
            paths: Sequence[str] | None = None, on_token: Callable[[str], None] | None = None,
            on_hits: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """The answer as `ragkit ask --json`; its text streams to `on_token` as it is written, the hits it reads
        go to `on_hits` first."""
        question, k, mode, paths = self._checked(question, k, mode, paths, default_k=min(self.index.settings.k, 5))
        if not self._answer_slots.acquire(blocking=False):
            raise BusyError(f"{self.max_answers} answers are being written; ask again when one has finished")
        try:
            with self._search_lock:
                hits = self.index.search(question, k, mode, paths)
            if on_hits is not None:
                on_hits([h.to_json() for h in hits])
            # the extractive reader encodes with the searches' dense encoder: it waits for them, and they for it
            lock = self._search_lock if self.index.reader_kind() == "extractive" else self._answer_lock
            with lock:
                answer = self.index.answer_from_hits(question, hits, mode, on_token=on_token)
            return answer.to_json()
        finally:
            self._answer_slots.release()

    def status(self) -> dict[str, Any]:
        """As `ragkit status --json`."""
        with self._search_lock:
            return self.index.status()

    def files(self) -> list[str]:
        """The documents the index records (relative paths, sorted)."""
        return sorted(self._manifest()["files"])

    def document(self, path: str, line: int = 1, end_line: int | None = None, page: int | None = None,
                 chunk_id: str | None = None, evidence: Sequence[tuple[int, int]] = (),
                 first: int | None = None) -> dict[str, Any]:
        """The lines of `path` around [line, end_line] (see ragkit.documents.document_window); `evidence`: char
        spans of the chunk `chunk_id` of that document, highlighted; `first`: the window's first line instead."""
        with self._search_lock:
            manifest = self.index.manifest()
            chunk = self.index.searcher.chunk(chunk_id) if chunk_id else None
        doc = self.documents.read(manifest, path)
        marks = chunk_marks(chunk.char_start, evidence) if chunk is not None and chunk.path == path else []
        return document_window(doc, line, end_line, page, marks, first=first)

    def check(self, query: str, k: int | None = None, mode: str | None = None,
              paths: Sequence[str] | None = None) -> None:
        """Raise RequestError for what `search` or `ask` would refuse (before an answer's stream begins)."""
        self._checked(query, k, mode, paths, default_k=1)

    def file_path(self, path: str) -> Path:
        """The file on disk of the indexed document `path` (DocumentNotFound unless the index holds it)."""
        return indexed_file(self._manifest(), path)

    def document_text(self, path: str) -> str:
        """The whole parsed text of the indexed document `path` (DocumentNotFound when the index does not hold
        it)."""
        return self.documents.read(self._manifest(), path).parsed.text

    def _manifest(self) -> dict[str, Any]:
        """The live manifest (taken under the search lock: it may open the searcher of a new generation)."""
        with self._search_lock:
            return self.index.manifest()

    def _checked(self, query: str, k: int | None, mode: str | None, paths: Sequence[str] | None,
                 default_k: int) -> tuple[str, int, str | None, list[str] | None]:
        if not isinstance(query, str) or not all(isinstance(p, str) for p in paths or []):
            raise RequestError("the query and paths must be text")
        query = query.strip()
        if not query:
            raise RequestError("the query is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise RequestError(f"the query is {len(query):,} characters long; the limit is {MAX_QUERY_CHARS:,}")
        k = default_k if k is None else k
        if not 1 <= k <= MAX_K:
            raise RequestError(f"k must be between 1 and {MAX_K}, got {k}")
        if mode is not None and mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        paths = [p for p in (paths or []) if p.strip()] or None
        if paths and len(paths) > MAX_PATHS:
            raise RequestError(f"at most {MAX_PATHS} path filters, got {len(paths)}")
        return query, k, mode, paths

    # --- index runs --------------------------------------------------------------------------------------------

    def start_index(self) -> dict[str, Any]:
        """Start an incremental index run of the indexed folder in the background; BusyError while one runs."""
        with self._job_lock:
            if self.job.state == "running":
                raise BusyError("an index run is in progress; wait for it to finish")
            root = self._manifest()["root"]
            self.job = IndexJob(state="running", started=time.time(), message=f"indexing {root}")
            threading.Thread(target=self._run_index, args=(root, self.job), daemon=True,
                             name="ragkit-index").start()
        return self.job.to_json()

    def _run_index(self, root: str, job: IndexJob) -> None:
        def progress(event) -> None:
            job.stage, job.done, job.total = event.stage, event.done, event.total
            job.stages[event.stage] = [event.done, event.total]

        try:
            report = self.index.add(root, progress=progress)
        except RagkitError as e:
            job.state, job.message = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - reported on the page, never lost in a thread
            job.state, job.message = "failed", f"{type(e).__name__}: {e}"
        else:
            job.state, job.report = "done", report.to_json()
            job.message = ", ".join(f"{job.report[key]} {key}" for key in ("added", "updated", "removed",
                                                                          "unchanged"))
        finally:
            job.finished = time.time()


__all__ = ["Service", "RequestError", "BusyError", "DocumentNotFound", "IndexJob", "MAX_K", "MAX_QUERY_CHARS"]
