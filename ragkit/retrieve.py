"""Query time: candidates from dense and BM25, fused by reciprocal rank, returned as hits with provenance."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragkit import store
from ragkit.config import Settings
from ragkit.ingest.document import Chunk
from ragkit.indexes.base import SearchResults


@dataclass
class Hit:
    """A retrieved chunk with its fused score and its rank in each retriever that found it."""

    chunk: Chunk
    chunk_id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {
            "path": c.path,
            "start_line": c.start_line,
            "end_line": c.end_line,
            "page": c.page,
            "heading": c.heading,
            "score": round(self.score, 6),
            "text": c.text,
            "chunk_id": self.chunk_id,
            "ranks": self.ranks,
        }


def reciprocal_rank_fusion(runs: dict[str, list[int]], k: int = 60) -> list[tuple[int, float, dict[str, int]]]:
    """Fuse ranked row lists: score(d) = Σ 1 / (k + rank(d)), ranks from 1. Ties keep first-seen order.

    >>> [(row, round(score, 4)) for row, score, _ in reciprocal_rank_fusion({"a": [7, 3], "b": [3]}, k=60)]
    [(3, 0.0325), (7, 0.0164)]
    """
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, rows in runs.items():
        for rank, row in enumerate(rows, start=1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (k + rank)
            ranks.setdefault(row, {})[name] = rank
    order = sorted(scores, key=lambda row: -scores[row])
    return [(row, scores[row], ranks[row]) for row in order]


class Searcher:
    """Searches one generation of an index; loads each part on first use."""

    def __init__(self, generation: Path, settings: Settings, encoder=None) -> None:
        self.generation = generation
        self.settings = settings
        self.manifest = store.read_manifest(generation)
        self.table = store.load_chunks(generation)
        self._dense = None
        self._lexical = None
        self._encoder = encoder if encoder is not None and encoder.name == self.dense_model else None

    @property
    def dense_model(self) -> str:
        return self.manifest["models"]["dense"]["model"]

    @property
    def encoder(self):
        """The dense encoder recorded in the index."""
        if self._encoder is None:
            from ragkit.encoders.dense import DenseEncoder

            self._encoder = DenseEncoder(self.dense_model, device=self.settings.device)
        return self._encoder

    @property
    def dense(self):
        if self._dense is None:
            from ragkit.indexes.faiss_index import DenseIndex

            self._dense = DenseIndex.load(self.generation / "dense")
        return self._dense

    @property
    def lexical(self):
        if self._lexical is None:
            from ragkit.indexes.bm25 import LexicalIndex

            self._lexical = LexicalIndex.load(self.generation / "bm25")
        return self._lexical

    def search(self, query: str, k: int, mode: str, paths: Sequence[str] | None = None) -> list[Hit]:
        return self.search_many([query], k, mode, paths)[0]

    def search_many(self, queries: Sequence[str], k: int, mode: str,
                    paths: Sequence[str] | None = None) -> list[list[Hit]]:
        """Top `k` hits per query; `mode` is dense, bm25 or hybrid; `paths` (names or globs) restricts the files."""
        rows = self.rows_of(paths) if paths else None
        if self.table.num_rows == 0 or not queries or (rows is not None and len(rows) == 0):
            return [[] for _ in queries]
        depth = max(k, self.settings.candidates) if mode == "hybrid" else k
        runs: dict[str, SearchResults] = {}
        if mode in ("dense", "hybrid"):
            runs["dense"] = self.dense.search(self.encoder.encode_queries(queries), depth, rows)
        if mode in ("bm25", "hybrid"):
            runs["bm25"] = self.lexical.search(queries, depth, rows)
        out = []
        for q in range(len(queries)):
            if mode == "hybrid":
                fused = reciprocal_rank_fusion({name: [r for r, _ in res[q]] for name, res in runs.items()},
                                               self.settings.rrf_k)[:k]
            else:
                fused = [(row, score, {mode: rank}) for rank, (row, score) in enumerate(runs[mode][q], start=1)]
            out.append([self._hit(row, score, ranks) for row, score, ranks in fused])
        return out

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """Sorted chunk rows of the indexed files that match any of `paths` (relative names or globs)."""
        files = self.manifest["files"]
        chosen = [rel for rel in files if any(rel == p or fnmatch.fnmatchcase(rel, p) for p in paths)]
        ranges = [np.arange(first, first + count) for first, count in (files[rel]["rows"] for rel in chosen)]
        return np.sort(np.concatenate(ranges)) if ranges else np.zeros(0, dtype=np.int64)

    def _hit(self, row: int, score: float, ranks: dict[str, int]) -> Hit:
        record = store.chunk_record(self.table, row)
        return Hit(chunk=store.chunk_from_record(record), chunk_id=record["chunk_id"], score=score, ranks=ranks)
