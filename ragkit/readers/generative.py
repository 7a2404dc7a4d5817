"""Readers with memory (Infini-attention, HMT) behind `ask --reader …` and `summarize`.

Prompt layout: the whole documents of the top hits are streamed through
the memory first, segment by segment; then the window that `fit_window` builds, the same as the generative
reader's (the question, the instruction, the top passages trimmed to fit, the question again), is read as one
final segment with exact attention, so that the answer is conditioned on it. The question opens the window as well
as closing it: HMT searches its memory with a summary of the window's first part, which then reads the question.
The window holds at most `window` tokens: by default what fits the backbone (its positions less the answer's and,
for HMT, its memory and sensory tokens), whatever the segment length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ragkit.errors import ConfigError, RagkitError
from ragkit.readers.extractive import Answer
from ragkit.readers.generate import (ACCOUNT_SYSTEM, ANSWER_EXAMPLE, ANSWER_SYSTEM, SUMMARY_INSTRUCTION, TextStream,
                                     answer_end, cite, each_id, is_account_question, loop_hold,
                                     stop_token_ids, until_stop)
from ragkit.readers.window import Style, WindowTooSmall, encode, fit_tail, fit_window, render
from ragkit.retrieve import Hit

MEMORY_READERS = ("infini", "hmt")
ANSWER_INSTRUCTION = ("Answer with a short phrase from the documents read before and the passages below, and cite "
                      "the passage as [n]. Answer a yes/no question with yes, no or maybe first.")
ANSWER_STYLE = Style(ANSWER_INSTRUCTION, ANSWER_SYSTEM, ANSWER_EXAMPLE)
ACCOUNT_STYLE = Style("Answer in a few sentences from the documents read before and the passages below, and cite "
                      "the passages you use as [n].", ACCOUNT_SYSTEM)
SUMMARY_CUE = "Summary:"


@dataclass(frozen=True)
class ReaderSpec:
    """Which memory reader to load: kind, reader model (HF id, folder or .gguf file; None: the default, which
    falls back to the embedded model), optional adapter, segment length, device, the final window's size (None:
    what fits the backbone) and the most tokens generated."""

    kind: str
    model: str | None
    adapter: str | None = None
    segment_length: int = 1024
    device: str | None = None
    max_new_tokens: int = 256
    window: int | None = None


class MemoryReader:
    """A causal LM with memory and its tokenizer; answers questions and summarizes documents of any length.
    `warnings`: what loading the reader model has to tell the user (e.g. that the embedded model serves)."""

    def __init__(self, spec: ReaderSpec) -> None:
        if spec.kind not in MEMORY_READERS:
            raise RagkitError(f"'{spec.kind}' is not a reader with memory (known: {', '.join(MEMORY_READERS)})")
        from ragkit.readers.lm import load_reader_lm

        self.spec = spec
        lm = load_reader_lm(spec.model or _adapter_backbone(spec.kind, spec.adapter))
        self.tokenizer, self.name, self.warnings = lm.tokenizer, lm.name, lm.warnings
        self.model = _wrap(spec.kind, lm.model, spec.segment_length, spec.adapter)
        self.model.eval()
        if spec.device:
            self.model.to(spec.device)

    @property
    def window_budget(self) -> int:
        """Tokens of the final window: the spec's, or what fits the backbone with the answer after it."""
        limit = self.model.max_window(self.spec.max_new_tokens)
        if self.spec.window is not None and self.spec.window > limit:
            raise ConfigError(f"the reader window of {self.spec.window} tokens does not fit the backbone with "
                              f"{self.spec.max_new_tokens} answer tokens after it: at most {limit}")
        return self.spec.window or limit

    def answer(self, question: str, hits: Sequence[Hit], documents: Sequence[str],
               on_token: Callable[[str], None] | None = None) -> Answer:
        """Stream `documents` into memory, then answer from the window of the question and the hits (cited as [n],
        n being the hit's rank), its text streamed to `on_token` piece by piece."""
        style = ACCOUNT_STYLE if is_account_question(question) else ANSWER_STYLE
        window = fit_window(self.tokenizer, question, hits, self.window_budget, style)
        memory = encode(self.tokenizer, "\n\n".join(documents)) if documents else []
        text, new = self._generate(memory, window.ids, on_token, until=answer_end(question), held=loop_hold)
        citations, numbers = cite(text, window)
        return Answer(text, citations, list(hits), reader=self.spec.kind, model=self.name,
                      prompt_tokens=window.tokens, generated_tokens=len(new), numbers=numbers)

    def summarize(self, document: str, on_token: Callable[[str], None] | None = None) -> str:
        """Stream the document through memory but for its tail that fits the window with the instruction, then
        generate its summary."""
        def prompt(text: str) -> str:
            return render(self.tokenizer, f"{text}\n\n{SUMMARY_INSTRUCTION}", cue=SUMMARY_CUE)

        budget = self.window_budget
        fits = lambda tail: len(encode(self.tokenizer, prompt(tail))) <= budget
        if not fits(""):
            raise WindowTooSmall(f"the reader's window of {budget} tokens cannot hold the summary instruction")
        start = fit_tail(document, fits)
        memory = encode(self.tokenizer, document[:start]) if document[:start].strip() else []
        return self._generate(memory, encode(self.tokenizer, prompt(document[start:])), on_token)[0]

    def _generate(self, memory_ids: list[int], window_ids: list[int], on_token: Callable[[str], None] | None = None,
                  until: Callable[[str], int | None] | None = None,
                  held: Callable[[str], int] | None = None) -> tuple[str, list[int]]:
        """Read `memory_ids` into memory and `window_ids` as the final window, then decode greedily: the text
        (streamed to `on_token` as `TextStream` does; cut where `until` says the answer ends) and the new ids
        before the stop."""
        import torch

        stops = stop_token_ids(self.tokenizer, self.model.model)
        stream = TextStream(self.tokenizer, on_token, until, held)
        prompt = torch.tensor([memory_ids + window_ids], dtype=torch.long, device=self._device())
        new = self.model.generate(prompt, self.spec.max_new_tokens, eos_token_id=stops, window=len(window_ids),
                                  on_token=each_id(stream.push, stops), halt=lambda: stream.ended)
        return stream.close(), until_stop(new[0].tolist(), stops)

    def _device(self):
        return next(self.model.parameters()).device


def _adapter_backbone(kind: str, adapter: str | None) -> str | None:
    """The backbone an adapter was trained on, when no reader model is named (None: the default reader model)."""
    if adapter is None:
        return None
    from ragkit.memory.base import reader_class

    return reader_class(kind).saved_backbone(adapter) or None


def _wrap(kind: str, backbone: Any, segment_length: int, adapter: str | None):
    """The backbone with the `kind` memory around it; with an adapter, its saved config and tensors."""
    from ragkit.memory.base import reader_class

    cls = reader_class(kind)
    return cls.wrap(backbone, cls.config_class(segment_length=segment_length), adapter)


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
                      max_new_tokens=settings.answer_tokens, window=getattr(settings, "reader_window", None))
