"""Structure-aware chunking, measured in the encoder's own tokens.

A document is cut at its headings first, then at paragraphs, lines, sentences, words and, as a last
resort, tokens; adjacent pieces are then packed greedily up to the token budget. Nothing is ever
truncated: every character of the document (but surrounding whitespace) lands in exactly one chunk.

Time grows linearly with the document: the whole text is tokenized in bounded windows, cut offsets
are found once per level, and packing jumps from chunk to chunk instead of walking piece by piece.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence

from ragkit.ingest.document import Chunk, ParsedDocument

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_WORD = re.compile(r"\s+")
_PATTERNS = (_PARAGRAPH, _LINE, _SENTENCE, _WORD)

WINDOW_CHARS = 1 << 14  # most chars of a document handed to the tokenizer at once

TokenStarts = Callable[[str], Sequence[int]]
Span = tuple[int, int]


class _Boundaries:
    """Candidate cut offsets of one document, from coarse (headings) to fine (tokens).

    The cuts of a text level (paragraphs … words) are found on first use: most documents never
    need their word boundaries.
    """

    def __init__(self, doc: ParsedDocument, token_starts: Sequence[int]) -> None:
        self.text = doc.text
        levels = sorted({h.level for h in doc.headings})
        self.heading_levels = len(levels)
        self._cuts: list[Sequence[int] | None] = [
            sorted({h.start for h in doc.headings if h.level <= lv}) for lv in levels
        ]
        self._cuts += [None] * len(_PATTERNS)
        self._cuts.append(token_starts)
        self.depth = len(self._cuts)
        self.token_starts = token_starts

    def cuts(self, level: int) -> Sequence[int]:
        """Sorted cut offsets of `level`."""
        found = self._cuts[level]
        if found is None:
            pattern = _PATTERNS[level - self.heading_levels]
            found = self._cuts[level] = [m.end() for m in pattern.finditer(self.text)]
        return found

    def inside(self, level: int, start: int, end: int) -> tuple[int, int]:
        """The index range [lo, hi) of the cuts of `level` strictly inside (start, end)."""
        cuts = self.cuts(level)
        return bisect.bisect_right(cuts, start), bisect.bisect_left(cuts, end)

    def tokens(self, start: int, end: int) -> int:
        """Tokens that start inside [start, end)."""
        return bisect.bisect_left(self.token_starts, end) - bisect.bisect_left(self.token_starts, start)

    def reach(self, start: int, budget: int) -> int:
        """The largest end such that [start, end) holds at most `budget` tokens (len(text) if all fit)."""
        k = bisect.bisect_left(self.token_starts, start) + budget
        return self.token_starts[k] if k < len(self.token_starts) else len(self.text)


def split_spans(doc: ParsedDocument, token_starts: Sequence[int], budget: int) -> list[Span]:
    """Char spans [start, end) that cover the document, each holding at most `budget` tokens."""
    return _split(_Boundaries(doc, token_starts), 0, len(doc.text), 0, budget)


def _split(bounds: _Boundaries, start: int, end: int, level: int, budget: int) -> list[Span]:
    """Spans covering [start, end), cut at `level` or finer, each within budget."""
    if bounds.tokens(start, end) <= budget or level >= bounds.depth:
        return [(start, end)]
    lo, hi = bounds.inside(level, start, end)
    if lo == hi:
        return _split(bounds, start, end, level + 1, budget)
    if level < bounds.heading_levels:
        return _split_sections(bounds, start, end, level, budget)
    return _pack_level(bounds, start, end, level, budget)


def _split_sections(bounds: _Boundaries, start: int, end: int, level: int, budget: int) -> list[Span]:
    """Whole sections may share a chunk; a section that had to be split keeps its chunks to itself."""
    lo, hi = bounds.inside(level, start, end)
    edges = [start, *bounds.cuts(level)[lo:hi], end]
    out: list[Span] = []
    whole: list[Span] = []
    for a, b in zip(edges, edges[1:]):
        group = _split(bounds, a, b, level + 1, budget)
        if len(group) == 1:
            whole.append(group[0])
            continue
        out.extend(_pack(bounds, whole, budget))
        out.extend(group)
        whole = []
    return out + _pack(bounds, whole, budget)


def _pack_level(bounds: _Boundaries, start: int, end: int, level: int, budget: int) -> list[Span]:
    """Greedy packing of the pieces between the cuts of `level`; pieces over budget are split finer.

    Same result as splitting every piece and packing the lot, but each step jumps to the furthest
    cut the current chunk can reach, so the work follows the number of chunks, not of pieces.
    """
    cuts = bounds.cuts(level)
    lo, hi = bounds.inside(level, start, end)

    def edge(i: int) -> int:  # edges: start, the cuts inside, end
        return start if i == 0 else end if i > hi - lo else cuts[lo + i - 1]

    packed: list[Span] = []
    i, last = 0, hi - lo + 1  # edge(last) == end
    while i < last:
        if packed:
            limit = bounds.reach(packed[-1][0], budget)
            j = last if end <= limit else bisect.bisect_right(cuts, limit, lo, hi) - lo
            if j > i:
                packed[-1] = (packed[-1][0], edge(j))
                i = j
                continue
        a, b = edge(i), edge(i + 1)  # the next piece, which does not join the last chunk whole
        if bounds.tokens(a, b) <= budget:
            packed.append((a, b))
        else:
            for piece in _split(bounds, a, b, level + 1, budget):
                _append_greedy(bounds, packed, piece, budget)
        i += 1
    return packed


def _pack(bounds: _Boundaries, pieces: list[Span], budget: int) -> list[Span]:
    """Merge adjacent pieces greedily while the merged span stays within budget."""
    packed: list[Span] = []
    for piece in pieces:
        _append_greedy(bounds, packed, piece, budget)
    return packed


def _append_greedy(bounds: _Boundaries, packed: list[Span], piece: Span, budget: int) -> None:
    """Extend the last span of `packed` over `piece` if the result fits, else append `piece`."""
    if packed and bounds.tokens(packed[-1][0], piece[1]) <= budget:
        packed[-1] = (packed[-1][0], piece[1])
    else:
        packed.append(piece)


def document_token_starts(text: str, token_starts: TokenStarts, window: int = WINDOW_CHARS) -> list[int]:
    """Token starts of a whole document, tokenized in windows of at most `window` chars.

    One call over megabytes costs some tokenizers more than linear time. Windows end before a
    newline or a space where there is one in their second half, so the counts match a whole-text
    call except where a window had to cut a long run without spaces; the chunks are re-tokenized
    afterwards, so the budget still holds exactly.

    >>> document_token_starts("ab cd ef", lambda t: [m.start() for m in re.finditer(r"\\S+", t)], window=4)
    [0, 3, 6]
    """
    starts: list[int] = []
    for a, b in _windows(text, window):
        starts.extend(a + s for s in token_starts(text[a:b]))
    return starts


def _windows(text: str, window: int) -> list[Span]:
    """Consecutive spans of at most `window` chars covering `text`, cut before whitespace if possible."""
    spans: list[Span] = []
    a = 0
    while len(text) - a > window:
        b = a + window
        cut = text.rfind("\n", a + window // 2, b)
        if cut < 0:
            cut = max(text.rfind(" ", a + window // 2, b), text.rfind("\t", a + window // 2, b))
        if cut >= 0:
            b = cut
        spans.append((a, b))
        a = b
    spans.append((a, len(text)))
    return spans


def _trim(text: str, start: int, end: int) -> Span:
    """Shrink a span to exclude surrounding whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_document(doc: ParsedDocument, path: str, token_starts: TokenStarts, budget: int) -> list[Chunk]:
    """Cut `doc` into chunks of at most `budget` tokens as counted by `token_starts`.

    `token_starts(text)` returns the char offset of every token of `text`; the whole document is
    estimated window by window (document_token_starts). Each chunk is re-tokenized on its own;
    one that tokenizes longer than the estimate (merges at the cut can differ) is split again,
    so the budget holds exactly.
    """
    chunks: list[Chunk] = []
    pending = split_spans(doc, document_token_starts(doc.text, token_starts), budget)[::-1]  # next span last
    while pending:
        a, b = _trim(doc.text, *pending.pop())
        if a >= b:
            continue
        text = doc.text[a:b]
        starts = token_starts(text)
        if len(starts) > budget and b - a > 1:
            # the estimate undercounted (token merges differ at the cut): split again, proportionally tighter
            tighter = max(1, budget * budget // len(starts) - 1)
            inner = split_spans(ParsedDocument(text), starts, tighter)
            pending.extend((a + x, a + y) for x, y in reversed(inner))
            continue
        chunks.append(_chunk(doc, path, len(chunks), a, b, len(starts)))
    return chunks


def _chunk(doc: ParsedDocument, path: str, ordinal: int, start: int, end: int, n_tokens: int) -> Chunk:
    """The chunk doc.text[start:end] with its lines, pages and heading."""
    return Chunk(
        path=path,
        ordinal=ordinal,
        text=doc.text[start:end],
        char_start=start,
        char_end=end,
        start_line=doc.line_at(start),
        end_line=doc.line_at(end - 1),
        page=doc.page_at(start),
        end_page=doc.page_at(end - 1),
        heading=doc.heading_path(start),
        n_tokens=n_tokens,
        page_breaks=doc.page_breaks(start, end),
    )
