"""The index folder: generations written beside the current one, switched atomically, one writer at a time.

Layout (all plain files; see docs/index-format.md):

    .ragkit/
      CURRENT           name of the live generation (replaced atomically)
      write.lock        held (flock) by the one process writing
      gen-000007/       a complete generation
        manifest.json   schema version, settings fingerprints, files → content hash and chunk rows
        chunks.parquet  one row per chunk: text and provenance
        dense/          vectors.npy (+ index.faiss for HNSW), params.json
        bm25/           bm25s arrays and vocabulary, ragkit.json
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ragkit.errors import IndexLockedError, IndexNotFoundError, RagkitError
from ragkit.ingest.document import Chunk

SCHEMA_VERSION = 1
CURRENT = "CURRENT"
LOCK = "write.lock"
MANIFEST = "manifest.json"
CHUNKS = "chunks.parquet"
GEN_PREFIX = "gen-"
TMP_SUFFIX = ".tmp"


def current_generation(root: Path) -> Path:
    """The live generation folder; raises IndexNotFoundError when there is none."""
    pointer = root / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {root} (run `ragkit index FOLDER` first, or pass --index)") from None
    folder = root / name
    if not (folder / MANIFEST).is_file():
        raise RagkitError(f"the index at {root} is damaged: generation {name} is missing; run `ragkit index` again")
    return folder


def read_manifest(generation: Path) -> dict[str, Any]:
    manifest = json.loads((generation / MANIFEST).read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RagkitError(
            f"the index at {generation.parent} has schema version {manifest.get('schema_version')}, "
            f"this ragkit reads version {SCHEMA_VERSION}; rebuild it with `ragkit index FOLDER --rebuild`")
    return manifest


@contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Hold the index's writer lock; a second writer gets IndexLockedError at once."""
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise IndexLockedError(
                f"the index at {root} is being written by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock, also when the process dies


class GenerationWriter:
    """Builds a new generation in a temporary folder; `commit` makes it the live one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        _remove_leftovers(root)
        self.name = f"{GEN_PREFIX}{_next_number(root):06d}"
        self.folder = root / (self.name + TMP_SUFFIX)
        self.folder.mkdir(parents=True)

    def write_chunks(self, table) -> None:
        """Write the chunk table (see `chunks_to_table`)."""
        import pyarrow.parquet as pq

        pq.write_table(table, self.folder / CHUNKS)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"schema_version": SCHEMA_VERSION, "generation": self.name, **manifest}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    def commit(self) -> Path:
        """fsync everything, rename into place, then switch CURRENT atomically."""
        _fsync_tree(self.folder)
        final = self.root / self.name
        os.rename(self.folder, final)
        pointer_tmp = self.root / (CURRENT + TMP_SUFFIX)
        with open(pointer_tmp, "w") as f:
            f.write(self.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.root / CURRENT)
        _fsync_dir(self.root)
        _drop_old_generations(self.root, keep={self.name})
        return final


def load_chunks(generation: Path):
    """The chunk table of a generation as a pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(generation / CHUNKS)


def chunk_record(table, row: int) -> dict[str, Any]:
    """One row of the chunk table as a dict."""
    return {name: table.column(name)[row].as_py() for name in table.column_names}


def chunk_schema():
    """Columns of chunks.parquet."""
    import pyarrow as pa

    return pa.schema([
        ("chunk_id", pa.string()),
        ("path", pa.string()),
        ("ordinal", pa.int32()),
        ("text", pa.large_string()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("start_line", pa.int32()),
        ("end_line", pa.int32()),
        ("page", pa.int32()),
        ("end_page", pa.int32()),
        ("heading", pa.string()),
        ("n_tokens", pa.int32()),
        ("page_breaks", pa.list_(pa.int32())),
    ])


def chunks_to_table(chunks: list[Chunk], chunk_ids: list[str]):
    """A pyarrow Table of `chunks` with the columns of `chunk_schema`."""
    import pyarrow as pa

    columns: dict[str, list] = {"chunk_id": chunk_ids}
    for name in Chunk.__dataclass_fields__:
        columns[name] = [getattr(c, name) for c in chunks]
    columns["page_breaks"] = [list(c.page_breaks) for c in chunks]
    return pa.table(columns, schema=chunk_schema())


def chunk_from_record(record: dict[str, Any]) -> Chunk:
    """Rebuild a Chunk from a row of the chunk table."""
    fields = {name: record[name] for name in Chunk.__dataclass_fields__}
    fields["page_breaks"] = tuple(record["page_breaks"] or ())
    return Chunk(**fields)


def _next_number(root: Path) -> int:
    numbers = [int(p.name[len(GEN_PREFIX):].split(".")[0]) for p in root.glob(GEN_PREFIX + "*")
               if p.name[len(GEN_PREFIX):].split(".")[0].isdigit()]
    return max(numbers, default=0) + 1


def _remove_leftovers(root: Path) -> None:
    """Delete what a killed writer left behind: unfinished generations and pointer files."""
    for path in root.glob("*" + TMP_SUFFIX):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _drop_old_generations(root: Path, keep: set[str]) -> None:
    """Keep the live generation and the one before it (a reader may still be loading it)."""
    generations = sorted(p for p in root.glob(GEN_PREFIX + "*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX))
    survivors = {p.name for p in generations[-2:]} | keep
    for path in generations:
        if path.name not in survivors:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
