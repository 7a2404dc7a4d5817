"""`ragkit index`: bring an index folder up to date with a documents folder, incrementally and atomically."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragkit import store
from ragkit.config import Settings
from ragkit.errors import RagkitError
from ragkit.ingest.document import Chunk, Skipped, SourceFile
from ragkit.models import model_revision, resolve_model_name
from ragkit.progress import Progress, ProgressEvent, silent

CHUNKER_VERSION = 1  # bump when chunk boundaries change for the same input


@dataclass
class IndexReport:
    """What one `index` run did."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    chunks: int = 0
    encoded_chunks: int = 0
    encoded_tokens: int = 0
    rebuilt: str | None = None  # why every file was re-encoded, when it was
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "chunks": self.chunks,
            "encoded_chunks": self.encoded_chunks,
            "encoded_tokens": self.encoded_tokens,
            "rebuilt": self.rebuilt,
            "seconds": round(self.seconds, 3),
        }


def fingerprint(settings: Settings) -> dict[str, Any]:
    """Everything that shapes chunks and vectors; a change re-encodes every file."""
    name = resolve_model_name(settings.dense_model)
    return {
        "dense_model": name,
        "dense_revision": model_revision(name),
        "chunk_tokens": settings.chunk_tokens,
        "chunker_version": CHUNKER_VERSION,
    }


def build_index(
    folder: Path,
    index_dir: Path,
    settings: Settings,
    progress: Progress = silent,
    rebuild: bool = False,
) -> IndexReport:
    """Index `folder` into `index_dir`; only new and changed files are parsed and encoded."""
    from ragkit.ingest.sources import scan_folder

    started = time.perf_counter()
    folder = folder.expanduser().resolve()
    index_dir = index_dir.expanduser().resolve()
    if not folder.is_dir():
        raise RagkitError(f"{folder} is not a folder; ragkit indexes folders of documents")
    with store.write_lock(index_dir):
        old = _previous(index_dir)
        if old and old["manifest"]["root"] != str(folder) and not rebuild:
            raise RagkitError(
                f"the index at {index_dir} holds {old['manifest']['root']}; "
                f"use --index DIR for another folder, or --rebuild to replace it")
        report = IndexReport()
        new_fingerprint = fingerprint(settings)
        if old and (rebuild or old["manifest"]["fingerprint"] != new_fingerprint):
            report.rebuilt = "--rebuild" if rebuild else _what_changed(old["manifest"]["fingerprint"], new_fingerprint)
            old = None

        progress(ProgressEvent("scan", 0, 1))
        scan = scan_folder(folder, exclude=[index_dir], max_file_bytes=int(settings.max_file_mb * 2**20))
        report.skipped.extend(scan.skipped)
        progress(ProgressEvent("scan", 1, 1))
        hashed = _hash_files(scan.files, report.skipped)

        manifest = old["manifest"] if old else {}
        old_files: dict[str, Any] = manifest.get("files", {})
        known_bad: dict[str, Any] = manifest.get("unparsable", {})
        changed: set[str] = set()
        for rel, (_, digest) in sorted(hashed.items()):
            if old_files.get(rel, {}).get("hash") == digest:
                report.unchanged += 1
            elif known_bad.get(rel, {}).get("hash") == digest:  # failed before, unchanged since: no retry
                report.skipped.append(Skipped(rel, known_bad[rel]["reason"]))
            else:
                changed.add(rel)
        unparsable = {s.path: known_bad[s.path] for s in report.skipped if s.path in known_bad}

        new_chunks, encoder = _parse_and_chunk(hashed, changed, settings, report, unparsable, progress)
        current = {rel for rel in hashed if rel in new_chunks or rel in old_files and rel not in changed}
        report.added = len(set(new_chunks) - set(old_files))
        report.updated = len(set(new_chunks) & set(old_files))
        report.removed = len(set(old_files) - current)
        report.skipped.sort(key=lambda s: s.path)
        skipped_json = [{"path": s.path, "reason": s.reason} for s in report.skipped]
        if old and not new_chunks and not report.removed and manifest.get("skipped") == skipped_json:
            report.chunks = manifest["stats"]["chunks"]
            report.seconds = time.perf_counter() - started
            return report

        vectors = _encode(encoder, new_chunks, settings, report, progress)
        hashed = {rel: hashed[rel] for rel in current}
        _write_generation(folder, index_dir, settings, new_fingerprint, old, hashed, new_chunks, vectors,
                          encoder, unparsable, report, progress)
        report.seconds = time.perf_counter() - started
        return report


def _previous(index_dir: Path) -> dict[str, Any] | None:
    """The live generation's manifest and folder, or None for a new (or unreadable old) index."""
    try:
        generation = store.current_generation(index_dir)
        return {"folder": generation, "manifest": store.read_manifest(generation)}
    except RagkitError:
        return None


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    return "changed settings: " + ", ".join(keys)


def _hash_files(files: list[SourceFile], skipped: list[Skipped]) -> dict[str, tuple[SourceFile, str]]:
    """Content hash of every readable file; unreadable ones join `skipped`."""
    out: dict[str, tuple[SourceFile, str]] = {}
    for source in files:
        try:
            data = source.path.read_bytes()
        except PermissionError:
            skipped.append(Skipped(source.rel, "permission denied"))
            continue
        except OSError as e:
            skipped.append(Skipped(source.rel, f"unreadable: {e.strerror or e}"))
            continue
        out[source.rel] = (source, hashlib.blake2b(data, digest_size=16).hexdigest())
    return out


def _parse_and_chunk(hashed, changed: set[str], settings: Settings, report: IndexReport,
                     unparsable: dict[str, Any], progress: Progress):
    """Parse and chunk the changed files; returns their chunks by path and the encoder (None if idle).

    Files that fail to parse join `report.skipped` and, with their hash, `unparsable`.
    """
    from ragkit.ingest.chunking import chunk_document
    from ragkit.ingest.parsers import ParseError, parse_file

    if not changed:
        return {}, None
    encoder = _load_encoder(settings)
    budget = min(settings.chunk_tokens, encoder.max_tokens) - encoder.special_tokens
    out: dict[str, list[Chunk]] = {}
    todo = sorted(changed)
    for i, rel in enumerate(todo):
        source, digest = hashed[rel]
        try:
            doc = parse_file(source.path)
        except ParseError as e:
            report.skipped.append(Skipped(rel, e.reason))
            unparsable[rel] = {"hash": digest, "reason": e.reason}
        else:
            out[rel] = chunk_document(doc, rel, encoder.token_starts, budget)
        progress(ProgressEvent("parse", i + 1, len(todo)))
    return out, encoder


def _load_encoder(settings: Settings):
    from ragkit.encoders.dense import DenseEncoder

    return DenseEncoder(settings.dense_model, device=settings.device)


def _encode(encoder, new_chunks: dict[str, list[Chunk]], settings: Settings, report: IndexReport,
            progress: Progress) -> dict[str, np.ndarray]:
    """Vectors for the new chunks, by path."""
    flat = [c for rel in sorted(new_chunks) for c in new_chunks[rel]]
    if not flat:
        return {}
    report.encoded_chunks = len(flat)
    report.encoded_tokens = sum(c.n_tokens for c in flat)
    vectors = encoder.encode_documents(
        [c.text for c in flat],
        [c.n_tokens for c in flat],
        batch_tokens=settings.encode_batch_tokens,
        progress=lambda done, total, tokens: progress(ProgressEvent("encode", done, total, tokens)),
    )
    out, row = {}, 0
    for rel in sorted(new_chunks):
        n = len(new_chunks[rel])
        out[rel] = vectors[row : row + n]
        row += n
    return out


def _chunk_id(rel: str, digest: str, ordinal: int) -> str:
    return hashlib.blake2b(f"{rel}\0{digest}\0{ordinal}".encode(), digest_size=8).hexdigest()


def _write_generation(folder, index_dir, settings, new_fingerprint, old, hashed, new_chunks, new_vectors,
                      encoder, unparsable, report: IndexReport, progress: Progress) -> None:
    """Assemble kept and new rows in path order, build the indexes, write and switch generations."""
    import pyarrow as pa

    from ragkit.indexes.bm25 import LexicalIndex
    from ragkit.indexes.faiss_index import DenseIndex, load_vectors

    old_table = store.load_chunks(old["folder"]) if old else None
    old_vectors = load_vectors(old["folder"] / "dense") if old else None
    old_files = old["manifest"]["files"] if old else {}

    writer = store.GenerationWriter(index_dir)
    tables, vector_parts, files, row = [], [], {}, 0
    for rel in sorted(hashed):
        source, digest = hashed[rel]
        if rel in new_chunks:
            chunks = new_chunks[rel]
            tables.append(store.chunks_to_table(chunks, [_chunk_id(rel, digest, c.ordinal) for c in chunks]))
            vector_parts.append(new_vectors.get(rel, np.zeros((0, _dim(encoder, old_vectors)), np.float32)))
            n, tokens = len(chunks), sum(c.n_tokens for c in chunks)
        else:
            first, n = old_files[rel]["rows"]
            tables.append(old_table.slice(first, n))
            vector_parts.append(np.asarray(old_vectors[first : first + n]))
            tokens = old_files[rel]["tokens"]
        files[rel] = {"hash": digest, "size": source.size, "rows": [row, n], "tokens": tokens}
        row += n

    progress(ProgressEvent("write", 0, 3))
    schema = store.chunk_schema()
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    dim = _dim(encoder, old_vectors)
    vectors = np.concatenate(vector_parts) if vector_parts else np.zeros((0, dim), np.float32)
    writer.write_chunks(table)
    DenseIndex.build(vectors, settings.dense_exact_max).save(writer.folder / "dense")
    progress(ProgressEvent("write", 1, 3))
    LexicalIndex.build(table.column("text").to_pylist()).save(writer.folder / "bm25")
    progress(ProgressEvent("write", 2, 3))
    report.chunks = table.num_rows
    dense_info = encoder.fingerprint() if encoder else old["manifest"]["models"]["dense"]
    writer.write_manifest({
        "created": store.now_iso(),
        "root": str(folder),
        "fingerprint": new_fingerprint,
        "models": {"dense": dense_info},
        "settings": {"chunk_tokens": settings.chunk_tokens, "dense_exact_max": settings.dense_exact_max},
        "files": files,
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        "unparsable": unparsable,
        "stats": {"files": len(files), "chunks": table.num_rows, "tokens": sum(f["tokens"] for f in files.values())},
        "last_run": {k: v for k, v in report.to_json().items() if k != "skipped"},
    })
    writer.commit()
    progress(ProgressEvent("write", 3, 3))


def _dim(encoder, old_vectors) -> int:
    return encoder.dim if encoder is not None else int(old_vectors.shape[1])
