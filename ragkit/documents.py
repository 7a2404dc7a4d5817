"""The indexed documents read back for a viewer (the web page, MCP resources): only files the index records, only
inside its folder, and only the neighbourhood of the lines asked for."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from ragkit.errors import RagkitError
from ragkit.ingest.document import ParsedDocument, content_hash, line_starts

CONTEXT_LINES = 40  # lines shown before and after the lines asked for
CACHED_DOCUMENTS = 8  # parsed documents kept in memory


class DocumentNotFound(RagkitError):
    """A path that is not a readable document of the index (never recorded, outside its folder, or gone)."""


def indexed_file(manifest: dict[str, Any], rel: str) -> Path:
    """The file on disk of `rel`, a path the index records, resolved inside the indexed folder.

    Anything else is refused with DocumentNotFound: a path the index does not record (absolute, `..`, encoded
    or not), and a recorded one that now leads outside the folder through a symlink (unless the index was built to
    follow links) or no longer exists.
    """
    parts = PurePosixPath(rel).parts
    if rel not in manifest.get("files", {}) or not parts or parts[0] == "/" or ".." in parts:
        raise DocumentNotFound(f"{rel!r} is not a document of this index")
    root = Path(manifest["root"]).resolve()
    path = root / rel
    follow = bool(manifest.get("settings", {}).get("follow_links"))
    if not follow and (path.is_symlink() or not path.resolve().is_relative_to(root)):
        raise DocumentNotFound(f"{rel!r} leads outside the indexed folder")
    if not path.is_file():
        raise DocumentNotFound(f"{rel!r} is no longer in {root}")
    return path


@dataclass
class DocumentText:
    """A document's parsed text, as the index chunked it."""

    path: str  # relative to the indexed folder
    parsed: ParsedDocument
    changed: bool  # the file differs from the one indexed: line numbers and highlights may be off


class DocumentReader:
    """Reads indexed documents through ragkit's parsers, keeping the last few parsed (keyed by size and mtime);
    safe to share between threads."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str, int, int], tuple[ParsedDocument, str]] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, manifest: dict[str, Any], rel: str) -> DocumentText:
        from ragkit.ingest.parsers import ParseError, parse_file

        path = indexed_file(manifest, rel)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._cache:
                try:
                    parsed = parse_file(path)
                except ParseError as e:
                    raise DocumentNotFound(f"{rel!r} cannot be read: {e.reason}") from None
                self._cache[key] = (parsed, content_hash(path.read_bytes()))
                while len(self._cache) > CACHED_DOCUMENTS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            parsed, digest = self._cache[key]
        return DocumentText(rel, parsed, changed=digest != manifest["files"][rel].get("hash"))


def document_window(doc: DocumentText, start_line: int = 1, end_line: int | None = None, page: int | None = None,
                    marks: Sequence[tuple[int, int]] = (), context: int = CONTEXT_LINES,
                    first: int | None = None) -> dict[str, Any]:
    """The lines around [start_line, end_line] (of `page` for documents with pages; lines count from its top;
    an `end_line` below 0 is the page's last line), `context` lines either side, with `marks` (char spans of the
    document's text) as spans of each line. `first`: show the 2 × `context` + 1 lines from this one instead (paging
    through the document, the cited lines still marked).

    Shape: {"path", "page", "pages", "start_line", "end_line", "first_line", "last_line", "total_lines",
    "changed", "lines": [{"n", "text", "cited", "marks": [[start, end], ...]}]}.
    """
    text = doc.parsed.text
    pages = doc.parsed.pages
    if pages:
        page = min(max(1, page or 1), len(pages))
        base, stop = pages[page - 1], pages[page] if page < len(pages) else len(text)
        while stop > base and text[stop - 1] in "\n\f":  # what separates this page from the next is no line
            stop -= 1
    else:
        page, base, stop = None, 0, len(text)
    starts = [base + s for s in line_starts(text[base:stop])]  # char offset of each line of the page (or file)
    if len(starts) > 1 and starts[-1] == stop:  # the text ends with a newline: no line after it
        starts.pop()
    total = len(starts)
    start_line = min(max(1, start_line), total)
    end_line = total if end_line is not None and end_line < 0 else min(max(start_line, end_line or start_line), total)
    if first is None:
        first, last = max(1, start_line - context), min(total, end_line + context)
    else:
        first = min(max(1, first), total)
        last = min(total, first + 2 * context)
    lines = []
    for n in range(first, last + 1):
        a = starts[n - 1]
        b = starts[n] - 1 if n < total else stop  # without the newline
        b = b - 1 if n == total and text[a:b].endswith("\n") else b
        spans = [[max(s, a) - a, min(e, b) - a] for s, e in marks if s < b and e > a]
        lines.append({"n": n, "text": text[a:b], "cited": start_line <= n <= end_line, "marks": spans})
    return {"path": doc.path, "page": page, "pages": len(pages) or None, "start_line": start_line,
            "end_line": end_line, "first_line": first, "last_line": last, "total_lines": total,
            "changed": doc.changed, "lines": lines}


def chunk_marks(char_start: int, evidence: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Evidence spans of a chunk (chars of its text) as spans of its document's text.

    >>> chunk_marks(100, [(0, 5), (10, 12)])
    [(100, 105), (110, 112)]
    """
    return [(char_start + s, char_start + e) for s, e in evidence]

