"""Reciprocal rank fusion, and the extractive reader's sentence choice and line-exact citations."""

from __future__ import annotations

import re

import pytest

from ragkit.ingest.document import Chunk
from ragkit.readers.extractive import Answer, ExtractiveReader, split_sentences
from ragkit.fusion import reciprocal_rank_fusion
from ragkit.retrieve import Hit

# --- reciprocal rank fusion --------------------------------------------------------------------


def rrf(runs, k=60):
    return [(row, pytest.approx(score, abs=1e-12), ranks) for row, score, ranks in reciprocal_rank_fusion(runs, k)]


def test_rrf_hand_computed_scores():
    fused = reciprocal_rank_fusion({"dense": [7, 3, 5], "bm25": [3, 9]}, k=60)
    assert [row for row, _, _ in fused] == [3, 7, 9, 5]
    scores = {row: score for row, score, _ in fused}
    assert scores[3] == pytest.approx(1 / 62 + 1 / 61)  # rank 2 in dense, rank 1 in bm25
    assert scores[7] == pytest.approx(1 / 61)
    assert scores[9] == pytest.approx(1 / 62)
    assert scores[5] == pytest.approx(1 / 63)
    assert {row: ranks for row, _, ranks in fused} == {
        3: {"dense": 2, "bm25": 1}, 7: {"dense": 1}, 9: {"bm25": 2}, 5: {"dense": 3}}


def test_rrf_row_found_by_one_retriever_only():
    # found by both at modest ranks beats found by one at the top: 1/65 + 1/65 > 1/61
    fused = reciprocal_rank_fusion({"dense": [1, 2, 3, 4, 9], "bm25": [5, 6, 7, 8, 9]}, k=60)
    assert fused[0][0] == 9
    assert fused[0][1] == pytest.approx(2 / 65)
    assert fused[0][2] == {"dense": 5, "bm25": 5}
    only_bm25 = [r for r in fused if r[0] == 5][0]
    assert only_bm25[1] == pytest.approx(1 / 61) and only_bm25[2] == {"bm25": 1}


def test_rrf_ties_keep_first_seen_order():
    assert [r for r, _, _ in reciprocal_rank_fusion({"a": [1, 2], "b": [2, 1]})] == [1, 2]
    assert [r for r, _, _ in reciprocal_rank_fusion({"b": [2, 1], "a": [1, 2]})] == [2, 1]
    assert [r for r, _, _ in reciprocal_rank_fusion({"a": [4], "b": [5]})] == [4, 5]
    assert [r for r, _, _ in reciprocal_rank_fusion({"b": [5], "a": [4]})] == [5, 4]
    fused = reciprocal_rank_fusion({"a": [8, 6, 4]})  # one run: its order is kept
    assert [r for r, _, _ in fused] == [8, 6, 4]


def test_rrf_constant_k():
    assert rrf({"a": [3, 4]}, k=0) == [(3, 1.0, {"a": 1}), (4, 0.5, {"a": 2})]
    assert rrf({"a": [3, 4]}, k=1) == [(3, 0.5, {"a": 1}), (4, 1 / 3, {"a": 2})]
    # row 1 is first in one run; row 2 is third in both: a large k rewards agreement, k=0 the top rank
    runs = {"a": [1, 10, 2], "b": [11, 12, 2]}
    assert [r for r, _, _ in reciprocal_rank_fusion(runs, k=60)][0] == 2  # 2/63 > 1/61
    assert [r for r, _, _ in reciprocal_rank_fusion(runs, k=0)][:2] == [1, 11]  # 1 > 2/3; ties first-seen


def test_rrf_empty_runs():
    assert reciprocal_rank_fusion({}) == []
    assert reciprocal_rank_fusion({"dense": [], "bm25": []}) == []
    assert rrf({"dense": [], "bm25": [2]}) == [(2, 1 / 61, {"bm25": 1})]


# --- helpers for the reader --------------------------------------------------------------------


def chunk(text: str, start_line: int = 1, page: int | None = None, page_breaks: tuple[int, ...] = (),
          path: str = "doc.md", heading: str = "") -> Chunk:
    end_page = None if page is None else page + len(page_breaks)
    end_line = start_line + text.count("\n") if not page_breaks else 1 + text.count("\n", page_breaks[-1])
    return Chunk(path=path, ordinal=0, text=text, char_start=0, char_end=len(text), start_line=start_line,
                 end_line=end_line, page=page, end_page=end_page, heading=heading, n_tokens=len(text.split()),
                 page_breaks=page_breaks)


def hit(c: Chunk, score: float = 1.0, chunk_id: str = "c0") -> Hit:
    return Hit(chunk=c, chunk_id=chunk_id, score=score)


def spans(text: str) -> list[str]:
    return [text[a:b] for a, b in split_sentences(text)]


# --- split_sentences ---------------------------------------------------------------------------


def test_split_sentences_offsets():
    text = "The crisis began in 1973. Prices rose!  Why?\nBecause of the embargo.\n\nA new part"
    got = split_sentences(text)
    assert [text[a:b] for a, b in got] == [
        "The crisis began in 1973.", "Prices rose!", "Why?", "Because of the embargo.", "A new part"]
    assert got[0] == (0, 25)
    assert got[1] == (26, 38)
    assert all(a < b <= c for (a, b), (c, _) in zip(got, got[1:]))


def test_split_sentences_blank_lines_end_sentences_without_punctuation():
    assert spans("Title\n\nFirst body line\nstill the same sentence.") == [
        "Title", "First body line\nstill the same sentence."]
    assert spans("  \n\n  leading blank lines. x\n\n\n") == ["leading blank lines.", "x"]


def test_split_sentences_keeps_closing_quotes_and_brackets():
    assert spans('He said "stop." Then he left.') == ['He said "stop."', "Then he left."]
    assert spans("(See section 4.) Next one. [Done!] Yes") == ["(See section 4.)", "Next one.", "[Done!]", "Yes"]


def test_split_sentences_no_split_without_space_after_the_stop():
    assert spans("Version 1.2.3 was released on 3.4.2024. Next") == [
        "Version 1.2.3 was released on 3.4.2024.", "Next"]


def test_split_sentences_empty():
    assert split_sentences("") == []
    assert split_sentences(" \n\n \t") == []


def test_split_sentences_cuts_very_long_runs_at_lines():
    lines = [f"line {i} " + "word " * 20 for i in range(12)]  # ~110 chars per line, no sentence stop
    text = "\n".join(lines)
    got = split_sentences(text)
    assert len(got) > 1
    assert all(b - a <= 600 for a, b in got)
    assert "".join(text[a:b] for a, b in got).replace("\n", "") == text.replace("\n", "")
    assert all(text[a:b] == text[a:b].strip("\n") for a, b in got)


# --- the extractive reader ---------------------------------------------------------------------

OIL = ("Markets were calm in the early seventies.\n"
       "The oil crisis began in October 1973 when the embargo was announced.\n"
       "Many countries rationed fuel in the following winter.")


def test_reader_picks_the_answering_sentence():
    answer = ExtractiveReader(encoder=None, max_sentences=1).answer("When did the oil crisis begin?", [hit(chunk(OIL))])
    assert isinstance(answer, Answer)
    assert [c.text for c in answer.citations] == [
        "The oil crisis began in October 1973 when the embargo was announced."]
    assert answer.answer == "The oil crisis began in October 1973 when the embargo was announced. [1]"
    (c,) = answer.citations
    assert (c.start_line, c.end_line, c.page) == (2, 2, None)


def test_reader_cites_exact_lines_within_a_chunk():
    text = ("The supplier ships the goods within ten days.\n"
            "Invoices are payable within thirty days of receipt.\n"
            "The warranty lasts for 24 months from delivery.\n"
            "Disputes go to the courts of Zurich.")
    answer = ExtractiveReader(max_sentences=1).answer("How long does the warranty last?", [hit(chunk(text, 5))])
    (c,) = answer.citations
    assert c.text == "The warranty lasts for 24 months from delivery."
    assert (c.start_line, c.end_line) == (7, 7)  # third line of a chunk that starts on line 5
    data = c.to_json()
    assert (data["start_line"], data["end_line"], data["chunk_lines"], data["path"]) == (7, 7, [5, 8], "doc.md")


def test_reader_cites_a_sentence_spanning_lines():
    text = "Intro about the contract parties.\nThe warranty lasts\nfor 24 months from delivery.\nEnd of terms here."
    (c,) = ExtractiveReader(max_sentences=1).answer("warranty months", [hit(chunk(text, 40))]).citations
    assert c.text == "The warranty lasts\nfor 24 months from delivery."
    assert (c.start_line, c.end_line) == (41, 42)


def test_reader_page_relative_lines_in_a_pdf_chunk():
    page3 = "Section nine covers delivery terms.\nGoods ship within ten days of the order."
    page4 = "Late delivery terms are strict.\nThe penalty is five percent per day of delay."
    text = page3 + "\n\n" + page4
    c3 = chunk(text, start_line=10, page=3, page_breaks=(len(page3) + 2,))
    reader = ExtractiveReader(max_sentences=1)
    (c,) = reader.answer("What is the penalty per day of delay?", [hit(c3)]).citations
    assert c.text == "The penalty is five percent per day of delay."
    assert (c.page, c.start_line, c.end_line) == (4, 2, 2)
    (c,) = reader.answer("When do goods ship after the order?", [hit(c3)]).citations
    assert c.text == "Goods ship within ten days of the order."
    assert (c.page, c.start_line, c.end_line) == (3, 11, 11)
    assert c.to_json()["page"] == 3


def test_reader_respects_max_sentences_and_numbers_citations():
    text = " ".join(f"Clause {n} says the fee is due in March." for n in range(1, 7))
    hits = [hit(chunk(text))]
    for limit in (1, 2, 3, 5):
        answer = ExtractiveReader(max_sentences=limit).answer("When is the fee due?", hits)
        assert len(answer.citations) == limit
        expected = " ".join(f"{' '.join(c.text.split())} [{n}]" for n, c in enumerate(answer.citations, 1))
        assert answer.answer == expected
        assert re.findall(r"\[(\d+)\]", answer.answer) == [str(n) for n in range(1, limit + 1)]


def test_reader_answer_joins_citations_in_order_and_cleans_whitespace():
    a = chunk("The fee of the license is due in March.\nUnrelated words about weather here.", path="a.md")
    b = chunk("Nothing about money in this sentence at all.\nThe license fee is due\n  every March.", path="b.md")
    answer = ExtractiveReader(max_sentences=2).answer("When is the license fee due?",
                                                       [hit(a, chunk_id="A"), hit(b, chunk_id="B")])
    assert [c.hit.chunk_id for c in answer.citations] == ["A", "B"]
    assert answer.answer == "The fee of the license is due in March. [1] The license fee is due every March. [2]"
    assert answer.citations[1].text == "The license fee is due\n  every March."
    assert (answer.citations[1].start_line, answer.citations[1].end_line) == (2, 3)
    assert answer.to_json()["citations"][1]["path"] == "b.md"
    assert answer.to_json()["answer"] == answer.answer


def test_reader_drops_weak_sentences_below_the_best():
    text = "The embargo started the oil crisis in 1973.\nCats sleep most of the afternoon."
    answer = ExtractiveReader(max_sentences=3).answer("oil crisis embargo 1973", [hit(chunk(text))])
    assert [c.text for c in answer.citations] == ["The embargo started the oil crisis in 1973."]
    assert answer.answer.endswith("[1]") and "[2]" not in answer.answer


def test_reader_with_no_hits():
    answer = ExtractiveReader().answer("anything?", [])
    assert answer.citations == [] and answer.hits == []
    assert answer.answer.startswith("No answer found")
    assert answer.to_json() == {"answer": answer.answer, "citations": [], "reader": "extractive", "model": None,
                                "prompt_tokens": None, "generated_tokens": None}


def test_reader_with_hits_without_text():
    blank = hit(chunk("  \n\n "))
    answer = ExtractiveReader().answer("anything?", [blank])
    assert answer.citations == [] and answer.hits == [blank]
    assert answer.answer.startswith("No answer found")


def test_reader_prefers_a_real_sentence_over_a_short_title():
    text = "Oil crisis embargo\n\nThe oil crisis began in 1973."
    (c,) = ExtractiveReader(max_sentences=3).answer("oil crisis embargo", [hit(chunk(text))]).citations
    assert c.text == "The oil crisis began in 1973."
    assert (c.start_line, c.end_line) == (3, 3)


def test_reader_cites_a_title_when_nothing_longer_exists():
    (c,) = ExtractiveReader().answer("oil crisis", [hit(chunk("Oil crisis", 12))]).citations
    assert (c.text, c.start_line) == ("Oil crisis", 12)


def test_reader_breaks_ties_by_hit_rank():
    same = "The fee is due every March."
    first, second = hit(chunk(same, path="first.md"), 0.9, "1"), hit(chunk(same, path="second.md"), 0.5, "2")
    answer = ExtractiveReader(max_sentences=1).answer("When is the fee due?", [second, first])
    assert answer.citations[0].hit is second  # the order of the hits is their rank
    answer = ExtractiveReader(max_sentences=1).answer("When is the fee due?", [first, second])
    assert answer.citations[0].hit is first
    assert answer.hits == [first, second]
