"""Where `ragkit index` parses files and encodes chunks: this process (`local`, the default) or a Ray cluster
(`ray`, ragkit.engines.ray_engine). Both run the same steps, `parse_source` for a file and the encoders'
`encode_documents` for a batch of chunks, and hand the results back to ragkit.indexer, which alone writes the
index."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from ragkit.errors import ConfigError
from ragkit.ingest.document import Chunk
from ragkit.tokens import token_starts

ENGINES = ("local", "ray")
EncodeProgress = Callable[[int, int, int], None]  # (chunks done, chunks total, tokens done)


@dataclass(frozen=True)
class ChunkSpec:
    """How files are cut into chunks: the tokenizers that measure them (the dense encoder's, then the late
    encoder's when there is one) and the most tokens a chunk may hold. It holds no model, so it travels cheaply
    to other processes."""

    tokenizers: tuple[Any, ...]
    budget: int

    def token_starts(self, text: str) -> list[int]:
        """Token starts by the tokenizer that cuts `text` finer, so a chunk fits every encoder."""
        return max((token_starts(tokenizer, text) for tokenizer in self.tokenizers), key=len)


@dataclass
class ParsedFile:
    """One file parsed and chunked, or why it could not be parsed (`chunks` is None then)."""

    rel: str
    chunks: list[Chunk] | None
    reason: str = ""
    warnings: list[str] = field(default_factory=list)


def parse_source(path: Path, rel: str, spec: ChunkSpec) -> ParsedFile:
    """Parse the file at `path` (relative path `rel`) and cut it into chunks by `spec`."""
    from ragkit.ingest.chunking import chunk_document
    from ragkit.ingest.parsers import ParseError, parse_file

    try:
        doc = parse_file(path)
    except ParseError as e:
        return ParsedFile(rel, None, e.reason)
    return ParsedFile(rel, chunk_document(doc, rel, spec.token_starts, spec.budget), warnings=list(doc.warnings))


class Engine(Protocol):
    """Where files are parsed and chunks encoded. Results may come back in any order; `progress` is called as
    batches complete. `encoders`: the run's models as ragkit.indexer loaded them (their settings name them)."""

    def parse(self, files: Sequence[tuple[str, Path]], spec: ChunkSpec) -> Iterable[ParsedFile]:
        """Each of `files` (relative path, absolute path) parsed and chunked."""

    def encode_dense(self, encoders: Any, texts: Sequence[str], lengths: Sequence[int],
                     progress: EncodeProgress) -> np.ndarray:
        """Dense vectors (n, dim) of `texts` of `lengths` tokens, by the run's dense model."""

    def encode_late(self, encoders: Any, texts: Sequence[str], n_tokens: Sequence[int],
                    progress: EncodeProgress) -> list:
        """Token vectors and spans (TokenEmbeddings) of each of `texts`, by the run's late model."""


class LocalEngine:
    """Parses and encodes in this process, file after file and batch after batch."""

    def parse(self, files: Sequence[tuple[str, Path]], spec: ChunkSpec) -> Iterator[ParsedFile]:
        for rel, path in files:
            yield parse_source(path, rel, spec)

    def encode_dense(self, encoders: Any, texts: Sequence[str], lengths: Sequence[int],
                     progress: EncodeProgress) -> np.ndarray:
        return encoders.dense.encode_documents(texts, lengths, batch_tokens=encoders.settings.encode_batch_tokens,
                                               progress=progress)

    def encode_late(self, encoders: Any, texts: Sequence[str], n_tokens: Sequence[int],
                    progress: EncodeProgress) -> list:
        return encoders.late.encode_documents(texts, n_tokens, batch_tokens=encoders.settings.encode_batch_tokens,
                                              pool_factor=encoders.settings.pool_factor, progress=progress)


@contextmanager
def open_engine(name: str = "local", address: str | None = None, workers: int | None = None) -> Iterator[Engine | None]:
    """The engine `name` for the runs inside the block (None: this process). `address` and `workers` apply to the
    Ray engine: the cluster to connect to, and how many actors encode (see ray_engine.ray_engine)."""
    if name not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got '{name}'")
    if name == "local":
        if address is not None or workers is not None:
            raise ConfigError("an address and a number of workers apply to the ray engine only (--engine ray)")
        yield None
        return
    from ragkit.engines.ray_engine import ray_engine

    with ray_engine(address, workers) as engine:
        yield engine
