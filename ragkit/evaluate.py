"""`ragkit eval`: retrieval and answer metrics over a dataset folder (docs/ + questions.jsonl).

Metrics are computed per question and averaged. Document-level metrics rank the distinct documents of the
retrieved chunks in order of first appearance; byte-identical copies of the gold document count as the gold.

Answers are scored on the reader's answer text: the extractive reader's top sentence, or a generating reader's
whole answer with its citation markers ("[1]", "[2, 3]") removed. Which metric a question gets depends on its
gold answers: every question with answers gets exact match, token F1, `answer_contains_gold` and
`answer_in_citations`; yes/no/maybe labels also get `yes_no_accuracy`, other answers `citation_support`; long
(abstractive) answers also get `rouge_l`.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from time import perf_counter  # times the reader calls (its own name: tests drive it)
from typing import Any, Iterable, Mapping, Sequence

from ragkit.errors import RagkitError
from ragkit.progress import Progress, ProgressEvent, silent

SUMMARY_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
                "answer_em", "answer_f1", "answer_contains_gold", "yes_no_accuracy", "rouge_l",
                "citation_support", "answer_in_citations")
CHUNK_DEPTH = 100  # chunks retrieved per question to rank documents
EVIDENCE_K = 5
YES_NO_LABELS = ("yes", "no", "maybe")
# Gold answers at least this long (in words, every gold of the question) are abstractive and get ROUGE-L:
# summaries run to sentences, while extracted spans, labels and figures are a few words.
LONG_ANSWER_WORDS = 15
_MAX_RANGE = 20  # a wider "[a-b]" is not a run of passages (a year range, say): only its ends count
_MARKER = re.compile(r"\s*\[\s*(\d+(?:\s*[,;\-\u2013]\s*\d+)*)\s*\]")  # [1] [1, 2] [2-4] [2–4]
# an answer that hedges without saying yes, no or maybe says "maybe"
_HEDGE = re.compile(r"\b(?:unclear|uncertain|inconclusive|unknown|not clear|not known|not certain|"
                    r"possibly|perhaps)\b")


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


def contains_gold(prediction: str, golds: Sequence[str]) -> float | None:
    """1.0 if a normalised gold occurs in the normalised prediction as whole words; None without non-empty golds.

    >>> contains_gold("The price rose to nearly $12 globally.", ["$12"])
    1.0
    >>> contains_gold("It cost 120 dollars", ["12"])
    0.0
    """
    golds = [normalize_answer(g) for g in golds if normalize_answer(g)]
    if not golds:
        return None
    padded = f" {normalize_answer(prediction)} "
    return float(any(f" {g} " in padded for g in golds))


def strip_citation_markers(text: str) -> str:
    """The text without its citation markers and the space before them.

    >>> strip_citation_markers("It began in October 1973 [1]. Prices rose [2, 3].")
    'It began in October 1973. Prices rose.'
    """
    return _MARKER.sub("", text).strip()


def cited_numbers(text: str) -> list[int]:
    """The passage numbers that the text's citation markers name, sorted; "[2-4]" names 2, 3 and 4.

    >>> cited_numbers("A [3]. B [1, 3]. C [5-6]. D [x].")
    [1, 3, 5, 6]
    """
    numbers: set[int] = set()
    for marker in _MARKER.finditer(text):
        for part in re.split(r"\s*[,;]\s*", marker.group(1)):
            bounds = [int(n) for n in re.split(r"\s*[\-\u2013]\s*", part)]
            if len(bounds) == 2 and bounds[1] - bounds[0] <= _MAX_RANGE:
                numbers.update(range(bounds[0], bounds[1] + 1))
            else:
                numbers.update(bounds)
    return sorted(numbers)


def yes_no_label(text: str) -> str | None:
    """The yes/no/maybe label an answer gives, or None.

    Rules, in order, on the normalised answer without citation markers: (1) its first word, if it is yes, no or
    maybe; (2) "maybe" if it hedges (unclear, uncertain, inconclusive, unknown, not clear, not known, not
    certain, possibly, perhaps); (3) the first of the words yes, no, maybe anywhere in it; (4) None (an answer
    that gives no label, scored as wrong).

    >>> [yes_no_label(t) for t in ("No, it did not [1].", "Yes.", "It is not clear whether it helps.")]
    ['no', 'yes', 'maybe']
    >>> [yes_no_label(t) for t in ("Based on [2], yes.", "There is no evidence of benefit.", "Yesterday.")]
    ['yes', 'no', None]
    """
    words = normalize_answer(strip_citation_markers(text)).split()
    if words and words[0] in YES_NO_LABELS:
        return words[0]
    if _HEDGE.search(" ".join(words)):
        return "maybe"
    return next((w for w in words if w in YES_NO_LABELS), None)


def yes_no_accuracy(prediction: str, golds: Sequence[str]) -> float | None:
    """1.0 if the prediction's label (see `yes_no_label`) is a gold label; None unless every gold is a label.

    >>> yes_no_accuracy("No, the effect was small.", ["no"]), yes_no_accuracy("No.", ["Denver"])
    (1.0, None)
    """
    labels = {normalize_answer(g) for g in golds}
    if not labels or not labels <= set(YES_NO_LABELS):
        return None
    return float(yes_no_label(prediction) in labels)


def is_abstractive(golds: Sequence[str]) -> bool:
    """Whether every gold answer has at least LONG_ANSWER_WORDS words (a summary, not a span or a label)."""
    return bool(golds) and all(len(g.split()) >= LONG_ANSWER_WORDS for g in golds)


def rouge_l(prediction: str, golds: Sequence[str]) -> float | None:
    """Best ROUGE-L F-measure of the prediction against the golds (rouge-score, Porter-stemmed); None without golds.

    >>> round(rouge_l("the cat sat on the mat", ["the cat is on the mat"]), 4)
    0.8333
    """
    if not golds:
        return None
    scorer = _rouge_scorer()
    return max(scorer.score(gold, prediction)["rougeL"].fmeasure for gold in golds)


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RagkitError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def citation_support(answer: str, passages: Mapping[int, str], golds: Sequence[str]) -> float | None:
    """1.0 if a gold answer occurs in a passage the answer cites: passages[n] for each [n] in it.

    An answer without a marker that names one of the passages is unsupported (0.0); None without golds.

    >>> citation_support("Paris [2].", {1: "London is big.", 2: "Paris is the capital."}, ["Paris"])
    1.0
    >>> citation_support("Paris [1].", {1: "London is big.", 2: "Paris is the capital."}, ["Paris"])
    0.0
    """
    return answer_in_texts(golds, [passages[n] for n in cited_numbers(answer) if n in passages])


def numbered_citations(result) -> dict[int, str]:
    """[n] → the text of the citation an Answer's text calls [n]: citations[i] is [numbers[i]] when the answer
    carries `numbers`, else [i + 1]."""
    numbers = getattr(result, "numbers", None) or range(1, len(result.citations) + 1)
    return dict(zip(numbers, (c.text for c in result.citations)))


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
        except KeyError as e:
            raise RagkitError(f"{path}:{number}: the question record has no {e} field; each line needs "
                              "{\"id\", \"question\", \"doc\"} (and optionally \"answers\", \"evidence\")") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise RagkitError(f"{path}:{number}: not a question record ({e}); "
                              "expected {\"id\", \"question\", \"doc\"} (and optionally \"answers\")") from None
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
             answer: bool = True, reader: str | None = None) -> EvalReport:
    """Run every question through `index` (a ragkit.Index that holds the dataset's docs); `reader` answers them
    (None: the index's default reader, as `ask` would choose it)."""
    started = time.perf_counter()
    if answer:
        reader = index.reader_kind(reader)
    manifest_files = index.manifest()["files"]
    twins = _identical_copies(manifest_files)
    corpus = [q for q in questions if not q.doc_scoped]
    corpus_hits = dict(zip((q.id for q in corpus),
                           index.search_many([q.question for q in corpus], k=max(CHUNK_DEPTH, k), mode=mode)))
    records, models = [], []
    for n, q in enumerate(questions, start=1):
        if q.doc_scoped:
            hits = index.search(q.question, k=max(CHUNK_DEPTH, k), mode=mode, paths=[q.doc])
        else:
            hits = corpus_hits[q.id]
        record = _score_retrieval(q, hits, twins.get(q.doc, {q.doc}), k)
        if answer and q.answers:
            result, seconds = _ask(index, q.question, hits[:EVIDENCE_K], mode, reader)
            record.update(score_answer(result, q.answers, reader, seconds))
            models.append(getattr(result, "model", None))
        records.append(record)
        progress(ProgressEvent("eval", n, len(questions)))
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["mode"] = mode
    if answer:
        summary["reader"] = reader
        model = next((m for m in models if m), None)
        if model:
            summary["model"] = model
    return EvalReport(summary, records)


def _identical_copies(files: dict[str, Any]) -> dict[str, set[str]]:
    by_hash: dict[str, set[str]] = {}
    for rel, info in files.items():
        by_hash.setdefault(info["hash"], set()).add(rel)
    return {rel: by_hash[info["hash"]] for rel, info in files.items()}


def _score_retrieval(q: Question, hits, gold_docs: set[str], k: int) -> dict[str, Any]:
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
    return record


def _ask(index, question: str, hits, mode: str, reader: str) -> tuple[Any, float]:
    """The reader's answer from the hits and the seconds the reader call took (retrieval is not counted)."""
    started = perf_counter()
    result = index.answer_from_hits(question, hits, mode=mode, reader=reader)
    return result, perf_counter() - started


def answer_text(result, reader: str) -> str:
    """The text an answer is scored on: the extractive reader's top sentence, or a generated answer without
    its citation markers."""
    if reader == "extractive":
        return result.citations[0].text if result.citations else ""
    return strip_citation_markers(result.answer)


def score_answer(result, golds: Sequence[str], reader: str, seconds: float) -> dict[str, Any]:
    """Per-question answer metrics of a reader's `result` (an Answer) against the gold answers.

    A yes/no/maybe label gets no `citation_support`: a passage that holds the word "no" does not support it.
    """
    text = answer_text(result, reader)
    citation_texts = [c.text for c in result.citations]
    accuracy = yes_no_accuracy(text, golds)
    record: dict[str, Any] = {
        "answer": text,
        "answer_em": exact_match(text, golds),
        "answer_f1": token_f1(text, golds),
        "answer_contains_gold": contains_gold(text, golds),
        "citation_support": None if accuracy is not None else
        citation_support(result.answer, numbered_citations(result), golds),
        "answer_in_citations": answer_in_texts(golds, citation_texts),
        "cited": cited_numbers(result.answer),
        "answer_seconds": round(seconds, 6),
    }
    if accuracy is not None:
        record["yes_no_accuracy"] = accuracy
        record["yes_no_label"] = yes_no_label(text)
    if is_abstractive(golds):
        record["rouge_l"] = rouge_l(text, golds)
    for key in ("prompt_tokens", "generated_tokens"):
        if getattr(result, key, None) is not None:
            record[key] = getattr(result, key)
    return record


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the questions that have it (None where none has it), and the reader's speed.

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
    summary.update(answer_speed(records))
    return summary


def answer_speed(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Mean seconds per answer, and generated tokens per second over the answers whose reader counts its tokens.

    >>> answer_speed([{"answer_seconds": 1.0, "generated_tokens": 30}, {"answer_seconds": 3.0}, {}])
    {'seconds_per_answer': 2.0, 'generated_tokens_per_second': 30.0}
    """
    seconds = [r["answer_seconds"] for r in records if "answer_seconds" in r]
    counted = [r for r in records if r.get("generated_tokens") is not None and "answer_seconds" in r]
    counted_seconds = sum(r["answer_seconds"] for r in counted)
    return {
        "seconds_per_answer": round(sum(seconds) / len(seconds), 4) if seconds else None,
        "generated_tokens_per_second":
            round(sum(r["generated_tokens"] for r in counted) / counted_seconds, 2) if counted_seconds else None,
    }


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
                progress: Progress = silent, rebuild: bool = False,
                reader: str | None = None, compare: bool = False) -> tuple[EvalReport, Any]:
    """Index DATASET_DIR/docs (or bring an existing index of them up to date, with the models it was built with
    unless `settings` name others) and evaluate its questions, answered by `reader`. `compare` adds, under
    summary["modes"], the ranking metrics of each single retriever the index has and of hybrid search, side by
    side (a fusion that loses to one of its parts shows)."""
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
    report = evaluate(index, questions, mode or settings.mode, k=k, progress=progress, answer=answer,
                      reader=reader)
    if compare:
        report.summary["modes"] = compare_modes(index, questions, k, progress)
    report.summary["dataset"] = dataset_dir.resolve().name
    report.summary["index"] = str(index.path)
    return report, index_report


RANKING_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5")


def compare_modes(index, questions: Sequence[Question], k: int = 10,
                  progress: Progress = silent) -> dict[str, dict[str, Any]]:
    """The ranking metrics of each single retriever of `index` and of hybrid search, by mode."""
    modes = ["dense", "bm25", *(["late"] if index.searcher.has_late else []), "hybrid"]
    out = {}
    for mode in modes:
        summary = evaluate(index, questions, mode, k=k, progress=progress, answer=False).summary
        out[mode] = {key: summary.get(key) for key in RANKING_KEYS}
    return out
