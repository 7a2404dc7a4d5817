"""Contextual chunks: the dense encoder and BM25 read a chunk's document name and heading path before its text;
what is stored, shown and cited is the chunk's own text."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkit import store
from ragkit.api import Index
from ragkit.config import Settings
from ragkit.encoders.dense import DenseEncoder
from ragkit.indexer import _chunks_still_valid, recorded_settings
from ragkit.ingest.context import chunk_context, contextual_texts, fit_context

# Two filings of one company: the 2022 one says "revenue" more often, only the names tell the years apart.
FILINGS = {
    "acme_2018_annual.txt": "Total revenue grew in the year under review.\n",
    "acme_2022_annual.txt": "Revenue, revenue and more revenue: total revenue grew in the year under review.\n",
}


def write(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def test_a_year_in_the_file_name_finds_that_years_filing(tmp_path, tiny_encoder):
    docs = write(tmp_path / "docs", FILINGS)
    top = {}
    for context in (0, 32):
        index = Index(tmp_path / f"index-{context}", Settings(dense_model=str(tiny_encoder), late=False,
                                                              context_tokens=context))
        index.add(docs)
        top[context] = index.search("acme total revenue in 2018", k=2, mode="bm25")[0].chunk.path
    assert top == {0: "acme_2022_annual.txt", 32: "acme_2018_annual.txt"}


def test_the_dense_encoder_reads_name_and_headings_the_citation_does_not(tmp_path, tiny_encoder, monkeypatch):
    docs = write(tmp_path / "docs", {"reports/acme_2018.md": "# Cash flows\n\n## Capital expenditure\n\n"
                                     + "Spending on plant rose. " * 30})
    read: list[str] = []
    encode = DenseEncoder.encode_documents

    def spy(self, texts, n_tokens, **kwargs):
        read.extend(texts)
        return encode(self, texts, n_tokens, **kwargs)

    monkeypatch.setattr(DenseEncoder, "encode_documents", spy)
    index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False))
    index.add(docs)
    table = store.load_chunks(store.current_generation(index.path))
    texts, headings = table.column("text").to_pylist(), table.column("heading").to_pylist()
    assert len(texts) > 2 and len(read) == len(texts)
    encoder = DenseEncoder(str(tiny_encoder))
    limit = encoder.max_tokens - encoder.special_tokens
    for text, heading in zip(texts, headings):
        seen = next(r for r in read if r.endswith(text))
        context = seen[: -len(text)]
        whole = chunk_context("reports/acme_2018.md", heading)
        # the name and heading path, cut at a word to the context's tokens when longer (the fixture's vocabulary
        # varies between builds, so how much fits does too)
        assert context.startswith("reports / acme") and whole.startswith(context.rstrip("\n"))
        if encoder.count_tokens(whole + "\n") <= limit // 4:  # the context takes at most a quarter
            assert context == whole + "\n"
        assert "acme" not in text and encoder.count_tokens(seen) <= limit
    assert any("Capital expenditure" in h for h in headings)
    hit = index.search("capital expenditure", k=1, mode="dense")[0]
    assert "acme" not in hit.chunk.text and hit.chunk.start_line >= 1


def test_a_context_too_long_is_cut_to_its_tokens():
    count = lambda text: len(text.split())  # noqa: E731
    context = chunk_context("a_b_c_d_e_f.txt", "One > Two > Three")
    assert context == "a b c d e f > One > Two > Three"
    fitted = fit_context(context, 4, count)
    assert count(fitted) <= 4 and context.startswith(fitted.strip())
    assert fit_context(context, 0, count) == ""
    read, extra = contextual_texts(["x_y.txt", "x_y.txt"], ["", ""], ["first", "second"], 8, count)
    assert read == ["x y\nfirst", "x y\nsecond"] and extra == [2, 2]
    assert contextual_texts(["x.txt"], [""], ["t"], 0, count) == (["t"], [0])


def test_indexes_made_before_contexts_keep_their_chunks():
    assert recorded_settings({"settings": {"chunk_tokens": 256}})["context_tokens"] == 0
    old = {"chunk_tokens": 256, "chunker_version": 2, "dense_tokenizer": "t", "late_tokenizer": None}
    assert _chunks_still_valid(old, {**old, "context_tokens": 0})
    assert not _chunks_still_valid(old, {**old, "context_tokens": 32})


def test_changing_the_context_rechunks_and_keeping_it_does_not(tmp_path, tiny_encoder):
    docs = write(tmp_path / "docs", FILINGS)
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False, context_tokens=0)).add(docs)
    kept = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False)).add(docs)
    assert kept.rebuilt is None  # unset: the index keeps its own (no context)
    changed = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False,
                                                 context_tokens=16)).add(docs)
    assert "context_tokens" in changed.rebuilt


@pytest.mark.parametrize("value", [-1])
def test_a_negative_context_is_refused(value):
    from ragkit.errors import ConfigError

    with pytest.raises(ConfigError, match="context_tokens"):
        Settings().replace(context_tokens=value)
