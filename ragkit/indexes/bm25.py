"""Lexical search: BM25 (bm25s) over stemmed, stop-worded tokens of the chunk texts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ragkit.indexes.base import SearchResults
from ragkit.tokens import STEMMER_LANGUAGE, tokenize

PARAMS = "ragkit.json"


class LexicalIndex:
    """BM25 over rows 0..n-1; an empty collection is allowed."""

    def __init__(self, retriever, count: int) -> None:
        self.retriever = retriever
        self.count = count

    @classmethod
    def build(cls, texts: Sequence[str]) -> "LexicalIndex":
        import bm25s

        retriever = bm25s.BM25()
        if texts:
            retriever.index(tokenize(texts), show_progress=False)
        return cls(retriever, len(texts))

    def __len__(self) -> int:
        return self.count

    def search(self, queries: Sequence, k: int, rows: np.ndarray | None = None) -> SearchResults:
        """Top `k` rows with a positive BM25 score for each query string, among `rows` when given."""
        k = min(k, self.count)
        if k == 0:
            return [[] for _ in queries]
        mask = None
        if rows is not None:
            mask = np.zeros(self.count, dtype=np.float32)
            mask[rows] = 1.0
        results = self.retriever.retrieve(tokenize(queries), k=k, show_progress=False, n_threads=1,
                                          weight_mask=mask)
        return [
            [(int(r), float(s)) for r, s in zip(rows, scores) if s > 0]
            for rows, scores in zip(results.documents, results.scores)
        ]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.count:
            self.retriever.save(str(folder), show_progress=False)
        (folder / PARAMS).write_text(json.dumps({"count": self.count, "stemmer": STEMMER_LANGUAGE}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "LexicalIndex":
        import bm25s

        count = json.loads((folder / PARAMS).read_text())["count"]
        if not count:
            return cls(bm25s.BM25(), 0)
        return cls(bm25s.BM25.load(str(folder), mmap=True, show_progress=False), count)
