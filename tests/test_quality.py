"""Real quality with real weights: all-MiniLM-L6-v2 over the SQuAD v1.1 dev articles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragkit import store

PER_ARTICLE = 10
# Floors of document recall@5 over the first 10 questions of every article that has questions (330; MiniLM,
# 256-token chunks), a little below what each mode scores: they leave room for thread-count noise only.
FLOORS = {"bm25": 0.97, "dense": 0.94, "hybrid": 0.97}


def first_of_each_article(questions: list, per_article: int, doc=lambda q: q["doc"]) -> list:
    """The first `per_article` questions about each article, in the file's order."""
    taken: dict[str, int] = {}
    chosen = []
    for q in questions:
        if taken.get(doc(q), 0) < per_article:
            taken[doc(q)] = taken.get(doc(q), 0) + 1
            chosen.append(q)
    return chosen


@pytest.fixture(scope="module")
def questions(shared_data) -> list[dict]:
    lines = (shared_data / "squad-v1.1-dev" / "questions.jsonl").read_text().split("\n")
    return first_of_each_article([json.loads(line) for line in lines if line.strip()], PER_ARTICLE)


@pytest.fixture(scope="module")
def squad_index(tmp_path_factory, minilm, shared_data):
    """The SQuAD v1.1 dev articles indexed once with MiniLM (about a minute on two cores); every test of it is in
    this module, so that a parallel run builds it once."""
    from ragkit.api import Index
    from ragkit.config import Settings

    idx = Index(tmp_path_factory.mktemp("squad") / "index", Settings(dense_model=str(minilm), late=False))
    idx.add(shared_data / "squad-v1.1-dev" / "docs")
    return idx


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_document_recall_at_5(squad_index, questions, mode):
    results = squad_index.search_many([q["question"] for q in questions], k=5, mode=mode)
    recall = sum(any(h.chunk.path == q["doc"] for h in hits) for q, hits in zip(questions, results)) / len(questions)
    assert recall >= FLOORS[mode], f"{mode} recall@5 {recall:.3f} fell below {FLOORS[mode]}"


def test_questions_cover_every_article_and_every_file_is_indexed(squad_index, questions, shared_data):
    docs = sorted(path.name for path in (shared_data / "squad-v1.1-dev" / "docs").iterdir())
    assert len({q["doc"] for q in questions}) >= 30 and len(questions) >= 300
    assert len(docs) == squad_index.status()["files"] == 48
    assert sorted(set(store.load_chunks(store.current_generation(squad_index.path)).column("path").to_pylist())) == docs


def test_chunks_fit_the_model(squad_index):
    status = squad_index.status()
    assert status["models"]["dense"]["max_tokens"] == 256
    table = store.load_chunks(store.current_generation(squad_index.path))
    assert table.num_rows > 1000 and max(table.column("n_tokens").to_pylist()) <= 256 - 2


def test_ask_cites_the_right_article(squad_index):
    answer = squad_index.ask("When did the 1973 oil crisis begin?", reader="extractive")
    first = answer.citations[0]
    assert first.hit.chunk.path == "1973_oil_crisis.txt"
    assert "October 1973" in first.text
    text = (Path(squad_index.status()["root"]) / first.hit.chunk.path).read_text().split("\n")
    assert first.text in " ".join(text[first.start_line - 1 : first.end_line])


def test_the_default_reader_writes_the_answer_with_the_embedded_model(squad_index):
    """Offline, no reader named: the embedded SmolLM2-135M-Instruct (the default reader model cannot be loaded)
    writes the answer from the top hits, said once in a warning; every [n] it cites is the n-th hit."""
    from ragkit.api import Index
    from ragkit.errors import RagkitWarning

    import warnings

    idx = Index(squad_index.path, squad_index.settings)
    with pytest.warns(RagkitWarning, match="using the embedded SmolLM2-135M-Instruct") as said:
        answer = idx.ask("When did the 1973 oil crisis begin?")
    with warnings.catch_warnings(record=True) as said_again:
        warnings.simplefilter("always")
        idx.ask("When did the embargo end?")
    assert sum("embedded SmolLM2" in str(w.message) for w in [*said, *said_again]) == 1
    assert answer.reader == "generate" and answer.model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "October 1973" in answer.answer and answer.generated_tokens > 0
    assert 0 < answer.prompt_tokens <= 8192 - idx.settings.answer_tokens
    assert answer.citations and all(answer.hits[n - 1] is c.hit for n, c in answer.numbered())
    assert answer.citations[0].hit.chunk.path == "1973_oil_crisis.txt"


@pytest.fixture(scope="module")
def late_questions(shared_data) -> list[dict]:
    """Six questions on each of five SQuAD articles."""
    per_doc: dict[str, list[dict]] = {}
    for line in (shared_data / "squad-v1.1-dev" / "questions.jsonl").read_text().split("\n"):
        if line.strip():
            q = json.loads(line)
            if len(per_doc.get(q["doc"], [])) < 6 and (q["doc"] in per_doc or len(per_doc) < 5):
                per_doc.setdefault(q["doc"], []).append(q)
    return [q for qs in per_doc.values() for q in qs]


def test_a_plain_model_as_late_model_ranks_by_meaning_not_noise(tmp_path_factory, minilm, shared_data,
                                                                late_questions):
    """MiniLM has no ColBERT head: through its own token vectors, late and hybrid search find the article (with a
    projection drawn at random, as PyLate would add, hybrid recall@1 fell to 0)."""
    import shutil

    from ragkit.api import Index
    from ragkit.config import Settings

    docs = tmp_path_factory.mktemp("late-squad") / "docs"
    docs.mkdir()
    for name in {q["doc"] for q in late_questions}:
        shutil.copy(shared_data / "squad-v1.1-dev" / "docs" / name, docs / name)
    idx = Index(docs.parent / "index", Settings(dense_model=str(minilm), late_model=str(minilm)))
    idx.add(docs)
    recall = {}
    for mode, depth in (("late", 5), ("hybrid", 1)):
        results = idx.search_many([q["question"] for q in late_questions], k=depth, mode=mode)
        recall[mode] = sum(any(h.chunk.path == q["doc"] for h in hits)
                           for q, hits in zip(late_questions, results)) / len(late_questions)
    assert recall["late"] >= 0.9 and recall["hybrid"] >= 0.9, recall


def test_eval_on_real_squad_questions(squad_index, shared_data):
    from ragkit.evaluate import evaluate, load_questions

    questions = first_of_each_article(load_questions(shared_data / "squad-v1.1-dev" / "questions.jsonl",
                                                     shared_data / "squad-v1.1-dev" / "docs"), 2, lambda q: q.doc)
    summary = evaluate(squad_index, questions, "hybrid", reader="extractive").summary
    # floors a little below what these 66 questions score, so that only a real regression fails
    assert summary["questions"] == 66
    assert summary["recall@5"] >= 0.93 and summary["evidence_hit@5"] >= 0.80
    assert summary["answer_in_citations"] >= 0.65
    # a gold inside the top sentence (whole words) is a gold inside the citations; every citation is cited
    assert summary["answer_contains_gold"] <= summary["answer_in_citations"]
    assert summary["citation_support"] == summary["answer_in_citations"]
