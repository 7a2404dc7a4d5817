"""How the generative reader's answers change with the passages it reads and where an answer ends, on CPU.

    python benchmarks/bench_reader_prompt.py [--sets squad-v1.1-dev] [--offset 600] [--limit 40]
                                             [--passages 5,3] [--reader-model ID|FOLDER|FILE.gguf] [--no-record]

Questions --offset … --offset + --limit of each set (away from the first ones that bench_answers scores), the same
MiniLM hybrid index as bench_answers (benchmarks/out/index/), the top 5 hits of each question. For each number of
passages the reader model (ragkit's default: SmolLM2 offline) answers once, decoding greedily to its first blank
line; the answer cut after its first sentence (what ragkit does for a factual question) is that text's prefix, as
greedy decoding does not look ahead, so both endings come from one run. Scored as `ragkit eval` scores answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, HERE, minilm_model, record  # noqa: E402

METRICS = ("answer_em", "answer_f1", "answer_contains_gold", "yes_no_accuracy", "citation_support")
HEADER = "| passages | answer ends | questions | EM | F1 | contains gold | yes/no acc | citation support | words | s/answer |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="squad-v1.1-dev")
    parser.add_argument("--offset", type=int, default=600, help="first question scored (0-based)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--passages", default="5,3", help="numbers of top hits the reader reads")
    parser.add_argument("--reader-model", default=None)
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/bench_reader_prompt.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in args.sets.split(","):
        raw, table = measure(name, args)
        title = f"Generative reader: passages read and where answers end, {name}"
        notes = (f"Questions {args.offset + 1}–{args.offset + raw['questions']} of the dev set; reader model "
                 f"{Path(raw['model']).name}; hybrid MiniLM index, top 5 hits. 'paragraph': the answer up to its first blank "
                 "line; 'sentence': cut after its first sentence, as ragkit does for factual questions.")
        if args.no_record:
            print(f"\n{title}\n\n{table}\n\n{notes}")
        else:
            record(f"bench_reader_prompt-{name}", title, raw, table, notes, command=command.strip())


def measure(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from ragkit.api import Index
    from ragkit.config import Settings
    from ragkit.evaluate import load_questions, score_answer
    from ragkit.readers.extractive import Answer
    from ragkit.readers.generate import answer_end, cite, paragraph_end

    dataset = DATA / name
    settings = Settings(dense_model=minilm_model(), late=False, mode="hybrid", reader="generate",
                        reader_model=args.reader_model)
    index = Index(HERE / "out" / "index" / name, settings)
    index.add(dataset / "docs")
    questions = load_questions(dataset / "questions.jsonl", dataset / "docs")[args.offset : args.offset + args.limit]
    reader = index.generative_reader()
    rows, raw = [HEADER, "|---" * HEADER.count(" | ") + "|---|"], {"set": name, "questions": len(questions),
                                                                    "model": reader.name, "runs": {}}
    hits = [index.search(q.question, 5, "hybrid", [q.doc] if q.doc_scoped else None) for q in questions]
    for passages in (int(p) for p in args.passages.split(",")):
        scored: dict[str, list[dict[str, Any]]] = {"paragraph": [], "sentence": []}
        started = time.perf_counter()
        for q, top in zip(questions, hits):
            window = reader.window(q.question, top[:passages])
            text, _ = reader.complete(window.ids, until=paragraph_end)
            end = answer_end(q.question)(text)
            for ending, shown in (("paragraph", text), ("sentence", text if end is None else text[:end])):
                citations, numbers = cite(shown, window)
                answer = Answer(shown, citations, top[:passages], reader="generate", numbers=numbers)
                scored[ending].append(score_answer(answer, q.answers, "generate", 0.0))
        seconds = (time.perf_counter() - started) / max(1, len(questions))
        for ending, records in scored.items():
            means = {m: mean([r.get(m) for r in records]) for m in METRICS}
            words = mean([len(r["answer"].split()) for r in records])
            raw["runs"][f"{passages}-{ending}"] = {**means, "words": words, "seconds_per_answer": seconds}
            cells = " | ".join("—" if means[m] is None else f"{means[m]:.3f}" for m in METRICS)
            rows.append(f"| {passages} | {ending} | {len(records)} | {cells} | {words:.1f} | {seconds:.2f} |")
            print(name, passages, ending, means, flush=True)
    return raw, "\n".join(rows)


def mean(values: list[float | None]) -> float | None:
    """Mean of the values that are not None (None when none is).

    >>> mean([1.0, None, 0.0]), mean([None])
    (0.5, None)
    """
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None


if __name__ == "__main__":
    main()
