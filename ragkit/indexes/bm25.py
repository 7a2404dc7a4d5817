"""Lexical search: BM25 (bm25s) over stemmed, stop-worded tokens of the chunk texts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ragkit.errors import RagkitError
from ragkit.indexes.base import SearchResults
from ragkit.tokens import STEMMER_LANGUAGE, tokenize

PARAMS = "ragkit.json"
LENGTHS = "lengths.npy"  # tokens of each row, int32 (n,)


def top_rows(scores: np.ndarray, k: int, rows: np.ndarray | None = None) -> list[tuple[int, float]]:
    """The `k` best rows with a positive score (among `rows` when given), best first; equal scores in row order,
    so that one index and its shards rank ties alike.

    >>> top_rows(np.array([0.5, 2.0, 0.0, 2.0]), 3)
    [(1, 2.0), (3, 2.0), (0, 0.5)]
    """
    if rows is not None:
        kept = np.zeros(len(scores), dtype=bool)
        kept[rows] = True
        scores = np.where(kept, scores, 0)
    top = np.argsort(-scores, kind="stable")[:k]
    return [(int(r), float(scores[r])) for r in top if scores[r] > 0]


class LexicalIndex:
    """BM25 over rows 0..n-1; an empty collection is allowed.

    `lengths` (tokens of each row) let `postings` give back each term's frequencies from bm25s's stored scores,
    which is what search over several shards needs to score with the statistics of all of them; indexes written
    before lengths were kept have None.
    """

    def __init__(self, retriever, count: int, lengths: np.ndarray | None = None) -> None:
        self.retriever = retriever
        self.count = count
        self.lengths = lengths

    @classmethod
    def build(cls, texts: Sequence[str]) -> "LexicalIndex":
        import bm25s

        retriever = bm25s.BM25()
        tokens = tokenize(texts)
        if texts:
            retriever.index(tokens, show_progress=False)
        return cls(retriever, len(texts), np.array([len(t) for t in tokens], dtype=np.int32))

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, term frequencies) of the rows holding `term` (a token as `tokenize` makes it).

        bm25s stores idf × tf / (tf + k1 (1 − b + b·len/avglen)) per (term, row); with the row lengths the
        frequency follows: tf = t·K / (1 − t), t = score / idf, K = k1 (1 − b + b·len/avglen), a whole number.
        """
        if self.lengths is None:
            raise RagkitError("this index was built before BM25 kept its row lengths; rebuild it with "
                              "`ragkit index FOLDER --rebuild` to search it in shards")
        column = self.retriever.vocab_dict.get(term) if self.count else None
        if column is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        scores = self.retriever.scores
        start, end = int(scores["indptr"][column]), int(scores["indptr"][column + 1])
        rows = np.asarray(scores["indices"][start:end], dtype=np.int64)
        k1, b = self.retriever.k1, self.retriever.b
        idf = np.log(1 + (self.count - (end - start) + 0.5) / ((end - start) + 0.5))  # lucene
        norm = k1 * (1 - b + b * self.lengths[rows] / self.lengths.mean())
        share = np.asarray(scores["data"][start:end], dtype=np.float64) / idf
        return rows, np.rint(share * norm / (1 - share))

    def __len__(self) -> int:
        return self.count

    def search(self, queries: Sequence, k: int, rows: np.ndarray | None = None) -> SearchResults:
        """Top `k` rows with a positive BM25 score for each query string, among `rows` when given."""
        k = min(k, self.count)
        if k == 0:
            return [[] for _ in queries]
        out = []
        for terms in tokenize(queries):
            known = [term for term in terms if term in self.retriever.vocab_dict]
            scores = self.retriever.get_scores(known) if known else np.zeros(self.count)
            out.append(top_rows(scores, k, rows))
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.count:
            self.retriever.save(str(folder), show_progress=False)
        if self.lengths is not None:
            np.save(folder / LENGTHS, self.lengths)
        (folder / PARAMS).write_text(json.dumps({"count": self.count, "stemmer": STEMMER_LANGUAGE}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "LexicalIndex":
        import bm25s

        count = json.loads((folder / PARAMS).read_text())["count"]
        lengths = np.load(folder / LENGTHS, allow_pickle=False) if (folder / LENGTHS).is_file() else None
        if not count:
            return cls(bm25s.BM25(), 0, lengths)
        return cls(bm25s.BM25.load(str(folder), mmap=True, show_progress=False), count, lengths)
