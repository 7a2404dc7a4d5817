"""Late-interaction search speed: ragkit's exact MaxSim (the float16 token matrix scored as stored) and its centroid
candidate stage (centroid interaction + exact re-rank) against PLAID (fast-plaid, as PyLate uses it) and PyLate's
exhaustive rerank, at 294k and at 10M tokens, in one run.

    python benchmarks/bench_late_speed.py [--queries 100] [--scale 34] [--workdir DIR]

Vectors: SQuAD v1.1 dev articles chunked by ragkit and encoded by a PyLate ColBERT over all-MiniLM-L6-v2 with an
untrained 128-d projection (the usual ColBERT width; no trained ColBERT can be downloaded here), queries from the
dev questions. The large collection repeats those chunks `scale` times with small noise (real token vectors, each
chunk made distinct), so that its ranking is as hard as the small one's; PLAID is trained on it like on any index.

Measured: p50/p95 latency and QPS of one query at a time, recall@10 against exact MaxSim, bytes per token held, the
time to build each candidate stage (the centroid stage over a grid of probes and candidate counts); the
memory-bandwidth limit (the token matrix read once per query at the bandwidth a numpy sum reaches here); and the
time of each stage of a hybrid query (dense + BM25 + late, fused, re-ranked) at 294k tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, minilm_colbert, minilm_model, percentiles, record  # noqa: E402


def latencies(search, queries) -> tuple[list[list[int]], list[float]]:
    found, times = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q))
        times.append(time.perf_counter() - started)
    return found, times


def recall_at_10(found: list[list[int]], truth: list[list[int]]) -> float:
    return sum(len(set(f[:10]) & set(t[:10])) / max(1, len(t[:10])) for f, t in zip(found, truth)) / len(truth)


def bandwidth_gb_s() -> float:
    """Bytes per second a numpy sum reads from a 1 GiB float32 array here (best of 3)."""
    import numpy as np

    data = np.ones(1 << 28, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


GRID = [(probe, candidates) for probe in (16, 32, 64, 128) for candidates in (128, 256, 512, 1024, 2048)]


def measure(late, queries, with_pylate: bool) -> dict:
    """Every late search method on one LateIndex, against exact MaxSim."""
    from ragkit.config import Settings

    n = len(queries)
    out: dict = {"tokens": late.total_tokens, "chunks": len(late)}
    first = time.perf_counter()
    exact, _ = latencies(lambda q: [r for r, _ in late.search([q], 10, exact_max_tokens=10**12)[0]], queries[:1])
    out["first_query_ms"] = 1000 * (time.perf_counter() - first)
    exact, times = latencies(lambda q: [r for r, _ in late.search([q], 10, exact_max_tokens=10**12)[0]], queries)
    out["exact"] = {**percentiles(times), "recall@10": 1.0}
    if late.has_centroids:
        default = Settings()
        grid = {}
        for probe, candidates in GRID:
            found, times = latencies(lambda q: [r for r, _ in late.search(
                [q], 10, exact_max_tokens=0, candidates=candidates, probe=probe)[0]], queries)
            grid[f"probe={probe} candidates={candidates}"] = {**percentiles(times), "recall@10":
                                                              recall_at_10(found, exact)}
        out["centroids_grid"] = grid
        out["centroids"] = dict(grid[f"probe={default.late_probe} candidates={default.late_rerank_candidates}"])
    if late.has_plaid:
        late.plaid_search(queries[:1], 10)  # opens PLAID
        found, times = latencies(lambda q: [r for r, _ in late.plaid_search([q], 10)[0]], queries)
        out["plaid"] = {**percentiles(times), "recall@10": recall_at_10(found, exact)}
        found, times = latencies(lambda q: [r for r, _ in late.candidate_search([q], 10, stage="plaid")[0]], queries)
        out["plaid_rerank"] = {**percentiles(times), "recall@10": recall_at_10(found, exact)}
    if with_pylate:
        from pylate import rank

        documents = [late.token_data(r)[0] for r in range(len(late))]
        ids = list(range(len(late)))
        found, times = latencies(lambda q: [int(r["id"]) for r in rank.rerank(
            documents_ids=[ids], queries_embeddings=[q], documents_embeddings=[documents])[0][:10]], queries)
        out["pylate_rerank"] = {**percentiles(times), "recall@10": recall_at_10(found, exact)}
    for name in METHODS:
        if name in out:
            out[name]["qps"] = 1000 / out[name]["p50_ms"]
    out["queries"] = n
    return out


METHODS = ("exact", "centroids", "plaid", "plaid_rerank", "pylate_rerank")


def hybrid_latency(idx, questions: list[str]) -> dict:
    """p50/p95 of a whole hybrid query and the mean milliseconds of each of its stages."""
    for q in questions[:5]:
        idx.search(q, k=10, mode="hybrid")
    stages: dict[str, float] = {}
    hybrid = []
    for q in questions:
        started = time.perf_counter()
        idx.search(q, k=10, mode="hybrid")
        hybrid.append(time.perf_counter() - started)
        for stage, seconds in idx.searcher.timings.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {**percentiles(hybrid), "stage_ms": {s: 1000 * v / len(questions) for s, v in stages.items()}}


def eval_seconds(idx, limit: int) -> dict:
    """Seconds per question of `ragkit eval` (hybrid) on the first `limit` SQuAD dev questions: retrieval and its
    scoring alone, and with the extractive reader's answers."""
    from ragkit.evaluate import evaluate, load_questions

    dataset = DATA / "squad-v1.1-dev"
    questions = load_questions(dataset / "questions.jsonl", dataset / "docs", limit)
    out = {"questions": len(questions)}
    for label, answer in (("retrieval", False), ("extractive_answers", True)):
        started = time.perf_counter()
        evaluate(idx, questions, "hybrid", answer=answer, reader="extractive" if answer else None)
        out[label] = (time.perf_counter() - started) / len(questions)
    return out


def add_candidate_stages(folder: Path, plaid: bool, kmeans_docs: int | None = None) -> dict:
    """Build the centroid stage of a late folder afresh and, with `plaid`, PLAID too (its k-means on `kmeans_docs`
    sampled documents; None: fast-plaid's default); their seconds."""
    from ragkit.indexes import late as late_module
    from ragkit.indexes.late_centroids import write_centroids

    index = late_module.LateIndex.load(folder)
    params = dict(index.params)
    seconds = {}
    started = time.perf_counter()
    params["centroids"] = vars(write_centroids(folder, index.tokens, index.offsets, {}, None))
    seconds["centroids"] = time.perf_counter() - started
    if plaid:
        shutil.rmtree(folder / late_module.PLAID, ignore_errors=True)
        started = time.perf_counter()
        parts = [index.stored(row) for row in range(len(index))]
        create = None
        if kmeans_docs is not None:
            from fast_plaid.search import FastPlaid

            create = FastPlaid.create
            FastPlaid.create = lambda self, *a, **kw: create(self, *a, **{**kw, "n_samples_kmeans": kmeans_docs})
        try:
            late_module._update_plaid(folder, parts, [f"c{i}" for i in range(len(parts))], None, None)
        finally:
            if create is not None:
                FastPlaid.create = create
        seconds["plaid"] = time.perf_counter() - started
        params["plaid"] = {"trained_docs": len(parts), "added_since_training": 0}
    (folder / late_module.PARAMS).write_text(json.dumps(params, indent=2))
    return seconds


def scaled_copy(source: Path, target: Path, scale: int, seed: int = 0) -> Path:
    """A late folder of `scale` noisy copies of every chunk of `source` (no candidate stage yet)."""
    import numpy as np

    from ragkit.indexes.late import LateIndex, write_late_index

    small = LateIndex.load(source)
    rng = np.random.default_rng(seed)
    parts = []
    for copy in range(scale):
        for row in range(len(small)):
            vectors = small.token_data(row)[0]
            noisy = vectors + rng.normal(scale=0.02, size=vectors.shape).astype(np.float32) * (copy > 0)
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
            parts.append((noisy.astype(np.float16), np.full((len(noisy), 2), -1, dtype=np.int32)))
    write_late_index(target, parts, [f"c{i}" for i in range(len(parts))], dict(small.params), None, None,
                     plaid=False, centroids=False)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--scale", type=int, default=34, help="copies of the collection in the large one (1: none)")
    parser.add_argument("--large-plaid", action=argparse.BooleanOptionalAction, default=True,
                        help="train PLAID on the large collection (on two cores it takes longer than 20 minutes)")
    parser.add_argument("--large-plaid-kmeans-docs", type=int, default=None,
                        help="documents PLAID's k-means samples on the large collection [default: fast-plaid's, "
                             "16·√(120·documents): over an hour of k-means on two cores at 10M tokens]")
    parser.add_argument("--large-only", action="store_true",
                        help="measure the large collection alone (no hybrid, eval or 294k-token measurements)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--name", default="bench_late_speed", help="raw numbers go to benchmarks/results/NAME.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ragkit import store
    from ragkit.api import Index
    from ragkit.config import Settings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-late-speed-"))
    questions = [json.loads(line)["question"] for line in
                 (DATA / "squad-v1.1-dev" / "questions.jsonl").read_text().splitlines()[: args.queries]]
    colbert = minilm_colbert(work / "colbert", identity=False)
    idx = Index(work / "index", Settings(dense_model=minilm_model(), late_model=colbert))
    idx.add(DATA / "squad-v1.1-dev" / "docs")
    searcher = idx.searcher
    queries = searcher.late_encoder.encode_queries(questions)
    raw: dict = {"questions": len(questions), "threads": args.threads, "bandwidth_GB_s": bandwidth_gb_s(), "small": {}}

    if not args.large_only:
        raw["hybrid"] = hybrid_latency(idx, questions)
        print("hybrid", raw["hybrid"], flush=True)
        raw["eval_seconds_per_question"] = eval_seconds(idx, args.queries)
        print("eval", raw["eval_seconds_per_question"], flush=True)

    from ragkit.indexes.late import LateIndex
    from ragkit.indexes.late_centroids import FILES

    sizes = ("large",) if args.large_only else ("small", "large") if args.scale > 1 else ("small",)
    small_dir = store.current_generation(idx.path) / "late"
    big_dir = work / f"late-x{args.scale}"
    if "large" in sizes and not (big_dir / "params.json").is_file():
        shutil.rmtree(big_dir, ignore_errors=True)
        started = time.perf_counter()
        scaled_copy(small_dir, big_dir, args.scale)
        raw["large_copy_seconds"] = time.perf_counter() - started
    if "small" in sizes:
        raw["small"]["build_seconds"] = add_candidate_stages(small_dir, plaid=True)
        raw["small"].update(measure(LateIndex.load(small_dir), queries, with_pylate=True))
        print("small", raw["small"], flush=True)
    if "large" in sizes:
        raw["large"] = {"build_seconds": add_candidate_stages(big_dir, args.large_plaid, args.large_plaid_kmeans_docs),
                        "plaid_kmeans_docs": args.large_plaid_kmeans_docs}
        raw["large"].update(measure(LateIndex.load(big_dir), queries[: max(10, args.queries // 2)],
                                    with_pylate=False))
        print("large", raw["large"], flush=True)
    for size in sizes:
        late_dir = small_dir if size == "small" else big_dir
        tokens = raw[size]["tokens"]
        float16 = (late_dir / "tokens.npy").stat().st_size / tokens
        raw[size]["bytes_per_token"] = {
            "float16_matrix": float16,
            "centroids": sum((late_dir / name).stat().st_size for name in FILES if (late_dir / name).is_file())
            / tokens,
            "plaid": sum(p.stat().st_size for p in (late_dir / "plaid").rglob("*") if p.is_file()) / tokens
            if (late_dir / "plaid").is_dir() else None}
        raw[size]["bandwidth_limit_ms"] = {
            "float16": 1000 * (late_dir / "tokens.npy").stat().st_size / (raw["bandwidth_GB_s"] * 1e9),
            "float32": 1000 * 2 * (late_dir / "tokens.npy").stat().st_size / (raw["bandwidth_GB_s"] * 1e9)}
    if not args.no_record:
        sizes_text = " and ".join(f"{raw[size]['tokens'] / 1e6:.2f}M" for size in sizes)
        record(args.name, "Late-interaction search speed: exact MaxSim and centroid candidates against PLAID "
               f"and PyLate's rerank, {sizes_text} tokens", raw, table(raw),
               command=f"python benchmarks/bench_late_speed.py {' '.join(sys.argv[1:])}".strip())


def table(raw: dict) -> str:
    lines = ["| collection | method | p50 ms | p95 ms | QPS | recall@10 vs exact | QPS vs PLAID |",
             "|---|---|---|---|---|---|---|"]
    for size in [size for size in ("small", "large") if raw.get(size)]:
        entry = raw[size]
        for method in METHODS:
            if method in entry:
                m = entry[method]
                versus = f"{m['qps'] / entry['plaid']['qps']:.2f}×" if "plaid" in entry else "–"
                lines.append(f"| {entry['tokens']:,} tokens | {method} | {m['p50_ms']:.1f} | {m['p95_ms']:.1f} | "
                             f"{m['qps']:.1f} | {m['recall@10']:.3f} | {versus} |")
    for size in [size for size in ("small", "large") if raw.get(size)]:
        lines += ["", f"Centroid stage at {raw[size]['tokens']:,} tokens, recall@10 vs exact / p50 ms, by probe "
                  "(rows) and candidates re-ranked (columns):", "", *grid_table(raw[size].get("centroids_grid", {}))]
    return "\n".join(lines)


def grid_table(grid: dict) -> list[str]:
    """Markdown rows of a centroid-stage grid keyed "probe=P candidates=C": recall@10 / p50 ms per cell."""
    counts = sorted({int(key.split("candidates=")[1]) for key in grid})
    lines = ["| probe | " + " | ".join(str(c) for c in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for probe in sorted({int(key.split()[0].split("=")[1]) for key in grid}):
        cells = [grid[f"probe={probe} candidates={c}"] for c in counts]
        lines.append(f"| {probe} | " + " | ".join(f"{c['recall@10']:.3f} / {c['p50_ms']:.0f}" for c in cells) + " |")
    return lines


if __name__ == "__main__":
    main()
