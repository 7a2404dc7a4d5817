"""The generative reader: a causal LM reads the question and the top passages and writes a short answer that cites
them as [n]; it also summarizes documents of any length (map over window-sized sections, then reduce).

Decoding is greedy with a KV cache, the prompt fitted by `fit_window` to the model's context minus the tokens
reserved for the answer, stopping at the end-of-sequence token or the chat template's end-of-turn token.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Collection, Iterable, Sequence

from ragkit.errors import ConfigError
from ragkit.readers.extractive import Answer, Citation
from ragkit.readers.window import (Example, Style, Window, WindowTooSmall, count_tokens, encode, fit_window,
                                   has_chat_template, prompt_ids, split_sections)
from ragkit.retrieve import Hit

ANSWER_SYSTEM = ("You answer questions from numbered passages with a short phrase copied from them, followed by the "
                 "passage number in brackets.")
ANSWER_INSTRUCTION = ("Answer with a short phrase from the passages and cite it as [n]. Answer a yes/no question "
                      "with yes, no or maybe first.")
ANSWER_EXAMPLE = Example(
    "What replaced wood fires in lighthouses?",
    ("[1] The Amazon river flows through Peru, Colombia and Brazil before it reaches the Atlantic Ocean.",
     "[2] Lighthouses were first lit with wood fires; oil lamps replaced them in the 18th century."),
    "oil lamps [2]")
ANSWER_STYLE = Style(ANSWER_INSTRUCTION, ANSWER_SYSTEM, ANSWER_EXAMPLE)
# Accounts (summaries, opinions, reasons) get no worked example: a small model copies its facts into the summary.
ACCOUNT_SYSTEM = "You answer questions from numbered passages in a few sentences, citing the passages you use as [n]."
ACCOUNT_INSTRUCTION = "Answer in a few sentences from the passages, and cite the passages you use as [n]."
ACCOUNT_STYLE = Style(ACCOUNT_INSTRUCTION, ACCOUNT_SYSTEM)
SUMMARY_INSTRUCTION = "Summarize the text above in a few sentences."
SECTION_INSTRUCTION = "The text above is one part of a longer document. Summarize it in a few sentences."
REDUCE_INSTRUCTION = ("The text above holds summaries of consecutive parts of one document. Combine them into one "
                      "summary of the whole document, in a few sentences.")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

OnText = Callable[[str], None]
PARAGRAPH_END = re.compile(r"\n\s*\n")  # where an answer ends: past it the model goes on to another question
CLAUSE_END = re.compile(r"[,.;:!?\n]")
LOOP_WORDS = 4  # a clause of at least this many words said twice is a loop, not an answer
ECHO_CHARS = (3, 80)  # lengths of the pieces of text whose repeats at the end of an answer are checked
REPEATS = 3  # that many copies in a row are a loop
# A sentence's end: . ! or ? (not after a capital, as in "U.S.", nor in a title) with any closing quote or
# bracket and the [n] citations after it, once another sentence starts.
SENTENCE_END = re.compile(r"(?<![A-Z])(?<!\b(?:Mr|Ms|Dr|St|Jr|Sr|vs))(?<!\bMrs)[.!?][\"')]*(?:\s*\[[\d\s,;–-]+\])*"
                          r"(?=\s+[^\s\[])")
# Questions that ask for an account rather than a fact: their answers may run to a paragraph.
ACCOUNT_QUESTION = re.compile(
    r"^\W*(summari[sz]e|describe|explain|discuss|highlight|list|compare|outline|why)\b|\bsummar(y|i[sz]e)\b"
    r"|^\W*how (did|do|does|is|are|was|were|can|could|should|would|has|have)\b"
    r"|^\W*what (did|do|does|was|were)\b.*\b(think|thought|propos|sa(y|id)|discuss|suggest|decid|agree|talk|comment"
    r"|feel|felt|argu|reason|opinion|view)", re.I)


YES_NO_QUESTION = re.compile(
    r"(^|[:;.—–-]\s*)(is|are|was|were|do|does|did|can|could|should|would|will|has|have|had|may|might|must|shall)\b"
    r"[^?]*\?\s*$", re.I)
# A title's question after its colon that is not a wh-question: "Aripiprazole: a new risk factor for gambling?"
TITLE_QUESTION = re.compile(r":\s+(?!(what|which|who|whom|whose|when|where|why|how)\b)[^:?]+\?\s*$", re.I)
LABELS = ("Yes", "No", "Maybe")


def is_yes_no_question(question: str) -> bool:
    """Whether `question` asks yes or no: it (or its last clause, as in "Title: does X work?") opens with an
    auxiliary verb and ends with "?", or it is a title's question that names no wh-word.

    >>> [is_yes_no_question(q) for q in ("Does X reduce pain?", "Gout: do patients know their goal?",
    ...                                  "A ward in a hospital: are they effective?", "Drug X: a new risk factor?",
    ...                                  "Surgery in the old. Is it justified for those aged 80 or older?",
    ...                                  "When did it begin?", "Oil: when did the crisis begin?")]
    [True, True, True, True, True, False, False]
    """
    question = question.strip()
    return bool(YES_NO_QUESTION.search(question) or TITLE_QUESTION.search(question))


def paragraph_end(text: str) -> int | None:
    """Where the text's first paragraph ends (its first blank line), or None."""
    found = PARAGRAPH_END.search(text)
    return found.start() if found else None


def loop_start(text: str) -> int | None:
    """Where the text starts saying again what it said (a small model caught in a loop), or None: the start of
    the first complete clause of at least LOOP_WORDS words that repeats an earlier one, or the end of the first
    of three or more copies of one piece of text that the text ends with ("I uh, I uh, I uh,").

    >>> text = "They agreed: the budget is fixed, the budget is fixed, the budget"
    >>> text[:loop_start(text)]
    'They agreed: the budget is fixed,'
    >>> text = "Professor E: Yeah. So I uh, I uh, I uh, I"
    >>> text[:loop_start(text)]
    'Professor E: Yeah. So I uh,'
    """
    seen: set[str] = set()
    start = 0
    for found in CLAUSE_END.finditer(text):
        words = text[start : found.start()].lower().split()
        if len(words) >= LOOP_WORDS:
            key = " ".join(words)
            if key in seen:
                return start
            seen.add(key)
        start = found.end()
    echo = echoed_tail(text)
    return echo[0] if echo and echo[1] >= REPEATS else None


def echoed_tail(text: str) -> tuple[int, float] | None:
    """The longest tail of the text that repeats the piece of text before it: (where the first copy of that piece
    ends, how many copies the tail and that piece make), for pieces of ECHO_CHARS characters that hold a letter;
    None when no tail echoes by two characters or more."""
    best: tuple[int, float] | None = None
    n = len(text)
    for period in range(ECHO_CHARS[0], min(ECHO_CHARS[1], n // 2) + 1):
        m = 0  # characters at the end that equal the character `period` before them
        while m < n - period and text[n - 1 - m] == text[n - 1 - m - period]:
            m += 1
        first_end = n - m
        if m >= 2 and any(c.isalpha() for c in text[first_end - period : first_end]):
            if best is None or first_end < best[0]:
                best = (first_end, (m + period) / period)
    return best


def loop_hold(text: str) -> int:
    """How much of the text may be sent before `loop_start` could cut it: all of it, but for an unfinished last
    clause that begins like an earlier clause of at least LOOP_WORDS words, and for a tail that echoes the text
    before it (either may be a loop's first words).

    >>> loop_hold("They agreed: the budget is fixed, the bud")
    33
    >>> loop_hold("They agreed: the budget is fixed, the colour")
    44
    >>> loop_hold("So I uh, I uh")
    8
    """
    echo = echoed_tail(text)
    held = echo[0] if echo else len(text)
    clauses = [found.end() for found in CLAUSE_END.finditer(text)]
    start = clauses[-1] if clauses else 0
    pending = " ".join(text[start:].lower().split())
    if not pending:
        return held
    edges = [0, *clauses]
    for a, b in zip(edges, clauses):
        words = text[a : b - 1].lower().split()
        if len(words) >= LOOP_WORDS and " ".join(words).startswith(pending):
            return min(start, held)
    return held


def is_account_question(question: str) -> bool:
    """Whether `question` asks for an account (a summary, a reason, an opinion) rather than a fact."""
    return bool(ACCOUNT_QUESTION.search(question))


def answer_style(question: str) -> Style:
    """How the reader asks its model: accounts without the worked example, facts with it."""
    return ACCOUNT_STYLE if is_account_question(question) else ANSWER_STYLE


def answer_end(question: str) -> Callable[[str], int | None]:
    """Where an answer to `question` ends, as a function of the text so far (None: not yet): at its first blank
    line or where it starts to loop, and, for a question that asks for a fact rather than an account, after its
    first sentence (its [n] citations included).

    >>> answer_end("When did it begin?")("In October 1973 [1]. It was a shock.")
    20
    >>> answer_end("Why did it begin?")("In October 1973 [1]. It was a shock.") is None
    True
    """
    account = is_account_question(question)

    def end(text: str) -> int | None:
        found = None if account else SENTENCE_END.search(text)
        ends = [e for e in (found.end() if found else None, paragraph_end(text), loop_start(text)) if e is not None]
        return min(ends) if ends else None

    return end


class GenerativeReader:
    """A causal LM (any Hugging Face `AutoModelForCausalLM`) with its tokenizer, answering from retrieved passages
    and summarizing documents; `context_length` tokens hold the prompt and the `answer_tokens` generated. A prompt
    takes at most `window` tokens (None: all the context leaves to it)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, context_length: int, answer_tokens: int = 256,
                 style: Style = ANSWER_STYLE, window: int | None = None) -> None:
        if not 0 < answer_tokens < context_length:
            raise ConfigError(f"answer_tokens must be between 1 and the reader's context length {context_length} "
                              f"less one, got {answer_tokens}")
        if window is not None and not 0 < window <= context_length - answer_tokens:
            raise ConfigError(f"the reader window of {window} tokens does not fit the reader model's context of "
                              f"{context_length} tokens with {answer_tokens} answer tokens after it: at most "
                              f"{context_length - answer_tokens}")
        self.window_tokens = window
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = context_length
        self.answer_tokens = answer_tokens
        self.style = style
        self.stop_ids = stop_token_ids(tokenizer, model)

    @classmethod
    def from_lm(cls, lm: Any, answer_tokens: int = 256, window: int | None = None) -> GenerativeReader:
        """From a loaded reader model (`.model`, `.tokenizer`, `.name`, `.context_length`)."""
        return cls(lm.model, lm.tokenizer, lm.name, lm.context_length, answer_tokens, window=window)

    @property
    def budget(self) -> int:
        """Tokens a prompt may take: the window, or the context less the answer's."""
        return self.window_tokens or self.context_length - self.answer_tokens

    def window(self, question: str, hits: Sequence[Hit]) -> Window:
        style = self.style if self.style is not ANSWER_STYLE else answer_style(question)
        return fit_window(self.tokenizer, question, hits, self.budget, style)

    def answer(self, question: str, hits: Sequence[Hit], on_token: OnText | None = None) -> Answer:
        """The model's answer to `question` from the hits, its text streamed to `on_token` piece by piece."""
        window = self.window(question, hits)
        label = self.label(window.ids) if is_yes_no_question(question) else []
        text, new = self.complete(window.ids, on_token, until=answer_end(question), prefix=label,
                                  held=loop_hold)
        citations, numbers = cite(text, window)
        return Answer(text, citations, list(hits), reader="generate", model=self.name, prompt_tokens=window.tokens,
                      generated_tokens=len(new), numbers=numbers)

    def summarize(self, text: str, on_token: OnText | None = None) -> str:
        """A summary of `text`: one pass when it fits the window; else each window-sized section is summarized
        (map), then the summaries together (reduce, in rounds while they do not fit). Only the final pass
        streams to `on_token`."""
        if not all(self._fits("", i) for i in (SUMMARY_INSTRUCTION, SECTION_INSTRUCTION, REDUCE_INSTRUCTION)):
            raise WindowTooSmall(f"the reader's window of {self.budget} tokens cannot hold a summary instruction")
        instruction = SUMMARY_INSTRUCTION
        while not self._fits(text, instruction):
            sections = self._sections(text, SECTION_INSTRUCTION)
            joined = "\n\n".join(self.complete(self._summary_prompt(s, SECTION_INSTRUCTION))[0] for s in sections)
            if count_tokens(self.tokenizer, joined) >= count_tokens(self.tokenizer, text):  # no progress: cut
                joined = (self._sections(joined, REDUCE_INSTRUCTION) or [""])[0]
            text, instruction = joined, REDUCE_INSTRUCTION
        return self.complete(self._summary_prompt(text, instruction), on_token)[0]

    def _sections(self, text: str, instruction: str) -> list[str]:
        return split_sections(text, lambda section: self._fits(section, instruction))

    def _summary_prompt(self, text: str, instruction: str) -> list[int]:
        return prompt_ids(self.tokenizer, f"{text}\n\n{instruction}", cue="Summary:")

    def _fits(self, text: str, instruction: str) -> bool:
        return len(self._summary_prompt(text, instruction)) <= self.budget

    def label(self, prompt: list[int]) -> list[int]:
        """The ids of Yes, No or Maybe, whichever the model would rather begin its answer with (by the logit of each
        label's first token after the prompt): a yes/no question's answer opens with its label."""
        import torch

        start = "" if has_chat_template(self.tokenizer) else " "  # a plain prompt ends in "Answer:"
        labels = [encode(self.tokenizer, start + label) for label in LABELS]
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([prompt], device=next(self.model.parameters()).device)
                                ).logits[0, -1]  # (V,)
        return max(labels, key=lambda ids: float(logits[ids[0]]))

    def complete(self, prompt: list[int], on_token: OnText | None = None,
                 until: Callable[[str], int | None] | None = None,
                 prefix: Sequence[int] = (), held: Callable[[str], int] | None = None) -> tuple[str, list[int]]:
        """Greedy continuation of the prompt ids after the answer's given first ids `prefix`: its text (the
        prefix's included, streamed to `on_token` up to where `held` says it is stable; cut where `until` says
        the answer ends) and its token ids."""
        stream = TextStream(self.tokenizer, on_token, until, held)
        for token in prefix:
            stream.push(token)
        new = greedy(self.model, [*prompt, *prefix], self.answer_tokens - len(prefix), self.stop_ids, stream.push,
                     lambda: stream.ended)
        return stream.close(), [*prefix, *new]


# ----------------------------------------------------------------------------------------------------------------
# decoding


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Ids that end an answer: the tokenizer's and the model's end-of-sequence ids and the chat template's
    end-of-turn tokens present in the vocabulary."""
    ids = {tokenizer.eos_token_id}
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return {i for i in ids if i is not None}


def greedy(model: Any, prompt: Sequence[int], max_new_tokens: int, stop: Collection[int],
           on_id: Callable[[int], None] | None = None, halt: Callable[[], bool] | None = None) -> list[int]:
    """Greedy decoding of one sequence with a KV cache: the new ids, up to `max_new_tokens`, without the stop id
    that ended them; each is passed to `on_id` as it comes, and decoding ends early once `halt()` is true."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt)], device=device), past_key_values=cache,
                       use_cache=True).logits[:, -1]  # (1, V)
        new = decode_greedy(logits, lambda token: model(input_ids=token[:, None], past_key_values=cache,
                                                        use_cache=True).logits[:, -1],
                            max_new_tokens, stop, None if on_id is None else each_id(on_id, stop), halt)
    return until_stop(new[0].tolist(), stop)


def decode_greedy(logits: Any, step: Callable[[Any], Any], max_new_tokens: int,
                  stop: int | Collection[int] | None = None, on_token: Callable[[Any], None] | None = None,
                  halt: Callable[[], bool] | None = None) -> Any:
    """The greedy loop shared by every reader. logits: (b, V) for the first new token; step(token (b,)) feeds the
    tokens to the model (with its cache) and returns the next logits (b, V). A row ends at a stop id and is then
    padded with it; the loop ends when every row has, or when `halt()` (asked after each step) is true.
    `on_token` gets each step's tokens (b,), stop and padding ids included. Returns the new ids
    (b, ≤ max_new_tokens)."""
    import torch

    stops = torch.tensor(sorted(_ids(stop)), dtype=torch.long, device=logits.device)  # (s,)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)  # (b,)
    ended = torch.zeros_like(done, dtype=torch.long)  # (b,) the stop id that ended each row
    new = []
    for i in range(max_new_tokens):
        token = torch.where(done, ended, logits.argmax(dim=-1))  # (b,)
        stopped = torch.isin(token, stops) & ~done
        ended, done = torch.where(stopped, token, ended), done | stopped
        new.append(token)
        if on_token is not None:
            on_token(token)
        if bool(done.all()) or i == max_new_tokens - 1 or (halt is not None and halt()):
            break
        logits = step(token)
    if not new:
        return torch.zeros((logits.shape[0], 0), dtype=torch.long, device=logits.device)
    return torch.stack(new, dim=1)  # (b, t)


def until_stop(ids: Sequence[int], stop: int | Collection[int] | None) -> list[int]:
    """The ids before the first stop id."""
    stops = _ids(stop)
    return list(next((ids[:i] for i, t in enumerate(ids) if t in stops), ids))


def each_id(on_id: Callable[[int], None], stop: int | Collection[int] | None) -> Callable[[Any], None]:
    """An on_token for one row that passes on its ids up to, not including, the first stop id."""
    stops, ended = _ids(stop), False

    def on_token(token: Any) -> None:
        nonlocal ended
        ended = ended or int(token[0]) in stops
        if not ended:
            on_id(int(token[0]))

    return on_token


def _ids(stop: int | Collection[int] | None) -> set[int]:
    return set() if stop is None else {stop} if isinstance(stop, int) else set(stop)


class TextStream:
    """Turns ids, as they come, into text pieces whose concatenation is the final text: each piece is what the
    decoding of all ids so far adds, held back while it ends in an incomplete character or in spaces (the final
    text is stripped), and beyond `held(text)` (where what is sent can no longer be taken back, such as the end of
    the last complete clause) while the text has not ended. `until(text)` says where the text ends (None: not yet);
    `ended` then tells the decoder to stop."""

    def __init__(self, tokenizer: Any, on_text: OnText | None = None,
                 until: Callable[[str], int | None] | None = None,
                 held: Callable[[str], int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.until = until
        self.held = held
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def push(self, token: int) -> None:
        if self.ended:
            return
        self.ids.append(token)
        text = self._text().rstrip()
        if self.held is not None and not self.ended:
            text = text[: self.held(text)]
        if not text.endswith("\ufffd"):
            self._send(text)

    def close(self) -> str:
        """The final text, all of it sent."""
        self._send(self._text().rstrip())
        return self.sent

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()
        end = self.until(text) if self.until is not None else None
        if end is not None:
            self.ended = True
            text = text[:end]
        return text

    def _send(self, text: str) -> None:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):  # nothing new, or not yet prefix-stable
            return
        piece, self.sent = text[len(self.sent) :], text
        if self.on_text is not None:
            self.on_text(piece)


# ----------------------------------------------------------------------------------------------------------------
# citations


_CITATION = re.compile(r"\[\s*(\d+(?:\s*[-–,;]\s*\d+)*)\s*\]")


def cited_numbers(text: str, valid: Iterable[int]) -> list[int]:
    """The passage numbers `text` cites as [n], [n, m], [n][m] or [n-m], in order of first mention, keeping only
    those in `valid`.

    >>> cited_numbers("Paris [2][3].", range(1, 5)), cited_numbers("[1, 3]", [1, 2, 3]), cited_numbers("[4]", [1, 2])
    ([2, 3], [1, 3], [])
    >>> cited_numbers("See [1-3] and [2].", [1, 2, 3])
    [1, 2, 3]
    """
    valid = set(valid)
    found: list[int] = []
    for match in _CITATION.finditer(text):
        for part in re.split(r"[,;]", match.group(1)):
            bounds = [int(x) for x in re.split(r"[-–]", part)]
            numbers = range(bounds[0], bounds[-1] + 1) if 0 <= bounds[-1] - bounds[0] < 100 else bounds
            found.extend(n for n in numbers if n in valid and n not in found)
    return found


def cite(text: str, window: Window) -> tuple[list[Citation], list[int]]:
    """Citations of an answer and their [n] numbers: the passages it cites, in order of first mention; when it cites
    none, every passage of the window, in order."""
    numbers = cited_numbers(text, [p.number for p in window.passages]) or [p.number for p in window.passages]
    return [whole_hit(window.hit(n)) for n in numbers], numbers


def whole_hit(hit: Hit) -> Citation:
    """A citation of a whole hit: its text, lines and pages."""
    c = hit.chunk
    return Citation(hit, c.text, c.start_line, c.end_line, c.page, hit.score, c.end_page)
