"""An index's vectors served from Qdrant: `ragkit export qdrant` copies each chunk's dense vector (a named vector)
and ColBERT token vectors (a multivector compared by MAX_SIM) with its place as payload; `search --backend qdrant`
asks Qdrant for the dense and late candidates instead of the local FAISS and MaxSim structures.

Point ids are the chunk ids (64-bit hashes of path, file hash and ordinal), so a re-export upserts the chunks that
are new and deletes those that are gone. The collection's metadata records the fingerprints of the index's dense
and late stages: when they differ (another model), the collection is made afresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ragkit import store
from ragkit.errors import RagkitError, warn
from ragkit.indexes.base import SearchResults
from ragkit.progress import Progress, ProgressEvent, silent

DENSE, LATE = "dense", "late"
UPSERT_BATCH = 64
SCROLL_BATCH = 1024
PAYLOAD = ("path", "start_line", "end_line", "page", "end_page", "heading", "text", "chunk_id")


def open_client(path: str | Path | None = None, url: str | None = None):
    """A Qdrant client: local mode in the folder `path` (no server), or the server at `url`."""
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise RagkitError("Qdrant support is not installed: pip install 'ragkit[qdrant]'") from None
    if (path is None) == (url is None):
        raise RagkitError("name one Qdrant: a folder for local mode (qdrant_path=DIR) or a server "
                          "(qdrant_url=URL)", settings=("qdrant_path", "qdrant_url"))
    if url is not None:
        return QdrantClient(url=url)
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as e:  # local mode locks its folder for one client
        raise RagkitError(f"cannot open the Qdrant folder {path}: {e}") from None


def point_id(chunk_id: str) -> int:
    """A chunk id (16 hex digits) as a Qdrant point id.

    >>> point_id("00000000000000ff")
    255
    """
    return int(chunk_id, 16)


@dataclass
class ExportReport:
    """What one export did."""

    collection: str
    points: int = 0  # points in the collection after the export
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0
    recreated: str | None = None  # why the collection was made afresh, when it was
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"collection": self.collection, "points": self.points, "upserted": self.upserted,
                "deleted": self.deleted, "unchanged": self.unchanged, "recreated": self.recreated,
                "seconds": round(self.seconds, 3)}


def export(generation: Path, client: Any, collection: str, progress: Progress = silent) -> ExportReport:
    """Bring `collection` up to date with the index generation `generation`: upsert its new chunks, delete the
    points of chunks it no longer has."""
    from qdrant_client import models

    from ragkit.indexes.late import LateIndex

    started = time.perf_counter()
    manifest = store.read_manifest(generation)
    table = store.load_chunks(generation)
    dense = np.load(generation / "dense" / "vectors.npy", mmap_mode="r", allow_pickle=False)
    late = LateIndex.load(generation / "late") if manifest["models"].get("late") else None
    stamp = collection_stamp(manifest)
    report = ExportReport(collection)
    report.recreated = _prepare(client, collection, stamp, dense.shape[1],
                                manifest["models"]["late"]["dim"] if late is not None else None)
    wanted = {point_id(cid): row for row, cid in enumerate(table.column("chunk_id").to_pylist())}
    present = _point_ids(client, collection)
    gone = sorted(present - wanted.keys())
    new = [(pid, row) for pid, row in wanted.items() if pid not in present]
    report.unchanged = len(wanted) - len(new)
    if gone:
        client.delete(collection, points_selector=models.PointIdsList(points=gone))
    report.deleted = len(gone)
    columns = {name: table.column(name).to_pylist() for name in PAYLOAD}
    for start in range(0, len(new), UPSERT_BATCH):
        batch = new[start : start + UPSERT_BATCH]
        points = []
        for pid, row in batch:
            vector: dict[str, Any] = {DENSE: np.asarray(dense[row], dtype=np.float32).tolist()}
            if late is not None:
                vector[LATE] = late.token_data(row)[0].tolist()
            points.append(models.PointStruct(id=pid, vector=vector,
                                             payload={name: columns[name][row] for name in PAYLOAD}))
        client.upsert(collection, points=points)
        report.upserted += len(batch)
        progress(ProgressEvent("export", report.upserted, len(new)))
    client.update_collection(collection, metadata={"ragkit": stamp})  # complete: searchable from now on
    report.points = client.count(collection, exact=True).count
    report.seconds = time.perf_counter() - started
    return report


def _prepare(client: Any, collection: str, stamp: dict[str, Any], dense_dim: int, late_dim: int | None) -> str | None:
    """Make `collection` ready for vectors of these stages; why it was made afresh, or None when kept."""
    from qdrant_client import models

    reason = None
    if client.collection_exists(collection):
        metadata = client.get_collection(collection).config.metadata or {}
        if metadata.get("ragkit") == stamp:
            return None
        reason = "the index's models or chunks differ from the collection's" if metadata.get("ragkit") else \
            "the collection was not made by a finished ragkit export"
        client.delete_collection(collection)
    vectors = {DENSE: models.VectorParams(size=dense_dim, distance=models.Distance.DOT)}  # unit vectors: cosine
    if late_dim is not None:
        vectors[LATE] = models.VectorParams(size=late_dim, distance=models.Distance.DOT,
                                            multivector_config=models.MultiVectorConfig(
                                                comparator=models.MultiVectorComparator.MAX_SIM))
    client.create_collection(collection, vectors_config=vectors, metadata={"ragkit": None})  # stamped when done
    return reason


def collection_stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a collection's vectors and payloads depend on: the index's chunk, dense and late fingerprints (chunk ids
    do not change when files are chunked anew)."""
    return {stage: manifest["fingerprint"][stage] for stage in ("chunks", "dense", "late")}


def _point_ids(client: Any, collection: str) -> set[int]:
    ids: set[int] = set()
    offset = None
    while True:
        records, offset = client.scroll(collection, limit=SCROLL_BATCH, offset=offset, with_payload=False,
                                        with_vectors=False)
        ids.update(int(r.id) for r in records)
        if offset is None:
            return ids


class QdrantCandidates:
    """Dense and late candidates from a Qdrant collection, as rows of the local chunk table (the hits, their
    fusion, re-ranking and evidence stay local)."""

    def __init__(self, client: Any, collection: str, chunk_ids: Sequence[str], stamp: dict[str, Any]) -> None:
        if not client.collection_exists(collection):
            raise RagkitError(f"there is no Qdrant collection '{collection}'; make it with `ragkit export qdrant`")
        metadata = client.get_collection(collection).config.metadata or {}
        if metadata.get("ragkit") != stamp:
            raise RagkitError(f"the Qdrant collection '{collection}' holds vectors of other models or chunks than "
                              "this index's, or an export that did not finish; bring it up to date with "
                              "`ragkit export qdrant`")
        self.client, self.collection = client, collection
        self.rows = {point_id(cid): row for row, cid in enumerate(chunk_ids)}
        self.points = {row: pid for pid, row in self.rows.items()}
        self.stale = 0  # points of chunks the local index no longer has (an export is due)

    def dense(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> SearchResults:
        return [self._query(np.asarray(q, dtype=np.float32).tolist(), DENSE, k, rows) for q in queries]

    def late(self, queries: Sequence[np.ndarray], k: int, rows: np.ndarray | None = None) -> SearchResults:
        return [self._query(np.asarray(q, dtype=np.float32).tolist(), LATE, k, rows) for q in queries]

    def _query(self, vector: Any, using: str, k: int, rows: np.ndarray | None) -> list[tuple[int, float]]:
        from qdrant_client import models

        where = None
        if rows is not None:
            where = models.Filter(must=[models.HasIdCondition(has_id=[self.points[int(r)] for r in rows])])
        # twice as many as asked: chunks tied at the cut are then taken in row order, as the local search does
        found = self.client.query_points(self.collection, query=vector, using=using, limit=2 * k, query_filter=where,
                                         with_payload=False, with_vectors=False).points
        out = []
        for point in found:
            row = self.rows.get(int(point.id))
            if row is None:
                if not self.stale:
                    warn(f"the Qdrant collection '{self.collection}' holds chunks this index no longer has; bring "
                         "it up to date with `ragkit export qdrant`")
                self.stale += 1
            else:
                out.append((row, float(point.score)))
        return sorted(out, key=lambda hit: (-hit[1], hit[0]))[:k]
