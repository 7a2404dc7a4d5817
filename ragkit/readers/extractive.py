"""The extractive reader: answers with the retrieved sentences that best match the question, each cited."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ragkit.retrieve import Hit

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*(\s+)(?=\S)|\n[ \t]*\n\s*")  # group 1: the gap after closers
_MAX_SENTENCE_CHARS = 600
_DENSE_CANDIDATES = 48  # sentences re-scored with the dense encoder
_LEXICAL_WEIGHT = 0.5  # weight of query-term coverage next to cosine similarity
_KEEP_RATIO = 0.8  # further sentences must score this close to the best one
_EVIDENCE_WEIGHT = 0.3  # weight of the share of a hit's MaxSim evidence that falls in the sentence
_MIN_WORDS = 4  # shorter "sentences" (titles, labels) are cited only when nothing longer matches


@dataclass(frozen=True)
class Sentence:
    """A sentence of a hit: char span into the hit's text."""

    hit: Hit
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.hit.chunk.text[self.start : self.end]


@dataclass
class Citation:
    """A cited sentence with the exact lines (and page) it sits on."""

    hit: Hit
    text: str
    start_line: int
    end_line: int
    page: int | None
    score: float
    end_page: int | None = None  # page of the last line (PDFs), when the passage crosses a page break

    def to_json(self) -> dict[str, Any]:
        c = self.hit.chunk
        return {
            "path": c.path,
            "start_line": self.start_line,
            "end_line": self.end_line,
            "page": self.page,
            "end_page": self.end_page if self.end_page is not None else self.page,
            "heading": c.heading,
            "score": round(self.score, 6),
            "text": self.text,
            "chunk_id": self.hit.chunk_id,
            "chunk_lines": [c.start_line, c.end_line],
        }


@dataclass
class Answer:
    """An answer, its numbered citations and the hits it was drawn from, and which reader and model wrote it.

    The answer text cites citations[i] as [numbers[i]]; without `numbers`, [1] is citations[0], [2] citations[1]…
    """

    answer: str
    citations: list[Citation]
    hits: list[Hit]
    reader: str = "extractive"  # extractive, generate, infini or hmt
    model: str | None = None  # the reader model's name (None: extractive)
    prompt_tokens: int | None = None  # tokens the reader model read last (its window), None for extractive
    generated_tokens: int | None = None  # tokens it generated, None for extractive
    numbers: list[int] | None = None  # the [n] of each citation, when not 1, 2, …

    def numbered(self) -> list[tuple[int, Citation]]:
        """(n, citation) pairs: the [n] the answer text uses for each citation."""
        numbers = self.numbers or range(1, len(self.citations) + 1)
        return list(zip(numbers, self.citations))

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "citations": [{"n": n, **c.to_json()} for n, c in self.numbered()],
                "reader": self.reader, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens}


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Char spans of the sentences of `text` (blank lines also end a sentence; long runs are cut at lines).

    >>> t = "The crisis began in 1973. Prices rose.\\n\\nA new part"
    >>> [t[a:b] for a, b in split_sentences(t)]
    ['The crisis began in 1973.', 'Prices rose.', 'A new part']
    """
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start(1) if match.group(1) is not None else match.start()))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        out.extend(_cut_long(text, a, b))
    return [(a, b) for a, b in out if text[a:b].strip()]


def _cut_long(text: str, start: int, end: int) -> list[tuple[int, int]]:
    if end - start <= _MAX_SENTENCE_CHARS:
        return [(start, end)]
    out, a = [], start
    for match in re.finditer(r"\n", text[start:end]):
        cut = start + match.end()
        if cut - a >= _MAX_SENTENCE_CHARS // 2:
            out.append((a, cut - 1))
            a = cut
    out.append((a, end))
    return out


class ExtractiveReader:
    """Scores every sentence of the hits by query-term coverage, the hit's MaxSim evidence inside it and,
    when an encoder is given, cosine similarity to the question."""

    def __init__(self, encoder=None, max_sentences: int = 3) -> None:
        self.encoder = encoder
        self.max_sentences = max_sentences

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        sentences = [Sentence(h, a, b) for h in hits for a, b in split_sentences(h.chunk.text)]
        if not sentences:
            return Answer("No answer found: nothing relevant is indexed.", [], list(hits))
        scores = self._score(question, sentences, hits)
        best = float(scores.max())
        chosen = [i for i in np.argsort(-scores, kind="stable")[: self.max_sentences]
                  if scores[i] >= _KEEP_RATIO * best or i == int(np.argmax(scores))]
        citations = [self._cite(sentences[i], float(scores[i])) for i in chosen]
        text = " ".join(f"{_clean(c.text)} [{n}]" for n, c in enumerate(citations, start=1))
        return Answer(text, citations, list(hits))

    def _score(self, question: str, sentences: list[Sentence], hits: Sequence[Hit]) -> np.ndarray:
        from ragkit.tokens import tokenize

        q_terms, *s_terms = tokenize([question] + [s.text for s in sentences])
        lexical = _coverage(set(q_terms), [set(t) for t in s_terms])
        rank_of = {id(h): r for r, h in enumerate(hits)}
        prior = np.array([0.05 / (1 + rank_of[id(s.hit)]) for s in sentences])
        scores = _LEXICAL_WEIGHT * lexical + prior + _EVIDENCE_WEIGHT * _evidence_share(sentences)
        scores -= np.array([1.0 if len(s.text.split()) < _MIN_WORDS else 0.0 for s in sentences])
        if self.encoder is not None:
            top = np.argsort(-scores, kind="stable")[:_DENSE_CANDIDATES]
            q_vec = self.encoder.encode_queries([question])[0]
            s_vecs = self.encoder.encode_queries([sentences[i].text for i in top])
            dense = np.full(len(sentences), -1.0)
            dense[top] = s_vecs @ q_vec
            scores = scores + dense
        return scores

    def _cite(self, sentence: Sentence, score: float) -> Citation:
        chunk = sentence.hit.chunk
        start_line, page = chunk.locate(sentence.start)
        end_line, end_page = chunk.locate(max(sentence.start, sentence.end - 1))
        return Citation(sentence.hit, sentence.text, start_line, end_line, page, score, end_page)


def _evidence_share(sentences: list[Sentence]) -> np.ndarray:
    """Share of its hit's evidence score (late-interaction alignments) that each sentence holds."""
    shares = np.zeros(len(sentences))
    for i, s in enumerate(sentences):
        total = sum(e.score for e in s.hit.evidence)
        if total > 0:
            inside = sum(e.score for e in s.hit.evidence if e.start < s.end and s.start < e.end)
            shares[i] = inside / total
    return shares


def _coverage(query: set[str], sentences: list[set[str]]) -> np.ndarray:
    """Share of the query's IDF weight (IDF over these sentences) that each sentence contains."""
    if not query:
        return np.zeros(len(sentences))
    n = len(sentences)
    idf = {t: math.log((n + 1) / (0.5 + sum(t in s for s in sentences))) for t in query}
    total = sum(idf.values()) or 1.0
    return np.array([sum(idf[t] for t in query & s) / total for s in sentences])


def _clean(text: str) -> str:
    return " ".join(text.split())
