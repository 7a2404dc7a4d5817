"""`ragkit index`: bring an index folder up to date with a documents folder, incrementally and atomically.

Three stages, each with its own fingerprint in the manifest:
- chunks: chunk size, the tokens of context (document name and heading path) read before each chunk, and the
  tokenizers that measure them; a change re-chunks and re-encodes every file;
- dense: the single-vector model, and its backend when not torch (onnx, onnx-int8); a change re-encodes the dense
  vectors of every chunk, nothing else;
- late: the ColBERT model and token pooling; a change re-encodes the token vectors of every chunk.
Within a stage, content hashes decide which files are parsed and encoded again.

Parsing and encoding go through an engine (ragkit.engines: this process by default, or a Ray cluster); this module
alone writes the generation.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ragkit import store
from ragkit.config import DEFAULT_DENSE_MODEL, DEFAULT_LATE_MODEL, Settings
from ragkit.engines import ChunkSpec, Engine, LocalEngine, ParsedFile
from ragkit.errors import RagkitError
from ragkit.ingest.context import SEPARATOR, chunk_context, contextual_texts
from ragkit.ingest.document import Chunk, Skipped, SourceFile, content_hash
from ragkit.fingerprints import fingerprints, recorded_settings, unresolved
from ragkit.models import embedded_dense_model, resolve_model_name
from ragkit.progress import Progress, ProgressEvent, silent

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
    late_encoded_chunks: int = 0
    rebuilt: str | None = None  # why every chunk was encoded again, when it was
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    COUNTS = ("added", "updated", "removed", "unchanged", "chunks", "encoded_chunks", "encoded_tokens",
              "late_encoded_chunks", "seconds")  # what adds up over runs (the shards of one run)

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
            "late_encoded_chunks": self.late_encoded_chunks,
            "rebuilt": self.rebuilt,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Plan:
    """Which stages must encode every chunk (not only those of new and changed files)."""

    dense_all: bool = False
    late_all: bool = False


@dataclass
class _Changes:
    """How the files found compare with the previous generation."""

    unchanged: int
    changed: set[str]  # new or edited files, to parse and encode
    known_bad: list[Skipped]  # files that failed to parse before and have not changed since
    unparsable: dict[str, Any]  # their manifest records


def _compare(hashed: dict[str, tuple[SourceFile, str]], manifest: dict[str, Any]) -> _Changes:
    old_files: dict[str, Any] = manifest.get("files", {})
    bad: dict[str, Any] = manifest.get("unparsable", {})
    changes = _Changes(0, set(), [], {})
    for rel, (_, digest) in sorted(hashed.items()):
        if old_files.get(rel, {}).get("hash") == digest:
            changes.unchanged += 1
        elif bad.get(rel, {}).get("hash") == digest:  # failed before, unchanged since: no retry
            changes.known_bad.append(Skipped(rel, bad[rel]["reason"]))
            changes.unparsable[rel] = bad[rel]
        else:
            changes.changed.add(rel)
    return changes


def build_index(
    folder: Path,
    index_dir: Path,
    settings: Settings,
    progress: Progress = silent,
    rebuild: bool = False,
    accept: Callable[[str], bool] | None = None,
    exclude: Sequence[Path] = (),
    engine: Engine | None = None,
) -> IndexReport:
    """Index `folder` into `index_dir`; only new and changed files are parsed and encoded.

    Settings left unset keep what the existing index was built with (see `Settings.for_index`). `accept`: only
    the files whose relative path it accepts (a shard's part of the folder); `exclude`: folders not scanned besides
    `index_dir`; `engine`: where files are parsed and chunks encoded (default: this process).
    """
    from ragkit.ingest.sources import printable_path, scan_folder

    started = time.perf_counter()
    engine = engine or LocalEngine()
    folder = documents_folder(folder)
    index_dir = index_dir.expanduser().resolve()
    if accept is None:  # a shard's folder is checked with its index's (ragkit.shards)
        store.check_index_folder(index_dir, folder)
    with store.write_lock(index_dir):
        previous = _previous(index_dir)
        if previous and previous["manifest"]["root"] != str(folder) and not rebuild:
            raise RagkitError(
                f"the index at {index_dir} holds {previous['manifest']['root']}; "
                f"use --index DIR for another folder, or --rebuild to replace it")
        report = IndexReport()
        encoders = _Encoders(settings.for_index(recorded_settings(previous["manifest"]) if previous else None),
                             dense_named=settings.dense_model is not None, late_named=settings.late_model is not None,
                             report=report)
        before: dict[str, Any] = previous["manifest"]["files"] if previous and not rebuild else {}  # for the counts

        progress(ProgressEvent("scan", 0, 1))
        scan = scan_folder(folder, exclude=[index_dir, *exclude],
                           max_file_bytes=int(encoders.settings.max_file_mb * 2**20),
                           follow_links=encoders.settings.follow_links)
        if accept is not None:
            scan.files = [f for f in scan.files if accept(f.rel)]
            scan.skipped = [s for s in scan.skipped if accept(s.path)]
        report.skipped.extend(Skipped(printable_path(s.path), s.reason) for s in scan.skipped)
        progress(ProgressEvent("scan", 1, 1))
        hashed = _hash_files(_storable(scan.files, report.skipped), report.skipped)

        new_fp, old, plan, changes = _plan_run(previous, hashed, encoders, rebuild, report)
        report.unchanged = changes.unchanged
        report.skipped.extend(changes.known_bad)
        unparsable = dict(changes.unparsable)

        new_chunks = _parse_and_chunk(hashed, changes.changed, encoders, report, unparsable, progress, engine)
        old_files: dict[str, Any] = old["manifest"]["files"] if old else {}
        current = {rel for rel in hashed if rel in new_chunks or rel in old_files and rel not in changes.changed}
        report.added = len(set(new_chunks) - set(before))
        report.updated = len(set(new_chunks) & set(before))
        report.removed = len(set(before) - current)
        report.skipped.sort(key=lambda s: s.path)
        if not current:
            report.warnings.append(f"no documents to index in {folder}" + (
                f" ({len(report.skipped)} skipped)" if report.skipped else ""))
        skipped_json = [{"path": s.path, "reason": s.reason} for s in report.skipped]
        nothing_to_do = not new_chunks and not report.removed and not plan.dense_all and not plan.late_all
        manifest = old["manifest"] if old else {}
        same_stage = not new_fp["late"] or recorded_settings(manifest)["late_candidates"] == \
            encoders.settings.late_candidates  # another candidate stage is a new generation (vectors reused)
        if old and nothing_to_do and manifest.get("skipped") == skipped_json and manifest["fingerprint"] == new_fp \
                and same_stage:
            report.chunks = manifest["stats"]["chunks"]
            report.seconds = time.perf_counter() - started
            return report

        hashed = {rel: hashed[rel] for rel in current}
        _write_generation(folder, index_dir, new_fp, old, plan, hashed, new_chunks, encoders, unparsable, report,
                          progress, started, engine)
        report.seconds = time.perf_counter() - started
        return report


def _plan_run(previous, hashed, encoders: "_Encoders", rebuild: bool, report: IndexReport):
    """This run's fingerprint and what it reuses of the `previous` generation: (fingerprint, old or None, plan,
    changes). When anything must be encoded, the models load first (a hub model downloads), so that the
    fingerprint names what was really loaded rather than a revision still unknown."""
    fingerprint = fingerprints(encoders.settings)
    old, plan = _reuse_plan(previous, fingerprint, rebuild, report)
    changes = _compare(hashed, old["manifest"] if old else {})
    if changes.changed or plan.dense_all or plan.late_all or unresolved(fingerprint) or not previous:
        encoders.load()
        resolved = fingerprints(encoders.settings)  # a model fell back, or its revision is known now
        if resolved != fingerprint:
            fingerprint, report.rebuilt = resolved, None
            old, plan = _reuse_plan(previous, fingerprint, rebuild, report)
            changes = _compare(hashed, old["manifest"] if old else {})
    return fingerprint, old, plan, changes


def _reuse_plan(old, new_fp: dict[str, Any], rebuild: bool, report: IndexReport):
    """Decide what of the old generation can be reused; returns (old or None, plan)."""
    if not old:
        return None, _Plan()
    old_fp = old["manifest"].get("fingerprint", {})
    if rebuild:
        report.rebuilt = "--rebuild"
        return None, _Plan()
    if not _chunks_still_valid(old_fp.get("chunks"), new_fp["chunks"]):
        changed = [key for key, value in new_fp["chunks"].items() if (old_fp.get("chunks") or {}).get(key) != value]
        report.rebuilt = "changed chunk settings: " + ", ".join(changed)
        return None, _Plan()
    plan = _Plan(dense_all=old_fp.get("dense") != new_fp["dense"],
                 late_all=new_fp["late"] is not None and old_fp.get("late") != new_fp["late"])
    stale = [name for name, redo in (("dense model", plan.dense_all), ("late model", plan.late_all)) if redo]
    if stale:
        report.rebuilt = "changed " + " and ".join(stale)
    return old, plan


def _chunks_still_valid(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Same chunks; turning late interaction off keeps chunks that also fit the late tokenizer."""
    if old is None:
        return False
    old = {"context_tokens": 0, **old}  # made before contextual chunks
    if new["late_tokenizer"] is None:
        return {**old, "late_tokenizer": None} == new
    return old == new


def documents_folder(folder: Path) -> Path:
    """`folder` resolved, or a clear error when it does not exist or is not a folder."""
    folder = folder.expanduser().resolve()
    if not folder.exists():
        raise RagkitError(f"{folder} does not exist; ragkit indexes folders of documents")
    if not folder.is_dir():
        raise RagkitError(f"{folder} is not a folder; ragkit indexes folders of documents")
    return folder


def _previous(index_dir: Path) -> dict[str, Any] | None:
    """The live generation's manifest and folder, or None for a new (or unreadable old) index."""
    try:
        generation = store.current_generation(index_dir)
        return {"folder": generation, "manifest": store.read_manifest(generation)}
    except RagkitError:
        return None


def _storable(files: list[SourceFile], skipped: list[Skipped]) -> list[SourceFile]:
    """The files whose names can be stored and printed; names that are not valid UTF-8 join `skipped`."""
    from ragkit.ingest.sources import printable_path

    kept = []
    for source in files:
        if printable_path(source.rel) == source.rel:
            kept.append(source)
        else:
            skipped.append(Skipped(printable_path(source.rel), "file name is not valid UTF-8 (rename it to index it)"))
    return kept


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
        out[source.rel] = (source, content_hash(data))
    return out


class _Encoders:
    """The models of this run, loaded on first use (a run with nothing to encode loads none).

    `settings` are the run's resolved settings. A default model the user did not name may be out of reach
    (offline and not cached): then the dense stage uses the embedded all-MiniLM-L6-v2 (`dense_fallback` keeps
    the reason) and the late stage is skipped (`late_skipped`); `settings` change to match and the report
    says so. A model the user named must load.
    """

    def __init__(self, settings: Settings, dense_named: bool, late_named: bool, report: IndexReport) -> None:
        self.settings = settings
        self.dense_named = dense_named
        self.late_named = late_named
        self.report = report
        self.dense_fallback: str | None = None
        self.late_skipped: str | None = None
        self._dense = None
        self._late = None

    def load(self) -> None:
        """Load every model this run uses now (downloading what is missing)."""
        self.dense
        self.late

    @property
    def dense(self):
        if self._dense is None:
            from ragkit.encoders.dense import DenseEncoder
            from ragkit.errors import ModelLoadError

            try:
                self._dense = DenseEncoder(self.settings.dense_model, self.settings.device,
                                           self.settings.dense_backend)
            except ModelLoadError as e:
                embedded = embedded_dense_model()
                if self.dense_named or self.settings.dense_model != DEFAULT_DENSE_MODEL or embedded is None:
                    raise
                self.dense_fallback = str(e).splitlines()[0]
                self.settings = self.settings.replace(dense_model=embedded)
                self.report.warnings.append(
                    f"the default dense model could not be loaded ({self.dense_fallback}); using the embedded "
                    "all-MiniLM-L6-v2 instead; pass --dense-model to choose another")
                self._dense = DenseEncoder(embedded, self.settings.device, self.settings.dense_backend)
        return self._dense

    @property
    def late(self):
        if self._late is None and self.settings.late:
            from ragkit.encoders.late import LateEncoder
            from ragkit.errors import ModelLoadError

            try:
                self._late = LateEncoder(self.settings.late_model,
                                         self.settings.chunk_tokens + LateEncoder.SPECIAL_TOKENS,
                                         device=self.settings.device)
            except ModelLoadError as e:
                if self.late_named or self.settings.late_model != DEFAULT_LATE_MODEL:
                    raise
                self._skip_late(str(e).splitlines()[0])
            else:
                if self._late.projection == "identity":
                    self.report.warnings.append(self._late.projection_note)
        return self._late

    def _skip_late(self, reason: str) -> None:
        self.late_skipped = reason
        self.settings = self.settings.replace(late=False)
        self.report.warnings.append(f"late interaction skipped ({reason}); pass --late-model /path/to/a/model, "
                                    "or --no-late to silence this")

    @property
    def context_tokens(self) -> int:
        """Tokens the dense encoder reads before each chunk (its context): the setting, at most a quarter of what
        the encoder reads."""
        return min(self.settings.context_tokens, (self.dense.max_tokens - self.dense.special_tokens) // 4)

    def chunk_budget(self) -> int:
        """Most tokens a chunk may hold so that every encoder reads it whole, the dense one with the chunk's
        context before it (the late one reads that much)."""
        budget = min(self.settings.chunk_tokens,
                     self.dense.max_tokens - self.dense.special_tokens - self.context_tokens)
        if self.late is not None:
            budget = min(budget, self.late.document_length - self.late.special_tokens)
            self.late.fit_to_chunks(budget)
        return budget

    def chunk_spec(self) -> ChunkSpec:
        """How this run cuts files into chunks (its tokenizers and chunk budget)."""
        budget = self.chunk_budget()
        late = (self.late.tokenizer,) if self.late is not None else ()
        return ChunkSpec((self.dense.tokenizer, *late), budget)


def _parse_and_chunk(hashed, changed: set[str], encoders: _Encoders, report: IndexReport,
                     unparsable: dict[str, Any], progress: Progress, engine: Engine) -> dict[str, list[Chunk]]:
    """Parse and chunk the changed files, by path, through `engine`.

    Files that fail to parse join `report.skipped` and, with their hash, `unparsable`.
    """
    if not changed:
        return {}
    spec = encoders.chunk_spec()
    todo = sorted(changed)
    progress(ProgressEvent("parse", 0, len(todo)))
    parsed: dict[str, ParsedFile] = {}
    for result in engine.parse([(rel, hashed[rel][0].path) for rel in todo], spec):
        parsed[result.rel] = result
        progress(ProgressEvent("parse", len(parsed), len(todo)))
    out: dict[str, list[Chunk]] = {}
    for rel in todo:
        result = parsed[rel]
        if result.chunks is None:
            report.skipped.append(Skipped(rel, result.reason))
            unparsable[rel] = {"hash": hashed[rel][1], "reason": result.reason}
        else:
            out[rel] = result.chunks
            report.warnings.extend(f"{rel}: {warning}" for warning in result.warnings)
    return out


def _chunk_id(rel: str, digest: str, ordinal: int) -> str:
    return hashlib.blake2b(f"{rel}\0{digest}\0{ordinal}".encode(), digest_size=8).hexdigest()


def _write_generation(folder, index_dir, new_fp, old, plan: _Plan, hashed, new_chunks, encoders: _Encoders,
                      unparsable, report: IndexReport, progress: Progress, started: float, engine: Engine) -> None:
    """Assemble kept and new rows in path order, encode what is missing, build the indexes, switch over."""
    import pyarrow as pa

    settings = encoders.settings

    old_table = store.load_chunks(old["folder"]) if old else None
    old_files = old["manifest"]["files"] if old else {}

    writer = store.GenerationWriter(index_dir)
    tables, files, sources, row = [], {}, [], 0  # sources: (first new row, old first row or None, count)
    for rel in sorted(hashed):
        source, digest = hashed[rel]
        if rel in new_chunks:
            chunks = new_chunks[rel]
            tables.append(store.chunks_to_table(chunks, [_chunk_id(rel, digest, c.ordinal) for c in chunks]))
            n, tokens, old_first = len(chunks), sum(c.n_tokens for c in chunks), None
        else:
            old_first, n = old_files[rel]["rows"]
            tables.append(old_table.slice(old_first, n))
            tokens = old_files[rel]["tokens"]
        files[rel] = {"hash": digest, "size": source.size, "rows": [row, n], "tokens": tokens}
        sources.append((row, old_first, n))
        row += n
    schema = store.chunk_schema()
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    texts = table.column("text").to_pylist()
    n_tokens = table.column("n_tokens").to_pylist()

    models = {}
    paths, headings = table.column("path").to_pylist(), table.column("heading").to_pylist()
    dense_info = _write_dense(writer.folder / "dense", settings, old, plan, sources, (paths, headings, texts),
                              n_tokens, encoders, report, progress, engine)
    models["dense"] = dense_info
    if settings.late:
        chunk_ids = table.column("chunk_id").to_pylist()
        old_ids = old_table.column("chunk_id").to_pylist() if old_table is not None else None
        models["late"] = _write_late(writer.folder / "late", settings, old, plan, sources, texts, n_tokens,
                                     chunk_ids, old_ids, encoders, report, progress, engine)
    progress(ProgressEvent("write", 0, 2))
    from ragkit.indexes.bm25 import LexicalIndex

    lexical_texts = texts
    if settings.context_tokens:  # BM25 reads each chunk's whole context: it has no length limit
        lexical_texts = [chunk_context(p, h) + SEPARATOR + t for p, h, t in zip(paths, headings, texts)]
    LexicalIndex.build(lexical_texts).save(writer.folder / "bm25")
    writer.write_chunks(table)
    report.chunks = table.num_rows
    progress(ProgressEvent("write", 1, 2))
    writer.write_manifest({
        "created": store.now_iso(),
        "root": str(folder),
        "fingerprint": new_fp,
        "models": models,
        "settings": _recorded(settings, encoders),
        "files": files,
        "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
        "unparsable": unparsable,
        "stats": {"files": len(files), "chunks": table.num_rows, "tokens": sum(f["tokens"] for f in files.values())},
        "last_run": _last_run(report, started),
    })
    writer.commit(progress)
    progress(ProgressEvent("write", 2, 2))


def _recorded(settings: Settings, encoders: _Encoders) -> dict[str, Any]:
    """The settings that shaped this index, as the next run reads them back (`recorded_settings`)."""
    return {
        # a default out of reach is tried again next time: the run that reaches it re-encodes with it
        "dense_model": DEFAULT_DENSE_MODEL if encoders.dense_fallback else resolve_model_name(settings.dense_model),
        "dense_fallback": encoders.dense_fallback,
        "dense_backend": settings.dense_backend,
        "chunk_tokens": settings.chunk_tokens,
        "context_tokens": settings.context_tokens,
        "late": settings.late or encoders.late_skipped is not None,  # a skipped default is tried again next time
        "late_model": resolve_model_name(settings.late_model),
        "late_skipped": encoders.late_skipped,
        "pool_factor": settings.pool_factor,
        "late_candidates": settings.late_candidates,
        "dense_exact_max": settings.dense_exact_max,
        "follow_links": settings.follow_links,
    }


def _last_run(report: IndexReport, started: float) -> dict[str, Any]:
    """The report of this run as the manifest keeps it (its time up to the write)."""
    report.seconds = time.perf_counter() - started
    return {k: v for k, v in report.to_json().items() if k != "skipped"}


def _rows_to_encode(sources, reuse: bool) -> list[int]:
    """Rows with no reusable result: new files' rows, or every row when the stage's output is stale."""
    return [first + i for first, old_first, n in sources for i in range(n) if old_first is None or not reuse]


def _check_fits(stage: str, limit: int, n_tokens: list[int]) -> None:
    """Kept chunks re-encoded by a new model must still fit it whole."""
    if n_tokens and max(n_tokens) > limit:
        raise RagkitError(f"the new {stage} model reads at most {limit} tokens per chunk but the index holds chunks "
                          f"of up to {max(n_tokens)}; run `ragkit index` again with --rebuild to re-chunk")


def _write_dense(folder: Path, settings, old, plan: _Plan, sources, chunks, n_tokens, encoders: _Encoders,
                 report: IndexReport, progress: Progress, engine: Engine) -> dict:
    """Dense vectors of every row: kept ones copied, the others encoded with their context before their text.
    `chunks`: (paths, headings, texts) of the rows."""
    from ragkit.indexes.faiss_index import DenseIndex, load_vectors

    paths, headings, texts = chunks
    reuse = old is not None and not plan.dense_all
    todo = _rows_to_encode(sources, reuse)
    dim = encoders.dense.dim if todo or not reuse else int(old["manifest"]["models"]["dense"]["dim"])
    vectors = np.zeros((len(texts), dim), dtype=np.float32)
    if reuse:
        old_vectors = load_vectors(old["folder"] / "dense")
        for first, old_first, n in sources:
            if old_first is not None:
                vectors[first : first + n] = old_vectors[old_first : old_first + n]
    if todo:
        read, extra = contextual_texts([paths[r] for r in todo], [headings[r] for r in todo],
                                       [texts[r] for r in todo], encoders.context_tokens,
                                       encoders.dense.count_tokens)
        lengths = [n_tokens[r] + more for r, more in zip(todo, extra)]
        _check_fits("dense", encoders.dense.max_tokens - encoders.dense.special_tokens, lengths)
        report.encoded_chunks = len(todo)
        report.encoded_tokens = sum(lengths)  # the contexts' tokens included: what the encoder read
        progress(ProgressEvent("encode", 0, len(todo)))
        vectors[todo] = engine.encode_dense(
            encoders, read, lengths,
            progress=lambda done, total, tokens: progress(ProgressEvent("encode", done, total, tokens)))
        _export_for_queries(encoders.dense, "dense", settings, report)
    DenseIndex.build(vectors, settings.dense_exact_max).save(folder)
    return encoders.dense.fingerprint() if todo or not reuse else old["manifest"]["models"]["dense"]


def _write_late(folder: Path, settings, old, plan: _Plan, sources, texts, n_tokens, chunk_ids, old_ids,
                encoders: _Encoders, report: IndexReport, progress: Progress, engine: Engine) -> dict:
    from ragkit.indexes.late import LateIndex, write_late_index

    old_late_dir = old["folder"] / "late" if old else None
    reuse = old is not None and not plan.late_all and old_late_dir.is_dir()
    previous = LateIndex.load(old_late_dir) if reuse else None
    todo = _rows_to_encode(sources, reuse)
    parts: list = [None] * len(texts)
    if previous is not None:
        for first, old_first, n in sources:
            if old_first is not None:
                for i in range(n):
                    parts[first + i] = previous.stored(old_first + i)
    if todo:
        encoders.chunk_budget()  # the late model reads exactly the chunk limit
        _check_fits("late", encoders.late.document_length - encoders.late.special_tokens,
                   [n_tokens[r] for r in todo])
        report.late_encoded_chunks = len(todo)
        progress(ProgressEvent("late", 0, len(todo)))
        encoded = engine.encode_late(
            encoders, [texts[r] for r in todo], [n_tokens[r] for r in todo],
            progress=lambda done, total, tokens: progress(ProgressEvent("late", done, total, tokens)))
        for r, item in zip(todo, encoded):
            parts[r] = (item.vectors, item.spans)
        _export_for_queries(encoders.late, "late", settings, report)
    info = encoders.late.fingerprint() if todo or previous is None else old["manifest"]["models"]["late"]
    params = {"model": info["model"], "dim": info["dim"], "pool_factor": settings.pool_factor}
    total_tokens = sum(len(vectors) for vectors, _ in parts)
    write_late_index(folder, parts, chunk_ids, params, previous, old_ids if previous is not None else None,
                     plaid=settings.late_candidates == "plaid" and total_tokens > settings.plaid_min_tokens,
                     centroids=settings.late_candidates == "centroids")
    return info


def _export_for_queries(encoder, stage: str, settings: Settings, report: IndexReport) -> None:
    """Make the ONNX export that encodes this stage's queries without torch, or say why queries will be slower."""
    failure = encoder.export_for_queries() if settings.onnx_queries else None
    if failure:
        report.warnings.append(f"{stage} queries will start slower, through torch: the {stage} model has no ONNX "
                               f"export ({failure})")
