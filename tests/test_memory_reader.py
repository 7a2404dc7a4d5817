"""`ask --reader infini` and `summarize` end to end with a tiny random Llama made at test time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from models import build_llama_reader

    return build_llama_reader(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def indexed(tmp_path, tiny_encoder, tiny_colbert) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oil.txt").write_text("The oil crisis began in October 1973.\n\n" + "Prices rose fourfold. " * 60)
    (docs / "fox.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(docs)
    return tmp_path / "index"


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_ask_with_a_memory_reader(indexed, tiny_llama, reader):
    result = runner.invoke(app, ["ask", "When did the oil crisis begin?", "--index", str(indexed), "--mode", "bm25",
                                 "--reader", reader, "--reader-model", str(tiny_llama), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data["answer"], str)
    assert [c["path"] for c in data["citations"]][0] == "oil.txt"


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_whole_documents_stream_through_memory(indexed, tiny_llama, reader):
    idx = Index(indexed, Settings(reader=reader, reader_model=str(tiny_llama), reader_segment=32, answer_tokens=4))
    answer = idx.ask("When did the oil crisis begin?", mode="bm25")
    assert idx.memory_reader(reader).model.state_bytes() > 0  # the documents did not fit one segment
    assert answer.citations and answer.citations[0].hit.chunk.path == "oil.txt"


def test_the_question_opens_and_closes_the_final_window(indexed, tiny_llama, monkeypatch):
    from ragkit.readers.generative import MemoryReader

    idx = Index(indexed, Settings(reader="hmt", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=2))
    windows = []
    generate = MemoryReader._generate
    monkeypatch.setattr(MemoryReader, "_generate", lambda self, docs, window: windows.append(window) or
                        generate(self, docs, window))
    idx.ask("When did the oil crisis begin?", mode="bm25")
    question = "Question: When did the oil crisis begin?"
    assert windows[0].startswith(question) and windows[0].endswith(question)
    assert "[1] The oil crisis began in October 1973." in windows[0]


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_summarize_a_file(tmp_path, tiny_llama, reader):
    doc = tmp_path / "report.md"
    doc.write_text("# Report\n\n" + "The committee reviewed the budget and approved it. " * 100)
    result = runner.invoke(app, ["summarize", str(doc), "--reader", reader, "--reader-model", str(tiny_llama),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"summary", "source"} and data["source"] == str(doc.resolve())


def test_reader_errors_are_clear(tmp_path, indexed):
    result = runner.invoke(app, ["ask", "x", "--index", str(indexed), "--mode", "bm25", "--reader", "infini",
                                 "--reader-model", str(tmp_path / "no-model")])
    assert result.exit_code == 1 and "reader model" in result.stderr and "Traceback" not in result.stderr
    doc = tmp_path / "a.txt"
    doc.write_text("text")
    result = runner.invoke(app, ["summarize", str(doc), "--reader", "extractive"])
    assert result.exit_code == 1 and "not a reader with memory" in result.stderr
    result = runner.invoke(app, ["summarize", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "is not a file" in result.stderr
