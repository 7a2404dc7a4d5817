"""The library's front: `Index` opens an index folder to add documents, search and ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ragkit import store
from ragkit.config import MODES, Settings, load_settings
from ragkit.errors import ConfigError, RagkitError
from ragkit.indexer import IndexReport, build_index
from ragkit.progress import Progress, silent


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
        self._reader = None

    def exists(self) -> bool:
        return (self.path / store.CURRENT).is_file()

    def add(self, folder: str | Path, progress: Progress = silent, rebuild: bool = False) -> IndexReport:
        """Index `folder` (incrementally: only new and changed files are parsed and encoded)."""
        # the searcher notices the new generation itself and reopens it with the models it already loaded
        return build_index(Path(folder), self.path, self.settings, progress=progress, rebuild=rebuild)

    def search(self, query: str, k: int | None = None, mode: str | None = None,
               paths: Sequence[str] | None = None) -> list:
        """The top `k` hits for `query` (mode: dense, bm25, late or hybrid), optionally only in files matching `paths`.

        `paths` are paths relative to the indexed folder or glob patterns ("contracts/*.pdf").
        """
        return self.searcher.search(query, k or self.settings.k, self._mode(mode), paths)

    def search_many(self, queries: list[str], k: int | None = None, mode: str | None = None) -> list[list]:
        """`search` for many queries at once (encoded in one batch)."""
        return self.searcher.search_many(queries, k or self.settings.k, self._mode(mode))

    def ask(self, question: str, k: int | None = None, mode: str | None = None,
            paths: Sequence[str] | None = None, reader: str | None = None):
        """An answer to `question` with numbered citations, from the top `k` hits (default 5).

        reader: "extractive" (cited sentences of the hits) or "infini" (a causal LM with memory reads the whole
        documents of the hits, then answers with the hits in its local window).
        """
        mode = self._mode(mode)
        hits = self.search(question, k or min(self.settings.k, 5), mode, paths)
        reader = reader or self.settings.reader
        if reader == "extractive":
            return self.answer_from_hits(question, hits, mode)
        from ragkit.readers.generative import document_texts

        manifest = self.manifest()
        documents = document_texts(Path(manifest["root"]), [h.chunk.path for h in hits],
                                   follow_links=bool(manifest["settings"].get("follow_links")))
        return self.memory_reader(reader).answer(question, hits, documents)

    def memory_reader(self, kind: str):
        """The memory reader `kind` built from the settings, loaded once."""
        from ragkit.readers.generative import MemoryReader, spec_from_settings

        spec = spec_from_settings(self.settings, kind)
        if self._reader is None or self._reader.spec != spec:
            self._reader = MemoryReader(spec)
        return self._reader

    def answer_from_hits(self, question: str, hits: list, mode: str | None = None):
        """The extractive reader's answer to `question` from the given hits."""
        from ragkit.readers.extractive import ExtractiveReader

        encoder = self.searcher.encoder if self._mode(mode) != "bm25" else None
        return ExtractiveReader(encoder, self.settings.answer_sentences).answer(question, hits)

    def manifest(self) -> dict[str, Any]:
        """The live generation's manifest (see docs/index-format.md)."""
        return self.searcher.manifest

    def status(self) -> dict[str, Any]:
        """Files, chunks, tokens, models, size on disk and the last run of the index."""
        generation = store.current_generation(self.path)
        manifest = store.read_manifest(generation)
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
        }

    @property
    def searcher(self):
        """The searcher of the live generation (reopened when another run has switched it)."""
        from ragkit.retrieve import Searcher

        generation = store.current_generation(self.path)
        if self._searcher is None or self._searcher.generation != generation:
            old = self._searcher
            self._searcher = old.reopen(generation) if old else Searcher(generation, self.settings)
        return self._searcher

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.settings.mode
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        return mode


def summarize_file(path: str | Path, settings: Settings | None = None, reader: str | None = None) -> dict[str, str]:
    """Stream a whole file through a memory reader and summarize it: {"summary", "source"}."""
    from ragkit.ingest.parsers import ParseError, parse_file
    from ragkit.readers.generative import MemoryReader, spec_from_settings

    settings = settings or load_settings()
    kind = reader or (settings.reader if settings.reader != "extractive" else "infini")
    source = Path(path).expanduser()
    if not source.is_file():
        raise RagkitError(f"{source} is not a file")
    try:
        text = parse_file(source).text
    except ParseError as e:
        raise RagkitError(f"cannot summarize {source}: {e.reason}") from None
    summary = MemoryReader(spec_from_settings(settings, kind)).summarize(text)
    return {"summary": summary, "source": str(source.resolve())}
