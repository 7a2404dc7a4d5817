"""Indexing throughput of the Ray engine against the local loop, at equal workers, on one machine.

    python benchmarks/bench_ray_index.py [--articles 30] [--workers 1 2]

The same SQuAD dev articles are indexed from scratch with all-MiniLM-L6-v2 (dense + BM25, no late stage) by the
local loop with torch on W threads, and by `--engine ray` on a local Ray instance of W CPUs (W encoding actors of
one CPU each). Encoding is timed from the "encode" stage's first progress event to its last: for Ray this includes
starting the actor pool (a process per actor, its imports and its model load). Ray's own start (`ray.init`) is
timed apart. Every Ray index is checked against the local one (same chunk ids, vectors within 1e-5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, minilm_model, record, timed  # noqa: E402


class StageClock:
    """A progress callback that remembers when each stage first and last reported."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, event) -> None:
        now = time.perf_counter()
        self.first.setdefault(event.stage, now)
        self.last[event.stage] = now

    def seconds(self, stage: str) -> float:
        return self.last[stage] - self.first[stage]


def run(docs: Path, index: Path, model: str, engine=None) -> dict:
    from ragkit.api import Index
    from ragkit.config import Settings

    clock = StageClock()
    report, total = timed(Index(index, Settings(dense_model=model, late=False)).add, docs, progress=clock,
                          engine=engine)
    return {"total_s": total, "parse_s": clock.seconds("parse"), "encode_s": clock.seconds("encode"),
            "chunks": report.chunks, "tokens": report.encoded_tokens,
            "encode_tok_s": report.encoded_tokens / clock.seconds("encode")}


def same_index(a: Path, b: Path) -> float:
    """Largest difference between the two indexes' dense vectors (their chunk ids must be equal)."""
    import numpy as np

    from ragkit import store

    ga, gb = store.current_generation(a), store.current_generation(b)
    ids = [store.load_chunks(g).column("chunk_id").to_pylist() for g in (ga, gb)]
    assert ids[0] == ids[1], "the Ray engine made other chunks than the local loop"
    va, vb = (np.load(g / "dense" / "vectors.npy") for g in (ga, gb))
    diff = float(np.abs(va - vb).max())
    assert diff <= 1e-5, diff
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=30, help="SQuAD dev articles (of 48), by name")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-record", action="store_true", help="print the table, write no RESULTS.md entry")
    args = parser.parse_args()

    import torch

    from ragkit.engines.ray_engine import ray_engine

    model = minilm_model()
    raw: dict = {"model": model, "articles": args.articles, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = work / "docs"
        docs.mkdir()
        for path in sorted((DATA / "squad-v1.1-dev" / "docs").iterdir())[: args.articles]:
            shutil.copy(path, docs / path.name)
        for workers in args.workers:
            torch.set_num_threads(workers)
            local = run(docs, work / f"local-{workers}", model)
            started = time.perf_counter()
            with ray_engine(workers=workers) as engine:
                ray_start = time.perf_counter() - started
                ray = run(docs, work / f"ray-{workers}", model, engine)
            ray["ray_init_s"] = ray_start
            ray["max_vector_diff"] = same_index(work / f"local-{workers}", work / f"ray-{workers}")
            raw["runs"][workers] = {"local": local, "ray": ray}
            print(f"workers {workers}: local {local}, ray {ray}", flush=True)

    lines = ["| workers | local loop: encode | Ray engine: encode | Ray ÷ local, encode rate | local loop: index run | "
             "Ray engine: index run (+ ray.init) | local ÷ Ray, run time |", "|---|---|---|---|---|---|---|"]
    for workers, r in raw["runs"].items():
        local, ray = r["local"], r["ray"]
        lines.append(
            f"| {workers} | {local['encode_tok_s']:,.0f} tok/s ({local['encode_s']:.1f} s) | "
            f"{ray['encode_tok_s']:,.0f} tok/s ({ray['encode_s']:.1f} s) | "
            f"{ray['encode_tok_s'] / local['encode_tok_s']:.2f}× | {local['total_s']:.1f} s | "
            f"{ray['total_s']:.1f} s (+ {ray['ray_init_s']:.1f} s) | {local['total_s'] / ray['total_s']:.2f}× |")
    first = next(iter(raw["runs"].values()))["local"]
    notes = (f"Model: all-MiniLM-L6-v2 (dense + BM25, `late=False`). {args.articles} SQuAD dev articles: "
             f"{first['chunks']:,} chunks, {first['tokens']:,} tokens encoded (the file name and heading path "
             "included). Local loop: torch on W threads in one process; Ray engine: a local Ray instance of W CPUs, "
             "W actors of one CPU (one torch thread) each, each loading the model once. The encode time runs from "
             "the stage's first progress event to its last, so Ray's includes starting its actors; the index run "
             "excludes `ray.init`, shown apart. Ratios below 1 are Ray's overhead. Every Ray index had the local "
             "loop's chunk ids and vectors (largest difference "
             f"{max(r['ray']['max_vector_diff'] for r in raw['runs'].values()):.1e}).")
    table = "\n".join(lines)
    if args.no_record:
        print(table)
        return
    record("bench_ray_index", "Indexing on Ray (`--engine ray`) against the local loop, at equal workers", raw, table,
           notes, command=f"python benchmarks/bench_ray_index.py --articles {args.articles}")


if __name__ == "__main__":
    main()
