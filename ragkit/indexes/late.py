"""Late interaction: every chunk's token vectors, scored by exact MaxSim, with a candidate stage for large collections.

Folder layout (all plain files):
    tokens.npy      float16 (T, dim): token vectors of all chunks, row after row, unit length
    spans.npy       int32 (T, 2): char span of each token in its chunk's text (-1: none)
    offsets.npy     int64 (n + 1): chunk row r owns tokens offsets[r]:offsets[r + 1]
    params.json     model, dim, pool factor, counts, centroid and PLAID bookkeeping
    centroids.npy, coarse.npy, coarse_offsets.npy, codes.npy, ivf.npy, ivf_offsets.npy, directions.npy: the candidate
                    centroid stage (ragkit.indexes.late_centroids)
    plaid/          fast-plaid index (centroids, codes, residuals; plain npy + json, never its pickled caches)
    plaid_rows.npy  int64: chunk row of each PLAID document id

MaxSim(q, d) = Σ_i max_j q_i · d_j. On a CPU, exact MaxSim over the token matrix is fast up to a few million tokens:
search uses a candidate stage only above `exact_max_tokens`, where it proposes candidates and exact MaxSim re-ranks
them: centroid interaction (late_centroids) when the folder has its lists, else PLAID when it has one. The
candidate stage is kept up to date in every generation, so it is ready when the collection grows past that size.

The matrix is stored as float16 and scored as stored, without a float32 copy: the products go through ONNX
Runtime, whose conversion uses the CPU's half-precision instructions (ragkit.indexes.token_products).
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragkit.indexes.base import SearchResults
from ragkit.indexes.late_centroids import (COARSE, IVF_OFFSETS, RETRAIN_SHARE, CentroidLists, CentroidState,
                                           write_centroids)
from ragkit.indexes.token_products import chunk_maxima, chunk_maxsim

TOKENS, SPANS, OFFSETS, PARAMS, PLAID, PLAID_ROWS = (
    "tokens.npy", "spans.npy", "offsets.npy", "params.json", "plaid", "plaid_rows.npy")
MIN_PLAID_TOKENS = 1000  # below this PLAID may not train its codec; exact search serves such tiny indexes
BLOCK_TOKENS = 1 << 16  # tokens scored per block in exhaustive search (bounds memory)
MAX_BLOCK_SCORES = 1 << 25  # similarities held at once in exhaustive search (128 MiB of float32)
# The files of a fast-plaid folder that a generation carries over to the next (see docs/index-format.md)
PLAID_FILE = re.compile(r"(metadata|plan|doclens\.\d+|\d+\.metadata|merged_(codes|residuals)\.manifest)\.json"
                        r"|(centroids|avg_residual|bucket_cutoffs|bucket_weights|cluster_threshold|ivf|ivf_lengths"
                        r"|\d+\.codes|\d+\.residuals|merged_codes|merged_residuals)\.npy")
# np.load parses headers with ast.literal_eval, which CPython 3.11 may fail when threads (shards searched at once)
# parse together: lazy loads during search take this lock
_LOAD_LOCK = threading.Lock()
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@dataclass
class PlaidState:
    """What PLAID was trained on, to know when to retrain."""

    trained_docs: int = 0
    added_since_training: int = 0

    def needs_retraining(self, new_docs: int) -> bool:
        return self.added_since_training + new_docs > RETRAIN_SHARE * max(self.trained_docs, 1)


class LateIndex:
    """Token vectors of rows 0..n-1 of the chunk table."""

    def __init__(self, folder: Path | None, tokens: np.ndarray, spans: np.ndarray, offsets: np.ndarray,
                 params: dict) -> None:
        self.folder = folder
        self.tokens = tokens
        self.spans = spans
        self.offsets = offsets
        self.params = params
        self._plaid = None
        self._centroids: CentroidLists | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def token_data(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 (t, dim), spans (t, 2)) of one chunk."""
        vectors, spans = self.stored(row)
        return np.asarray(vectors, dtype=np.float32), np.asarray(spans)

    def stored(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored (float16 vectors, spans) of one chunk, as memory-mapped views (no copy)."""
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.tokens[a:b], self.spans[a:b]

    # ---------------------------------------------------------------------------------------------- search

    def search(self, queries: Sequence[np.ndarray], k: int, rows: np.ndarray | None = None,
               exact_max_tokens: int = 1_000_000, candidates: int = 1024, probe: int = 128) -> SearchResults:
        """Top `k` rows by MaxSim for each query (tokens, dim), among `rows` when given. Above `exact_max_tokens`,
        exact MaxSim re-ranks the best `candidates` rows of the candidate stage (`probe`: centroids per query token)."""
        if len(self) == 0 or k == 0:
            return [[] for _ in queries]
        if rows is not None:
            return [_top(self.maxsim(q, rows), rows, k) for q in queries]
        if self.total_tokens > exact_max_tokens and (self.has_centroids or self.has_plaid):
            return self.candidate_search(queries, k, candidates, probe)
        all_rows = np.arange(len(self))
        return [_top(scores, all_rows, k) for scores in self.maxsim_all_many(queries)]

    def candidate_search(self, queries: Sequence[np.ndarray], k: int, candidates: int = 1024, probe: int = 128,
                         stage: str | None = None) -> SearchResults:
        """Top `k` rows per query: the best `candidates` rows of a candidate stage (`stage`: "centroids" or "plaid";
        None: centroids when built, else PLAID), re-scored by exact MaxSim."""
        stage = stage or ("centroids" if self.has_centroids else "plaid")
        count = max(k, candidates)
        if stage == "centroids":
            lists = self._centroid_lists()
            found = [lists.candidates(q, count, probe) for q in queries]
        else:
            found = [[row for row, _ in hits] for hits in self.plaid_search(queries, count)]
        out = []
        for q, rows in zip(queries, found):
            rows = np.unique(np.asarray(rows, dtype=np.int64))
            out.append(_top(self.maxsim(q, rows), rows, k))
        return out

    def maxsim(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact MaxSim of one query (q_tokens, dim) against each of `rows`: their tokens gathered, one product."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.zeros(len(rows), dtype=np.float32)
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        filled = np.flatnonzero(lengths)  # a chunk with no token vectors scores 0
        if len(filled) == 0:
            return scores
        query = np.asarray(query, dtype=np.float32)
        ends = np.cumsum(lengths[filled])
        first = 0
        while first < len(filled):  # groups of about BLOCK_TOKENS tokens bound the memory of a wide filter
            last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + BLOCK_TOKENS)))
            group = filled[first:last]
            group_lengths = lengths[group]
            starts = np.cumsum(group_lengths) - group_lengths
            positions = np.arange(int(group_lengths.sum())) + np.repeat(self.offsets[rows[group]] - starts,
                                                                        group_lengths)
            scores[group] = chunk_maxsim(query, self.tokens[positions], starts)
            first = last
        return scores

    def maxsim_all(self, query: np.ndarray) -> np.ndarray:
        """Exact MaxSim of one query (q_tokens, dim) against every row."""
        return self.maxsim_all_many([query])[0]

    def maxsim_all_many(self, queries: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Exact MaxSim of each query (q_tokens, dim) against every row. The token matrix is streamed in blocks
        of whole chunks, each scored as stored against a group of queries at a time."""
        n = len(self)
        out = [np.zeros(n, dtype=np.float32) for _ in queries]
        if not queries:
            return out
        q_tokens = max(len(q) for q in queries)
        size = max(1, MAX_BLOCK_SCORES // (BLOCK_TOKENS * max(q_tokens, 1)))  # queries scored per block
        groups = []  # (first query, its group's query tokens stacked (Σ q_tokens, dim), each query's column bounds)
        for g in range(0, len(queries), size):
            batch = queries[g : g + size]
            groups.append((g, np.concatenate([np.asarray(q, dtype=np.float32) for q in batch]),
                           np.cumsum([0] + [len(q) for q in batch])))
        row = 0
        while row < n:
            end = int(np.searchsorted(self.offsets, self.offsets[row] + BLOCK_TOKENS, side="right")) - 1
            end = min(max(end, row + 1), n)
            block = self.tokens[self.offsets[row] : self.offsets[end]]  # (block tokens, dim) float16
            filled = row + np.flatnonzero(np.diff(self.offsets[row : end + 1]))  # rows with tokens; the rest score 0
            starts = self.offsets[filled] - self.offsets[row]
            for g, stacked, bounds in groups if len(filled) else ():
                best = chunk_maxima(stacked, block, starts)  # (Σ q_tokens, filled)
                for i in range(len(bounds) - 1):
                    out[g + i][filled] = best[bounds[i] : bounds[i + 1]].sum(axis=0)
            row = end
        return out

    # ------------------------------------------------------------------------------------- candidate stages

    @property
    def has_centroids(self) -> bool:
        return self.folder is not None and (self.folder / IVF_OFFSETS).is_file()

    def _centroid_lists(self) -> CentroidLists:
        with _LOAD_LOCK:
            if self._centroids is None:
                self._centroids = CentroidLists.load(self.folder, len(self))
        return self._centroids

    @property
    def has_plaid(self) -> bool:
        return self.folder is not None and (self.folder / PLAID_ROWS).is_file()

    def plaid_search(self, queries: Sequence[np.ndarray], k: int) -> SearchResults:
        """PLAID's approximate top `k` rows per query."""
        import torch

        with _LOAD_LOCK:
            plaid_rows = np.load(self.folder / PLAID_ROWS)
        batch = torch.from_numpy(np.stack(_pad(queries)))
        results = self._plaid_handle().search(queries_embeddings=batch, top_k=min(k, len(plaid_rows)),
                                              show_progress=False)
        return [[(int(plaid_rows[doc]), float(score)) for doc, score in result] for result in results]

    def _plaid_handle(self):
        if self._plaid is None:
            with _gc_frozen():
                self._plaid = _open_plaid(self.folder / PLAID)
        return self._plaid

    # ------------------------------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, folder: Path) -> "LateIndex":
        return cls(folder, np.load(folder / TOKENS, mmap_mode="r"), np.load(folder / SPANS, mmap_mode="r"),
                   np.load(folder / OFFSETS), json.loads((folder / PARAMS).read_text()))


def write_late_index(folder: Path, parts: Sequence[tuple[np.ndarray, np.ndarray]], chunk_ids: Sequence[str],
                     params: dict, previous: "LateIndex | None", previous_chunk_ids: Sequence[str] | None,
                     plaid: bool = True, centroids: bool = False) -> dict:
    """Write token vectors of every row and bring the candidate stages asked for up to date (`centroids`: centroid
    interaction, `plaid`: PLAID); returns the params written.

    The centroids keep the tokens of chunks carried over from `previous` where they were, and are trained again
    when K changes or more than RETRAIN_SHARE of the tokens arrived after the last training.

    PLAID is carried over from `previous` when it was built by the same model: the documents of removed
    chunks are deleted, new chunks appended, and the centroids retrained from scratch once more than
    RETRAIN_SHARE of the collection arrived after the last training.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(v) for v, _ in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dim = int(params["dim"])
    tokens = np.lib.format.open_memmap(folder / TOKENS, mode="w+", dtype=np.float16, shape=(int(offsets[-1]), dim))
    spans = np.lib.format.open_memmap(folder / SPANS, mode="w+", dtype=np.int32, shape=(int(offsets[-1]), 2))
    for (vectors, token_spans), a, b in zip(parts, offsets[:-1], offsets[1:]):
        tokens[a:b] = vectors
        spans[a:b] = token_spans
    tokens.flush()
    spans.flush()
    np.save(folder / OFFSETS, offsets)
    centroid_state = CentroidState()
    if centroids:
        centroid_state = write_centroids(folder, tokens, offsets, *_carried_centroids(previous, previous_chunk_ids,
                                                                                      chunk_ids))
    del tokens, spans
    state = _update_plaid(folder, parts, list(chunk_ids), previous, previous_chunk_ids) if plaid else PlaidState()
    params = {**params, "count": len(parts), "tokens": int(offsets[-1]),
              "plaid": {"trained_docs": state.trained_docs, "added_since_training": state.added_since_training}}
    if centroids:
        params["centroids"] = vars(centroid_state)
    (folder / PARAMS).write_text(json.dumps(params, indent=2))
    return params


def _carried_centroids(previous: LateIndex | None, previous_chunk_ids: Sequence[str] | None, chunk_ids: Sequence[str]
                       ) -> tuple[dict[int, tuple[int, int, int]], tuple[Path, CentroidState] | None]:
    """(row → (row, token range) in `previous` of each chunk carried over, (previous folder, its centroid state)) for
    write_centroids; nothing carried when `previous` has no centroids of its own."""
    if previous is None or previous_chunk_ids is None or not previous.has_centroids or not (
            previous.folder / COARSE).is_file() or "centroids" not in previous.params:
        return {}, None
    old_row = {cid: row for row, cid in enumerate(previous_chunk_ids)}
    carried = {row: (old, int(previous.offsets[old]), int(previous.offsets[old + 1]))
               for row, cid in enumerate(chunk_ids) if (old := old_row.get(cid)) is not None}
    return carried, (previous.folder, CentroidState(**previous.params["centroids"]))


def _update_plaid(folder: Path, parts, chunk_ids: list[str], previous: LateIndex | None,
                  previous_chunk_ids: Sequence[str] | None) -> PlaidState:
    """Carry PLAID over from `previous` or train it afresh; write plaid_rows.npy; returns what it was trained on."""
    if not chunk_ids:
        return PlaidState()
    row_of = {cid: row for row, cid in enumerate(chunk_ids)}
    plaid_folder = folder / PLAID
    with _gc_frozen():
        built = _carry_plaid(plaid_folder, parts, row_of, previous, previous_chunk_ids)
        if built is None:
            built = _train_plaid(plaid_folder, parts, chunk_ids)
    if built is None:
        return PlaidState()
    order, state = built
    _remove_lock(plaid_folder)
    _check_plain(plaid_folder)
    np.save(folder / PLAID_ROWS, np.array([row_of[c] for c in order], dtype=np.int64))
    return state


def _carry_plaid(plaid_folder: Path, parts, row_of: dict[str, int], previous: LateIndex | None,
                 previous_chunk_ids: Sequence[str] | None) -> tuple[list[str], PlaidState] | None:
    """Update a copy of the previous PLAID in place: removed chunks deleted, new ones appended. Returns (chunk id of
    each PLAID document, state), or None when PLAID must be trained again or its folder cannot be carried."""
    if previous is None or not previous.has_plaid or previous_chunk_ids is None:
        return None
    state = PlaidState(**previous.params.get("plaid", {}))
    old_order = [previous_chunk_ids[r] for r in np.load(previous.folder / PLAID_ROWS)]
    kept = [cid for cid in old_order if cid in row_of]
    kept_ids = set(kept)
    new = [cid for cid in row_of if cid not in kept_ids]
    if not kept or state.needs_retraining(len(new)) or not _copy_plaid(previous.folder / PLAID, plaid_folder):
        return None
    plaid = _open_plaid(plaid_folder)
    removed = [i for i, cid in enumerate(old_order) if cid not in row_of]
    if removed:
        plaid.delete(removed)  # later ids shift down: `kept` keeps that order
    if new:
        # buffer_size=1: new documents never wait in fast-plaid's pickled buffer.npy; their outlying tokens get
        # new centroids at once. start_from_scratch=0: never rebuild from a pickled embeddings.npy.
        plaid.update(documents_embeddings=[_tensor(parts[row_of[cid]][0]) for cid in new], buffer_size=1,
                     start_from_scratch=0, use_triton_kmeans=False)
    return kept + new, PlaidState(state.trained_docs, state.added_since_training + len(new))


def _train_plaid(plaid_folder: Path, parts, chunk_ids: list[str]) -> tuple[list[str], PlaidState] | None:
    """Train PLAID from scratch on every chunk; None when there are too few tokens to train a codec."""
    shutil.rmtree(plaid_folder, ignore_errors=True)
    try:
        # start_from_scratch=0: fast-plaid would otherwise keep a pickled copy of the vectors (embeddings.npy) of
        # collections up to that many documents; ragkit keeps its own in tokens.npy.
        _open_plaid(plaid_folder).create(documents_embeddings=[_tensor(v) for v, _ in parts], seed=42,
                                         use_triton_kmeans=False, start_from_scratch=0)
    except Exception:
        if sum(len(v) for v, _ in parts) >= MIN_PLAID_TOKENS:
            raise
        shutil.rmtree(plaid_folder, ignore_errors=True)  # too few tokens to train a codec: exact search only
        return None
    return chunk_ids, PlaidState(trained_docs=len(chunk_ids))


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Freeze the objects that exist now while fast-plaid works: it calls gc.collect() many times per operation, and
    with torch loaded a full collection over the whole heap is slow each time. A heap frozen by others is left as is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _open_plaid(plaid_folder: Path):
    from fast_plaid import search

    return search.FastPlaid(index=str(plaid_folder), device="cpu")


def _copy_plaid(source: Path, target: Path) -> bool:
    """Copy the files of a PLAID folder that fast-plaid reads without pickle, and nothing else: not its pickled
    caches (embeddings.npy, buffer.npy), nor a lock, a metadata database, a link or an unknown file. False (and
    nothing copied) when a file that is copied is not plain, so that PLAID is trained again from tokens.npy."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if PLAID_FILE.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            shutil.copy2(path, target / path.name)  # keeps mtimes: fast-plaid's merged_* files stay current
    if all(is_plain_npy(path) for path in target.glob("*.npy")):
        return True
    shutil.rmtree(target)
    return False


def _check_plain(plaid_folder: Path) -> None:
    """The index holds no pickle, even from a fast-plaid that writes one despite the settings above."""
    pickled = sorted(path.name for path in plaid_folder.glob("*.npy") if not is_plain_npy(path))
    if pickled:
        raise RuntimeError(f"fast-plaid wrote pickled arrays to {plaid_folder}: {', '.join(pickled)}")


def is_plain_npy(path: Path) -> bool:
    """Whether a .npy file holds a plain array, one that np.load reads with allow_pickle=False (header only)."""
    try:
        with open(path, "rb") as f:
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            return read_header is not None and not read_header(f)[2].hasobject
    except (OSError, ValueError):
        return False


def _remove_lock(plaid_folder: Path) -> None:
    """fast-plaid leaves a lock file behind; a finished generation has no writer."""
    (plaid_folder / "plaid.lock").unlink(missing_ok=True)


def _tensor(vectors: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(vectors, dtype=np.float32))


def _pad(queries: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Queries of one length (PyLate pads queries to query_length already; this guards the rest)."""
    length = max(len(q) for q in queries)
    return [np.pad(q, ((0, length - len(q)), (0, 0))) for q in queries]


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
    k = min(k, len(rows))
    if k == 0:
        return []
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(rows[i]), float(scores[i])) for i in top]
