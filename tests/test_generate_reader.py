"""The generative reader with a tiny random Llama made at test time: greedy decoding over exactly the window that
fit_window builds, streaming, citations, and map-reduce summaries within the window."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkit.errors import ConfigError
from ragkit.evidence import Evidence
from ragkit.ingest.document import Chunk
from ragkit.readers.generate import (ANSWER_STYLE, REDUCE_INSTRUCTION, SECTION_INSTRUCTION, SUMMARY_INSTRUCTION,
                                     GenerativeReader, TextStream, answer_end, cite, cited_numbers, greedy, loop_hold,
                                     stop_token_ids)
from ragkit.readers.window import encode, fit_window
from ragkit.retrieve import Hit

QUESTION = "When did oil prices rise sharply?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from models import build_llama_reader

    folder = build_llama_reader(Path(tmp_path_factory.mktemp("tiny-llama")))
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def hit(text: str, path: str = "a.txt", start_line: int = 1, evidence: tuple[int, int] | None = None) -> Hit:
    chunk = Chunk(path, 0, text, 0, len(text), start_line, start_line + text.count("\n"), None, None, "", 0)
    return Hit(chunk, f"{path}:{start_line}", 1.0, {}, [Evidence(*evidence, 1.0)] if evidence else [])


def hits() -> list[Hit]:
    long = "The quick brown fox jumps over the lazy dog. " * 40 + "Oil prices rose sharply in October 1973. "
    start = long.index("October")
    return [hit(long + "Code is text too. " * 40, "oil.txt", 3, (start, start + 12)),
            hit("Retrieval augmented generation cites the lines and pages it used.", "rag.txt", 7),
            hit("Contracts, filings, papers, source code and transcripts are long documents.", "docs.txt", 1)]


TIE = 1e-4  # a cached and an uncached pass may round differently: logits this close count as equal


def assert_greedy(model, prompt: list[int], new: list[int], budget: int, stop: set[int], ended: bool) -> None:
    """`new` is greedy decoding of `prompt` re-read whole at every step (no cache), up to near ties: each id is the
    step's best, and a run that stopped before `budget` without its text having `ended` stopped at a stop id."""
    import torch

    seq = list(prompt)
    with torch.no_grad():
        for token in new:
            logits = model(torch.tensor([seq])).logits[0, -1]  # (V,)
            assert float(logits[token]) >= float(logits.max()) - TIE, f"step {len(seq) - len(prompt)}"
            seq.append(token)
        if len(new) < budget and not ended:
            logits = model(torch.tensor([seq])).logits[0, -1]
            assert max(float(logits[s]) for s in stop) >= float(logits.max()) - TIE, "stopped without a stop id"


def recording_greedy(monkeypatch) -> list[list[int]]:
    """Patches the reader's decoder to keep each list of ids it returns."""
    from ragkit.readers import generate

    runs = []
    decode = generate.greedy
    monkeypatch.setattr(generate, "greedy", lambda *a, **kw: runs.append(decode(*a, **kw)) or runs[-1])
    return runs


def test_the_answer_is_greedy_decoding_of_exactly_the_window(tiny, monkeypatch):
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=12)
    import ragkit.readers.generate as generate

    monkeypatch.setattr(generate, "answer_end", lambda question: generate.paragraph_end)  # the random model loops
    monkeypatch.setattr(generate, "loop_hold", len)
    seen = []
    complete = GenerativeReader.complete
    monkeypatch.setattr(GenerativeReader, "complete",
                        lambda self, ids, *a, **kw: seen.append(ids) or complete(self, ids, *a, **kw))
    runs = recording_greedy(monkeypatch)
    answer = reader.answer(QUESTION, hits())
    window = fit_window(tok, QUESTION, hits(), 400 - 12, ANSWER_STYLE)
    assert seen == [window.ids] and window.tokens <= 388 and window.passages[0].trimmed
    [new] = runs
    assert_greedy(model, window.ids, new, 12, reader.stop_ids, ended=False)
    assert answer.answer == tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    assert "\n\n" not in answer.answer  # else the answer would stop at it (tested below)
    assert (answer.reader, answer.model, answer.prompt_tokens, answer.generated_tokens) == \
        ("generate", "tiny", window.tokens, len(new))
    assert reader.complete(window.ids)[1] == new
    data = answer.to_json()
    assert (data["reader"], data["model"], data["prompt_tokens"], data["generated_tokens"]) == \
        ("generate", "tiny", window.tokens, len(new))


def test_an_answer_ends_at_its_first_blank_line(tiny, monkeypatch):
    """A model that goes on after its answer with a blank line and another "Question:" is stopped there: the
    answer is the first paragraph, and no token is generated after the one that ended it."""
    from ragkit.readers import generate

    model, _ = tiny
    tok = byte_level_tokenizer()  # the tiny model's own vocabulary has no newline
    text = "October 1973 [1].\n\nQuestion: what else?\n\n[6] A passage it made up."
    script = encode(tok, text)
    steps = []

    def scripted(model_, prompt, max_new_tokens, stop, on_id=None, halt=None):
        for token in script[:max_new_tokens]:
            steps.append(token)
            on_id(token)
            if halt():
                break
        return list(steps)

    monkeypatch.setattr(generate, "greedy", scripted)
    reader = GenerativeReader(model, tok, "tiny", context_length=600, answer_tokens=len(script) + 1)
    pieces = []
    answer = reader.answer(QUESTION, hits(), on_token=pieces.append)
    assert answer.answer == "October 1973 [1]." == "".join(pieces) and answer.numbers == [1]
    assert len(steps) < len(encode(tok, "October 1973 [1].\n\nQuestion"))
    assert "Question" in tok.decode(script) and answer.generated_tokens == len(steps)
    summary = reader.summarize("The committee reviewed the budget and approved it.")
    assert summary == text.strip()  # a summary may have several paragraphs


@pytest.mark.parametrize("question, text, answer", [
    ("When did it begin?", "In October 1973 [1]. It was a shock.", "In October 1973 [1]."),
    ("When did it begin?", "In October 1973. [1] [2] Then more.", "In October 1973. [1] [2]"),
    ("Who led the U.S. Army?", "The U.S. Army was led by Abrams. Later", "The U.S. Army was led by Abrams."),
    ("Who paid?", "Mr. Smith paid $3.5 million [2]. He", "Mr. Smith paid $3.5 million [2]."),
    ("Is it safe?", "Yes [1]\n\nQuestion: is it?", "Yes [1]"),
    ("Why did it begin?", "Arab states cut supply [1]. Prices rose.\n\nQuestion", "Arab states cut supply [1]. "
                                                                                   "Prices rose."),
    ("Summarize the whole meeting.", "They met. They agreed.", None),
    ("What did the group think of the battery design?", "Long-lived. Cheap.", None),
    ("How did the designer introduce the prototype?", "In yellow. Spongy.", None),
])
def test_a_factual_answer_ends_after_its_first_sentence_an_account_at_its_first_blank_line(question, text, answer):
    from ragkit.readers.generate import answer_end

    end = answer_end(question)(text)
    assert (text[:end] if end is not None else None) == answer


def test_a_yes_no_answer_opens_with_the_label_the_model_prefers_then_goes_on_greedily(tiny, monkeypatch):
    import torch

    from ragkit.readers.generate import LABELS

    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=10)
    question = "Did oil prices rise sharply?"
    window = reader.window(question, hits())
    with torch.no_grad():
        logits = model(torch.tensor([window.ids])).logits[0, -1]  # (V,)
    labels = [encode(tok, " " + label) for label in LABELS]  # the tiny tokenizer has no chat template
    runs = recording_greedy(monkeypatch)
    answer = reader.answer(question, hits())
    [rest] = runs
    label = reader.label(window.ids)
    assert label in labels and float(logits[label[0]]) >= max(float(logits[ids[0]]) for ids in labels) - TIE
    text = tok.decode(label + rest, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    end = answer_end_of(question, text)
    assert_greedy(model, window.ids + label, rest, 10 - len(label), reader.stop_ids, ended=end < len(text))
    assert answer.answer == text[:end] and answer.generated_tokens == len(label) + len(rest)


def answer_end_of(question: str, text: str) -> int:
    from ragkit.readers.generate import answer_end

    end = answer_end(question)(text)
    return len(text) if end is None else end


def test_the_reader_window_setting_bounds_the_prompt(tiny):
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=12, window=120)
    assert reader.budget == 120 and reader.window(QUESTION, hits()).tokens <= 120
    with pytest.raises(ConfigError, match="at most 388"):
        GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=12, window=389)


def test_decoding_stops_at_a_stop_id(tiny):
    import torch

    model, tok = tiny
    prompt = encode(tok, "the quick brown fox")
    first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    assert greedy(model, prompt, 5, {first}) == []
    free = greedy(model, prompt, 5, set())
    assert len(free) == 5 and free[0] == first
    first_of_third = free.index(free[2])
    assert greedy(model, prompt, 5, {free[2]}) == free[:first_of_third]


def test_stop_ids_include_the_chat_templates_end_of_turn(tiny):
    import copy

    model, tok = tiny
    assert stop_token_ids(tok, model) == {model.generation_config.eos_token_id}  # the tokenizer names no eos
    tok2 = copy.deepcopy(tok)
    tok2.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert tok2.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok2, model)


def test_streamed_pieces_concatenate_to_the_answer(tiny, monkeypatch):
    import ragkit.readers.generate as generate

    monkeypatch.setattr(generate, "answer_end", lambda question: generate.paragraph_end)  # the random model may loop
    monkeypatch.setattr(generate, "loop_hold", len)
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=16)
    pieces = []
    answer = reader.answer(QUESTION, hits(), on_token=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == answer.answer and answer.answer


def byte_level_tokenizer(corpus: str = "plain words only " * 50):
    """A byte-level BPE tokenizer trained at test time: it decodes any text back exactly, newlines included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([corpus], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_streaming_holds_back_split_characters_and_trailing_spaces():
    """A byte-level BPE splits "é" and "日本" across tokens: no piece shows half a character, and the pieces make the
    final text exactly."""
    tok = byte_level_tokenizer()
    text = "  café 日本 words  end "
    ids = encode(tok, text)
    assert len(ids) > len(text.split()) + 4  # multi-byte characters take several tokens
    pieces = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream.push(i)
    final = stream.close()
    assert final == text.strip() == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces) and not pieces[-1].endswith(" ")


def test_the_citation_parser():
    valid = range(1, 4)
    assert cited_numbers("Paris [2][3].", valid) == [2, 3]
    assert cited_numbers("Paris [1, 3]", valid) == [1, 3]
    assert cited_numbers("Paris [4]", valid) == []
    assert cited_numbers("[3] then [1] then [3] again", valid) == [3, 1]
    assert cited_numbers("[1-3]", valid) == [1, 2, 3] and cited_numbers("[ 2 ; 3 ]", valid) == [2, 3]
    assert cited_numbers("no citation, [n] or [x]", valid) == [] and cited_numbers("[0] [1999]", valid) == []


def test_citations_map_numbers_to_the_hits_shown(tiny):
    _, tok = tiny
    given = hits()
    window = fit_window(tok, QUESTION, given, 2000, ANSWER_STYLE)
    citations, numbers = cite("October 1973 [3][1], not [9].", window)
    assert numbers == [3, 1] and [c.hit for c in citations] == [given[2], given[0]]
    assert [(c.hit.chunk.path, c.start_line, c.end_line) for c in citations] == [("docs.txt", 1, 1), ("oil.txt", 3, 3)]
    citations, numbers = cite("October 1973.", window)
    assert numbers == [1, 2, 3] and [c.hit for c in citations] == given


def test_the_answer_json_numbers_its_citations(tiny, monkeypatch):
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=400, answer_tokens=4)
    monkeypatch.setattr(GenerativeReader, "complete", lambda self, ids, on_token=None, until=None, prefix=(), held=None: ("1973 [2]", [5, 6]))
    answer = reader.answer(QUESTION, hits())
    assert answer.answer == "1973 [2]" and answer.numbers == [2] and answer.generated_tokens == 2
    assert [(c["n"], c["path"]) for c in answer.to_json()["citations"]] == [(2, "rag.txt")]
    assert [(n, c.hit.chunk.path) for n, c in answer.numbered()] == [(2, "rag.txt")]


def test_a_long_document_is_summarized_by_map_then_reduce_within_the_window(tiny, monkeypatch):
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=160, answer_tokens=12)
    calls = []
    complete = GenerativeReader.complete

    def spy(self, ids, on_token=None, until=None, prefix=()):
        calls.append((ids, on_token is not None))
        return complete(self, ids, on_token)

    def instruction(ids: list[int]) -> str:
        """Which instruction a summary prompt ends with (plain text: the instruction, then "Summary:")."""
        return next(i for i in (SECTION_INSTRUCTION, REDUCE_INSTRUCTION, SUMMARY_INSTRUCTION)
                    if ids[-len(end := encode(tok, f"{i}\n\nSummary:")) :] == end)

    monkeypatch.setattr(GenerativeReader, "complete", spy)
    document = "\n\n".join(f"Part {n}. The quick brown fox jumps over the lazy dog. Oil prices rose in 1973. " * 3
                           for n in range(12))
    assert len(encode(tok, document)) > 5 * 148
    pieces = []
    summary = reader.summarize(document, on_token=pieces.append)
    assert all(len(ids) <= 160 - 12 for ids, _ in calls)  # every call within the window
    kinds = [instruction(ids) for ids, _ in calls]
    assert kinds[:5] == [SECTION_INSTRUCTION] * 5 and kinds[-1] == REDUCE_INSTRUCTION
    assert [streams for _, streams in calls] == [False] * (len(calls) - 1) + [True]  # only the final pass streams
    assert "".join(pieces) == summary
    calls.clear()
    reader.summarize("The committee reviewed the budget and approved it.")
    assert [instruction(ids) for ids, _ in calls] == [SUMMARY_INSTRUCTION]


def test_an_answer_that_starts_to_loop_ends_before_the_loop_and_never_streams_it():
    """SmolLM2-135M, summarizing a meeting, says "the budget is fixed" again and again: the answer is what it said
    before its first repeated clause, and the repeated clause is never sent."""
    tok = byte_level_tokenizer()
    text = "They agreed: the budget is fixed, the budget is fixed, the budget is fixed, and the"
    pieces = []
    stream = TextStream(tok, pieces.append, answer_end("Summarize the meeting"), loop_hold)
    for i in encode(tok, text):
        stream.push(i)
        assert "fixed, the budget is fixed" not in "".join(pieces)
    assert stream.ended
    assert stream.close() == "".join(pieces) == "They agreed: the budget is fixed,"
    unlooped = TextStream(tok, None, answer_end("Summarize the meeting"), loop_hold)
    for i in encode(tok, "They agreed: the budget is fixed, the colour is red, the budget is set"):
        unlooped.push(i)
    assert not unlooped.ended  # a clause said once, and short clauses said twice, are no loop
    pieces = []
    stammer = TextStream(tok, pieces.append, answer_end("Summarize the meeting"), loop_hold)
    for i in encode(tok, "Professor E: Yeah. So I uh, I uh, I uh, I uh, I uh"):
        stammer.push(i)
    assert stammer.ended and stammer.close() == "".join(pieces) == "Professor E: Yeah. So I uh,"


def test_an_account_question_gets_no_worked_example(tiny):
    model, tok = tiny
    reader = GenerativeReader(model, tok, "tiny", context_length=2000, answer_tokens=16)
    example = ANSWER_STYLE.example.question
    assert example in reader.window("When did oil prices rise sharply?", hits()).text
    account = reader.window("Summarize the discussion about oil prices", hits()).text
    assert example not in account and "few sentences" in account
