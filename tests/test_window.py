"""The reader's window: the question and the instruction always inside, never over budget, passages trimmed around
their evidence and numbered as their hits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ragkit.evidence import Evidence
from ragkit.ingest.document import Chunk
from ragkit.readers.window import (ELLIPSIS, Example, Style, WindowTooSmall, allot, count_tokens, encode, fit_tail,
                                   fit_window, frames, split_sections, trim)
from ragkit.retrieve import Hit

QUESTION = "When did oil prices rise sharply?"
STYLE = Style("Answer with a short phrase from the passages and cite it as [n].", "You answer from passages.",
              Example("What jumps?", ("[1] The quick brown fox jumps.",), "the fox [1]"))
WORDS = ("the quick brown fox jumps over the lazy dog oil prices rose sharply in october 1973 retrieval augmented "
         "generation cites the lines and pages it used contracts filings papers source code").split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from models import build_tokenizer

    return build_tokenizer(Path(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The same tokenizer with a ChatML-like template (its markers are split into word pieces, and counted)."""
    from models import build_tokenizer

    tok = build_tokenizer(Path(tmp_path_factory.mktemp("chat-tokenizer")))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def hit(text: str, evidence: list[tuple[int, int]] = (), path: str = "a.txt", chunk_id: str = "c") -> Hit:
    chunk = Chunk(path, 0, text, 0, len(text), 1, 1 + text.count("\n"), None, None, "", 0)
    return Hit(chunk, chunk_id, 1.0, {}, [Evidence(a, b, 1.0) for a, b in evidence])


def random_text(rng: random.Random, words: int) -> str:
    sentences, out = [], []
    for _ in range(words):
        out.append(rng.choice(WORDS))
        if rng.random() < 0.12:
            sentences.append(" ".join(out).capitalize() + ".")
            out = []
    return " ".join(sentences + ([" ".join(out)] if out else []))


def pieces_of(shown: str) -> list[str]:
    """The runs of a trimmed passage's own text, between its "…" marks."""
    return [p for p in shown.split(ELLIPSIS) if p.strip()]


def check_window(tok, window, hits, budget: int) -> None:
    assert window.tokens == len(window.ids) <= budget
    assert window.ids == encode(tok, window.text)
    assert f"Question: {QUESTION}" in window.text
    assert [p.number for p in window.passages] == sorted({p.number for p in window.passages})
    for p in window.passages:
        assert p.hit is hits[p.number - 1] and window.hit(p.number) is p.hit
        assert f"[{p.number}] {p.text}" in window.text
        assert all(piece.strip() in p.hit.chunk.text for piece in pieces_of(p.text))
        assert p.trimmed == (p.text != p.hit.chunk.text)


def test_the_token_count_never_exceeds_the_budget_and_the_question_is_always_in(tokenizer, chat_tokenizer):
    """A property over random budgets, passage counts and lengths, with and without evidence and chat template."""
    rng = random.Random(7)
    for case in range(60):
        tok = chat_tokenizer if case % 2 else tokenizer
        hits = []
        for n in range(rng.randint(0, 6)):
            text = random_text(rng, rng.choice([3, 20, 80, 400]))
            start = rng.randrange(len(text))
            evidence = [(start, min(len(text), start + rng.randint(1, 30)))] if rng.random() < 0.6 else []
            hits.append(hit(text, evidence, chunk_id=str(n)))
        minimum = count_tokens(tok, frames(QUESTION, STYLE)[-1].text(tok, []))
        budget = minimum + rng.choice([0, 1, 5, 30, 100, 300, 1000, 5000])
        window = fit_window(tok, QUESTION, hits, budget, STYLE, min_passage=rng.choice([1, 16, 64]))
        check_window(tok, window, hits, budget)


def test_a_tiny_budget_keeps_the_question_and_instruction_and_drops_huge_passages(tokenizer):
    huge = [hit("The quick brown fox jumps over the lazy dog. " * 2000)]
    minimum = count_tokens(tokenizer, frames(QUESTION, STYLE)[-1].text(tokenizer, []))
    window = fit_window(tokenizer, QUESTION, huge, minimum, STYLE)
    assert window.passages == [] and window.tokens == minimum
    assert window.text.endswith(f"{STYLE.instruction}\n\nQuestion: {QUESTION}\n\nAnswer:")
    question_ids = encode(tokenizer, QUESTION)
    assert any(window.ids[i : i + len(question_ids)] == question_ids for i in range(len(window.ids)))
    with pytest.raises(WindowTooSmall):
        fit_window(tokenizer, QUESTION, huge, minimum - 1, STYLE)


def test_the_full_frame_opens_and_closes_with_the_question_and_shows_the_example(tokenizer):
    window = fit_window(tokenizer, QUESTION, [hit("Oil prices rose sharply in October 1973.")], 2000, STYLE)
    message = (f"Question: {QUESTION}\n\n{STYLE.instruction}\n\n[1] Oil prices rose sharply in October 1973.\n\n"
               f"Question: {QUESTION}")
    example = f"Question: What jumps?\n\n{STYLE.instruction}\n\n[1] The quick brown fox jumps.\n\nQuestion: What jumps?"
    assert window.text == f"{STYLE.system}\n\n{example}\n\nAnswer: the fox [1]\n\n{message}\n\nAnswer:"
    assert not window.passages[0].trimmed


def test_the_chat_template_is_used_and_its_tokens_counted(chat_tokenizer):
    hits = [hit("Oil prices rose sharply in October 1973. " * 40)]
    window = fit_window(chat_tokenizer, QUESTION, hits, 300, STYLE)
    assert window.text.startswith("<|im_start|>system\nYou answer from passages.<|im_end|>\n<|im_start|>user\n")
    assert window.text.endswith(f"Question: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert window.tokens <= 300 and window.passages and window.passages[0].trimmed


def test_trimming_keeps_the_evidence_and_marks_the_cuts(tokenizer):
    filler = "The quick brown fox jumps over the lazy dog. "
    text = filler * 40 + "Oil prices rose sharply in October 1973. " + filler * 40
    start = text.index("October 1973")
    window = fit_window(tokenizer, QUESTION, [hit(text, [(start, start + len("October 1973"))])], 200, "Answer.")
    (p,) = window.passages
    assert "October 1973" in p.text and p.text.startswith(f"{ELLIPSIS} ") and p.text.endswith(f" {ELLIPSIS}")
    assert len(pieces_of(p.text)) == 1  # one run around the evidence


def test_evidence_is_kept_best_first_when_not_all_of_it_fits():
    text = " ".join(f"w{i}" for i in range(100))
    best, second = (text.index("w80"), text.index("w80") + 3), (text.index("w10"), text.index("w10") + 3)
    words = lambda t: len(t.split())  # noqa: E731 - one "token" per word, "…" included
    assert trim(text, [best, second], 3, words) == f"{ELLIPSIS} w80 {ELLIPSIS}"
    assert trim(text, [best, second], 7, words) == f"{ELLIPSIS} w10 {ELLIPSIS} w79 w80 w81 {ELLIPSIS}"
    assert trim(text, [best, second], 9, words) == f"{ELLIPSIS} w9 w10 w11 {ELLIPSIS} w79 w80 w81 {ELLIPSIS}"
    assert trim(text, [best], 0, words) == "" and trim(text, [best], 1000, words) == text


def test_without_evidence_the_sentences_sharing_the_questions_words_are_kept(tokenizer):
    text = ("The quick brown fox jumps over the lazy dog. " * 30 + "Oil prices rose sharply in October 1973. "
            + "Code is text too. " * 30)
    window = fit_window(tokenizer, QUESTION, [hit(text)], 150, "Answer.")
    assert "Oil prices rose sharply in October 1973." in window.passages[0].text
    start = fit_window(tokenizer, "Unrelated words?", [hit(text)], 150, "Answer.").passages[0].text
    assert start.startswith("The quick brown fox") and start.endswith(ELLIPSIS)


def test_numbering_maps_to_hits_and_a_passage_trimmed_to_nothing_is_left_out(tokenizer):
    hits = [hit(f"Passage number {n} says the quick brown fox jumps. " * 30, chunk_id=str(n)) for n in range(1, 6)]
    window = fit_window(tokenizer, QUESTION, hits, 300, "Answer.", min_passage=64)
    # 5 would leave each fewer than 64 tokens; 3 or 4 fit, as the tokenizer trained for the test splits the frame
    numbers = [p.number for p in window.passages]
    assert numbers in ([1, 2, 3], [1, 2, 3, 4])
    assert all(p.hit.chunk_id == str(p.number) and p.trimmed for p in window.passages)
    assert "[5]" not in window.text
    blank = [hits[0], hit(" \n ", chunk_id="blank"), hits[2]]
    window = fit_window(tokenizer, QUESTION, blank, 1000, "Answer.")
    assert [(p.number, p.hit.chunk_id) for p in window.passages] == [(1, "1"), (3, "3")]
    assert "[2]" not in window.text


def test_allot_is_max_min_fair_in_rank_order():
    rng = random.Random(3)
    for _ in range(300):
        needs = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
        budget, floor = rng.randint(0, 1200), rng.choice([1, 32, 64])
        shares = allot(needs, budget, floor)
        kept = [i for i, s in enumerate(shares) if s > 0]
        assert sum(shares) <= max(budget, 0) and all(s <= need for s, need in zip(shares, needs))
        assert kept == list(range(len(kept)))  # only the lowest-ranked are left out
        if sum(needs) <= budget:
            assert shares == needs
        cut = [s for s, need in zip(shares, needs) if 0 < s < need]
        assert max(cut, default=0) - min(cut, default=0) <= 1  # the trimmed ones share equally
        assert all(s >= need for s, need in zip(shares, needs) if s > max(cut, default=0))


def test_sections_cover_the_text_and_each_fits(tokenizer):
    text = "\n\n".join(random_text(random.Random(n), 120) for n in range(12))
    fits = lambda s: count_tokens(tokenizer, s) <= 100  # noqa: E731
    sections = split_sections(text, fits)
    assert len(sections) > 5 and all(fits(s) for s in sections)
    assert " ".join(sections).split() == text.split()
    start = fit_tail(text, fits)
    assert fits(text[start:]) and not fits(text[start - 2 :]) and text[start - 1].isspace()
    assert fit_tail("short text", fits) == 0
