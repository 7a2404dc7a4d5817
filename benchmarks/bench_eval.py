"""Quality baselines: `ragkit eval` on every dataset in ../shared/data, for each retrieval mode, on CPU.

    python benchmarks/bench_eval.py [--model PATH_OR_ID] [--sets squad-v1.1-dev,qmsum] [--modes bm25,dense,hybrid]

Retrieval metrics for every mode; the extractive reader's answers are scored in hybrid mode (the default of
`ragkit ask`). Per-question results go to benchmarks/out/ (not committed); the summary to results/bench_eval.json
and RESULTS.md, with a breakdown by question type where a set has one.
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

from benchmarks.bench_index import default_model  # noqa: E402
from benchmarks.common import DATA, HERE, record  # noqa: E402

SETS = ["squad-v1.1-dev", "leval-longdoc", "qmsum", "financebench", "pubmedqa-pqal"]
GROUP_FIELDS = ("task", "type", "question_type")  # per-set question categories worth a breakdown
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
           "answer_f1", "answer_in_citations")


def groups_of(questions_file: Path) -> dict[str, str]:
    """Question id → its category, for sets that have one."""
    out = {}
    for line in questions_file.read_text().splitlines():
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
    from ragkit.config import Settings
    from ragkit.evaluate import run_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--modes", default="bm25,dense,hybrid")
    args = parser.parse_args()
    model = args.model or default_model()
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    raw: dict[str, dict] = {}
    table = ["| set | mode | questions | R@1 | R@5 | R@10 | MRR@10 | nDCG@10 | evidence@5 | answer F1 | answer in citations |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            dataset = DATA / name
            groups = groups_of(dataset / "questions.jsonl")
            raw[name] = {}
            for mode in args.modes.split(","):
                settings = Settings(dense_model=model, mode=mode)
                report, index_report = run_dataset(dataset, settings, index_dir=Path(tmp) / name,
                                                   answer=(mode == "hybrid"))
                s = report.summary
                raw[name][mode] = {"summary": s, "index_seconds": index_report.seconds,
                                   "chunks": index_report.chunks}
                with open(out_dir / f"eval-{name}-{mode}.jsonl", "w") as f:
                    for r in report.per_question:
                        f.write(json.dumps(r) + "\n")
                cells = " | ".join("—" if s[m] is None else f"{s[m]:.3f}" for m in METRICS)
                table.append(f"| {name} | {mode} | {s['questions']} | {cells} |")
                if groups:
                    by = breakdown(report.per_question, groups, "recall@5")
                    raw[name][mode]["recall@5_by_group"] = by
                    if by and mode == "hybrid":
                        parts = ", ".join(f"{g} {v:.2f} (n={n})" for g, (v, n) in by.items())
                        notes.append(f"- {name}, hybrid recall@5 by {parts}")
                print(name, mode, json.dumps(s), flush=True)
    notes_text = ("Model: all-MiniLM-L6-v2 (real weights, 256-token chunks), CPU. `—`: the set has no data for "
                  "that metric (no evidence spans; answers scored in hybrid mode only). Document-scoped questions "
                  "(L-Eval papers/contracts/reports, QMSum whole-meeting summaries) are searched within their "
                  "document and left out of the ranking metrics.\n\n" + "\n".join(notes))
    record("bench_eval", "Quality baselines per dataset and mode", {"model": model, "sets": raw},
           "\n".join(table), notes_text)


if __name__ == "__main__":
    main()
