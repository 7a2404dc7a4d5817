"""Quality baselines: `ragkit eval` on every dataset in ../shared/data, for each retrieval mode, on CPU.

    python benchmarks/bench_eval.py [--sets squad-v1.1-dev,qmsum] [--late-sets ...] [--limit N]

Models: all-MiniLM-L6-v2 (real weights) for dense, and the same MiniLM folder as late model: it has no ColBERT
head, so ragkit reads its own token vectors through an identity projection (no trained ColBERT can be downloaded
here). Two passes over one index per set: without the late stage (bm25, dense, hybrid = dense + BM25 fused: what
`ragkit index` builds offline with no model flags), then with it (late, hybrid = dense + BM25 + late fused and
re-ranked by MaxSim: the default pipeline's shape). The extractive reader's answers are scored for both hybrid
passes. Each set gets its own RESULTS.md entry as soon as it is done. Per-question results go to benchmarks/out/ (not
committed); the summary to results/bench_eval.json and RESULTS.md, with a breakdown by question type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU baselines, whatever the machine has
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, HERE, minilm_model, record  # noqa: E402

SETS = ["pubmedqa-pqal", "squad-v1.1-dev", "qmsum", "leval-longdoc", "financebench"]  # smallest first
# the late stage over FinanceBench's ~9M tokens takes hours on two cores: left out by default
LATE_SETS = ["squad-v1.1-dev", "leval-longdoc", "qmsum", "pubmedqa-pqal"]
PASSES = [("bm25", False), ("dense", False), ("hybrid", False), ("late", True), ("hybrid", True)]
GROUP_FIELDS = ("task", "type", "question_type")  # per-set question categories worth a breakdown
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
           "answer_f1", "answer_in_citations")


def groups_of(questions_file: Path) -> dict[str, str]:
    """Question id → its category, for sets that have one."""
    out = {}
    for line in questions_file.read_text().split("\n"):
        if not line.strip():
            continue
        q = json.loads(line)
        for name in GROUP_FIELDS:
            if name in q:
                out[str(q["id"])] = f"{name}={q[name]}"
                break
    return out


def breakdown(records: list[dict], groups: dict[str, str], metric: str) -> dict[str, tuple[float, int]]:
    """Mean of `metric` per category: {category: (mean, count)}."""
    values = defaultdict(list)
    for r in records:
        if r.get(metric) is not None and r["id"] in groups:
            values[groups[r["id"]]].append(r[metric])
    return {g: (sum(v) / len(v), len(v)) for g, v in sorted(values.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--late-sets", default=",".join(LATE_SETS))
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    args = parser.parse_args()
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        late_model = minilm_model()  # no ColBERT head: its own token vectors
        for name in args.sets.split(","):
            late_pass = name in args.late_sets.split(",")
            evaluate_set(name, late_pass, late_model, Path(tmp) / name, args.limit, out_dir)


def evaluate_set(name: str, late_pass: bool, late_model: str, index_dir: Path, limit: int | None,
                 out_dir: Path) -> None:
    """Every pass over one set; writes results/bench_eval-NAME.json and a RESULTS.md entry."""
    from ragkit.config import Settings
    from ragkit.evaluate import run_dataset

    dataset = DATA / name
    groups = groups_of(dataset / "questions.jsonl")
    raw: dict[str, dict] = {}
    table = [HEADER, "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for mode, late in PASSES:
        if late and not late_pass:
            continue
        label = f"{mode}+late" if mode == "hybrid" and late else mode
        answered = mode == "hybrid"
        settings = Settings(dense_model=minilm_model(), late_model=late_model, late=late, mode=mode)
        report, index_report = run_dataset(dataset, settings, index_dir=index_dir, limit=limit,
                                           answer=answered)
        s = report.summary
        raw[label] = {"summary": s, "index_seconds": index_report.seconds, "chunks": index_report.chunks}
        with open(out_dir / f"eval-{name}-{label}.jsonl", "w") as f:
            for r in report.per_question:
                f.write(json.dumps(r) + "\n")
        cells = " | ".join("—" if s[m] is None else f"{s[m]:.3f}" for m in METRICS)
        table.append(f"| {name} | {label} | {s['questions']} | {cells} |")
        if groups:
            by = breakdown(report.per_question, groups, "recall@5")
            raw[label]["recall@5_by_group"] = by
            if by and mode == "hybrid":
                parts = ", ".join(f"{g} {v:.2f} (n={n})" for g, (v, n) in by.items())
                notes.append(f"- {label} recall@5 by {parts}")
        print(name, label, json.dumps(s), flush=True)
    record(f"bench_eval-{name}", f"Quality baseline: {name}", {"set": name, "passes": raw}, "\n".join(table),
           NOTES + "\n\n" + "\n".join(notes), command="python benchmarks/bench_eval.py")


HEADER = "| set | mode | questions | R@1 | R@5 | R@10 | MRR@10 | nDCG@10 | evidence@5 | answer F1 | answer in citations |"
NOTES = ("Models: all-MiniLM-L6-v2 (real weights, 256-token chunks) for dense; late = MaxSim over MiniLM's own token "
         "vectors of the query's words (no ColBERT head: identity projection, untrained as a ColBERT); CPU. "
         "`hybrid` fuses dense and BM25 on an index built with --no-late (what `ragkit index` builds offline with no "
         "model flags); `hybrid+late` adds late interaction and re-ranks the top 32 by MaxSim (the default "
         "pipeline's shape). `—`: no data for that metric (no evidence spans in the set; answers scored for the "
         "hybrid passes only). Document-scoped "
         "questions (L-Eval papers, contracts and reports; QMSum whole-meeting summaries) are searched within "
         "their document and left out of the ranking metrics.")


if __name__ == "__main__":
    main()
