"""`ragkit eval`: retrieval and answer metrics over a dataset folder (docs/ + questions.jsonl).

Metrics are computed per question and averaged. Document-level metrics rank the distinct documents of the
retrieved chunks in order of first appearance; byte-identical copies of the gold document count as the gold.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ragkit.errors import RagkitError
from ragkit.progress import Progress, ProgressEvent, silent

SUMMARY_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
                "answer_em", "answer_f1", "answer_in_citations")
CHUNK_DEPTH = 100  # chunks retrieved per question to rank documents
EVIDENCE_K = 5


# ------------------------------------------------------------------------------------------------
# Answer metrics (SQuAD v1.1 normalisation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, fold whitespace (SQuAD v1.1).

    >>> normalize_answer("The  Denver Broncos!")
    'denver broncos'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float | None:
    """1.0 if the normalised prediction equals any normalised gold; None without golds."""
    if not golds:
        return None
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float | None:
    """Best token-level F1 of the prediction against the golds (SQuAD); None without golds.

    >>> token_f1("in October 1973", ["October 1973"])
    0.8
    """
    if not golds:
        return None
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(g).split()) for g in golds)


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_in_texts(golds: Sequence[str], texts: Iterable[str]) -> float | None:
    """1.0 if any normalised gold answer occurs in any normalised text; None without non-empty golds."""
    golds = [normalize_answer(g) for g in golds if normalize_answer(g)]
    if not golds:
        return None
    haystack = [normalize_answer(t) for t in texts]
    return float(any(g in t for g in golds for t in haystack))


# ------------------------------------------------------------------------------------------------
# Ranking metrics (one relevant document, possibly present under several identical names)


def first_relevant_rank(ranked: Sequence[str], relevant: set[str], k: int) -> int | None:
    """1-based rank of the first relevant item within the top k, or None.

    >>> first_relevant_rank(["a", "b", "c"], {"c", "z"}, 3)
    3
    """
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            return rank
    return None


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return float(first_relevant_rank(ranked, relevant, k) is not None)


def mrr_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    rank = first_relevant_rank(ranked, relevant, k)
    return 1.0 / rank if rank else 0.0


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Binary nDCG with one relevant item: 1 / log2(rank + 1), ideal DCG = 1.

    >>> round(ndcg_at(["x", "gold"], {"gold"}, 10), 4)
    0.6309
    """
    rank = first_relevant_rank(ranked, relevant, k)
    return 1.0 / math.log2(rank + 1) if rank else 0.0


def distinct_in_order(items: Iterable[str]) -> list[str]:
    """Items without repeats, in order of first appearance.

    >>> distinct_in_order(["b", "a", "b", "c", "a"])
    ['b', 'a', 'c']
    """
    return list(dict.fromkeys(items))


def spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether half-open char spans [a0, a1) and [b0, b1) share a character."""
    return a[0] < b[1] and b[0] < a[1]


# ------------------------------------------------------------------------------------------------
# The dataset runner


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    doc: str
    evidence_spans: list[tuple[int, int]] = field(default_factory=list)  # char spans in the gold doc
    doc_scoped: bool = False  # "this contract", "the meeting": ask against the gold doc only


@dataclass
class EvalReport:
    summary: dict[str, Any]
    per_question: list[dict[str, Any]]


def load_questions(path: Path, docs: Path, limit: int | None = None) -> list[Question]:
    """Questions from a JSONL file; evidence is located as char spans in the gold document."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # JSON strings may hold U+2028: not a line end
    except OSError as e:
        raise RagkitError(f"cannot read questions file {path}: {e.strerror or e}") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question = Question(str(record["id"]), record["question"], list(record.get("answers") or []),
                                record["doc"], doc_scoped=bool(record.get("doc_scoped", False)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RagkitError(f"{path}:{number}: not a question record ({e}); "
                              "expected {\"id\", \"question\", \"answers\", \"doc\"}") from None
        question.evidence_spans = _evidence_spans(record, docs / question.doc)
        questions.append(question)
        if limit and len(questions) >= limit:
            break
    return questions


def _evidence_spans(record: dict[str, Any], doc_path: Path) -> list[tuple[int, int]]:
    """Char spans of the gold evidence in the document, from the fields a dataset provides."""
    if "evidence_char_ranges" in record:
        return [(int(a), int(b)) for a, b in record["evidence_char_ranges"]]
    if "evidence_list" in record:
        return [tuple(e["page_char_range"]) for e in record["evidence_list"]
                if e.get("doc", record["doc"]) == record["doc"] and "page_char_range" in e]
    evidence = record.get("evidence")
    if not evidence:
        return []
    if "evidence_start" in record:
        return [(int(record["evidence_start"]), int(record["evidence_start"]) + len(evidence))]
    try:
        start = doc_path.read_text(encoding="utf-8").find(evidence)
    except (OSError, UnicodeDecodeError):
        return []
    return [(start, start + len(evidence))] if start >= 0 else []


def evaluate(index, questions: Sequence[Question], mode: str, k: int = 10, progress: Progress = silent,
             answer: bool = True) -> EvalReport:
    """Run every question through `index` (a ragkit.Index that holds the dataset's docs)."""
    started = time.perf_counter()
    manifest_files = index.manifest()["files"]
    twins = _identical_copies(manifest_files)
    corpus = [q for q in questions if not q.doc_scoped]
    corpus_hits = dict(zip((q.id for q in corpus),
                           index.search_many([q.question for q in corpus], k=max(CHUNK_DEPTH, k), mode=mode)))
    records = []
    for n, q in enumerate(questions, start=1):
        if q.doc_scoped:
            hits = index.search(q.question, k=max(CHUNK_DEPTH, k), mode=mode, paths=[q.doc])
        else:
            hits = corpus_hits[q.id]
        records.append(_score_question(index, q, hits, twins.get(q.doc, {q.doc}), mode, k, answer))
        progress(ProgressEvent("eval", n, len(questions)))
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["mode"] = mode
    return EvalReport(summary, records)


def _identical_copies(files: dict[str, Any]) -> dict[str, set[str]]:
    by_hash: dict[str, set[str]] = {}
    for rel, info in files.items():
        by_hash.setdefault(info["hash"], set()).add(rel)
    return {rel: by_hash[info["hash"]] for rel, info in files.items()}


def _score_question(index, q: Question, hits, gold_docs: set[str], mode: str, k: int,
                    answer: bool) -> dict[str, Any]:
    ranked_docs = distinct_in_order(h.chunk.path for h in hits)
    record: dict[str, Any] = {"id": q.id, "question": q.question, "doc": q.doc, "doc_scoped": q.doc_scoped,
                              "retrieved_docs": ranked_docs[:k]}
    if not q.doc_scoped:  # ranking metrics mean nothing when the search was confined to the gold doc
        record.update({
            "recall@1": recall_at(ranked_docs, gold_docs, 1),
            "recall@5": recall_at(ranked_docs, gold_docs, 5),
            "recall@10": recall_at(ranked_docs, gold_docs, 10),
            "mrr@10": mrr_at(ranked_docs, gold_docs, 10),
            "ndcg@10": ndcg_at(ranked_docs, gold_docs, 10),
        })
    if q.evidence_spans:
        record["evidence_hit@5"] = float(any(
            h.chunk.path in gold_docs and spans_overlap((h.chunk.char_start, h.chunk.char_end), span)
            for h in hits[:EVIDENCE_K] for span in q.evidence_spans))
    if answer and q.answers:
        result = index.answer_from_hits(q.question, hits[:EVIDENCE_K], mode=mode)
        best = result.citations[0].text if result.citations else ""  # the reader's top answer sentence
        record["answer"] = best
        record["answer_em"] = exact_match(best, q.answers)
        record["answer_f1"] = token_f1(best, q.answers)
        record["answer_in_citations"] = answer_in_texts(q.answers, [c.text for c in result.citations])
    return record


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the questions that have it (None where none has it).

    >>> summarize([{"recall@1": 1.0}, {"recall@1": 0.0, "answer_f1": 0.5}])["recall@1"]
    0.5
    >>> summarize([{"recall@1": 1.0}])["answer_f1"] is None
    True
    """
    summary: dict[str, Any] = {"questions": len(records)}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        summary[key] = round(sum(values) / len(values), 4) if values else None
    summary["ranked_questions"] = sum(1 for r in records if "recall@1" in r)
    return summary


def default_eval_index(dataset_dir: Path, dense_model: str | None) -> Path:
    """A cache folder per (dataset, model), so repeated evals reuse their index (None: the default model)."""
    import hashlib
    import os

    from ragkit.config import DEFAULT_DENSE_MODEL
    from ragkit.models import resolve_model_name

    dense_model = dense_model or DEFAULT_DENSE_MODEL
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragkit" / "eval"
    key = hashlib.blake2b(f"{dataset_dir.resolve()}\0{resolve_model_name(dense_model)}".encode(),
                          digest_size=6).hexdigest()
    return cache / f"{dataset_dir.resolve().name}-{key}"


def run_dataset(dataset_dir: Path, settings, index_dir: Path | None = None, questions_file: Path | None = None,
                mode: str | None = None, k: int = 10, limit: int | None = None, answer: bool = True,
                progress: Progress = silent, rebuild: bool = False) -> tuple[EvalReport, Any]:
    """Index DATASET_DIR/docs (or bring an existing index of them up to date, with the models it was built with
    unless `settings` name others) and evaluate its questions."""
    from ragkit.api import Index

    dataset_dir = dataset_dir.expanduser()
    docs = dataset_dir / "docs"
    questions_file = questions_file or dataset_dir / "questions.jsonl"
    if not docs.is_dir():
        raise RagkitError(f"{dataset_dir} has no docs/ folder; a dataset is docs/ plus questions.jsonl")
    if not questions_file.is_file():
        raise RagkitError(f"no questions file at {questions_file} (pass --questions FILE)")
    questions = load_questions(questions_file, docs, limit)
    if not questions:
        raise RagkitError(f"{questions_file} holds no questions")
    index = Index(index_dir or default_eval_index(dataset_dir, settings.dense_model), settings)
    index_report = index.add(docs, progress=progress, rebuild=rebuild)
    missing = sorted({q.doc for q in questions} - set(index.manifest()["files"]))
    if missing:
        raise RagkitError(f"{len(missing)} gold document(s) are not in the index, e.g. {missing[0]} "
                          "(skipped while indexing, or not in docs/)")
    report = evaluate(index, questions, mode or settings.mode, k=k, progress=progress, answer=answer)
    report.summary["dataset"] = dataset_dir.resolve().name
    report.summary["index"] = str(index.path)
    return report, index_report
