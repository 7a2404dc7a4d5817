"""Late search on a collection of real, distinct text: every evaluation set's documents in one late folder (about
10M tokens), queried with each set's dev questions; the centroid candidate stage against exact MaxSim.

    python benchmarks/bench_late_collection.py [--queries-per-set 30] [--workdir DIR]

The large collection of bench_late_speed repeats the SQuAD vectors with noise, so its top 10 is a few chunks and
their copies; here every chunk is its own text (SQuAD articles, meeting transcripts, PubMed abstracts, long
stories and papers, the Python documentation, annual reports), so a query's top 10 are ten different passages
among millions of tokens about other things. Vectors: the same PyLate ColBERT over all-MiniLM-L6-v2 with an
untrained 128-d projection as bench_late_speed (no trained ColBERT can be downloaded here), chunked as
`ragkit index` chunks. PLAID is not built: fast-plaid cannot compress 10M tokens on two cores in under half an hour
(bench_late_speed's entry).

Measured: recall@10 against exact MaxSim, overall and per set, and p50/p95 of one query at a time, over a grid of
probes and candidates, for ragkit's centroid count (64·√T) and for PLAID's (16·√T); the time to build each; exact
MaxSim's own latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.bench_late_speed import grid_table, latencies, recall_at_10  # noqa: E402
from benchmarks.common import DATA, minilm_colbert, minilm_model, percentiles, record  # noqa: E402

SETS = ("squad-v1.1-dev", "qmsum", "pubmedqa-pqal", "leval-longdoc", "pydocs", "financebench")
GRID = [(probe, candidates) for probe in (32, 64, 128) for candidates in (256, 512, 1024, 2048)]
COUNTS = {"ragkit (64·√T)": 64, "PLAID's (16·√T)": 16}


def encode_set(name: str, encoders, parts_dir: Path) -> dict:
    """Chunk one set's documents as `ragkit index` does and encode them with the late model; cached in
    `parts_dir` as NAME.tokens.npy (float16), NAME.offsets.npy and NAME.paths.json."""
    from ragkit.engines import parse_source

    if (parts_dir / f"{name}.offsets.npy").is_file():
        return {"cached": True}
    spec = encoders.chunk_spec()
    root = DATA / name / "docs"
    chunks = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parsed = parse_source(path, str(path.relative_to(root)), spec)
        chunks.extend(parsed.chunks or [])
    started = time.perf_counter()
    encoded = encoders.late.encode_documents([c.text for c in chunks], [c.n_tokens for c in chunks])
    offsets = np.concatenate([[0], np.cumsum([len(e.vectors) for e in encoded])]).astype(np.int64)
    np.save(parts_dir / f"{name}.tokens.npy", np.concatenate([e.vectors for e in encoded]).astype(np.float16))
    np.save(parts_dir / f"{name}.offsets.npy", offsets)
    (parts_dir / f"{name}.paths.json").write_text(json.dumps([c.path for c in chunks]))
    return {"chunks": len(chunks), "tokens": int(offsets[-1]), "seconds": time.perf_counter() - started}


def write_collection(parts_dir: Path, folder: Path, sets: tuple[str, ...], params: dict) -> list[str]:
    """One late folder of every set's chunks, in set order (no candidate stage yet); the set of each row."""
    from ragkit.indexes.late import write_late_index

    parts, owner = [], []
    for name in sets:
        tokens = np.load(parts_dir / f"{name}.tokens.npy", mmap_mode="r")
        offsets = np.load(parts_dir / f"{name}.offsets.npy")
        for a, b in zip(offsets[:-1], offsets[1:]):
            parts.append((tokens[a:b], np.full((b - a, 2), -1, dtype=np.int32)))
            owner.append(name)
    write_late_index(folder, parts, [f"c{i}" for i in range(len(parts))], params, None, None, plaid=False,
                     centroids=False)
    return owner


def build_centroids(late, folder: Path, per_root_token: int) -> float:
    """Seconds to write the centroid files of `late`'s tokens into `folder` with K = per_root_token·√T."""
    from ragkit.indexes import late_centroids

    folder.mkdir(parents=True, exist_ok=True)
    saved = late_centroids.CENTROIDS_PER_ROOT_TOKEN
    late_centroids.CENTROIDS_PER_ROOT_TOKEN = per_root_token
    try:
        started = time.perf_counter()
        late_centroids.write_centroids(folder, late.tokens, late.offsets, {}, None)
        return time.perf_counter() - started
    finally:
        late_centroids.CENTROIDS_PER_ROOT_TOKEN = saved


def questions_of(name: str, count: int) -> list[str]:
    path = DATA / name / "questions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["question"] for line in path.read_text().splitlines()[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries-per-set", type=int, default=30)
    parser.add_argument("--exact-queries", type=int, default=5, help="queries timed with exact MaxSim")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--name", default="bench_late_collection")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ragkit.config import Settings
    from ragkit.indexer import IndexReport, _Encoders
    from ragkit.indexes.late import LateIndex
    from ragkit.indexes.late_centroids import CentroidLists

    sets = tuple(args.sets.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-late-collection-"))
    colbert = work / "colbert"
    if not colbert.is_dir():
        minilm_colbert(colbert, identity=False)
    encoders = _Encoders(Settings(dense_model=minilm_model(), late_model=str(colbert)).for_index({}), True, True,
                         IndexReport())
    parts_dir = work / "real-parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    raw: dict = {"sets": list(sets), "threads": args.threads, "encoding": {}}
    for name in sets:
        raw["encoding"][name] = encode_set(name, encoders, parts_dir)
        print("encoded", name, raw["encoding"][name], flush=True)
    folder = work / "collection"
    owner_file = work / "collection-sets.json"
    if not owner_file.is_file():
        owner = write_collection(parts_dir, folder, sets, {"model": str(colbert), "dim": encoders.late.dim})
        owner_file.write_text(json.dumps(owner))
    owner = json.loads(owner_file.read_text())
    late = LateIndex.load(folder)
    raw.update(tokens=late.total_tokens, chunks=len(late),
               chunks_per_set={name: owner.count(name) for name in sets})

    labels, questions = [], []
    for name in sets:
        asked = questions_of(name, args.queries_per_set)
        labels += [name] * len(asked)
        questions += asked
    queries = encoders.late.encode_queries(questions)
    started = time.perf_counter()
    truth = [[r for r, _ in hits] for hits in late.search(queries, 10, exact_max_tokens=10**12)]
    raw["exact_all_queries_seconds"] = time.perf_counter() - started
    _, times = latencies(lambda q: late.search([q], 10, exact_max_tokens=10**12), queries[: args.exact_queries])
    raw["exact"] = percentiles(times)
    raw["questions"] = {name: labels.count(name) for name in sets if name in labels}
    print("exact", raw["exact"], flush=True)

    raw["centroids"] = {}
    for label, per_root in COUNTS.items():
        stage_dir = work / f"centroids-{per_root}"
        entry = {"build_seconds": build_centroids(late, stage_dir, per_root)}
        late._centroids = CentroidLists.load(stage_dir, len(late))  # the stage searched by candidate_search
        entry["centroids"] = len(late._centroids.centroids)
        for probe, candidates in GRID:
            found, times = latencies(lambda q: [r for r, _ in late.candidate_search(
                [q], 10, candidates=candidates, probe=probe, stage="centroids")[0]], queries)
            per_set = {name: recall_at_10([f for f, s in zip(found, labels) if s == name],
                                          [t for t, s in zip(truth, labels) if s == name]) for name in raw["questions"]}
            entry[f"probe={probe} candidates={candidates}"] = {**percentiles(times),
                                                               "recall@10": recall_at_10(found, truth),
                                                               "recall@10_per_set": per_set}
        raw["centroids"][label] = entry
        print(label, entry, flush=True)
    if not args.no_record:
        record(args.name, f"Late search on {late.total_tokens / 1e6:.1f}M tokens of real text (every evaluation "
               "set's documents): centroid candidates against exact MaxSim", raw, table(raw),
               command=f"python benchmarks/bench_late_collection.py {' '.join(sys.argv[1:])}".strip())


def table(raw: dict) -> str:
    from ragkit.config import Settings

    lines = [f"{raw['tokens']:,} tokens in {raw['chunks']:,} chunks ("
             + ", ".join(f"{name} {count:,}" for name, count in raw["chunks_per_set"].items())
             + f" chunks); {sum(raw['questions'].values())} questions ("
             + ", ".join(f"{name} {count}" for name, count in raw["questions"].items())
             + f"). Exact MaxSim: {raw['exact']['p50_ms']:.0f} ms p50.", ""]
    for label, entry in raw["centroids"].items():
        grid = {key: cell for key, cell in entry.items() if key.startswith("probe=")}
        lines += [f"Centroids {label}: K = {entry['centroids']:,}, built in {entry['build_seconds']:.0f} s. "
                  "Recall@10 vs exact / p50 ms, by probe (rows) and candidates (columns):", "", *grid_table(grid)]
        settings = Settings()
        default = grid.get(f"probe={settings.late_probe} candidates={settings.late_rerank_candidates}")
        if default:
            lines += ["", f"Per set at the defaults (probe {settings.late_probe}, {settings.late_rerank_candidates:,} "
                      "candidates): " + ", ".join(
                f"{name} {value:.3f}" for name, value in default["recall@10_per_set"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
