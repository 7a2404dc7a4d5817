"""Evidence spans: the parts of a chunk that the query's tokens matched best under MaxSim."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SPANS = 8


@dataclass(frozen=True)
class Evidence:
    """Chars [start, end) of a hit's text, and the summed similarity of the query tokens aligned to them."""

    start: int
    end: int
    score: float

    def to_json(self) -> dict[str, float | int]:
        return {"start": self.start, "end": self.end, "score": round(self.score, 4)}


def snippet_bounds(length: int, center: int, limit: int) -> tuple[int, int]:
    """[start, end) of the window of at most `limit` chars of a text of `length` chars that a snippet shows around
    `center` (its best evidence): a third of the window before it.

    >>> snippet_bounds(1000, 500, 300), snippet_bounds(1000, 990, 300), snippet_bounds(50, 10, 300)
    ((400, 700), (700, 1000), (0, 50))
    """
    start = max(0, min(center - limit // 3, length - limit))
    return start, min(length, start + limit)


def maxsim_evidence(query: np.ndarray, vectors: np.ndarray, spans: np.ndarray, text: str,
                    limit: int = MAX_SPANS) -> list[Evidence]:
    """Spans of `text` holding the document token each query token aligns to, best first.

    query: (q_tokens, dim); vectors: (d_tokens, dim); spans: (d_tokens, 2) char spans (-1: no text).
    Aligned sub-word tokens grow to whole words; aligned words next to each other merge into a phrase.

    >>> q = np.eye(3, dtype=np.float32)[:2]            # two query tokens
    >>> d = np.eye(3, dtype=np.float32)                 # three document tokens
    >>> [(e.start, e.end, e.score) for e in maxsim_evidence(q, d, np.array([[0, 3], [4, 7], [8, 11]]), "oil big cat")]
    [(0, 7, 2.0)]
    """
    if len(vectors) == 0 or len(query) == 0:
        return []
    sims = vectors @ query.T  # (d_tokens, q_tokens)
    best = sims.argmax(axis=0)
    scores: dict[tuple[int, int], float] = {}
    for q_index, token in enumerate(best):
        start, end = (int(x) for x in spans[token])
        if start < 0 or sims[token, q_index] <= 0:
            continue
        word = _whole_word(text, start, end)
        scores[word] = scores.get(word, 0.0) + float(sims[token, q_index])
    return sorted(_merge_adjacent(text, scores), key=lambda e: -e.score)[:limit]


def _whole_word(text: str, start: int, end: int) -> tuple[int, int]:
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return start, end


def _merge_adjacent(text: str, scores: dict[tuple[int, int], float]) -> list[Evidence]:
    """Join spans separated by nothing but spaces (not line breaks), summing their scores."""
    merged: list[Evidence] = []
    for start, end in sorted(scores):
        score = scores[(start, end)]
        if merged and start <= merged[-1].end + 1 and text[merged[-1].end:start].strip(" ") == "":
            last = merged.pop()
            merged.append(Evidence(last.start, max(last.end, end), last.score + score))
        else:
            merged.append(Evidence(start, end, score))
    return merged
