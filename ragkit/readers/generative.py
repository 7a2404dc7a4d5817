"""Readers with memory (Infini-attention, HMT) behind `ask --reader …` and `summarize`.

Prompt layout (../shared/reference/readers.md §4.4): the whole documents of the top hits are streamed through
the memory first; the question and the top retrieved passages come last, inside the local window, so that they
are read with exact attention and the answer is conditioned on them. The question opens the window as well as
closing it: HMT searches its memory with a summary of the window's first half, which then reads the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ragkit.errors import ModelLoadError, RagkitError
from ragkit.models import resolve_model_name
from ragkit.readers.extractive import Answer, Citation
from ragkit.retrieve import Hit

MEMORY_READERS = ("infini", "hmt")
ANSWER_INSTRUCTION = ("Answer the question using the documents read above and the numbered passages below. "
                      "Cite passages as [n].")
SUMMARY_INSTRUCTION = "Summarize the document above in a few sentences."


@dataclass(frozen=True)
class ReaderSpec:
    """Which memory reader to load: kind, backbone (HF id or path), optional adapter, segment length, device."""

    kind: str
    model: str
    adapter: str | None = None
    segment_length: int = 1024
    device: str | None = None
    max_new_tokens: int = 256


class MemoryReader:
    """A causal LM with memory and its tokenizer; answers questions and summarizes documents of any length."""

    def __init__(self, spec: ReaderSpec) -> None:
        if spec.kind not in MEMORY_READERS:
            raise RagkitError(f"'{spec.kind}' is not a reader with memory (known: {', '.join(MEMORY_READERS)})")
        from transformers import AutoTokenizer

        from ragkit.encoders.dense import quiet_transformers

        quiet_transformers()
        self.spec = spec
        name = resolve_model_name(spec.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load"
            raise ModelLoadError(f"Could not load the tokenizer of the reader model '{spec.model}': "
                                 f"{str(e).strip()[:300]}\nPoint ragkit at a local copy: --reader-model "
                                 "/path/to/model (or reader_model in ragkit.toml).") from None
        self.model = _load_memory_model(spec.kind, name, spec.segment_length, spec.adapter)
        self.model.eval()
        if spec.device:
            self.model.to(spec.device)

    def answer(self, question: str, hits: Sequence[Hit], documents: Sequence[str]) -> Answer:
        """Stream `documents`, then answer from the question and the hits (cited [1]…[n] in hit order)."""
        passages = "\n\n".join(f"[{n}] {h.chunk.text}" for n, h in enumerate(hits, start=1))
        window = f"Question: {question}\n\n{ANSWER_INSTRUCTION}\n\n{passages}\n\nQuestion: {question}"
        text = self._generate(documents, window)
        citations = [_whole_hit(h) for h in hits]
        return Answer(text, citations, list(hits))

    def summarize(self, document: str) -> str:
        """Stream the whole document through memory, then generate its summary."""
        return self._generate([document], SUMMARY_INSTRUCTION)

    def _generate(self, documents: Sequence[str], window: str) -> str:
        import torch

        memory_ids = self.tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"] \
            if documents else []
        window_ids = self._prompt_ids(window)
        prompt = torch.tensor([memory_ids + window_ids], dtype=torch.long, device=self._device())
        new = self.model.generate(prompt, self.spec.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()

    def _prompt_ids(self, text: str) -> list[int]:
        """The window as the model expects it: its chat template when it has one, plain text otherwise."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tokenizer(f"{text}\n\nAnswer:", add_special_tokens=False)["input_ids"]

    def _device(self):
        return next(self.model.parameters()).device


def _load_memory_model(kind: str, name: str, segment_length: int, adapter: str | None):
    """InfiniLM or HMTLM around the backbone `name`, with the adapter if given (its config then applies)."""
    if kind == "infini":
        from ragkit.readers.infini import InfiniConfig, InfiniLM

        return InfiniLM.from_pretrained(name, InfiniConfig(segment_length=segment_length), adapter=adapter)
    from ragkit.readers.hmt import HMTConfig, HMTLM

    return HMTLM.from_pretrained(name, HMTConfig(segment_length=segment_length), adapter=adapter)


def _whole_hit(hit: Hit) -> Citation:
    c = hit.chunk
    return Citation(hit, c.text, c.start_line, c.end_line, c.page, hit.score, c.end_page)


def document_texts(root: Path, paths: Sequence[str], follow_links: bool = False) -> list[str]:
    """The parsed text of each distinct file (relative to the indexed folder), in first-seen order.

    A path that leads outside the folder (`..`, or a symlink that now points elsewhere) is refused unless the
    index was built with `follow_links`.
    """
    from ragkit.ingest.parsers import ParseError, parse_file

    texts = []
    root = root.resolve()
    for rel in dict.fromkeys(paths):
        path = root / rel
        if not follow_links and not path.resolve().is_relative_to(root):
            raise RagkitError(f"{rel} leads outside the indexed folder {root}; ragkit reads only files inside it")
        try:
            texts.append(parse_file(path).text)
        except ParseError as e:
            raise RagkitError(f"cannot read {rel} for the reader: {e.reason} (was it changed after indexing?)") \
                from None
    return texts


def spec_from_settings(settings: Any, kind: str) -> ReaderSpec:
    return ReaderSpec(kind=kind, model=settings.reader_model, adapter=settings.adapter,
                      segment_length=settings.reader_segment, device=settings.device,
                      max_new_tokens=settings.answer_tokens)
