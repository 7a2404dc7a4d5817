"""Pieces of the web page made in Python: snippets cut into highlighted parts, links to the document view, answer
text with its [n] markers as links. Everything returned as text parts is escaped by the templates."""

from __future__ import annotations

import re
from typing import Any, Sequence
from urllib.parse import urlencode

from markupsafe import Markup, escape

from ragkit.evidence import snippet_bounds

SNIPPET_CHARS = 360
_MARKER = re.compile(r"\[(\d+)\]")


def split_marked(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    """`text` as (part, highlighted) pairs, the spans (merged where they overlap) highlighted.

    >>> split_marked("oil prices rose", [(4, 10)])
    [('oil ', False), ('prices', True), (' rose', False)]
    """
    parts: list[tuple[str, bool]] = []
    at = 0
    for start, end in sorted((max(0, a), min(len(text), b)) for a, b in spans):
        if end <= at:
            continue
        start = max(start, at)
        if start > at:
            parts.append((text[at:start], False))
        parts.append((text[start:end], True))
        at = end
    if at < len(text):
        parts.append((text[at:], False))
    return parts


def snippet_parts(text: str, evidence: Sequence[dict[str, Any]], limit: int = SNIPPET_CHARS) -> list[tuple[str, bool]]:
    """A window of a hit's text around its best evidence span, cut into highlighted parts (whitespace folded).

    >>> snippet_parts("a b  c", [{"start": 2, "end": 3}])
    [('a ', False), ('b', True), (' c', False)]
    """
    start, end = snippet_bounds(len(text), evidence[0]["start"] if evidence else 0, limit)
    spans = [(e["start"] - start, e["end"] - start) for e in evidence if e["end"] > start and e["start"] < end]
    parts = split_marked(text[start:end], spans)
    folded = [(re.sub(r"\s+", " ", part), marked) for part, marked in parts]
    if start:
        folded.insert(0, ("…", False))
    if end < len(text):
        folded.append(("…", False))
    return folded


def citation_link(item: dict[str, Any], evidence: Sequence[dict[str, Any]] = ()) -> str:
    """The document view of a hit or a citation (as their JSON): its lines, page, chunk and evidence spans.

    >>> citation_link({"path": "a b.txt", "start_line": 3, "end_line": 5, "page": None, "chunk_id": "c1"},
    ...               [{"start": 0, "end": 4}])
    '/document?path=a+b.txt&line=3&end=5&chunk=c1&ev=0-4#L3'
    """
    params: dict[str, Any] = {"path": item["path"], "line": item["start_line"], "end": item["end_line"]}
    if item.get("page") is not None:
        params["page"] = item["page"]
        if item.get("end_page") not in (None, item["page"]):
            params["end"] = -1  # the passage runs on to the next page: from its first line to the page's end
    params["chunk"] = item.get("chunk_id") or ""
    if evidence:
        params["ev"] = ",".join(f"{e['start']}-{e['end']}" for e in evidence)
    query = urlencode({k: v for k, v in params.items() if v != ""})
    return f"/document?{query}#L{item['start_line']}"


def answer_html(answer: dict[str, Any]) -> Markup:
    """The answer's text, escaped, with each [n] that names a citation as a link to it.

    >>> str(answer_html({"answer": "Yes <b> [1] [9]", "citations": [{"n": 1}]}))
    'Yes &lt;b&gt; <a class="cite" href="#cite-1">[1]</a> [9]'
    """
    known = {c["n"] for c in answer.get("citations", [])}

    def link(match: re.Match) -> str:
        n = int(match.group(1))
        return f'<a class="cite" href="#cite-{n}">[{n}]</a>' if n in known else match.group(0)

    return Markup(_MARKER.sub(link, str(escape(answer.get("answer", "")))))
