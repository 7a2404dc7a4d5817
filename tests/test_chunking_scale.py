"""Chunking in time linear in the size of the document: one line of megabytes, packing work, many headings and
pages, and the tokenizer called on windows, never on the whole text."""

from __future__ import annotations

import json
import math
import random
import re
import time

import pytest
from test_chunking import SENTENCES, chunk_with, words

from ragkit.ingest.chunking import WINDOW_CHARS, chunk_document, document_token_starts, split_spans
from ragkit.ingest.document import Chunk, Heading, ParsedDocument


class Recording:
    """A fast stand-in for a subword tokenizer (words and punctuation) that records its calls."""

    TOKEN = re.compile(r"\w+|[^\w\s]")

    def __init__(self) -> None:
        self.calls: list[int] = []  # length of each text tokenized

    def __call__(self, text: str) -> list[int]:
        self.calls.append(len(text))
        return [m.start() for m in self.TOKEN.finditer(text)]


def minified_json(size: int) -> str:
    rng = random.Random(0)
    rows: list[str] = []
    length = 0
    while length < size:
        row = {"id": len(rows), "name": f"item{rng.randint(0, 99999)}", "tags": rng.sample(SENTENCES[0].split(), 3)}
        rows.append(json.dumps(row, separators=(",", ":")))
        length += len(rows[-1]) + 1
    return "[" + ",".join(rows) + "]"


def words_line(size: int) -> str:
    rng = random.Random(1)
    vocabulary = " ".join(SENTENCES).split()
    return " ".join(rng.choice(vocabulary) for _ in range(size // 7))


def assert_covers_fast(doc: ParsedDocument, chunks: list[Chunk]) -> None:
    """assert_covers with string operations, for documents of megabytes."""
    previous_end = 0
    for n, c in enumerate(chunks):
        assert c.ordinal == n
        assert c.char_start >= previous_end and doc.text[previous_end : c.char_start].strip() == ""
        assert c.text == doc.text[c.char_start : c.char_end] and c.text == c.text.strip() != ""
        previous_end = c.char_end
    assert doc.text[previous_end:].strip() == ""


@pytest.mark.parametrize("make", [minified_json, words_line])
def test_one_line_of_megabytes_chunks_in_linear_time(make):
    text = make(4 * 2**20)  # no newline: one line, as a minified file or a text export
    tokenizer = Recording()
    doc = ParsedDocument(text)
    started = time.perf_counter()
    chunks = chunk_document(doc, "big.json", tokenizer, 254)
    elapsed = time.perf_counter() - started
    # a few seconds when linear; piece-by-piece packing or whole-text calls took far longer
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert max(tokenizer.calls) <= WINDOW_CHARS  # never the whole document in one call
    assert sum(tokenizer.calls) <= 3 * len(text)  # the text once, each chunk once, a few re-splits
    assert_covers_fast(doc, chunks)
    total = len(Recording()(text))
    assert len(chunks) >= total // 254
    for c in chunks:
        assert c.n_tokens == len(Recording()(c.text)) <= 254
        assert (c.start_line, c.end_line) == (1, 1)


class CountingStarts(list):
    """Token starts that count how often the chunker looks one up."""

    lookups = 0

    def __getitem__(self, index):
        self.lookups += 1
        return super().__getitem__(index)


@pytest.mark.parametrize("make, tokenizer", [(minified_json, Recording()), (words_line, words)])
def test_packing_work_follows_the_chunks_not_the_pieces(make, tokenizer):
    # a megabyte on one line is hundreds of thousands of words or tokens but a few thousand chunks;
    # packing jumps to the furthest cut a chunk reaches (a few binary searches per chunk)
    text = make(2**20)
    starts = CountingStarts(tokenizer(text))
    spans = split_spans(ParsedDocument(text), starts, 254)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert starts.lookups <= 20 * len(spans) * math.log2(len(starts))


def test_many_headings_and_pages_chunk_in_linear_time():
    # each chunk looked up its heading path and page breaks by scanning every heading and page
    text, headings, pages = "", [], []
    for i in range(20000):
        headings.append(Heading(len(text), 1 + i % 3, f"S{i}"))
        pages.append(len(text))
        text += f"Section {i}\n\nsome words of section {i}\n\n"
    doc = ParsedDocument(text, headings, pages)
    started = time.perf_counter()
    chunks = chunk_with(doc, words, 8)
    assert time.perf_counter() - started < 30
    assert len(chunks) == 20000
    for i in (0, 1, 2, 3, 4, 12345, 19999):
        c = chunks[i]
        expected = [f"S{i - i % 3 + k}" for k in range(i % 3 + 1)]
        assert c.heading == " > ".join(expected)
        assert (c.page, c.end_page, c.page_breaks) == (i + 1, i + 1, ())
    # with room for two sections, "S1 > S2" shares a chunk that crosses onto page 3
    pair = chunk_with(doc, words, 16)[1]
    assert (pair.heading, pair.page, pair.end_page) == ("S0 > S1", 2, 3)
    assert pair.page_breaks == (pages[2] - pages[1],)


def test_document_token_starts_in_windows_agree_with_one_call_at_spaces():
    text = "\n".join(words_line(3000) for _ in range(20))
    assert len(text) > 10 * 4096
    assert document_token_starts(text, words, window=4096) == words(text)
    assert document_token_starts(text, words, window=10**9) == words(text)


def test_document_token_starts_cut_runs_without_spaces_at_the_window():
    tokenizer = Recording()
    text = "x" * 10000
    assert document_token_starts(text, tokenizer, window=4096) == [0, 4096, 8192]
    assert tokenizer.calls == [4096, 4096, 1808]
