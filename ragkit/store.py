"""The index folder: generations written beside the current one, switched atomically, one writer at a time.

Layout (all plain files; see docs/index-format.md):

    .ragkit/
      CURRENT           name of the live generation (replaced atomically)
      write.lock        held (flock) by the one process writing; says "pid N" while N writes
      gen-000006/       the generation before the live one, kept for readers that opened it just before the switch
      gen-000007/       the live generation
        manifest.json   schema version, settings and stage fingerprints, models, files → content hash and chunk rows
        chunks.parquet  one row per chunk: text and provenance
        dense/          vectors.npy (+ index.faiss for HNSW), params.json
        bm25/           bm25s arrays and vocabulary, ragkit.json
        late/           token vectors, spans, offsets, params.json (+ plaid/ and plaid_rows.npy); absent without
                        a late stage
      gen-000008.tmp/   a generation being written (renamed to gen-000008/ when complete)

Rules: only the holder of write.lock changes the folder. A new generation is numbered above every one present. On
taking the lock and again after its switch, the writer removes its own unfinished entries (gen-N.tmp, CURRENT.tmp)
and every generation but the live one and the one before it (the one it replaced, kept for readers that opened it
just before the switch). Nothing else in the folder is touched, and a folder that holds anything else and no index
is refused as an index folder.

Test hook: RAGKIT_DEBUG_COMMIT_PAUSE=SECONDS makes `GenerationWriter.commit` sleep that long after the rename and
again after the switch, so that a test can kill a writer inside those windows.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ragkit.errors import IndexLockedError, IndexNotFoundError, RagkitError
from ragkit.ingest.document import Chunk
from ragkit.progress import Progress, ProgressEvent, silent

SCHEMA_VERSION = 1
CURRENT = "CURRENT"
LOCK = "write.lock"
MANIFEST = "manifest.json"
CHUNKS = "chunks.parquet"
GEN_PREFIX = "gen-"
TMP_SUFFIX = ".tmp"
COMMIT_PAUSE_ENV = "RAGKIT_DEBUG_COMMIT_PAUSE"


def current_generation(root: Path) -> Path:
    """The live generation folder; raises IndexNotFoundError when there is none."""
    pointer = root / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        raise IndexNotFoundError(f"no index at {root} (run `ragkit index FOLDER` first, or pass --index)") from None
    except NotADirectoryError:
        raise IndexNotFoundError(f"{root} is a file, not an index folder (pass --index with a folder)") from None
    folder = root / name
    if not (folder / MANIFEST).is_file():
        raise RagkitError(f"the index at {root} is damaged: generation {name} is missing; run `ragkit index` again")
    return folder


@contextmanager
def reading(generation: Path) -> Iterator[None]:
    """Read a generation's files: a file missing, cut short or garbled becomes one message that says the index is
    damaged and how to rebuild it (a file that cannot be read for its permissions says so)."""
    try:
        yield
    except PermissionError as e:
        raise RagkitError(f"cannot read the index at {generation.parent} ({e.strerror.lower()}: {e.filename})") \
            from None
    except (OSError, ValueError) as e:  # pyarrow's and json's errors on a damaged file are ValueErrors
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RagkitError(f"the index at {generation.parent} is damaged ({generation.name}: {detail}); rebuild it "
                          "with `ragkit index FOLDER --rebuild`") from None


def read_manifest(generation: Path) -> dict[str, Any]:
    with reading(generation):
        manifest = json.loads((generation / MANIFEST).read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RagkitError(
            f"the index at {generation.parent} has schema version {manifest.get('schema_version')}, "
            f"this ragkit reads version {SCHEMA_VERSION}; rebuild it with `ragkit index FOLDER --rebuild`")
    return manifest


@contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Hold the index's writer lock; a second writer gets IndexLockedError at once, naming the holder.

    The lock file says "pid N" only while N holds the lock. Taking it, the holder first removes what a killed
    writer left behind (`prune_generations`).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK, "a+")  # closing releases the lock, also when the process dies
    except FileExistsError:
        raise RagkitError(f"{root} is a file, not an index folder; pass --index with a folder") from None
    except PermissionError as e:
        raise RagkitError(f"cannot write the index at {root} ({e.strerror.lower()}: {e.filename})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexLockedError(
                f"the index at {root} is being written by {_holder(handle)}; wait for it to finish") from None
        try:
            _write_holder(handle, f"pid {os.getpid()}")
            prune_generations(root)
            yield
        finally:
            _write_holder(handle, "")


def check_index_folder(root: Path, documents: Path, own: Callable[[str], bool] | None = None) -> None:
    """Refuse `root` as the index folder of `documents` when it is that folder, or a file, or a folder that holds
    something else and no index (an index writes only its own names there: `own(name)`, default `is_own_name`)."""
    if root == documents:
        raise RagkitError(f"the index folder cannot be the folder it indexes ({root}); pass --index with another "
                          "folder (one inside it is fine: it is skipped)")
    if root.exists() and not root.is_dir():
        raise RagkitError(f"{root} is a file, not an index folder; pass --index with a folder")
    if not root.is_dir():
        return
    own = own or is_own_name
    try:
        foreign = sorted(p.name for p in root.iterdir() if not own(p.name))
    except PermissionError as e:
        raise RagkitError(f"cannot read the index folder {root} ({e.strerror.lower()})") from None
    if foreign and not (root / CURRENT).is_file():
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise RagkitError(f"{root} holds other files ({shown}) and no ragkit index; pass --index with a new or "
                          "empty folder, so that nothing of yours is overwritten")


def is_own_name(name: str) -> bool:
    """Whether an index folder's entry `name` is one ragkit writes there."""
    return name in (CURRENT, LOCK, CURRENT + TMP_SUFFIX) or _is_generation(name.removesuffix(TMP_SUFFIX))


def _write_holder(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def _holder(handle) -> str:
    """Who holds the lock, by the lock file; text naming a dead process (a killed holder's, read in the instant
    before the new holder replaces it) is not reported."""
    handle.seek(0)
    text = handle.read().strip()
    pid = text.removeprefix("pid ")
    if text.startswith("pid ") and pid.isdigit() and _alive(int(pid)):
        return text
    return "another process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def prune_generations(root: Path) -> None:
    """Remove every `*.tmp` entry and every generation but the live one and the one before it: what a killed
    writer left, and what readers no longer need. Only the lock holder may call this.

    "The one before" is the highest-numbered generation below the live one: a new generation is numbered above
    every one present, so one numbered above the live one was renamed into place but never switched to (no
    reader can have opened it), and one below the one before has had a whole run to be released by readers.
    """
    for path in root.glob(GEN_PREFIX + "*" + TMP_SUFFIX):
        if _is_generation(path.name.removesuffix(TMP_SUFFIX)):
            _remove(path)
    (root / (CURRENT + TMP_SUFFIX)).unlink(missing_ok=True)
    live = _live_name(root)
    if live is None and (root / CURRENT).exists():
        return  # a damaged pointer: leave the generations for the user to inspect
    numbers = _generation_numbers(root)
    below = [n for n in numbers.values() if live is not None and n < _number(live)]
    keep = {live, _name(max(below)) if below else None}
    for name in numbers:
        if name not in keep:
            _remove(root / name)


class GenerationWriter:
    """Builds a new generation in a temporary folder; `commit` makes it the live one. Hold `write_lock`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = _name(max(_generation_numbers(root).values(), default=0) + 1)
        self.folder = root / (self.name + TMP_SUFFIX)
        self.folder.mkdir(parents=True)

    def write_chunks(self, table) -> None:
        """Write the chunk table (see `chunks_to_table`)."""
        import pyarrow.parquet as pq

        pq.write_table(table, self.folder / CHUNKS)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"schema_version": SCHEMA_VERSION, "generation": self.name, **manifest}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    def commit(self, progress: Progress = silent) -> Path:
        """fsync everything, rename into place, switch CURRENT atomically, then remove the generations before the
        one this replaces. Reports ("switch", 0, 1) after the rename and ("switch", 1, 1) after the switch."""
        _fsync_tree(self.folder)
        final = self.root / self.name
        os.rename(self.folder, final)
        _fsync_dir(self.root)
        progress(ProgressEvent("switch", 0, 1))
        _debug_pause()
        _switch_current(self.root, self.name)
        progress(ProgressEvent("switch", 1, 1))
        _debug_pause()
        prune_generations(self.root)
        return final


def _switch_current(root: Path, name: str) -> None:
    """Point CURRENT at `name`: write CURRENT.tmp, fsync it, rename it over CURRENT, fsync the folder."""
    pointer_tmp = root / (CURRENT + TMP_SUFFIX)
    with open(pointer_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / CURRENT)
    _fsync_dir(root)


def _debug_pause() -> None:
    seconds = os.environ.get(COMMIT_PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def load_chunks(generation: Path):
    """The chunk table of a generation as a pyarrow Table."""
    import pyarrow.parquet as pq

    with reading(generation):
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


def _name(number: int) -> str:
    return f"{GEN_PREFIX}{number:06d}"


def _number(name: str) -> int:
    return int(name[len(GEN_PREFIX):])


def _generation_numbers(root: Path) -> dict[str, int]:
    """Every renamed (finished) generation folder by name, with its number."""
    return {p.name: _number(p.name) for p in root.glob(GEN_PREFIX + "*") if p.is_dir() and _is_generation(p.name)}


def _live_name(root: Path) -> str | None:
    """The name CURRENT holds, or None when there is no (well-formed) CURRENT."""
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return name if _is_generation(name) else None


def _is_generation(name: str) -> bool:
    """Whether `name` is a generation's (gen-N)."""
    return name.startswith(GEN_PREFIX) and name[len(GEN_PREFIX):].isdigit()


def _remove(path: Path) -> None:
    """Delete a file or folder; what cannot be deleted now is left for the next run to retry."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
