"""The Ray engine: files are parsed and chunked in Ray tasks, chunks encoded in pools of Ray actors, through Ray
Data; the driver (ragkit.indexer) writes the generation from what comes back.

Files travel in blocks to tasks that run `ragkit.engines.parse_source`, the function the local loop calls. Chunks
travel in the length-sorted, token-bounded batches the local loop makes (`encode_batch_tokens`) to actors that
load the model once and encode with it (one GPU each when the cluster has GPUs, else an equal share of its CPUs).
Only what the indexer hands over reaches the cluster: new and changed files, and chunks without reusable vectors.
A task whose worker dies is retried, an actor that dies is restarted; a run that fails all the same raises a
RagkitError before the new generation goes live, so the previous one stays live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ragkit.engines import ChunkSpec, ParsedFile, parse_source
from ragkit.errors import RagkitError
from ragkit.ingest.document import Chunk, short_error
from ragkit.tokens import token_batches

INSTALL = "pip install 'ragkit[ray]'"
FILES_PER_TASK = 16  # most files in one parsing task
RETRIES = 3  # retries of a failed task, restarts of a dead actor


def import_ray() -> Any:
    """The `ray` module with Ray Data, or a RagkitError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RagkitError(f"the Ray engine needs Ray, which is not installed; install it with {INSTALL}") from None
    return ray


@contextmanager
def ray_engine(address: str | None = None, workers: int | None = None) -> Iterator["RayEngine"]:
    """A RayEngine for the block: on the cluster at `address`, else on a local Ray instance with `workers` CPUs (all
    of this machine's by default) that stops when the block ends. A Ray session already open in this process is
    used as it is."""
    ray = import_ray()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = not ray.is_initialized()
    if started:
        quiet = {"logging_level": "ERROR", "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise RagkitError(f"could not start {where}: {short_error(e)}") from None
    try:
        yield RayEngine(workers)
    finally:
        if started:
            ray.shutdown()


class _DenseActor:
    """Ray actor: loads the dense model once, then encodes batches of chunks."""

    def __init__(self, name: str, device: str | None, batch_tokens: int, backend: str = "torch") -> None:
        from ragkit.encoders.dense import DenseEncoder

        self.encoder = DenseEncoder(name, device=device, backend=backend)
        self.batch_tokens = batch_tokens

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = []
        for item in batch.to_pylist():
            vectors = self.encoder.encode_documents(item["texts"], item["lengths"], batch_tokens=self.batch_tokens)
            out.append({"rows": item["rows"], "vectors": vectors.astype(np.float32).tobytes()})
        return pa.Table.from_pylist(out)


class _LateActor:
    """Ray actor: loads the late model once, then encodes batches of chunks to token vectors and spans."""

    def __init__(self, name: str, document_length: int, device: str | None, batch_tokens: int,
                 pool_factor: int) -> None:
        from ragkit.encoders.late import LateEncoder

        self.encoder = LateEncoder(name, document_length, device=device)
        self.batch_tokens = batch_tokens
        self.pool_factor = pool_factor

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = []
        for item in batch.to_pylist():
            encoded = self.encoder.encode_documents(item["texts"], item["lengths"], batch_tokens=self.batch_tokens,
                                                    pool_factor=self.pool_factor)
            out.append({"rows": item["rows"], "dim": self.encoder.dim, "counts": [len(e.vectors) for e in encoded],
                        "vectors": np.concatenate([e.vectors for e in encoded]).astype(np.float16).tobytes(),
                        "spans": np.concatenate([e.spans for e in encoded]).astype(np.int32).tobytes()})
        return pa.Table.from_pylist(out)


class RayEngine:
    """Parses and encodes on the Ray cluster this process is connected to (see the module docstring).

    `workers`: actors per encoding pool (default: the cluster's GPUs, else its CPUs). `sent_files` lists the files
    sent to be parsed and `sent_chunks` counts the chunks sent to each encoder, over this engine's life."""

    dense_actor: type = _DenseActor
    late_actor: type = _LateActor

    def __init__(self, workers: int | None = None) -> None:
        self.ray = import_ray()
        self.workers = workers
        self.sent_files: list[str] = []
        self.sent_chunks = {"dense": 0, "late": 0}

    def parse(self, files: Sequence[tuple[str, Path]], spec: ChunkSpec) -> Iterator[ParsedFile]:
        """Each file parsed and chunked by `parse_source` in a Ray task, as the tasks complete."""
        if not files:
            return
        self.sent_files += [rel for rel, _ in files]
        actors, _ = self._pool()
        blocks = min(len(files), max(2 * actors, math.ceil(len(files) / FILES_PER_TASK)))
        items = [{"rel": rel, "path": str(path)} for rel, path in files]
        with _retry_args_accepted():
            data = self.ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                _parse_batch, fn_args=(spec,), batch_size=None, batch_format="pyarrow", max_retries=RETRIES)
        for row in self._rows(data, "parsing files"):
            yield _parsed_from_row(row)

    def encode_dense(self, encoders: Any, texts: Sequence[str], lengths: Sequence[int],
                     progress: Callable[[int, int, int], None]) -> np.ndarray:
        """Dense vectors of `texts`, encoded by actors that each load the run's dense model."""
        settings = encoders.settings
        model = {"name": settings.dense_model, "device": settings.device, "batch_tokens": settings.encode_batch_tokens,
                 "backend": settings.dense_backend}
        out = np.zeros((len(texts), encoders.dense.dim), dtype=np.float32)
        for rows, result in self._encode("dense", self.dense_actor, model, texts, lengths, progress):
            out[rows] = np.frombuffer(result["vectors"], dtype=np.float32).reshape(len(rows), -1)
        return out

    def encode_late(self, encoders: Any, texts: Sequence[str], n_tokens: Sequence[int],
                    progress: Callable[[int, int, int], None]) -> list:
        """Token vectors and spans of `texts`, encoded by actors that each load the run's late model."""
        from ragkit.encoders.late import TokenEmbeddings

        settings = encoders.settings
        model = {"name": settings.late_model, "document_length": encoders.late.document_length,
                 "device": settings.device, "batch_tokens": settings.encode_batch_tokens,
                 "pool_factor": settings.pool_factor}
        out: list = [None] * len(texts)
        for rows, result in self._encode("late", self.late_actor, model, texts, n_tokens, progress):
            vectors = np.frombuffer(result["vectors"], dtype=np.float16).reshape(-1, result["dim"])
            spans = np.frombuffer(result["spans"], dtype=np.int32).reshape(-1, 2)
            ends = np.cumsum(result["counts"])
            for row, end, count in zip(rows, ends, result["counts"]):
                out[row] = TokenEmbeddings(vectors[end - count : end].copy(), spans[end - count : end].copy())
        return out

    def _encode(self, kind: str, actor: type, model: dict[str, Any], texts: Sequence[str], lengths: Sequence[int],
                progress: Callable[[int, int, int], None]) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """(rows, the actor's result) per batch, as batches complete; `progress` follows them."""
        order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
        batches = token_batches(order, lengths, model["batch_tokens"])
        items = [{"rows": b, "texts": [texts[i] for i in b], "lengths": [lengths[i] for i in b]} for b in batches]
        self.sent_chunks[kind] += len(texts)
        actors, resources = self._pool()
        with _retry_args_accepted():
            data = self.ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                actor, fn_constructor_kwargs=model, batch_size=1, batch_format="pyarrow",
                compute=self.ray.data.ActorPoolStrategy(size=min(actors, len(items))),
                max_restarts=RETRIES, max_task_retries=RETRIES, **resources)
        done = tokens = 0
        for result in self._rows(data, f"encoding ({kind})"):
            rows = result["rows"]
            done += len(rows)
            tokens += sum(lengths[i] for i in rows)
            yield rows, result
            progress(done, len(texts), tokens)

    def _pool(self) -> tuple[int, dict[str, int]]:
        """Actors per encoding pool and the resources of each: a GPU when the cluster has GPUs, else CPUs."""
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            return min(self.workers or gpus, gpus), {"num_gpus": 1}
        cpus = max(1, int(resources.get("CPU", 1)))
        actors = min(self.workers or cpus, cpus)
        return actors, {"num_cpus": cpus // actors}

    def _rows(self, data: Any, doing: str) -> Iterator[dict[str, Any]]:
        """The rows of `data` as its blocks complete; a failure the retries did not overcome as a RagkitError."""
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield from batch.to_pylist()
        except Exception as e:
            if isinstance(e, RagkitError):
                raise
            raise RagkitError(f"the Ray cluster failed while {doing} ({short_error(e)}); the index is as it was "
                              "before this run") from e


@contextmanager
def _retry_args_accepted() -> Iterator[None]:
    """Ray Data takes retry limits as keyword arguments, which newer releases announce they will drop."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
        yield


def _parse_batch(batch: Any, spec: ChunkSpec) -> Any:
    """Ray task: parse and chunk a block of files."""
    import pyarrow as pa

    return pa.Table.from_pylist([_parsed_to_row(parse_source(Path(item["path"]), item["rel"], spec))
                                 for item in batch.to_pylist()])


def _parsed_to_row(parsed: ParsedFile) -> dict[str, str]:
    chunks = None if parsed.chunks is None else [dataclasses.asdict(c) for c in parsed.chunks]
    return {"rel": parsed.rel, "parsed": json.dumps({"chunks": chunks, "reason": parsed.reason,
                                                      "warnings": parsed.warnings})}


def _parsed_from_row(row: dict[str, str]) -> ParsedFile:
    parsed = json.loads(row["parsed"])
    chunks = parsed["chunks"]
    if chunks is not None:
        chunks = [Chunk(**{**c, "page_breaks": tuple(c["page_breaks"])}) for c in chunks]
    return ParsedFile(row["rel"], chunks, parsed["reason"], parsed["warnings"])
