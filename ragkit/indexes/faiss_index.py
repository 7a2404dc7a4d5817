"""Dense vectors in FAISS: exact inner product for small collections, HNSW beyond."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ragkit.indexes.base import SearchResults

VECTORS = "vectors.npy"
INDEX = "index.faiss"
PARAMS = "params.json"
HNSW_M = 32  # neighbours per node
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128


class DenseIndex:
    """Unit vectors (n, dim) float32 searched by inner product (= cosine)."""

    def __init__(self, vectors: np.ndarray, kind: str, index: object | None = None) -> None:
        import faiss

        self.vectors = vectors
        self.kind = kind
        if index is None:
            index = _build(faiss, vectors, kind)
        self.index = index
        if kind == "hnsw":
            self.index.hnsw.efSearch = HNSW_EF_SEARCH

    @classmethod
    def build(cls, vectors: np.ndarray, exact_max: int) -> "DenseIndex":
        """Exact search up to `exact_max` vectors, HNSW above."""
        kind = "flat" if len(vectors) <= exact_max else "hnsw"
        return cls(np.ascontiguousarray(vectors, dtype=np.float32), kind)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: Sequence, k: int, rows: np.ndarray | None = None) -> SearchResults:
        """Top `k` rows by inner product for each query vector, among `rows` (sorted) when given."""
        queries = np.asarray(queries, dtype=np.float32)
        if rows is not None:
            return _exact_subset(self.vectors, queries, k, rows)
        k = min(k, len(self.vectors))
        if k == 0:
            return [[] for _ in queries]
        scores, rows = self.index.search(queries, k)
        return [[(int(r), float(s)) for r, s in zip(rs, ss) if r >= 0] for rs, ss in zip(rows, scores)]

    def save(self, folder: Path) -> None:
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / VECTORS, self.vectors)
        if self.kind == "hnsw":  # a flat index is rebuilt from the vectors: no second copy on disk
            faiss.write_index(self.index, str(folder / INDEX))
        params = {"kind": self.kind, "count": len(self.vectors), "dim": int(self.vectors.shape[1]), "metric": "ip"}
        (folder / PARAMS).write_text(json.dumps(params, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "DenseIndex":
        import faiss

        params = json.loads((folder / PARAMS).read_text())
        vectors = np.load(folder / VECTORS, mmap_mode="r")
        index = faiss.read_index(str(folder / INDEX)) if params["kind"] == "hnsw" else None
        return cls(vectors, params["kind"], index)


def load_vectors(folder: Path) -> np.ndarray:
    """The stored vectors alone, memory-mapped (for reuse by an incremental run)."""
    return np.load(folder / VECTORS, mmap_mode="r")


def _build(faiss, vectors: np.ndarray, kind: str):
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if len(vectors):
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _exact_subset(vectors: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray) -> SearchResults:
    """Exact search over a subset of rows: a filtered search touches only those vectors."""
    k = min(k, len(rows))
    if k == 0:
        return [[] for _ in queries]
    scores = queries @ np.asarray(vectors[rows]).T  # (queries, len(rows))
    out = []
    for row_scores in scores:
        top = np.argpartition(-row_scores, k - 1)[:k]
        top = top[np.argsort(-row_scores[top], kind="stable")]
        out.append([(int(rows[i]), float(row_scores[i])) for i in top])
    return out
