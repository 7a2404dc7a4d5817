"""A sharded index: one index folder holding several shard folders of the usual format (`shard-0/`, `shard-1/`,
…; `shards.json` says how many), each the index of the files whose path hashes to it. One shard per partition of a
large folder, or per machine.

Search asks every shard's retrievers at once (a thread each) and merges their results before fusion and re-ranking,
so that a sharded index ranks as one unsharded index would: dense and late scores are the same numbers; BM25 is
scored with the statistics of all shards together (document counts, document frequencies, mean length), from the
term frequencies each shard's BM25 index gives back (`LexicalIndex.postings`).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ragkit import store
from ragkit.errors import ConfigError, RagkitError
from ragkit.indexes.base import SearchResults
from ragkit.indexes.bm25 import top_rows
from ragkit.progress import Progress, silent
from ragkit.retrieve import Searcher, load_structure

SHARDS = "shards.json"
LAST_RUN = "last_run.json"  # the report of the last run over all shards (a shard with nothing to do keeps its own)


def shard_of(rel: str, count: int) -> int:
    """The shard of the file `rel` (its path relative to the indexed folder) among `count`.

    >>> shard_of("a.txt", 1), shard_of("a.txt", 3) == shard_of("a.txt", 3)
    (0, True)
    """
    return int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "big") % count


def shard_count(index_dir: Path) -> int | None:
    """How many shards the index folder holds, or None for an unsharded index."""
    path = index_dir / SHARDS
    return int(json.loads(path.read_text())["count"]) if path.is_file() else None


def shard_dirs(index_dir: Path, count: int) -> list[Path]:
    return [index_dir / f"shard-{i}" for i in range(count)]


def build_sharded(folder: Path, index_dir: Path, settings: Any, count: int | None, progress: Progress = silent,
                  rebuild: bool = False, engine: Any = None):
    """Index `folder` into the shards of `index_dir` (made with `count` shards when new), shard after shard; one
    report for the whole run. `engine`: where files are parsed and chunks encoded (see ragkit.indexer)."""
    from ragkit.indexer import IndexReport, build_index, documents_folder

    index_dir = index_dir.expanduser().resolve()
    existing = shard_count(index_dir)
    if existing is None and store.CURRENT in {p.name for p in index_dir.glob("*")}:
        raise ConfigError(f"the index at {index_dir} is not sharded; index into another folder (--index DIR) to "
                          "make a sharded one")
    store.check_index_folder(index_dir, documents_folder(Path(folder)), own=_is_own_name)
    written = existing is not None and any((shard / store.CURRENT).is_file() for shard in shard_dirs(index_dir,
                                                                                                      existing))
    if written and count is not None and count != existing:  # unwritten shards may still change their number
        raise ConfigError(f"the index at {index_dir} has {existing} shards, not {count}; index into another folder "
                          "(--index DIR) to change their number")
    count = count if count is not None and not written else existing
    if not count or count < 1:
        raise ConfigError("an index needs at least 1 shard")
    index_dir.mkdir(parents=True, exist_ok=True)
    (index_dir / SHARDS).write_text(json.dumps({"count": count}))
    total = IndexReport()
    for i, shard in enumerate(shard_dirs(index_dir, count)):
        part = build_index(folder, shard, settings, progress=progress, rebuild=rebuild,
                           accept=lambda rel, i=i: shard_of(rel, count) == i, exclude=[index_dir], engine=engine)
        for name in IndexReport.COUNTS:
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.skipped, total.rebuilt = total.skipped + part.skipped, total.rebuilt or part.rebuilt
        total.warnings += [w for w in part.warnings if w not in total.warnings
                           and not w.startswith("no documents to index")]  # a shard may hold none
    total.skipped.sort(key=lambda s: s.path)
    if not total.chunks:
        total.warnings.append(f"no documents to index in {folder}")
    _write_atomically(index_dir / LAST_RUN, json.dumps(total.to_json()))
    return total


def _is_own_name(name: str) -> bool:
    """Whether a sharded index folder's entry `name` is one ragkit writes there."""
    return name in (SHARDS, LAST_RUN, LAST_RUN + ".tmp") or \
        (name.startswith("shard-") and name[len("shard-"):].isdigit())


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def current_generations(index_dir: Path) -> tuple[Path, ...]:
    """The live generation of each shard."""
    count = shard_count(index_dir)
    return tuple(store.current_generation(shard) for shard in shard_dirs(index_dir, count or 0))


def merged_manifest(manifests: Sequence[dict[str, Any]], offsets: Sequence[int],
                    last_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """One manifest for the shards together: their files (rows shifted to the rows of the joined chunk table),
    skipped files and stats summed, `last_run` (the whole run's report; else the shards' last runs summed), the
    shards' generations as a list; models, fingerprint and settings of the first (all must agree)."""
    first = manifests[0]
    for other in manifests[1:]:
        if other["fingerprint"] != first["fingerprint"]:
            raise RagkitError("the shards of this index were built with different models or chunk settings; "
                              "run `ragkit index` on it to bring them in line")
    files: dict[str, Any] = {}
    for manifest, offset in zip(manifests, offsets):
        for rel, info in manifest["files"].items():
            files[rel] = {**info, "rows": [info["rows"][0] + offset, info["rows"][1]]}
    from ragkit.indexer import IndexReport

    return {
        **first,
        "generation": [m["generation"] for m in manifests],
        "created": max(m["created"] for m in manifests),
        "files": dict(sorted(files.items())),
        "skipped": sorted((s for m in manifests for s in m["skipped"]), key=lambda s: s["path"]),
        "unparsable": {k: v for m in manifests for k, v in m.get("unparsable", {}).items()},
        "stats": {key: sum(m["stats"][key] for m in manifests) for key in ("files", "chunks", "tokens")},
        "last_run": last_run or {**first["last_run"], **{key: sum(m["last_run"].get(key) or 0 for m in manifests)
                                                        for key in IndexReport.COUNTS}},
        "shards": len(manifests),
    }


def _in_parallel(fn: Callable[[int], Any], count: int) -> list[Any]:
    if count == 1:
        return [fn(0)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(fn, range(count)))


def _local_rows(rows: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    """The rows among `rows` (joined-table rows) in [start, end), as that shard's own rows."""
    if rows is None:
        return None
    return rows[(rows >= start) & (rows < end)] - start


def _merge(parts: list[SearchResults], offsets: Sequence[int], k: int) -> SearchResults:
    """Each query's results of every shard, rows shifted to the joined table, best k by score (rows break ties)."""
    out = []
    for q in range(len(parts[0])):
        joined = [(row + offsets[s], score) for s, part in enumerate(parts) for row, score in part[q]]
        out.append(sorted(joined, key=lambda hit: (-hit[1], hit[0]))[:k])
    return out


class _Sharded:
    """What the per-retriever views share: the shards' structures and where each shard's rows start."""

    def __init__(self, parts: Sequence[Any], sizes: Sequence[int]) -> None:
        self.parts = list(parts)
        self.offsets = [0, *np.cumsum(sizes).tolist()]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _search(self, search: Callable, queries: Sequence, k: int, rows: np.ndarray | None) -> SearchResults:
        def one(s: int) -> SearchResults:
            local = _local_rows(rows, self.offsets[s], self.offsets[s + 1])
            if local is not None and len(local) == 0 or self.offsets[s + 1] == self.offsets[s]:
                return [[] for _ in queries]
            return search(self.parts[s], queries, k, local)

        return _merge(_in_parallel(one, len(self.parts)), self.offsets, k)

    def _shard(self, row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return s, row - self.offsets[s]


class ShardedDense(_Sharded):
    """The dense indexes of the shards as one: exact top k of each, merged."""

    def search(self, queries: Sequence, k: int, rows: np.ndarray | None = None) -> SearchResults:
        return self._search(lambda part, qs, k, local: part.search(qs, k, local), queries, k, rows)


class ShardedLate(_Sharded):
    """The late-interaction indexes of the shards as one (search, MaxSim of given rows, token vectors)."""

    @property
    def params(self) -> dict[str, Any]:
        return self.parts[0].params

    def search(self, queries: Sequence[np.ndarray], k: int, rows: np.ndarray | None = None,
               exact_max_tokens: int = 1_000_000, candidates: int = 1024, probe: int = 128) -> SearchResults:
        return self._search(lambda part, qs, k, local: part.search(qs, k, local, exact_max_tokens, candidates, probe),
                            queries, k, rows)

    def maxsim(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.array([self.parts[s].maxsim(query, np.array([local]))[0]
                         for s, local in map(self._shard, map(int, rows))], dtype=np.float32)

    def token_data(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        s, local = self._shard(row)
        return self.parts[s].token_data(local)


class ShardedLexical(_Sharded):
    """BM25 over the shards together, with their statistics merged: the scores one index over all their rows
    would give (bm25s's lucene variant, its k1 and b)."""

    def search(self, queries: Sequence[str], k: int, rows: np.ndarray | None = None) -> SearchResults:
        from ragkit.tokens import tokenize

        total = len(self)
        if any(part.lengths is None for part in self.parts):
            raise RagkitError("a shard of this index was built before BM25 kept its row lengths; rebuild it with "
                              "`ragkit index FOLDER --rebuild` to search it in shards")
        if total == 0 or k == 0:
            return [[] for _ in queries]
        mean_length = sum(float(p.lengths.sum()) for p in self.parts if p.count) / total
        out = []
        for terms in tokenize(queries):
            scores = np.zeros(total)
            for term in terms:  # a repeated query term counts each time, as in bm25s
                postings = [p.postings(term) for p in self.parts]
                frequency = sum(len(found) for found, _ in postings)
                if not frequency:
                    continue
                idf = math.log(1 + (total - frequency + 0.5) / (frequency + 0.5))
                for part, offset, (found, tf) in zip(self.parts, self.offsets, postings):
                    k1, b = part.retriever.k1, part.retriever.b
                    norm = k1 * (1 - b + b * part.lengths[found] / mean_length)
                    scores[found + offset] += idf * tf / (tf + norm)
            out.append(top_rows(scores.astype(np.float32), k, rows))  # float32, as bm25s scores
        return out


class ShardedSearcher(Searcher):
    """A Searcher over the shards' live generations (a tuple of them): the joined chunk table and manifest, and each
    retriever's results merged across shards (see the module docstring)."""

    def _read(self, generations: tuple[Path, ...]):
        import pyarrow as pa

        parts = [(store.read_manifest(g), store.load_chunks(g)) for g in generations]
        self._sizes = [table.num_rows for _, table in parts]
        offsets = [0, *np.cumsum(self._sizes).tolist()]
        last_run = generations[0].parent.parent / LAST_RUN if generations else None
        manifest = merged_manifest([m for m, _ in parts], offsets,
                                   json.loads(last_run.read_text()) if last_run and last_run.is_file() else None)
        return manifest, pa.concat_tables([table for _, table in parts])

    def _load(self, part: str):
        # one after another: np.load parses each header with ast.literal_eval, which CPython 3.11 may fail
        # ("AST constructor recursion depth mismatch") when threads parse at once
        loaded = [load_structure(generation, part) for generation in self.generation]
        view = {"dense": ShardedDense, "bm25": ShardedLexical, "late": ShardedLate}[part]
        return view(loaded, self._sizes)
