"""Retrieval rules side by side: each single retriever, then fusion rules, on the dev questions of every set, on CPU.

    python benchmarks/bench_fusion.py [--sets squad-v1.1-dev,financebench] [--context-tokens 32]
                                      [--rules default,rrf,dense+name] [--limit N] [--no-record]

One index per set and context setting (all-MiniLM-L6-v2 dense + BM25, no late stage) in
benchmarks/out/index-context-N/, built once and kept. Each question's dense and BM25 candidates (the top
`candidates` chunks of each, as hybrid search takes them) are retrieved once; every rule then ranks the same
candidates through `ragkit.fusion.fuse`, the function `ragkit search` runs, so a rule's numbers are what search
with those settings returns. Document-scoped questions are left out (their ranking means nothing). Metrics as
`ragkit eval` computes them. --no-record prints the tables without writing RESULTS.md or results/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_eval import breakdown, groups_of  # noqa: E402
from benchmarks.common import DATA, HERE, minilm_model, record  # noqa: E402

SETS = ["pubmedqa-pqal", "squad-v1.1-dev", "qmsum", "leval-longdoc", "financebench"]
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "evidence_hit@5")
# Rules by name: the settings of ragkit.config.Settings that shape fusion, over PLAIN ("dense" and "bm25" are the
# single runs; "default" is ragkit's own default rule, whatever it is).
PLAIN = {"fusion": "rrf", "rrf_k": 60, "dense_weight": 1.0, "bm25_weight": 1.0, "name_weight": 0.0}
RULES: dict[str, dict[str, Any]] = {
    "default": {},
    "dense": {},
    "bm25": {},
    "rrf": {},
    "rrf k=10": {"rrf_k": 10},
    "rrf bm25×0.5": {"bm25_weight": 0.5},
    "rrf dense×0.5": {"dense_weight": 0.5},
    "convex": {"fusion": "convex"},
    "rrf+name 0.5": {"name_weight": 0.5},
    "rrf+name 1": {"name_weight": 1.0},
    "rrf k=10+name 0.5": {"rrf_k": 10, "name_weight": 0.5},
    "rrf bm25×0.5+name 0.5": {"bm25_weight": 0.5, "name_weight": 0.5},
    "convex+name 0.5": {"fusion": "convex", "name_weight": 0.5},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--context-tokens", type=int, default=None, help="[default: ragkit's]")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--limit", type=int, default=0, help="first N questions of each set (0: all)")
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from ragkit.config import INDEX_DEFAULTS

    context = INDEX_DEFAULTS["context_tokens"] if args.context_tokens is None else args.context_tokens
    command = "python benchmarks/bench_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.sets.split(","):
        raw, table, notes = measure_set(name, context, args.rules.split(","), args.limit)
        title = f"Retrieval rules side by side: {name}, context {context} tokens"
        if args.no_record:
            print(f"\n{title}\n\n{table}\n\n{notes}", flush=True)
        else:
            record(f"bench_fusion-{name}-context{context}", title, raw, table, notes, command=command.strip())


def open_index(name: str, context: int):
    from ragkit.api import Index
    from ragkit.config import Settings

    index = Index(HERE / "out" / f"index-context-{context}" / name,
                  Settings(dense_model=minilm_model(), late=False, context_tokens=context))
    report = index.add(DATA / name / "docs")
    return index, report


def measure_set(name: str, context: int, rules: list[str], limit: int) -> tuple[dict[str, Any], str, str]:
    from ragkit.evaluate import _identical_copies, _score_retrieval, load_questions, summarize
    from ragkit.fusion import FusionRule, fuse
    from ragkit.retrieve import Searcher

    index, report = open_index(name, context)
    questions = [q for q in load_questions(DATA / name / "questions.jsonl", DATA / name / "docs", limit or None)
                 if not q.doc_scoped]
    searcher: Searcher = index.searcher
    table = searcher.table
    starts, ends = table.column("char_start").to_pylist(), table.column("char_end").to_pylist()
    paths = searcher.paths
    twins = _identical_copies(searcher.manifest["files"])
    depth = searcher.settings.candidates
    runs = searcher._candidates([q.question for q in questions], None, depth, "hybrid", None)
    groups = groups_of(DATA / name / "questions.jsonl")
    raw: dict[str, Any] = {"set": name, "context_tokens": context, "questions": len(questions),
                           "chunks": table.num_rows, "index_seconds": report.seconds, "rules": {}}
    header = "| rule | " + " | ".join(METRICS) + " |"
    lines = [header, "|---" * (len(METRICS) + 1) + "|"]
    for rule_name in rules:
        changes = {} if rule_name == "default" else {**PLAIN, **RULES[rule_name]}
        settings = searcher.settings.replace(**changes)
        rule = FusionRule.from_settings(settings)
        records = []
        for i, q in enumerate(questions):
            question_runs = {r: result[i] for r, result in runs.items()}
            if rule_name in ("dense", "bm25"):
                ranked = [row for row, _ in question_runs[rule_name]]
            else:
                names = searcher.name_scores(q.question) if rule.name_weight else None
                ranked = [row for row, _, _ in fuse(question_runs, rule, paths, names)]
            hits = [SimpleNamespace(chunk=SimpleNamespace(path=paths[r], char_start=starts[r], char_end=ends[r]))
                    for r in ranked[:depth]]
            records.append(_score_retrieval(q, hits, twins.get(q.doc, {q.doc}), 10))
        summary = summarize(records)
        by_group = {m: breakdown(records, groups, m) for m in ("recall@1", "recall@5")} if groups else {}
        raw["rules"][rule_name] = {"settings": changes or "ragkit defaults", "summary": summary, "by_group": by_group,
                                   "misses@5": [r["id"] for r in records if r.get("recall@5") == 0.0]}
        lines.append(f"| {rule_name} | " + " | ".join(cell(summary.get(m)) for m in METRICS) + " |")
        print(name, rule_name, {m: summary.get(m) for m in METRICS}, flush=True)
    notes = (f"{len(questions)} questions (document-scoped ones left out), {table.num_rows} chunks; MiniLM dense + "
             f"BM25, {depth} candidates each, chunks read with {context} tokens of context (document name and "
             "heading path); every rule ranks the same candidates with `ragkit.fusion.fuse`.")
    return raw, "\n".join(lines), notes


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
