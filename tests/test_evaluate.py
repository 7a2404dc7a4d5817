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
    answer_speed,
    answer_text,
    citation_support,
    cited_numbers,
    contains_gold,
    distinct_in_order,
    exact_match,
    is_abstractive,
    load_questions,
    mrr_at,
    ndcg_at,
    normalize_answer,
    numbered_citations,
    recall_at,
    rouge_l,
    score_answer,
    spans_overlap,
    strip_citation_markers,
    summarize,
    token_f1,
    yes_no_accuracy,
    yes_no_label,
)
from ragkit.readers.extractive import Answer, Citation


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


def test_citation_markers_are_removed_with_the_space_before_them():
    assert strip_citation_markers("October 1973 [1].") == "October 1973."
    assert strip_citation_markers("A [1][2] and B [2, 3] and C [4-5] and D [4–5]") == "A and B and C and D"
    assert strip_citation_markers("[1] Paris") == "Paris"
    assert strip_citation_markers("in [the] year [a1]") == "in [the] year [a1]"  # not markers


def test_cited_numbers_read_lists_and_ranges():
    assert cited_numbers("Paris [2]. London [1; 3] [2].") == [1, 2, 3]
    assert cited_numbers("see [2-4] and [6–7]") == [2, 3, 4, 6, 7]
    assert cited_numbers("in [1990-2020]") == [1990, 2020]  # a wide range is not a run of passages
    assert cited_numbers("no markers (1), [x]") == []


def test_contains_gold_needs_whole_words():
    assert contains_gold("It rose to nearly $12 globally [1].", ["$12"]) == 1.0
    assert contains_gold("It cost 120 dollars", ["12"]) == 0.0  # a substring, not the number
    assert contains_gold("The Denver Broncos won.", ["Carolina", "the denver broncos"]) == 1.0
    assert contains_gold("Not known", ["no"]) == 0.0
    assert contains_gold("anything", []) is None and contains_gold("anything", ["!!"]) is None


@pytest.mark.parametrize("answer, label", [
    ("No, the intervention did not help [1].", "no"),
    ("Yes.", "yes"),
    ("YES", "yes"),
    ("maybe", "maybe"),
    ("It is not clear whether it helps.", "maybe"),  # hedge, no label word
    ("The evidence is inconclusive [2].", "maybe"),
    ("Yes, although it is unclear for how long.", "yes"),  # the first word decides before hedges
    ("It is unclear; there is no consensus.", "maybe"),  # a hedge decides before a later label word
    ("Based on the passages [1], yes, it does.", "yes"),  # first label word anywhere
    ("The answer is: no.", "no"),
    ("There is no evidence of benefit.", "no"),  # "no" as a determiner still reads as the label
    ("Yesterday the trial ended.", None),  # words, not prefixes
    ("Nothing suggests a difference.", None),
    ("Tailored interventions increase mammography use.", None),  # no label given: scored wrong
    ("", None),
])
def test_yes_no_label(answer, label):
    assert yes_no_label(answer) == label


def test_yes_no_accuracy_only_for_label_golds():
    assert yes_no_accuracy("No, it did not.", ["no"]) == 1.0
    assert yes_no_accuracy("No, it did not.", ["yes"]) == 0.0
    assert yes_no_accuracy("It is not clear.", ["Maybe"]) == 1.0
    assert yes_no_accuracy("Mammography use increased.", ["yes"]) == 0.0  # no label: wrong
    assert yes_no_accuracy("No.", ["Denver Broncos"]) is None
    assert yes_no_accuracy("No.", ["no", "Denver"]) is None
    assert yes_no_accuracy("No.", []) is None


def test_rouge_l_is_the_stemmed_longest_common_subsequence_f_measure():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # same words, other order: LCS 2 of 3 (unigram overlap would give 1.0)
    assert rouge_l("dogs bark loudly", ["bark dogs loudly"]) == pytest.approx(2 / 3)
    # stems: "dogs running" ~ "dog runs"; LCS 2, P = 2/4 ("the", "were" unmatched), R = 2/3: F = 4/7
    assert rouge_l("the dogs were running", ["a dog runs"]) == pytest.approx(4 / 7)
    assert rouge_l("the dogs were running", ["cats sleep", "a dog runs"]) == pytest.approx(4 / 7)  # best gold
    assert rouge_l("anything", []) is None


def test_only_long_gold_answers_are_abstractive():
    fourteen, fifteen = " ".join(["word"] * 14), " ".join(["word"] * 15)
    assert not is_abstractive([fourteen]) and is_abstractive([fifteen])
    assert not is_abstractive([fifteen, "$12"]) and not is_abstractive([])


def test_citation_support_reads_the_cited_passages():
    passages = {1: "London is large.", 2: "Paris is the capital of France.", 3: "Lyon is in France."}
    assert citation_support("Paris [2].", passages, ["Paris"]) == 1.0
    assert citation_support("Paris [1].", passages, ["Paris"]) == 0.0  # cites a passage without the answer
    assert citation_support("Paris [1, 2].", passages, ["Paris"]) == 1.0
    assert citation_support("Paris [1-3].", passages, ["Paris"]) == 1.0
    assert citation_support("Paris.", passages, ["Paris"]) == 0.0  # cites nothing
    assert citation_support("Paris [9].", passages, ["Paris"]) == 0.0  # no such passage
    assert citation_support("Paris [2].", {3: "Paris."}, ["Paris"]) == 0.0  # numbers, not positions
    assert citation_support("Paris [2].", passages, []) is None


def test_citations_are_found_by_their_numbers():
    answer = Answer("Paris [3].", [_cite("London."), _cite("Paris.")], [])
    assert numbered_citations(answer) == {1: "London.", 2: "Paris."}
    answer.numbers = [2, 3]  # a reader that keeps only the passages the answer cites, under their numbers
    assert numbered_citations(answer) == {2: "London.", 3: "Paris."}
    assert score_answer(answer, ["Paris"], "generate", 1.0)["citation_support"] == 1.0


def _hit(text: str, path: str = "d.txt"):
    from ragkit.ingest.document import Chunk
    from ragkit.retrieve import Hit

    chunk = Chunk(path=path, ordinal=0, text=text, char_start=0, char_end=len(text), start_line=1, end_line=1,
                  page=None, end_page=None, heading="", n_tokens=len(text.split()))
    return Hit(chunk=chunk, chunk_id=path, score=1.0)


def _cite(text: str) -> Citation:
    return Citation(_hit(text), text, 1, 1, None, 1.0)


def test_answer_text_per_reader():
    citations = [_cite("The crisis began in October 1973."), _cite("Prices rose.")]
    answer = Answer("The crisis began in October 1973. [1] Prices rose. [2]", citations, [])
    assert answer_text(answer, "extractive") == "The crisis began in October 1973."  # the top sentence
    generated = Answer("In October 1973 [1].", citations, [])
    assert answer_text(generated, "generate") == "In October 1973."
    assert answer_text(Answer("No answer found.", [], []), "extractive") == ""


def test_score_answer_of_a_generated_answer():
    citations = [_cite("Prices rose fourfold."), _cite("The embargo began in October 1973.")]
    answer = Answer("It began in October 1973 [2].", citations, [])
    answer.generated_tokens, answer.prompt_tokens = 9, 120
    record = score_answer(answer, ["October 1973"], "generate", 0.25)
    assert record["answer"] == "It began in October 1973."
    assert record["answer_em"] == 0.0 and record["answer_contains_gold"] == 1.0
    # pred "it began in october 1973" vs "october 1973": P = 2/5, R = 1: F1 = 4/7
    assert record["answer_f1"] == pytest.approx(4 / 7)
    assert record["citation_support"] == 1.0 and record["answer_in_citations"] == 1.0 and record["cited"] == [2]
    assert record["answer_seconds"] == 0.25 and record["generated_tokens"] == 9 and record["prompt_tokens"] == 120
    assert "yes_no_accuracy" not in record and "rouge_l" not in record


def test_score_answer_adds_yes_no_and_rouge_where_they_apply():
    yes_no = score_answer(Answer("No, it did not [1].", [_cite("There was no change.")], []), ["no"], "generate",
                          1.0)
    assert yes_no["yes_no_accuracy"] == 1.0 and yes_no["yes_no_label"] == "no" and "rouge_l" not in yes_no
    assert yes_no["citation_support"] is None  # passage [1] holds no label to support
    assert "generated_tokens" not in yes_no  # the reader did not report it
    gold = "the team agreed that the remote control should have a simple design with few buttons and a bright colour"
    summary = score_answer(Answer("The team wanted a simple remote [1].", [_cite("x")], []), [gold], "hmt", 1.0)
    assert summary["rouge_l"] == pytest.approx(rouge_l("The team wanted a simple remote.", [gold]))
    assert 0 < summary["rouge_l"] < 1 and "yes_no_accuracy" not in summary


def test_answer_speed_is_total_tokens_over_total_seconds():
    records = [{"answer_seconds": 1.0, "generated_tokens": 30}, {"answer_seconds": 3.0, "generated_tokens": 30},
               {"answer_seconds": 2.0}, {"recall@1": 1.0}]
    speed = answer_speed(records)
    assert speed["seconds_per_answer"] == 2.0  # over the three answers
    assert speed["generated_tokens_per_second"] == 15.0  # 60 tokens in 4 s (the mean of rates would say 20)
    assert answer_speed([{"recall@1": 1.0}]) == {"seconds_per_answer": None, "generated_tokens_per_second": None}


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
    assert summary["yes_no_accuracy"] is None and summary["rouge_l"] is None


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
                                      "--reader", "extractive", "--out", str(tmp_path / "per-question.jsonl")])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("questions", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "evidence_hit@5",
                "answer_em", "answer_f1", "answer_in_citations"):
        assert key in summary
    assert summary["questions"] == 3 and summary["ranked_questions"] == 2  # q3 is scoped to its document
    assert summary["recall@1"] == 1.0 and summary["evidence_hit@5"] == 1.0
    assert summary["answer_in_citations"] == 1.0
    assert summary["reader"] == "extractive" and "model" not in summary
    # the extractive answer cites every sentence it gives, so support is the answer in its citations
    assert summary["citation_support"] == summary["answer_in_citations"]
    assert summary["answer_contains_gold"] is not None and summary["seconds_per_answer"] > 0
    assert summary["yes_no_accuracy"] is None and summary["rouge_l"] is None  # no labels, no long answers
    assert summary["generated_tokens_per_second"] is None  # the extractive reader generates nothing
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
    with pytest.raises(RagkitError, match=r"q.jsonl:1: the question record has no 'doc' field"):
        load_questions(tmp_path / "q.jsonl", tmp_path)
    (tmp_path / "q.jsonl").write_text('["x"]\n')
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


class Clock:
    """A perf_counter that moves only when told: the reader's seconds are exact, retrieval's are large."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StandInGenerativeReader:
    """The generative reader's interface (answer(question, hits, on_token=None) -> Answer with reader, model,
    prompt_tokens, generated_tokens, numbers), with fixed answers and costs. Like the real one, passage [n] is
    hits[n - 1], and an answer's citations are the passages it cites under their numbers, or every passage when it
    cites none."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def answer(self, question: str, hits, on_token=None) -> Answer:
        if question.startswith("When did the oil"):
            n = next(i for i, h in enumerate(hits, start=1) if "October 1973" in h.chunk.text)
            text, tokens, seconds = f"October 1973 [{n}].", 4, 0.5
        elif "fox" in question:
            text, tokens, seconds = "Yes: the lazy dog.", 6, 1.0  # cites nothing
        else:
            text, tokens, seconds = "It ends in 2030 [7].", 8, 1.5  # no passage 7: at most five hits are read
        self.clock.now += seconds
        numbers = [n for n in cited_numbers(text) if n <= len(hits)] or list(range(1, len(hits) + 1))
        citations = [Citation(hits[n - 1], hits[n - 1].chunk.text, 1, 1, None, 1.0) for n in numbers]
        answer = Answer(text, citations, list(hits))
        answer.reader, answer.model, answer.numbers = "generate", "stand-in-lm", numbers
        answer.prompt_tokens, answer.generated_tokens = 50, tokens
        return answer


class StandInIndex:
    """A real Index whose "generate" reader is the stand-in one; "extractive" goes to the real one. Searching costs
    100 clock s."""

    def __init__(self, index, clock: Clock) -> None:
        self.index, self.clock, self.reader = index, clock, StandInGenerativeReader(clock)

    def manifest(self):
        return self.index.manifest()

    def search(self, *args, **kwargs):
        self.clock.now += 100
        return self.index.search(*args, **kwargs)

    def search_many(self, *args, **kwargs):
        self.clock.now += 100
        return self.index.search_many(*args, **kwargs)

    def reader_kind(self, reader=None):
        return self.index.reader_kind(reader)

    def answer_from_hits(self, question, hits, mode=None, reader=None):
        if reader == "extractive":
            return self.index.answer_from_hits(question, hits, mode, reader=reader)
        return self.reader.answer(question, hits)


@pytest.fixture
def small_index(tmp_path, tiny_encoder, tiny_colbert):
    from ragkit.api import Index
    from ragkit.config import Settings

    dataset = make_dataset(tmp_path / "set")
    index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert),
                                               mode="bm25"))
    index.add(dataset / "docs")
    return index, load_questions(dataset / "questions.jsonl", dataset / "docs")


def test_eval_scores_a_generating_reader(small_index, monkeypatch):
    from ragkit.evaluate import evaluate

    index, questions = small_index
    clock = Clock()
    monkeypatch.setattr("ragkit.evaluate.perf_counter", clock)
    report = evaluate(StandInIndex(index, clock), questions, "bm25", reader="generate")
    s = report.summary
    assert s["reader"] == "generate" and s["model"] == "stand-in-lm"
    # q1 "October 1973" exact; q2 "yes lazy dog" vs "lazy dog": P 2/3, R 1, F1 0.8; q3 "it ends in 2030" vs
    # "december 31 2030": P 1/4, R 1/3, F1 2/7
    assert s["answer_em"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["answer_f1"] == pytest.approx((1 + 0.8 + 2 / 7) / 3, abs=1e-4)
    assert s["answer_contains_gold"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["citation_support"] == pytest.approx(1 / 3, abs=1e-4)  # only q1 cites a passage holding its answer
    assert s["answer_in_citations"] == 1.0
    assert s["seconds_per_answer"] == 1.0  # the reader's 0.5 + 1.0 + 1.5 s; searching's 100 s are not counted
    assert s["generated_tokens_per_second"] == 6.0  # 18 tokens in 3 s
    by_id = {r["id"]: r for r in report.per_question}
    assert by_id["q1"]["answer"] == "October 1973." and by_id["q1"]["generated_tokens"] == 4
    assert by_id["q3"]["cited"] == [7] and by_id["q3"]["citation_support"] == 0.0
    assert by_id["q2"]["prompt_tokens"] == 50


def test_eval_passes_the_reader_name_to_the_index(small_index):
    from ragkit.evaluate import evaluate

    index, questions = small_index
    report = evaluate(StandInIndex(index, Clock()), questions, "bm25", reader="extractive")
    assert report.summary["reader"] == "extractive" and "model" not in report.summary
    assert "2030" in report.per_question[2]["answer"]  # the real extractive reader's top sentence


def test_eval_answers_with_the_index_default_reader(small_index, monkeypatch):
    """No reader named: the one `ask` would choose (here extractive, as no reader model can be loaded)."""
    from ragkit.api import Index
    from ragkit.errors import ModelLoadError, RagkitWarning
    from ragkit.evaluate import evaluate

    index, questions = small_index

    def no_model(self):
        raise ModelLoadError("no reader model here")

    monkeypatch.setattr(Index, "generative_reader", no_model)
    with pytest.warns(RagkitWarning, match="no reader model could be loaded"):
        report = evaluate(index, questions, "bm25")
    assert report.summary["reader"] == "extractive" and report.summary["answer_in_citations"] == 1.0


def test_run_dataset_threads_the_reader(tmp_path, tiny_encoder, tiny_colbert, monkeypatch):
    from ragkit.api import Index
    from ragkit.config import Settings
    from ragkit.evaluate import run_dataset

    asked = []

    def answer_from_hits(self, question, hits, mode=None, reader=None):
        asked.append(reader)
        answer = StandInGenerativeReader(Clock()).answer(question, hits)
        answer.model = "stand-in-lm"
        return answer

    monkeypatch.setattr(Index, "answer_from_hits", answer_from_hits)
    dataset = make_dataset(tmp_path / "set")
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), mode="bm25")
    report, _ = run_dataset(dataset, settings, index_dir=tmp_path / "index", reader="hmt")
    assert asked == ["hmt"] * 3
    assert report.summary["reader"] == "hmt" and report.summary["model"] == "stand-in-lm"


def test_eval_compare_shows_each_retriever_beside_hybrid(tmp_path, tiny_encoder, tiny_colbert):
    dataset = make_dataset(tmp_path / "set")
    common = [str(dataset), "--index", str(tmp_path / "index"), "--dense-model", str(tiny_encoder),
              "--late-model", str(tiny_colbert), "--no-answers"]
    result = CliRunner().invoke(app, ["eval", *common, "--compare", "--json"])
    assert result.exit_code == 0, result.stderr
    modes = json.loads(result.stdout)["modes"]
    assert list(modes) == ["dense", "bm25", "late", "hybrid"]
    for mode in modes:  # each column is what eval of that mode alone reports
        alone = json.loads(CliRunner().invoke(app, ["eval", *common, "--mode", mode, "--json"]).stdout)
        assert modes[mode] == {key: alone[key] for key in modes[mode]}
    text = CliRunner().invoke(app, ["eval", *common, "--compare"]).stdout
    assert "Each retriever beside hybrid search" in text and "bm25" in text and "recall@5" in text
