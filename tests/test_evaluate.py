"""`ragkit eval`: metrics against hand-computed cases, and the runner end to end on a dataset made here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.errors import RagkitError
from ragkit.evaluate import (
    answer_in_texts,
    distinct_in_order,
    exact_match,
    load_questions,
    mrr_at,
    ndcg_at,
    normalize_answer,
    recall_at,
    spans_overlap,
    summarize,
    token_f1,
)


def test_normalization_follows_squad():
    assert normalize_answer("  The Eiffel-Tower, in  Paris. ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("") == ""


def test_exact_match_and_f1_take_the_best_gold():
    assert exact_match("the Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert exact_match("Broncos win", ["Broncos"]) == 0.0
    # pred "denver broncos won" vs gold "broncos": p = 1/3, r = 1 → f1 = 0.5
    assert token_f1("Denver Broncos won", ["Broncos", "Carolina"]) == pytest.approx(0.5)
    # repeated tokens count once per occurrence: pred "a b b" vs gold "b b c" → common 2, p = r = 2/3
    assert token_f1("x y y", ["y y z"]) == pytest.approx(2 / 3)


def test_empty_answers():
    assert exact_match("anything", []) is None and token_f1("anything", []) is None
    assert token_f1("", ["gold"]) == 0.0
    assert token_f1("", [""]) == 1.0  # both empty after normalisation: SQuAD counts a match
    assert token_f1("the", ["a"]) == 1.0  # only articles on both sides
    assert answer_in_texts([], ["text"]) is None
    assert answer_in_texts(["!!"], ["text"]) is None  # normalises to nothing


def test_answer_in_texts():
    assert answer_in_texts(["October 1973"], ["It began in october, 1973.", "x"]) == 1.0  # punctuation goes
    assert answer_in_texts(["October 1974"], ["It began in October 1973."]) == 0.0
    assert answer_in_texts(["October 1973"], ["It began in October 1973."]) == 1.0
    assert answer_in_texts(["$12"], ["rose to nearly $12 globally"]) == 1.0


def test_ranking_metrics_hand_computed():
    ranked = ["d3", "d1", "d7"]
    assert recall_at(ranked, {"d1"}, 1) == 0.0 and recall_at(ranked, {"d1"}, 5) == 1.0
    assert mrr_at(ranked, {"d1"}, 10) == 0.5
    assert ndcg_at(ranked, {"d7"}, 10) == pytest.approx(1 / math.log2(4))
    assert ndcg_at(ranked, {"d3"}, 10) == 1.0


def test_missing_gold_scores_zero():
    assert recall_at(["a", "b"], {"z"}, 10) == 0.0
    assert mrr_at([], {"z"}, 10) == 0.0 and ndcg_at([], {"z"}, 10) == 0.0


def test_identical_copies_count_once_at_their_first_rank():
    ranked = ["x", "copy2", "gold"]
    assert mrr_at(ranked, {"gold", "copy2"}, 10) == 0.5


def test_ties_in_chunks_rank_documents_by_first_appearance():
    assert distinct_in_order(["a", "a", "b", "a", "c"]) == ["a", "b", "c"]
    assert recall_at(distinct_in_order(["a"] * 20 + ["gold"]), {"gold"}, 2) == 1.0


def test_span_overlap_is_half_open():
    assert spans_overlap((0, 10), (9, 20)) and not spans_overlap((0, 10), (10, 20))


def test_summary_averages_only_present_values():
    summary = summarize([{"recall@5": 1.0, "answer_f1": 0.5}, {"recall@5": 0.0}, {"answer_f1": None}])
    assert summary["questions"] == 3 and summary["recall@5"] == 0.5 and summary["answer_f1"] == 0.5
    assert summary["evidence_hit@5"] is None and summary["ranked_questions"] == 0


def make_dataset(folder: Path) -> Path:
    docs = folder / "docs"
    docs.mkdir(parents=True)
    (docs / "oil.txt").write_text("Oil history\n\nThe oil crisis began in October 1973. Prices rose fourfold.\n")
    (docs / "oil-copy.txt").write_text((docs / "oil.txt").read_text())
    (docs / "fox.txt").write_text("Foxes\n\nThe quick brown fox jumps over the lazy dog every morning.\n")
    (docs / "contract.txt").write_text("Agreement\n\nThis agreement terminates on December 31, 2030.\n")
    doc_text = (docs / "oil.txt").read_text()
    questions = [
        {"id": "q1", "question": "When did the oil crisis begin?", "answers": ["October 1973"], "doc": "oil.txt",
         "evidence": "The oil crisis began in October 1973.",
         "evidence_start": doc_text.index("The oil crisis")},
        {"id": "q2", "question": "What does the quick brown fox jump over?", "answers": ["the lazy dog"],
         "doc": "fox.txt"},
        {"id": "q3", "question": "When does this agreement terminate?", "answers": ["December 31, 2030"],
         "doc": "contract.txt", "doc_scoped": True},
    ]
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    return folder


def test_eval_end_to_end(tmp_path, tiny_encoder, tiny_colbert):
    dataset = make_dataset(tmp_path / "set")
    result = CliRunner().invoke(app, ["eval", str(dataset), "--index", str(tmp_path / "index"), "--mode", "bm25",
                                      "--dense-model", str(tiny_encoder), "--late-model", str(tiny_colbert), "--json",
                                      "--out", str(tmp_path / "per-question.jsonl")])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("questions", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
                "answer_em", "answer_f1", "answer_in_citations"):
        assert key in summary
    assert summary["questions"] == 3 and summary["ranked_questions"] == 2  # q3 is scoped to its document
    assert summary["recall@1"] == 1.0 and summary["evidence_hit@5"] == 1.0
    assert summary["answer_in_citations"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "per-question.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2", "q3"]
    assert records[2]["retrieved_docs"] == ["contract.txt"] and "recall@1" not in records[2]
    assert "2030" in records[2]["answer"]


def test_eval_reuses_its_index(tmp_path, tiny_encoder, tiny_colbert):
    from ragkit.config import Settings
    from ragkit.evaluate import run_dataset

    dataset = make_dataset(tmp_path / "set")
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), mode="bm25")
    _, first = run_dataset(dataset, settings, index_dir=tmp_path / "index", answer=False)
    report, second = run_dataset(dataset, settings, index_dir=tmp_path / "index", limit=1, answer=False)
    assert first.added == 4 and second.unchanged == 4 and second.encoded_chunks == 0
    assert report.summary["questions"] == 1 and report.summary["answer_f1"] is None


def test_bad_questions_file_is_a_clear_error(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"id": 1, "question": "x"}\n')
    with pytest.raises(RagkitError, match=r"q.jsonl:1: not a question record"):
        load_questions(tmp_path / "q.jsonl", tmp_path)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "has no docs/ folder" in result.stderr


def test_evidence_spans_from_each_dataset_format(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d.txt").write_text("alpha beta gamma delta")
    lines = [
        {"id": "a", "question": "q", "answers": [], "doc": "d.txt", "evidence_char_ranges": [[6, 10]]},
        {"id": "b", "question": "q", "answers": [], "doc": "d.txt",
         "evidence_list": [{"doc": "d.txt", "page": 0, "page_char_range": [0, 22]}]},
        {"id": "c", "question": "q", "answers": [], "doc": "d.txt", "evidence": "gamma"},
        {"id": "d", "question": "q", "answers": [], "doc": "d.txt", "evidence": "not in the doc"},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    spans = [q.evidence_spans for q in load_questions(tmp_path / "q.jsonl", docs)]
    assert spans == [[(6, 10)], [(0, 22)], [(11, 16)], []]


def test_eval_on_real_squad_questions(squad_index, shared_data):
    from ragkit.evaluate import evaluate

    questions = load_questions(shared_data / "squad-v1.1-dev" / "questions.jsonl",
                               shared_data / "squad-v1.1-dev" / "docs", limit=40)
    summary = evaluate(squad_index, questions, "hybrid").summary
    # measured 2026-11-26 on the first 100 questions: recall@5 0.99, evidence_hit@5 0.96, answer in citations 0.83
    assert summary["recall@5"] >= 0.95 and summary["evidence_hit@5"] >= 0.85
    assert summary["answer_in_citations"] >= 0.6


def test_questions_may_hold_unicode_line_separators(tmp_path):
    record = {"id": "u", "question": "line\u2028separator?", "answers": ["x\u2029y"], "doc": "d.txt"}
    (tmp_path / "q.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    [question] = load_questions(tmp_path / "q.jsonl", tmp_path)
    assert question.question == "line\u2028separator?" and question.answers == ["x\u2029y"]


def test_eval_on_an_existing_index_uses_its_models_offline(tmp_path, tiny_encoder, tiny_colbert):
    """No model flags: the index's own (local) models serve, not the hub defaults, which offline cannot load."""
    from ragkit.api import Index
    from ragkit.config import Settings

    dataset = make_dataset(tmp_path / "set")
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(
        dataset / "docs")
    result = CliRunner().invoke(app, ["eval", str(dataset), "--index", str(tmp_path / "index"), "--mode", "bm25",
                                      "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["recall@1"] == 1.0
    assert not list(tmp_path.glob("ragkit-eval-*"))  # per-question results only where --out asks for them
    status = Index(tmp_path / "index").status()
    assert status["models"]["dense"]["model"] == str(tiny_encoder)
    assert status["models"]["late"]["model"] == str(tiny_colbert)
