"""The shapes that flow through ingestion: a source file, its parsed text (or why it cannot be parsed) and its
chunks."""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SourceFile:
    """A file found under the indexed folder."""

    path: Path  # absolute path on disk
    rel: str  # path relative to the indexed folder, with forward slashes
    size: int


@dataclass(frozen=True)
class Skipped:
    """A file that was not indexed, and why."""

    path: str  # relative to the indexed folder
    reason: str


class ParseError(Exception):
    """A file that cannot be indexed; `reason` is a short message shown to the user.

    `damaged` marks a file the parsing library failed on: what it logged may say why.
    """

    def __init__(self, reason: str, *, damaged: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.damaged = damaged


MAX_MESSAGE = 100  # chars of a library's error message kept in a reason


def short_error(error: BaseException) -> str:
    """A one-line, bounded description of a library error."""
    lines = str(error).strip().strip("\"'").splitlines()  # KeyError quotes its message
    message = lines[0] if lines else type(error).__name__
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


@dataclass(frozen=True)
class Heading:
    """A heading that starts at `start` (a char offset into the document text)."""

    start: int
    level: int  # 1 = top level
    title: str


@dataclass
class ParsedDocument:
    """Plain text of one file plus the structure needed for citations.

    `pages` holds the char offset where each page starts (PDF only, page 1 first);
    `headings` is sorted by offset. `warnings` holds what parsing noticed about a damaged file
    that could still be read (a rebuilt PDF, a page without text, the library's own messages).
    """

    text: str
    headings: list[Heading] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._line_starts = line_starts(self.text)
        self._heading_starts = [h.start for h in self.headings]
        self._heading_paths = _heading_paths(self.headings)

    def line_at(self, offset: int) -> int:
        """1-based line number of the char at `offset` (relative to its page for PDFs)."""
        line = bisect.bisect_right(self._line_starts, offset)
        page = self.page_at(offset)
        if page is None:
            return line
        page_first_line = bisect.bisect_right(self._line_starts, self.pages[page - 1])
        return line - page_first_line + 1

    def page_at(self, offset: int) -> int | None:
        """1-based page number of the char at `offset`, or None for documents without pages."""
        if not self.pages:
            return None
        return max(1, bisect.bisect_right(self.pages, offset))

    def page_breaks(self, start: int, end: int) -> tuple[int, ...]:
        """Offsets, relative to `start`, of the pages that begin strictly inside (start, end)."""
        lo, hi = bisect.bisect_right(self.pages, start), bisect.bisect_left(self.pages, end)
        return tuple(p - start for p in self.pages[lo:hi])

    def heading_path(self, offset: int) -> str:
        """The headings enclosing `offset`, outermost first, joined with ' > '."""
        i = bisect.bisect_right(self._heading_starts, offset)
        return self._heading_paths[i - 1] if i else ""


def _heading_paths(headings: list[Heading]) -> list[str]:
    """For each heading, the path of headings open right after it (itself last)."""
    paths = []
    stack: list[Heading] = []
    for heading in headings:
        while stack and stack[-1].level >= heading.level:
            stack.pop()
        stack.append(heading)
        paths.append(" > ".join(h.title for h in stack))
    return paths


@dataclass(frozen=True)
class Chunk:
    """A span of a document small enough for the encoder, with its provenance."""

    path: str  # relative to the indexed folder
    ordinal: int  # position of the chunk within its file
    text: str
    char_start: int
    char_end: int
    start_line: int  # 1-based, inclusive
    end_line: int  # 1-based, inclusive
    page: int | None
    end_page: int | None
    heading: str
    n_tokens: int
    page_breaks: tuple[int, ...] = ()  # offsets into `text` where a new page starts (PDF)

    def locate(self, offset: int) -> tuple[int, int | None]:
        """(line, page) of the char at `offset` into `text`; lines count from the page start for PDFs."""
        page_index = bisect.bisect_right(self.page_breaks, offset)
        if page_index == 0:
            return self.start_line + self.text.count("\n", 0, offset), self.page
        line_base = self.page_breaks[page_index - 1]
        return 1 + self.text.count("\n", line_base, offset), (self.page or 1) + page_index


def line_starts(text: str) -> list[int]:
    """Char offset where each line of `text` starts (line 1 first)."""
    return [0] + [m.end() for m in re.finditer("\n", text)]


def normalize_newlines(text: str) -> str:
    """`text` with every line ending (\\r\\n, \\r) as \\n."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def content_hash(data: bytes) -> str:
    """The hash an index records for a file's bytes (it tells a changed file from an unchanged one)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
