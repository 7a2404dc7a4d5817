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


QUESTION = "When did the oil crisis begin, how far prices rose, and what did the fox jump over?"


def tokens(tiny_llama: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))(text, add_special_tokens=False)["input_ids"]


def decode(tiny_llama: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama)).decode(ids, skip_special_tokens=True).strip()


def expected_prompt(tiny_llama: Path, docs: Path, hits) -> list[int]:
    """The reader's prompt built by hand: the whole files of the hits (first-seen order, blank-line separated), then
    the window: the question, the instruction, the hits numbered [1]… in order, the question again, "Answer:"."""
    from ragkit.readers.generative import ANSWER_INSTRUCTION

    documents = [(docs / path).read_text() for path in dict.fromkeys(h.chunk.path for h in hits)]
    passages = "\n\n".join(f"[{n}] {h.chunk.text}" for n, h in enumerate(hits, start=1))
    window = f"Question: {QUESTION}\n\n{ANSWER_INSTRUCTION}\n\n{passages}\n\nQuestion: {QUESTION}\n\nAnswer:"
    return tokens(tiny_llama, "\n\n".join(documents)) + tokens(tiny_llama, window)


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


def record_generate(monkeypatch, cls) -> list[tuple[list[int], list[int]]]:
    """Every (prompt, new tokens) that `cls.generate` sees and returns."""
    calls = []
    generate = cls.generate

    def spy(self, prompt_ids, *args, **kwargs):
        new = generate(self, prompt_ids, *args, **kwargs)
        calls.append((prompt_ids[0].tolist(), new[0].tolist()))
        return new

    monkeypatch.setattr(cls, "generate", spy)
    return calls


def hits_for(idx: Index):
    return idx.search(QUESTION, min(idx.settings.k, 5), "bm25")  # what ask retrieves


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


def test_infini_answer_is_the_backbones_greedy_continuation_of_the_documents_then_the_window(
        indexed, tiny_llama, monkeypatch):
    """Within one window nothing is read into memory: the answer is exactly the backbone's greedy decoding of the
    prompt built by hand, and the citations are the hits, [n] being the n-th hit."""
    from ragkit.readers.infini import InfiniLM

    idx = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), reader_segment=2048,
                                  answer_tokens=8))
    calls = record_generate(monkeypatch, InfiniLM)
    answer = idx.ask(QUESTION, mode="bm25")
    hits = hits_for(idx)
    prompt = expected_prompt(tiny_llama, indexed.parent / "docs", hits)
    assert len(prompt) <= 2048 and len(hits) > 2 and {h.chunk.path for h in hits} == {"oil.txt", "fox.txt"}
    (seen, new), = calls
    assert seen == prompt
    assert new == greedy(tiny_llama, prompt, 8)
    assert answer.answer == decode(tiny_llama, new)
    assert [c.hit.chunk_id for c in answer.citations] == [h.chunk_id for h in hits] == \
        [h.chunk_id for h in answer.hits]
    assert [(c.text, c.start_line, c.end_line, c.score) for c in answer.citations] == \
        [(h.chunk.text, h.chunk.start_line, h.chunk.end_line, h.score) for h in hits]


def test_infini_streams_the_documents_into_memory_and_answers_from_the_last_window(indexed, tiny_llama, monkeypatch):
    """With 32-token segments, layer 0's memory after answering holds exactly the prompt before its last 32 tokens
    (Σ σ(K)ᵀ V over them, from the backbone's own first layer); with the gates shut the answer is the backbone's
    greedy decoding of those last 32 tokens alone, whatever documents were read."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from ragkit.readers.infini import InfiniLM

    idx = Index(indexed, Settings(reader="infini", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=4))
    calls = record_generate(monkeypatch, InfiniLM)
    idx.ask(QUESTION, mode="bm25")
    prompt = expected_prompt(tiny_llama, indexed.parent / "docs", hits_for(idx))
    assert calls[0][0] == prompt and len(prompt) > 3 * 32
    backbone = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    layer = backbone.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(backbone.model.embed_tokens(torch.tensor([prompt[:-32]])))  # (1, n, C)
        k, v = (proj(h).view(1, h.shape[1], 2, 8).transpose(1, 2) for proj in (layer.self_attn.k_proj,
                                                                               layer.self_attn.v_proj))
    s = F.elu(k) + 1  # (1, H_kv, n, d): pre-RoPE key features
    attn = idx.memory_reader("infini").model.layers[0]
    torch.testing.assert_close(attn.memory, s.transpose(-2, -1) @ v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(attn.normalizer, s.sum(-2), rtol=1e-5, atol=1e-4)

    idx.memory_reader("infini").model.shut_gates()
    shut = idx.ask(QUESTION, mode="bm25")
    assert shut.answer == decode(tiny_llama, greedy(tiny_llama, prompt[-32:], 4))
    other = idx.memory_reader("infini").answer(QUESTION, hits_for(idx), ["Another document entirely. " * 40])
    assert other.answer == shut.answer


def test_hmt_streams_the_documents_into_its_memory_cache(indexed, tiny_llama, monkeypatch):
    """With 32-token segments, HMT caches one memory per segment of the prompt before its last 32 tokens, the first
    being the backbone's last hidden state at the trailing memory token of [P_1 ‖ the document's first 32 tokens ‖
    P_1], and the window reads the 32 tokens just before it as its sensory memory."""
    import torch
    from transformers import LlamaForCausalLM

    from ragkit.readers.hmt import HMTLM

    idx = Index(indexed, Settings(reader="hmt", reader_model=str(tiny_llama), reader_segment=32, answer_tokens=4))
    calls = record_generate(monkeypatch, HMTLM)
    idx.ask(QUESTION, mode="bm25")
    prompt = expected_prompt(tiny_llama, indexed.parent / "docs", hits_for(idx))
    assert calls[0][0] == prompt
    model = idx.memory_reader("hmt").model
    assert model.cache.shape == (1, -(-(len(prompt) - 32) // 32), 32)
    backbone = LlamaForCausalLM.from_pretrained(str(tiny_llama)).eval()
    p1 = model.memory_init.detach().view(1, 1, -1)
    with torch.no_grad():
        x = torch.cat([p1, backbone.model.embed_tokens(torch.tensor([prompt[:32]])), p1], dim=1)
        first = backbone(inputs_embeds=x, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(model.cache[:, 0], first, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the sensory tokens the window reads: the last k = 32 tokens streamed before it
        torch.testing.assert_close(model.sensory, backbone.model.embed_tokens(torch.tensor([prompt[-64:-32]])))


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


def test_infini_summary_is_the_greedy_continuation_of_the_document_then_the_instruction(tmp_path, tiny_llama):
    from ragkit.api import summarize_file
    from ragkit.readers.generative import SUMMARY_INSTRUCTION

    doc = tmp_path / "report.txt"
    doc.write_text("The committee reviewed the budget and approved it. " * 30)
    result = summarize_file(doc, Settings(reader_model=str(tiny_llama), reader_segment=2048, answer_tokens=6),
                            reader="infini")
    prompt = tokens(tiny_llama, doc.read_text()) + tokens(tiny_llama, f"{SUMMARY_INSTRUCTION}\n\nAnswer:")
    assert len(prompt) <= 2048
    assert result == {"summary": decode(tiny_llama, greedy(tiny_llama, prompt, 6)), "source": str(doc.resolve())}


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
