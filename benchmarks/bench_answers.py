"""Answer quality per reader: extractive, generate, infini and hmt on every shared set, same retrieval, on CPU.

    python benchmarks/bench_answers.py [--sets pubmedqa-pqal,squad-v1.1-dev] [--readers extractive,generate]
                                       [--limit 100] [--reader-model ID|FOLDER|FILE.gguf] [--no-record]

One index per set (all-MiniLM-L6-v2 dense + BM25, no late stage), built once and kept in benchmarks/out/index/ for
the next run; hybrid search. Every reader answers the same first --limit questions of each set from the same top-5
hits, through `ragkit eval`'s runner (ragkit.evaluate), whose metrics say what each number means. The generating
readers use ragkit's reader model (--reader-model to name another); infini and hmt run with untrained adapters
unless --adapter names a trained one.
Each reader first answers one question unscored, so loading its model is not counted in seconds per answer.

Each set gets a RESULTS.md entry and results/bench_answers-SET.json; per-question answers go to benchmarks/out/
(not committed). --no-record prints the tables and writes neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU measurements, whatever the machine has
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_eval import breakdown, groups_of  # noqa: E402
from benchmarks.common import DATA, HERE, minilm_model, record  # noqa: E402

SETS = ["pubmedqa-pqal", "squad-v1.1-dev", "qmsum", "leval-longdoc", "financebench"]  # smallest first
READERS = ["extractive", "generate", "infini", "hmt"]
MODE = "hybrid"
METRICS = ("answer_em", "answer_f1", "answer_contains_gold", "yes_no_accuracy", "rouge_l", "citation_support",
           "answer_in_citations")
HEADER = ("| reader | model | questions | EM | F1 | contains gold | yes/no acc | ROUGE-L | citation support | "
          "answer in citations | s/answer | tok/s |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--limit", type=int, default=100, help="first N questions of each set (0: all)")
    parser.add_argument("--reader-model", default=None, help="reader model [default: ragkit's]")
    parser.add_argument("--adapter", default=None, help="a trained memory adapter for the infini/hmt readers "
                        "(its backbone unless --reader-model names one) [default: untrained]")
    parser.add_argument("--index-root", type=Path, default=HERE / "out" / "index", help="one index per set here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    parser.add_argument("--no-record", action="store_true", help="print the tables, write no RESULTS.md entry")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    command = "python benchmarks/bench_answers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.sets.split(","):
        raw, table, notes = measure_set(name, args.readers.split(","), args, out_dir)
        title = f"Answer quality per reader: {name}"
        if args.no_record:
            print(f"\n{title}\n\n{table}\n\n{notes}")
        else:
            record(f"bench_answers-{name}", title, raw, table, notes, command=command.strip())


def open_set(name: str, args: argparse.Namespace):
    """The set's index (built or brought up to date) and its first --limit questions."""
    from ragkit.api import Index
    from ragkit.config import Settings
    from ragkit.evaluate import load_questions

    dataset = DATA / name
    extra = {"reader_model": args.reader_model} if args.reader_model else {}
    if args.adapter:
        extra["adapter"] = args.adapter
    settings = Settings(dense_model=minilm_model(), late=False, mode=MODE, **extra)
    index = Index(args.index_root / name, settings)
    index_report = index.add(dataset / "docs")
    questions = load_questions(dataset / "questions.jsonl", dataset / "docs", args.limit or None)
    return index, questions, index_report


def measure_set(name: str, readers: list[str], args: argparse.Namespace,
                out_dir: Path) -> tuple[dict[str, Any], str, str]:
    """Every reader over one set: (raw numbers, markdown table, notes)."""
    from ragkit.evaluate import evaluate

    index, questions, index_report = open_set(name, args)
    groups = groups_of(DATA / name / "questions.jsonl")
    raw: dict[str, Any] = {"set": name, "mode": MODE, "limit": args.limit, "questions": len(questions),
                           "index_seconds": index_report.seconds, "readers": {}}
    rows, notes = [HEADER, "|---" * HEADER.count(" | ") + "|---|"], []
    for reader in readers:
        warm = evaluate(index, questions[:1], MODE, reader=reader).summary  # loads the reader's model
        report = evaluate(index, questions, MODE, reader=reader)
        s = report.summary
        label = f"{reader} (adapter {args.adapter})" if args.adapter and reader in ("infini", "hmt") else reader
        write_answers(out_dir / f"answers-{name}-{reader}{'-adapter' if label != reader else ''}.jsonl",
                      report.per_question)
        by_group = {m: breakdown(report.per_question, groups, m) for m in METRICS} if groups else {}
        raw["readers"][reader] = {"summary": s, "first_answer_seconds": warm["seconds_per_answer"],
                                  "by_group": by_group}
        rows.append(table_row(label, s))
        if by_group.get("answer_f1"):
            notes.append(f"- {reader} F1 by " + ", ".join(f"{g} {v:.3f} (n={n})"
                                                          for g, (v, n) in by_group["answer_f1"].items()))
        print(name, reader, json.dumps(s), flush=True)
    majority = majority_label(questions)
    if majority:
        raw["majority_label"] = {"label": majority[0], "accuracy": majority[1]}
        notes.insert(0, f"- Majority label of these questions: {majority[0]} ({majority[1]:.3f} of them).")
    return raw, "\n".join(rows), NOTES + "\n\n" + "\n".join(notes)


def table_row(reader: str, s: dict[str, Any]) -> str:
    """One markdown row of a reader's summary; `—` where the metric has no question."""
    cells = [cell(s[m], 3) for m in METRICS]
    speed = [cell(s["seconds_per_answer"], 2), cell(s["generated_tokens_per_second"], 1)]
    return f"| {reader} | {s.get('model', '—')} | {s['questions']} | " + " | ".join(cells + speed) + " |"


def cell(value: float | None, digits: int) -> str:
    """A number with `digits` decimals, or — for None.

    >>> cell(0.12345, 3), cell(None, 2)
    ('0.123', '—')
    """
    return "—" if value is None else f"{value:.{digits}f}"


def majority_label(questions) -> tuple[str, float] | None:
    """The commonest gold label and its share, when every question's gold answers are one yes/no/maybe label.

    >>> from types import SimpleNamespace as Q
    >>> majority_label([Q(answers=["yes"]), Q(answers=["no"]), Q(answers=["yes"])])
    ('yes', 0.6667)
    >>> majority_label([Q(answers=["yes"]), Q(answers=["Denver"])]) is None
    True
    """
    from ragkit.evaluate import YES_NO_LABELS, normalize_answer

    labels = [{normalize_answer(a) for a in q.answers} for q in questions]
    if not labels or any(len(x) != 1 or not x <= set(YES_NO_LABELS) for x in labels):
        return None
    label, count = Counter(next(iter(x)) for x in labels).most_common(1)[0]
    return label, round(count / len(labels), 4)


def write_answers(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


NOTES = ("Retrieval: all-MiniLM-L6-v2 dense + BM25 fused (hybrid, no late stage), the same top-5 hits for every "
         "reader; CPU. Scored on the reader's answer text: the extractive reader's top sentence, a generated answer "
         "without its [n] markers (SQuAD normalisation). Contains gold: a gold answer inside the answer as whole "
         "words. Yes/no acc: questions whose gold is a yes/no/maybe label, the answer mapped to a label "
         "(ragkit.evaluate.yes_no_label; no label counts as wrong). ROUGE-L: F-measure, stemmed, for questions whose "
         "gold answers have at least 15 words. Citation support: a gold answer inside a passage the answer cites "
         "with [n] (not for yes/no labels). Answer in citations: a gold answer inside any of the answer's "
         "citations. s/answer: the reader call only, after one unscored answer that loads the model; tok/s: "
         "generated tokens over those seconds. `—`: no question of the set has that metric, or the reader does not "
         "count tokens. Infini and HMT: untrained adapters unless the row names one.")


if __name__ == "__main__":
    main()
