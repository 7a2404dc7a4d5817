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


@pytest.fixture
def indexed(tmp_path, tiny_encoder, tiny_colbert) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oil.txt").write_text("The oil crisis began in October 1973.\n\n" + "Prices rose fourfold. " * 60)
    (docs / "fox.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(docs)
    return tmp_path / "index"


QUESTION = "When did the oil crisis begin, how far prices rose, and what did the fox jump over?"


def tokens(tiny_llama: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))(text, add_special_tokens=False)["input_ids"]


def decode(tiny_llama: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama)).decode(ids, skip_special_tokens=True).strip()


def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def memory_and_window(tiny_llama: Path, docs: Path, hits, budget: int) -> tuple[list[int], list[int]]:
    """The reader's input built by hand: the whole files of the hits (first-seen order, blank-line separated), read
    into memory, then the window fit_window builds from the question and the hits, read with exact attention."""
    from ragkit.readers.generative import ANSWER_STYLE
    from ragkit.readers.window import fit_window

    documents = [(docs / path).read_text() for path in dict.fromkeys(h.chunk.path for h in hits)]
    window = fit_window(tokenizer(tiny_llama), QUESTION, hits, budget, ANSWER_STYLE)
    return tokens(tiny_llama, "\n\n".join(documents)), window.ids


def greedy(tiny_llama: Path, prompt: list[int], steps: int) -> list[int]:
    """The backbone's own greedy continuation of `prompt` (positions from 0), without any cache."""
    import torch
    from transformers import LlamaForCausalLM

    backbone = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(backbone(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def record_generate(monkeypatch, cls) -> list[tuple[list[int], int, list[int]]]:
    """Every (prompt, window length, new tokens) that `cls.generate` sees and returns."""
    calls = []
    generate = cls.generate

    def spy(self, prompt_ids, *args, **kwargs):
        new = generate(self, prompt_ids, *args, **kwargs)
        calls.append((prompt_ids[0].tolist(), kwargs["window"], new[0].tolist()))
        return new

    monkeypatch.setattr(cls, "generate", spy)
    return calls


def hits_for(idx: Index):
    """What the reader is given: the top `reader_passages` of the 5 hits ask retrieves."""
    return idx.search(QUESTION, min(idx.settings.k, 5), "bm25")[: idx.settings.reader_passages]


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_ask_with_a_memory_reader_prints_the_readers_answer_and_citations(indexed, tiny_llama, reader, monkeypatch):
    from ragkit.readers.generative import MemoryReader

    answers = []
    answer = MemoryReader.answer
    monkeypatch.setattr(MemoryReader, "answer", lambda self, *args: answers.append((self.spec, answer(self, *args)))
                        or answers[-1][1])
    result = runner.invoke(app, ["ask", QUESTION, "--index", str(indexed), "--mode", "bm25",
                                 "--reader", reader, "--reader-model", str(tiny_llama), "--json"])
    assert result.exit_code == 0, result.stderr
    (spec, given), = answers
    assert (spec.kind, spec.model) == (reader, str(tiny_llama))
    assert json.loads(result.stdout) == json.loads(json.dumps(given.to_json()))
    hits = hits_for(Index(indexed))
    assert [c["chunk_id"] for c in json.loads(result.stdout)["citations"]] == [h.chunk_id for h in hits]


def test_infini_reads_the_documents_into_memory_and_the_window_with_exact_attention(indexed, tiny_llama,
                                                                                    monkeypatch):
    """The model reads the hits' whole documents, then the window fit_window builds (as long as fits the backbone
    with the answer, whatever the segment length); with the gates shut the answer is exactly the backbone's greedy
    decoding of that window alone, and the citations are the hits."""
    import ragkit.readers.generative as generative
    from ragkit.readers.generate import paragraph_end
    from ragkit.memory.infini import InfiniLM

    monkeypatch.setattr(generative, "answer_end", lambda question: paragraph_end)  # the random model may loop
    monkeypatch.setattr(generative, "loop_hold", len)
    idx = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=8))
    calls = record_generate(monkeypatch, InfiniLM)
    idx.memory_reader("infini").model.shut_gates()
    answer = idx.ask(QUESTION, mode="bm25")
    hits = hits_for(idx)
    memory, window = memory_and_window(tiny_llama, indexed.parent / "docs", hits, 2048 - 8)
    assert len(hits) > 2 and {h.chunk.path for h in hits} == {"oil.txt", "fox.txt"}
    (seen, length, new), = calls
    assert seen == memory + window and length == len(window) > 32
    assert new[: answer.generated_tokens] == greedy(tiny_llama, window, 8)[: answer.generated_tokens]
    assert answer.answer == decode(tiny_llama, new[: answer.generated_tokens])
    assert (answer.reader, answer.prompt_tokens) == ("infini", len(window))
    assert [c.hit.chunk_id for c in answer.citations] == [h.chunk_id for h in hits][: len(answer.citations)]
    assert [h.chunk_id for h in answer.hits] == [h.chunk_id for h in hits]


def test_with_default_settings_and_long_documents_the_question_is_in_the_window(tmp_path, tiny_encoder,
                                                                                tiny_colbert, tiny_llama,
                                                                                monkeypatch):
    """Default segment length (1024), documents of several thousand tokens: the question's tokens open and close
    the window the model attends to exactly, with every passage; only the documents go to memory."""
    from ragkit.memory.infini import InfiniLM

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oil.txt").write_text("The oil crisis began in October 1973.\n\n" + "Prices rose fourfold. " * 800)
    (docs / "fox.txt").write_text("The fox jumped over the lazy dog.\n\n" + "Foxes are quick. " * 800)
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), reader="infini",
                        reader_model=str(tiny_llama), answer_tokens=4, chunk_tokens=64)
    idx = Index(tmp_path / "index", settings)
    idx.add(docs)
    calls = record_generate(monkeypatch, InfiniLM)
    idx.ask(QUESTION, mode="bm25")
    (prompt, length, _), = calls
    window = prompt[-length:]
    question = tokens(tiny_llama, QUESTION)
    assert len(prompt) - length > 2 * 1024  # the documents, streamed into memory
    at = [i for i in range(length) if window[i : i + len(question)] == question]
    assert len(at) == 2 and at[1] > length - len(question) - 8  # it opens the passages and closes the window
    for hit in hits_for(idx):  # every passage is in the window, between the two (short chunks: none trimmed)
        passage = tokens(tiny_llama, hit.chunk.text)
        assert any(window[i : i + len(passage)] == passage for i in range(at[0], at[1])), hit.chunk_id


def test_infini_streams_the_documents_into_memory_and_answers_from_the_window(indexed, tiny_llama, monkeypatch):
    """With 32-token segments, layer 0's memory after answering holds exactly the documents (Σ σ(K)ᵀ V over their
    tokens, from the backbone's own first layer); with the gates shut the answer does not depend on them."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from ragkit.memory.infini import InfiniLM

    idx = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=4))
    calls = record_generate(monkeypatch, InfiniLM)
    idx.ask(QUESTION, mode="bm25")
    memory, window = memory_and_window(tiny_llama, indexed.parent / "docs", hits_for(idx), 2048 - 4)
    assert calls[0][0] == memory + window and len(memory) > 3 * 32
    backbone = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    layer = backbone.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(backbone.model.embed_tokens(torch.tensor([memory])))  # (1, n, C)
        k, v = (proj(h).view(1, h.shape[1], 2, 8).transpose(1, 2) for proj in (layer.self_attn.k_proj,
                                                                               layer.self_attn.v_proj))
    s = F.elu(k) + 1  # (1, H_kv, n, d): pre-RoPE key features
    attn = idx.memory_reader("infini").model.layers[0]
    torch.testing.assert_close(attn.memory, s.transpose(-2, -1) @ v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn.normalizer, s.sum(-2), rtol=1e-5, atol=1e-4)

    idx.memory_reader("infini").model.shut_gates()
    shut = idx.ask(QUESTION, mode="bm25")
    other = idx.memory_reader("infini").answer(QUESTION, hits_for(idx), ["Another document entirely. " * 40])
    assert other.answer == shut.answer


def test_hmt_streams_the_documents_into_its_memory_cache(indexed, tiny_llama, monkeypatch):
    """With 32-token segments, HMT caches one memory per segment of the documents, the first being the backbone's
    last hidden state at the trailing memory token of [P_1 ‖ the documents' first 32 tokens ‖ P_1], and the window
    reads the last 32 tokens streamed before it as its sensory memory."""
    import torch
    from transformers import LlamaForCausalLM

    from ragkit.memory.hmt import HMTLM

    idx = Index(indexed, Settings(reader="hmt", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=4))
    calls = record_generate(monkeypatch, HMTLM)
    idx.ask(QUESTION, mode="bm25")
    model = idx.memory_reader("hmt").model
    memory, window = memory_and_window(tiny_llama, indexed.parent / "docs", hits_for(idx),
                                       model.max_window(4))
    assert calls[0][0] == memory + window and calls[0][1] == len(window)
    assert model.cache.shape == (1, -(-len(memory) // 32), 32)
    backbone = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    p1 = model.memory_init.detach().view(1, 1, -1)
    with torch.no_grad():
        x = torch.cat([p1, backbone.model.embed_tokens(torch.tensor([memory[:32]])), p1], dim=1)
        first = backbone(inputs_embeds=x, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(model.cache[:, 0], first, rtol=1e-4, atol=1e-5)
    if len(memory) % 32 == 0:  # the sensory tokens: the last k = 32 tokens streamed before the window
        with torch.no_grad():
            torch.testing.assert_close(model.sensory, backbone.model.embed_tokens(torch.tensor([memory[-32:]])))


def test_the_window_setting_bounds_the_memory_readers_window(indexed, tiny_llama, monkeypatch):
    from ragkit.errors import ConfigError
    from ragkit.memory.infini import InfiniLM

    idx = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), answer_tokens=4, reader_window=200))
    calls = record_generate(monkeypatch, InfiniLM)
    answer = idx.ask(QUESTION, mode="bm25")
    assert calls[0][1] == answer.prompt_tokens <= 200
    too_big = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), answer_tokens=4,
                                      reader_window=2045))
    with pytest.raises(ConfigError, match="at most 2044"):
        too_big.ask(QUESTION, mode="bm25")


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_summarize_a_file(tmp_path, tiny_llama, reader):
    doc = tmp_path / "report.md"
    doc.write_text("# Report\n\n" + "The committee reviewed the budget and approved it. " * 100)
    result = runner.invoke(app, ["summarize", str(doc), "--reader", reader, "--reader-model", str(tiny_llama),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"summary", "source"} and data["source"] == str(doc.resolve())


def test_infini_summary_of_a_document_that_fits_reads_it_all_in_the_window(tmp_path, tiny_llama, monkeypatch):
    """A document that fits the window with the instruction goes there whole, nothing into memory, and the summary
    is the text of the tokens generated after it."""
    from ragkit.api import summarize_file
    from ragkit.readers.generate import SUMMARY_INSTRUCTION
    from ragkit.readers.generative import SUMMARY_CUE
    from ragkit.memory.infini import InfiniLM
    from ragkit.readers.window import render

    doc = tmp_path / "report.txt"
    doc.write_text("The committee reviewed the budget and approved it. " * 30)
    calls = record_generate(monkeypatch, InfiniLM)
    result = summarize_file(doc, Settings(reader_model=str(tiny_llama), answer_tokens=6), reader="infini")
    text = doc.read_text().strip()
    prompt = tokens(tiny_llama, render(tokenizer(tiny_llama), f"{text}\n\n{SUMMARY_INSTRUCTION}", cue=SUMMARY_CUE))
    (seen, window, new), = calls
    assert seen == prompt and window == len(prompt) <= 2048 - 6 and len(new) <= 6
    eos = tokenizer(tiny_llama).sep_token_id
    shown = new[: new.index(eos)] if eos in new else new
    assert result == {"summary": decode(tiny_llama, shown), "source": str(doc.resolve())}


def test_reader_errors_are_clear(tmp_path, indexed):
    result = runner.invoke(app, ["ask", "oil", "--index", str(indexed), "--mode", "bm25", "--reader", "infini",
                                 "--reader-model", str(tmp_path / "no-model")])
    assert result.exit_code == 1 and "reader model" in result.stderr and "Traceback" not in result.stderr
    doc = tmp_path / "a.txt"
    doc.write_text("text")
    result = runner.invoke(app, ["summarize", str(doc), "--reader", "extractive"])
    assert result.exit_code == 1 and "'extractive' cannot summarize" in result.stderr
    result = runner.invoke(app, ["summarize", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "is not a file" in result.stderr


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_an_adapter_brings_its_backbone_when_no_reader_model_is_named(indexed, tiny_llama, reader, tmp_path,
                                                                      monkeypatch):
    """`ask --reader R --adapter DIR` without --reader-model reads with the backbone the adapter was trained on (as
    its trainer named it), and with the adapter's own parameters."""
    import torch

    from ragkit.memory.base import reader_class
    from ragkit.readers.generative import MemoryReader

    trained = reader_class(reader).from_pretrained(str(tiny_llama))
    with torch.no_grad():
        for p in trained.adapter_parameters():
            p.add_(0.25)
    trained.save_adapter(tmp_path / "adapter")
    assert reader_class(reader).saved_backbone(tmp_path / "adapter") == str(tiny_llama)
    loaded = []
    init = MemoryReader.__init__
    monkeypatch.setattr(MemoryReader, "__init__", lambda self, spec: init(self, spec) or loaded.append(self))
    result = runner.invoke(app, ["ask", QUESTION, "--index", str(indexed), "--mode", "bm25", "--reader", reader,
                                 "--adapter", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.stderr
    (memory_reader,) = loaded
    assert memory_reader.spec.model is None and memory_reader.name == str(tiny_llama)
    for a, b in zip(memory_reader.model.adapter_parameters(), trained.adapter_parameters(), strict=True):
        assert torch.equal(a, b)
