"""Query time: candidates from dense, BM25 and late interaction, fused, re-ranked by exact MaxSim, with evidence."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragkit import store
from ragkit.config import Settings
from ragkit.errors import RagkitError
from ragkit.evidence import Evidence, maxsim_evidence
from ragkit.fusion import Fused, FusionRule, fuse
from ragkit.indexes.base import SearchResults
from ragkit.ingest.document import Chunk


@dataclass
class Hit:
    """A retrieved chunk: its score, its rank in each retriever that found it, and its evidence spans."""

    chunk: Chunk
    chunk_id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)  # char spans into chunk.text, best first

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {
            "path": c.path,
            "start_line": c.start_line,
            "end_line": c.end_line,
            "page": c.page,
            "end_page": c.end_page,
            "heading": c.heading,
            "score": round(self.score, 6),
            "text": c.text,
            "evidence": [e.to_json() for e in self.evidence],
            "chunk_id": self.chunk_id,
            "ranks": self.ranks,
        }


def load_structure(generation: Path, part: str):
    """The search structure `part` (dense, bm25 or late) of a generation, from its folder of that name."""
    from ragkit.indexes.bm25 import LexicalIndex
    from ragkit.indexes.faiss_index import DenseIndex
    from ragkit.indexes.late import LateIndex

    kind = {"dense": DenseIndex, "bm25": LexicalIndex, "late": LateIndex}[part]
    return kind.load(generation / part)


class Searcher:
    """Searches one generation of an index; loads each part on first use."""

    def __init__(self, generation: Path, settings: Settings, encoder=None, late_encoder=None,
                 qdrant_client=None) -> None:
        self.generation = generation
        self.settings = settings
        self.manifest, self.table = self._read(generation)
        self._dense = None
        self._lexical = None
        self._late = None
        self._encoder = encoder if encoder is not None and encoder.matches(self.manifest["models"]["dense"]) else None
        late_info = self.manifest["models"].get("late")
        self._late_encoder = late_encoder if late_info and late_encoder is not None and \
            (late_encoder.name, late_encoder.revision) == (late_info["model"], late_info.get("revision")) else None
        self.timings: dict[str, float] = {}  # seconds per stage of the last search
        self._paths: list[str] | None = None
        self._names = None
        self._rows_by_id: dict[str, int] | None = None
        self._qdrant_client = qdrant_client  # kept across reopens: a local-mode folder admits one client
        self._qdrant = None

    def _read(self, generation: Path):
        """The manifest and chunk table of the generation searched."""
        return store.read_manifest(generation), store.load_chunks(generation)

    def reopen(self, generation: Path) -> "Searcher":
        """A searcher of `generation` that keeps this one's loaded encoders where the models are the same."""
        return type(self)(generation, self.settings, encoder=self._encoder, late_encoder=self._late_encoder,
                          qdrant_client=self._qdrant_client)

    @property
    def dense_model(self) -> str:
        return self.manifest["models"]["dense"]["model"]

    @property
    def has_late(self) -> bool:
        return "late" in self.manifest["models"]

    @property
    def encoder(self):
        """The encoder of queries for the dense model recorded in the index (its ONNX export when cached)."""
        if self._encoder is None:
            from ragkit.encoders.onnx import query_encoder

            self._encoder = query_encoder(self.manifest["models"]["dense"], self.settings.device,
                                          self.settings.onnx_queries)
        return self._encoder

    @property
    def late_encoder(self):
        """The encoder of queries for the late model recorded in the index (its ONNX export when cached)."""
        if self._late_encoder is None:
            from ragkit.encoders.late_onnx import late_query_encoder

            self._late_encoder = late_query_encoder(self.manifest["models"]["late"], self.settings.device,
                                                    self.settings.onnx_queries)
        return self._late_encoder

    @property
    def late_document_encoder(self):
        """The late model itself, which encodes documents (the query encoder when that is the model)."""
        if not hasattr(self.late_encoder, "encode_documents"):
            from ragkit.encoders.late import LateEncoder

            info = self.manifest["models"]["late"]
            self._late_encoder = LateEncoder(info["model"], info["document_length"], device=self.settings.device)
        return self._late_encoder

    @property
    def dense(self):
        if self._dense is None:
            self._dense = self._load("dense")
        return self._dense

    @property
    def lexical(self):
        if self._lexical is None:
            self._lexical = self._load("bm25")
        return self._lexical

    @property
    def late(self):
        if self._late is None:
            self._late = self._load("late")
        return self._late

    def _load(self, part: str):
        """The generation's search structure `part`: dense, bm25 or late."""
        with store.reading(self.generation):
            return load_structure(self.generation, part)

    @property
    def qdrant(self):
        """The Qdrant collection that gives dense and late candidates (backend qdrant), or None (local)."""
        if self.settings.backend != "qdrant":
            return None
        if self._qdrant is None:
            from ragkit.indexes.qdrant import QdrantCandidates, collection_stamp, open_client

            if self.manifest.get("shards"):
                raise RagkitError("a sharded index cannot search from Qdrant yet (it cannot be exported); search it "
                                  "with --backend local")
            if self._qdrant_client is None:
                self._qdrant_client = open_client(self.settings.qdrant_path, self.settings.qdrant_url)
            self._qdrant = QdrantCandidates(self._qdrant_client, self.settings.qdrant_collection,
                                            self.table.column("chunk_id").to_pylist(), collection_stamp(self.manifest))
        return self._qdrant

    def search(self, query: str, k: int, mode: str, paths: Sequence[str] | None = None) -> list[Hit]:
        return self.search_many([query], k, mode, paths)[0]

    def search_many(self, queries: Sequence[str], k: int, mode: str,
                    paths: Sequence[str] | None = None) -> list[list[Hit]]:
        """Top `k` hits per query.

        mode: dense, bm25 or late alone, or hybrid (all the index has, fused, then the top `rerank_depth`
        re-ranked by exact MaxSim); `paths` (names or globs) restricts the files searched.
        """
        self.timings = {}
        if mode == "late" and not self.has_late:
            skipped = self.manifest.get("settings", {}).get("late_skipped")
            if skipped:
                raise RagkitError(f"this index has no late-interaction stage: it was skipped when the index was "
                                  f"built ({skipped}); run `ragkit index` with --late-model PATH to add it")
            raise RagkitError("this index has no late-interaction stage (built with --no-late); "
                              "run `ragkit index` without --no-late to add it")
        rows = self.rows_of(paths) if paths else None
        if self.table.num_rows == 0 or not queries or (rows is not None and len(rows) == 0):
            return [[] for _ in queries]
        use_late = self.has_late and mode in ("late", "hybrid")
        late_queries = self._timed("late_query", self.late_encoder.encode_queries, queries) if use_late else None
        runs = self._candidates(queries, late_queries, k, mode, rows)
        out = []
        for q in range(len(queries)):
            if mode == "hybrid":
                names = self.name_scores(queries[q]) if self.settings.name_weight else {}
                fused = self._timed("fuse", self._fuse, names, {name: result[q] for name, result in runs.items()})
                if use_late:
                    fused = self._timed("rerank", self._rerank, late_queries[q], fused, names)
            else:
                fused = [(row, score, {mode: rank}) for rank, (row, score) in enumerate(runs[mode][q], start=1)]
            hits = [self._hit(row, score, ranks) for row, score, ranks in fused[:k]]
            if use_late:  # evidence for the hits a user reads, not for every candidate of a deep search
                words = late_queries[q][self.late_encoder.word_positions(queries[q])]
                shown = min(k, self.settings.evidence_hits)
                self._timed("evidence", self._add_evidence, words, [row for row, _, _ in fused[:shown]],
                            hits[:shown])
            out.append(hits)
        return out

    def _candidates(self, queries, late_queries, k: int, mode: str, rows) -> dict[str, SearchResults]:
        depth = max(k, self.settings.candidates) if mode == "hybrid" else k
        runs: dict[str, SearchResults] = {}
        qdrant = self.qdrant
        if mode in ("dense", "hybrid"):
            vectors = self._timed("dense_query", self.encoder.encode_queries, queries)
            runs["dense"] = self._timed("dense", qdrant.dense if qdrant else self.dense.search, vectors, depth, rows)
        if mode in ("bm25", "hybrid"):
            runs["bm25"] = self._timed("bm25", self.lexical.search, queries, depth, rows)
        if late_queries is not None and qdrant:
            runs["late"] = self._timed("late", qdrant.late, late_queries, depth, rows)
        elif late_queries is not None:
            runs["late"] = self._timed("late", self.late.search, late_queries, depth, rows,
                                       self.settings.late_exact_max_tokens, self.settings.late_rerank_candidates,
                                       self.settings.late_probe)
        return runs

    @property
    def paths(self) -> list[str]:
        """The document of each chunk row."""
        if self._paths is None:
            self._paths = self.table.column("path").to_pylist()
        return self._paths

    def name_scores(self, query: str) -> dict[str, float]:
        """The documents whose names hold what `query` names, scored in (0, 1] (`ragkit.names`)."""
        if self._names is None:
            from ragkit.names import NameMatcher

            self._names = NameMatcher(self.manifest["files"])
        return self._names.scores(query)

    def _fuse(self, names: dict[str, float], runs: dict[str, list[tuple[int, float]]]) -> Fused:
        return fuse(runs, FusionRule.from_settings(self.settings), self.paths, names)

    def _rerank(self, late_query: np.ndarray, fused, names: dict[str, float]):
        """Exact MaxSim over the top `rerank_depth` fused candidates; the rest keep their fused order below. The
        name rule holds here too: a chunk of a document the query names gains `name_weight` × its name score in
        units of the best MaxSim score of the head (as in fusion, where the unit is the best possible score)."""
        head, tail = fused[: self.settings.rerank_depth], fused[self.settings.rerank_depth :]
        if not head:
            return fused
        rows = np.array([row for row, _, _ in head], dtype=np.int64)
        scores = self.late.maxsim(late_query, rows)
        if self.settings.name_weight and names and len(head) > 1:
            named = np.array([names.get(self.paths[row], 0.0) for row in rows])
            scores = scores + self.settings.name_weight * float(np.abs(scores).max()) * named
        order = np.argsort(-scores, kind="stable")
        floor = float(scores.min())
        reranked = [(head[i][0], float(scores[i]), head[i][2]) for i in order]
        return reranked + [(row, floor - 1e-6 * (n + 1), ranks) for n, (row, _, ranks) in enumerate(tail)]

    def _add_evidence(self, query_words: np.ndarray, rows: list[int], hits: list[Hit]) -> None:
        """MaxSim alignments of the query's words in each hit. The stored token vectors serve when they map to
        text; pooled vectors (pool_factor > 1) are means of several tokens, so the hits' text is encoded again,
        unpooled, and the evidence comes from those vectors."""
        stored = [self.late.token_data(row) for row in rows]
        pooled = (self.late.params.get("pool_factor") or 1) > 1
        missing = [i for i, (_, spans) in enumerate(stored) if pooled or len(spans) and (spans[:, 0] < 0).all()]
        if missing:
            fresh = self.late_document_encoder.encode_documents([hits[i].chunk.text for i in missing],
                                                       [hits[i].chunk.n_tokens for i in missing])
            for i, item in zip(missing, fresh):
                stored[i] = (item.vectors.astype(np.float32), item.spans)
        for hit, (vectors, spans) in zip(hits, stored):
            hit.evidence = maxsim_evidence(query_words, vectors, spans, hit.chunk.text)

    def chunk(self, chunk_id: str) -> Chunk | None:
        """The chunk with this id in this generation, or None."""
        if self._rows_by_id is None:
            self._rows_by_id = {cid: row for row, cid in enumerate(self.table.column("chunk_id").to_pylist())}
        row = self._rows_by_id.get(chunk_id)
        return None if row is None else store.chunk_from_record(store.chunk_record(self.table, row))

    def rows_of(self, paths: Sequence[str]) -> np.ndarray:
        """Sorted chunk rows of the indexed files that match any of `paths` (relative names or globs)."""
        files = self.manifest["files"]
        chosen = [rel for rel in files if any(rel == p or fnmatch.fnmatchcase(rel, p) for p in paths)]
        ranges = [np.arange(first, first + count) for first, count in (files[rel]["rows"] for rel in chosen)]
        return np.sort(np.concatenate(ranges)) if ranges else np.zeros(0, dtype=np.int64)

    def _hit(self, row: int, score: float, ranks: dict[str, int]) -> Hit:
        record = store.chunk_record(self.table, row)
        return Hit(chunk=store.chunk_from_record(record), chunk_id=record["chunk_id"], score=score, ranks=ranks)

    def _timed(self, stage: str, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
        return result
