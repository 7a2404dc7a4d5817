"""Late interaction: PLAID and exact MaxSim against PyLate's exhaustive rerank and Voyager index, in one run.

    python benchmarks/bench_late.py [--queries 200]

Corpus: the SQuAD v1.1 dev articles, chunked by ragkit (256-token chunks). No trained ColBERT can be downloaded
here, so speed, size and agreement between search methods are measured with a PyLate ColBERT over the
all-MiniLM-L6-v2 weights with an untrained 128-d projection (the usual ColBERT width), and the re-ranking depth
sweep, which needs meaningful scores, with an identity projection (MaxSim over MiniLM's own token vectors).

Measured: search latency p50/p95 of ragkit's exact MaxSim, raw PLAID, and ragkit's PLAID + exact re-rank, against
PyLate's exhaustive `rank.rerank` and its Voyager (HNSW) index; recall@10 of each against the exhaustive top 10;
late-index bytes per token with and without token pooling; the time of each stage of a hybrid query; and how
the depth of exact MaxSim re-ranking in hybrid search trades quality (gold article, gold paragraph) for time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, minilm_colbert, minilm_model, percentiles, ratio_table, record, timed  # noqa: E402


def rerank_sweep(index_path: Path, settings, n_questions: int) -> dict[int, dict]:
    """Quality and time of hybrid search as the exact MaxSim re-ranking depth grows (0: fused order only)."""
    import time

    from ragkit.api import Index
    from ragkit.evaluate import evaluate, load_questions

    squad = DATA / "squad-v1.1-dev"
    questions = load_questions(squad / "questions.jsonl", squad / "docs", limit=n_questions)
    out = {}
    for depth in (0, 8, 32, 128):
        idx = Index(index_path, settings.replace(rerank_depth=depth))
        started = time.perf_counter()
        summary = evaluate(idx, questions, "hybrid", answer=False).summary
        out[depth] = {"recall@1": summary["recall@1"], "recall@5": summary["recall@5"],
                      "evidence_hit@5": summary["evidence_hit@5"],
                      "ms_per_query": 1000 * (time.perf_counter() - started) / len(questions)}
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def recall_at_10(found: list[list[int]], truth: list[list[int]]) -> float:
    return sum(len(set(f[:10]) & set(t[:10])) / max(1, len(t[:10])) for f, t in zip(found, truth)) / len(truth)


def main() -> None:
    import torch
    from pylate import indexes, rank, retrieve

    from ragkit import store
    from ragkit.api import Index
    from ragkit.config import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    questions = [json.loads(line)["question"] for line in
                 (DATA / "squad-v1.1-dev" / "questions.jsonl").read_text().split("\n")[: args.queries]]
    docs = DATA / "squad-v1.1-dev" / "docs"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        colbert = minilm_colbert(work / "colbert", identity=False)  # 128-d, the usual ColBERT width
        settings = Settings(dense_model=minilm_model(), late_model=colbert, late_exact_max_tokens=0)  # build PLAID
        idx = Index(work / "index", settings)
        report, index_seconds = timed(idx.add, docs)
        pooled = Index(work / "pooled", settings.replace(pool_factor=2))
        _, pooled_seconds = timed(pooled.add, docs)

        searcher = idx.searcher
        late = searcher.late
        n_docs, tokens = len(late), late.total_tokens
        query_vectors = searcher.late_encoder.encode_queries(questions)
        doc_vectors = [late.token_data(r)[0] for r in range(n_docs)]

        # PyLate's exhaustive rerank over every chunk: the ground truth
        all_ids = list(range(n_docs))
        truth, pylate_times = [], []
        for q in query_vectors:
            result, seconds = timed(rank.rerank, documents_ids=[all_ids], queries_embeddings=[q],
                                    documents_embeddings=[doc_vectors])
            truth.append([int(r["id"]) for r in result[0][:10]])
            pylate_times.append(seconds)

        def run(search) -> tuple[list[list[int]], list[float]]:
            found, times = [], []
            for q in query_vectors:
                rows, seconds = timed(search, q)
                found.append(rows)
                times.append(seconds)
            return found, times

        exact_found, exact_times = run(lambda q: [r for r, _ in late.search([q], 10, exact_max_tokens=10**12)[0]])
        plaid_found, plaid_times = run(lambda q: [r for r, _ in late.plaid_search([q], 10)[0]])
        rerank_found, rerank_times = run(lambda q: [r for r, _ in late.search([q], 10, exact_max_tokens=0)[0]])

        voyager = indexes.Voyager(index_folder=str(work / "voyager"), override=True)
        _, voyager_build = timed(voyager.add_documents, documents_ids=[str(i) for i in all_ids],
                                 documents_embeddings=doc_vectors)
        retriever = retrieve.ColBERT(index=voyager)
        voyager_found, voyager_times = run(lambda q: [int(r["id"]) for r in retriever.retrieve(
            queries_embeddings=[torch.from_numpy(q)], k=10)[0]])

        for q in questions[:5]:  # warm the hybrid path
            idx.search(q, k=10, mode="hybrid")
        stage_totals: dict[str, float] = {}
        hybrid_times = []
        for q in questions:
            _, seconds = timed(idx.search, q, 10, "hybrid")
            hybrid_times.append(seconds)
            for stage, value in searcher.timings.items():
                stage_totals[stage] = stage_totals.get(stage, 0.0) + value
        stages_ms = {stage: 1000 * value / len(questions) for stage, value in stage_totals.items()}

        quality = Index(work / "quality", Settings(dense_model=minilm_model(),
                                                   late_model=minilm_colbert(work / "identity", identity=True)))
        quality.add(docs)
        depth_sweep = rerank_sweep(quality.path, quality.settings, args.queries)

        late_dir = store.current_generation(idx.path) / "late"
        pooled_dir = store.current_generation(pooled.path) / "late"
        pooled_tokens = pooled.searcher.late.total_tokens
        sizes = {
            "tokens_fp16_B_per_token": (late_dir / "tokens.npy").stat().st_size / tokens,
            "plaid_B_per_token": folder_bytes(late_dir / "plaid") / tokens,
            "late_folder_B_per_token": folder_bytes(late_dir) / tokens,
            "pooled_tokens": pooled_tokens,
            "pooled_late_folder_B_per_source_token": folder_bytes(pooled_dir) / tokens,
            "voyager_B_per_token": folder_bytes(work / "voyager") / tokens,
        }

    raw = {
        "chunks": n_docs, "tokens": tokens, "queries": len(questions),
        "index_seconds": index_seconds, "pooled_index_seconds": pooled_seconds, "voyager_build_seconds": voyager_build,
        "latency": {name: percentiles(times) for name, times in {
            "pylate_rerank_exhaustive": pylate_times, "ragkit_exact": exact_times, "plaid_raw": plaid_times,
            "ragkit_plaid_rerank": rerank_times, "voyager": voyager_times, "ragkit_hybrid": hybrid_times}.items()},
        "recall@10_vs_exhaustive": {
            "ragkit_exact": recall_at_10(exact_found, truth), "plaid_raw": recall_at_10(plaid_found, truth),
            "ragkit_plaid_rerank": recall_at_10(rerank_found, truth), "voyager": recall_at_10(voyager_found, truth)},
        "index_bytes": sizes,
        "hybrid_stage_ms": stages_ms,
        "rerank_depth": depth_sweep,
    }
    lat, rec = raw["latency"], raw["recall@10_vs_exhaustive"]
    rows = [
        ("late search p50: exact MaxSim vs PyLate exhaustive rerank", "ragkit exact", lat["ragkit_exact"]["p50_ms"],
         "pylate rank.rerank", lat["pylate_rerank_exhaustive"]["p50_ms"], "ms"),
        ("late search p95: exact MaxSim vs PyLate exhaustive rerank", "ragkit exact", lat["ragkit_exact"]["p95_ms"],
         "pylate rank.rerank", lat["pylate_rerank_exhaustive"]["p95_ms"], "ms"),
        ("late search p50: PLAID + exact re-rank vs Voyager", "ragkit PLAID+rerank",
         lat["ragkit_plaid_rerank"]["p50_ms"], "pylate Voyager", lat["voyager"]["p50_ms"], "ms"),
        ("late search p95: PLAID + exact re-rank vs Voyager", "ragkit PLAID+rerank",
         lat["ragkit_plaid_rerank"]["p95_ms"], "pylate Voyager", lat["voyager"]["p95_ms"], "ms"),
        ("late index size", "ragkit late folder", sizes["late_folder_B_per_token"], "pylate Voyager",
         sizes["voyager_B_per_token"], "B/token"),
    ]
    stage_text = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in stages_ms.items())
    notes = (
        f"{n_docs:,} chunks, {tokens:,} document tokens, {len(questions)} queries. "
        f"Recall@10 against PyLate's exhaustive top 10: ragkit exact {rec['ragkit_exact']:.3f}, raw PLAID "
        f"{rec['plaid_raw']:.3f}, PLAID + exact re-rank {rec['ragkit_plaid_rerank']:.3f}, Voyager {rec['voyager']:.3f}. "
        f"Raw PLAID p50 {lat['plaid_raw']['p50_ms']:.1f} ms. "
        f"Bytes per token: float16 token matrix {sizes['tokens_fp16_B_per_token']:.0f}, PLAID "
        f"{sizes['plaid_B_per_token']:.0f}, whole late folder {sizes['late_folder_B_per_token']:.0f}; with "
        f"pool_factor=2 ({sizes['pooled_tokens']:,} vectors) {sizes['pooled_late_folder_B_per_source_token']:.0f} "
        f"per source token. Hybrid query p50 {lat['ragkit_hybrid']['p50_ms']:.1f} ms; mean time per stage: "
        f"{stage_text}. Index build: {index_seconds:.0f} s (dense + BM25 + late), pooled {pooled_seconds:.0f} s; "
        f"Voyager build {voyager_build:.0f} s.\n\nRe-ranking depth in hybrid search ({args.queries} questions): "
        + "; ".join(f"depth {d}: recall@1 {r['recall@1']:.3f}, evidence@5 {r['evidence_hit@5']:.3f}, "
                    f"{r['ms_per_query']:.0f} ms/query" for d, r in depth_sweep.items()) + ".")
    record("bench_late", "Late interaction: exact MaxSim, PLAID, Voyager", raw, ratio_table(rows), notes)


if __name__ == "__main__":
    main()
