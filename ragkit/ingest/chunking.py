"""Structure-aware chunking, measured in the encoder's own tokens.

A document is cut at its headings first, then at paragraphs, lines, sentences, words and, as a last
resort, tokens; adjacent pieces are then packed greedily up to the token budget. Nothing is ever
truncated: every character of the document (but surrounding whitespace) lands in exactly one chunk.
"""

from __future__ import annotations

import bisect
import re
from typing import Callable, Sequence

from ragkit.ingest.document import Chunk, ParsedDocument

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_WORD = re.compile(r"\s+")


class _Boundaries:
    """Candidate cut offsets of one document, from coarse (headings) to fine (tokens)."""

    def __init__(self, doc: ParsedDocument, token_starts: Sequence[int]) -> None:
        text = doc.text
        levels = sorted({h.level for h in doc.headings})
        self.levels: list[list[int]] = [sorted({h.start for h in doc.headings if h.level <= lv}) for lv in levels]
        self.heading_levels = len(levels)
        for pattern in (_PARAGRAPH, _LINE, _SENTENCE, _WORD):
            self.levels.append([m.end() for m in pattern.finditer(text)])
        self.levels.append(list(token_starts))
        self.token_starts = token_starts

    def tokens(self, start: int, end: int) -> int:
        """Tokens that start inside [start, end)."""
        return bisect.bisect_left(self.token_starts, end) - bisect.bisect_left(self.token_starts, start)

    def inside(self, level: int, start: int, end: int) -> list[int]:
        """Cut offsets of `level` strictly inside (start, end)."""
        cuts = self.levels[level]
        return cuts[bisect.bisect_right(cuts, start) : bisect.bisect_left(cuts, end)]


def split_spans(doc: ParsedDocument, token_starts: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Char spans [start, end) that cover the document, each holding at most `budget` tokens."""
    return _split(_Boundaries(doc, token_starts), 0, len(doc.text), 0, budget)


def _split(bounds: _Boundaries, start: int, end: int, level: int, budget: int) -> list[tuple[int, int]]:
    if bounds.tokens(start, end) <= budget or level >= len(bounds.levels):
        return [(start, end)]
    cuts = bounds.inside(level, start, end)
    if not cuts:
        return _split(bounds, start, end, level + 1, budget)
    edges = [start, *cuts, end]
    groups = [_split(bounds, a, b, level + 1, budget) for a, b in zip(edges, edges[1:])]
    if level >= bounds.heading_levels:
        return _pack(bounds, [piece for group in groups for piece in group], budget)
    # Sections: whole ones may share a chunk; a section that had to be split keeps its chunks to itself.
    out: list[tuple[int, int]] = []
    whole: list[tuple[int, int]] = []
    for group in groups:
        if len(group) == 1:
            whole.append(group[0])
            continue
        out.extend(_pack(bounds, whole, budget))
        out.extend(group)
        whole = []
    return out + _pack(bounds, whole, budget)


def _pack(bounds: _Boundaries, pieces: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Merge adjacent pieces greedily while the merged span stays within budget."""
    packed: list[tuple[int, int]] = []
    for a, b in pieces:
        if packed and bounds.tokens(packed[-1][0], b) <= budget:
            packed[-1] = (packed[-1][0], b)
        else:
            packed.append((a, b))
    return packed


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink a span to exclude surrounding whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_document(
    doc: ParsedDocument,
    path: str,
    token_starts: Callable[[str], list[int]],
    budget: int,
) -> list[Chunk]:
    """Cut `doc` into chunks of at most `budget` tokens as counted by `token_starts`.

    `token_starts(text)` returns the char offset of every token of `text`. Each chunk is
    re-tokenized on its own; one that tokenizes longer than the estimate (merges at the cut
    can differ) is split again, so the budget holds exactly.
    """
    starts = token_starts(doc.text)
    chunks: list[Chunk] = []
    pending = split_spans(doc, starts, budget)[::-1]  # a stack: next span last
    while pending:
        a, b = _trim(doc.text, *pending.pop())
        if a >= b:
            continue
        text = doc.text[a:b]
        n_tokens = len(token_starts(text))
        if n_tokens > budget and b - a > 1:
            # the estimate undercounted (token merges differ at the cut): split again, proportionally tighter
            tighter = max(1, budget * budget // n_tokens - 1)
            inner = split_spans(ParsedDocument(text), token_starts(text), tighter)
            pending.extend((a + x, a + y) for x, y in reversed(inner))
            continue
        chunks.append(
            Chunk(
                path=path,
                ordinal=len(chunks),
                text=text,
                char_start=a,
                char_end=b,
                start_line=doc.line_at(a),
                end_line=doc.line_at(b - 1),
                page=doc.page_at(a),
                end_page=doc.page_at(b - 1),
                heading=doc.heading_path(a),
                n_tokens=n_tokens,
                page_breaks=tuple(p - a for p in doc.pages if a < p < b),
            )
        )
    return chunks
