"""Indexing throughput, search latency and incremental re-indexing, each beside the baseline a user would write.

    python benchmarks/bench_index.py [--model PATH_OR_ID] [--queries 200]

1. Throughput: `ragkit index` of the SQuAD dev articles against a plain `SentenceTransformer.encode` loop over
   the very same chunks (same model, same texts, same tokens).
2. Latency: hybrid search (`Index.search`) against a raw FAISS search (encode the query, `IndexFlatIP.search`)
   over the same vectors, one query at a time.
3. Re-indexing after one file of the Python docs changed, against indexing them all.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, minilm_model, percentiles, ratio_table, record, timed  # noqa: E402


class StageClock:
    """A progress callback that remembers when each stage last reported."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, event) -> None:
        self.last[event.stage] = time.perf_counter()


def throughput(model: str, work: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from ragkit import store
    from ragkit.api import Index
    from ragkit.config import Settings

    idx = Index(work / "squad-index", Settings(dense_model=model, late=False))  # the dense + BM25 pipeline
    clock = StageClock()
    report, total = timed(idx.add, DATA / "squad-v1.1-dev" / "docs", progress=clock)
    encode_seconds = clock.last["encode"] - clock.last["parse"]
    texts = store.load_chunks(store.current_generation(idx.path)).column("text").to_pylist()

    plain = SentenceTransformer(model, device="cpu")
    _, plain_seconds = timed(plain.encode, texts, batch_size=32, normalize_embeddings=True)
    tokens = report.encoded_tokens
    return {
        "chunks": report.chunks, "tokens": tokens,
        "ragkit_total_s": total, "ragkit_encode_s": encode_seconds, "plain_encode_s": plain_seconds,
        "ragkit_total_tok_s": tokens / total, "ragkit_encode_tok_s": tokens / encode_seconds,
        "plain_encode_tok_s": tokens / plain_seconds,
    }


def latency(model: str, work: Path, n_queries: int) -> dict:
    import json

    import faiss

    from ragkit import store
    from ragkit.api import Index
    from ragkit.encoders.dense import DenseEncoder
    from ragkit.indexes.faiss_index import load_vectors

    questions = [json.loads(line)["question"] for line in
                 (DATA / "squad-v1.1-dev" / "questions.jsonl").read_text().split("\n")[:n_queries]]
    idx = Index(work / "squad-index")
    vectors = load_vectors(store.current_generation(idx.path) / "dense")
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    encoder = DenseEncoder(model)

    def raw_faiss(q: str):
        return flat.search(encoder.encode_queries([q]), 10)

    out = {}
    for name, fn in {
        "raw_faiss": raw_faiss,
        "hybrid": lambda q: idx.search(q, k=10, mode="hybrid"),
        "dense": lambda q: idx.search(q, k=10, mode="dense"),
        "bm25": lambda q: idx.search(q, k=10, mode="bm25"),
    }.items():
        fn(questions[0])  # warm up: load models and indexes
        out[name] = percentiles([timed(fn, q)[1] for q in questions])
    return out


def reindex(model: str, work: Path) -> dict:
    from ragkit.api import Index
    from ragkit.config import Settings

    docs = work / "pydocs"
    shutil.copytree(DATA / "pydocs" / "docs", docs)
    idx = Index(work / "pydocs-index", Settings(dense_model=model, late=False))
    full, full_seconds = timed(idx.add, docs)
    _, unchanged_seconds = timed(idx.add, docs)
    changed = docs / "tutorial" / "classes.rst.txt"
    changed.write_text(changed.read_text() + "\n\nA paragraph added to measure re-indexing.\n")
    one, one_seconds = timed(idx.add, docs)
    return {
        "files": full.added, "chunks": full.chunks, "tokens": full.encoded_tokens,
        "full_s": full_seconds, "no_change_s": unchanged_seconds, "one_file_s": one_seconds,
        "one_file_encoded_chunks": one.encoded_chunks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="dense model id or path [default: all-MiniLM-L6-v2]")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    model = args.model or minilm_model()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = throughput(model, work)
        lat = latency(model, work, args.queries)
        re = reindex(model, work)
    raw = {"model": model, "throughput": t, "latency": lat, "reindex": re}
    rows = [
        ("encoding, SQuAD dev chunks", "ragkit encode", t["ragkit_encode_tok_s"], "ST.encode loop",
         t["plain_encode_tok_s"], "tok/s"),
        ("indexing end to end (scan, parse, chunk, encode, FAISS, BM25, write)", "ragkit index",
         t["ragkit_total_tok_s"], "ST.encode loop", t["plain_encode_tok_s"], "tok/s"),
        ("search p50, one query", "hybrid", lat["hybrid"]["p50_ms"], "raw FAISS", lat["raw_faiss"]["p50_ms"], "ms"),
        ("search p95, one query", "hybrid", lat["hybrid"]["p95_ms"], "raw FAISS", lat["raw_faiss"]["p95_ms"], "ms"),
        ("re-index pydocs after one file changed", "incremental", re["one_file_s"], "full index", re["full_s"], "s"),
    ]
    notes = (f"Model: `{Path(model).name if Path(model).exists() else model}`. "
             f"SQuAD dev: {t['chunks']:,} chunks, {t['tokens']:,} tokens. "
             f"Search latency over {args.queries} questions, k=10: dense {lat['dense']['p50_ms']:.1f} ms p50, "
             f"bm25 {lat['bm25']['p50_ms']:.1f} ms p50. pydocs: {re['files']} files, {re['chunks']:,} chunks, "
             f"{re['tokens']:,} tokens; a run with no change takes {re['no_change_s']:.1f} s; "
             f"the one-file run encoded {re['one_file_encoded_chunks']} chunks.")
    record("bench_index", "Indexing, search latency, re-indexing", raw, ratio_table(rows), notes)


if __name__ == "__main__":
    main()
