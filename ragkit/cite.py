"""How a citation names the place of a passage: path, lines and, for PDFs, pages."""

from __future__ import annotations


def location(path: str, start_line: int, end_line: int, page: int | None = None,
             end_page: int | None = None) -> str:
    """Where a passage is, as a citation prints it: lines, and pages for PDFs (lines count from the page top).

    >>> location("a.txt", 3, 3), location("a.txt", 3, 5), location("r.pdf", 3, 5, 2, 2), location("r.pdf", 40, 5, 2, 3)
    ('a.txt:3', 'a.txt:3-5', 'r.pdf p.2:3-5', 'r.pdf p.2:40–p.3:5')
    """
    if page is not None and end_page is not None and end_page != page:
        return f"{path} p.{page}:{start_line}–p.{end_page}:{end_line}"
    lines = f"{start_line}" if start_line == end_line else f"{start_line}-{end_line}"
    return f"{path} p.{page}:{lines}" if page is not None else f"{path}:{lines}"
