"""What a reader model reads last: the question, an instruction and the retrieved passages, fitted to a budget
counted in the model's own tokens (its chat template included).

Layout, as the user's message of the chat template when the tokenizer has
one, else as plain text ending in "Answer:":

    Question: <question>

    <instruction>

    [1] <passage of hits[0]>

    [2] <passage of hits[1]>

    Question: <question>

The question opens the window (HMT searches its memory with a summary of the window's start; a memory reader
reads the passages knowing what is asked) and closes it (the answer follows the question it answers). A `Style`
may add a system message and a worked example (a prior user turn and the assistant's reply), which small instruct
models copy the form of. When the budget is tight the frame gives way in this order: the example, the opening
question, the system message; the instruction and the closing question are always inside, or `fit_window` raises
`WindowTooSmall`.

Passages keep their hit's number: [n] is hits[n - 1]. They are allotted tokens in rank order by a max-min fair
split (`allot`): a passage that needs no more than an equal share of what is left gets all it needs, the others
split the rest equally, the better-ranked ones taking the remainder's odd tokens; when a passage would then get
fewer than `min_passage` tokens, the lowest-ranked passage is left out and the split is made again. A passage
longer than its share is trimmed around its evidence (`trim`): the words of its evidence spans first (best first),
then the words nearest to them, so that what is cut is what lies farthest from the evidence; a hit without
evidence is trimmed around its sentences sharing most words with the question, or kept from its start. Cuts show
as "…". A passage trimmed to nothing is left out, and its number with it.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ragkit.errors import RagkitError
from ragkit.retrieve import Hit

ELLIPSIS = "…"
MIN_PASSAGE_TOKENS = 64  # a passage cut shorter than this is left out in favour of the better-ranked ones
MAX_UNIT_CHARS = 32  # longer runs without spaces (URLs, CJK text) are cut into units of this many chars
PLAIN_CUE = "Answer:"  # ends a plain-text prompt (no chat template): the model continues after it


class WindowTooSmall(RagkitError):
    """The budget cannot hold the instruction and the question."""


@dataclass(frozen=True)
class Passage:
    """A passage as the window shows it: `[number] text`, number n being hits[n - 1]."""

    number: int
    hit: Hit
    text: str  # the hit's text, with "…" where it was trimmed
    trimmed: bool


@dataclass(frozen=True)
class Window:
    """The prompt a reader model reads last: its token ids and text, and the passages shown in it."""

    ids: list[int]
    text: str  # what `ids` encode (the chat template rendered, when there is one)
    passages: list[Passage]
    budget: int

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def hit(self, number: int) -> Hit | None:
        """The hit shown as [number], or None when no passage has that number."""
        return next((p.hit for p in self.passages if p.number == number), None)


# ----------------------------------------------------------------------------------------------------------------
# prompts in the model's own tokens


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` exactly as written (special tokens such as <|im_start|> written in it included)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode(tokenizer, text))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class Example:
    """A worked example shown before the real question (a prior turn of the chat): small models copy its form."""

    question: str
    passages: tuple[str, ...]  # as shown, "[n] text"
    answer: str


@dataclass(frozen=True)
class Style:
    """How a reader asks its model: the instruction in the window, and optionally a system message and an example."""

    instruction: str
    system: str | None = None
    example: Example | None = None


def render(tokenizer: Any, message: str, cue: str = PLAIN_CUE, system: str | None = None,
           examples: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt as the model expects it: the system message, the (user, assistant) example turns and `message`
    as the user's turn of its chat template, followed by the assistant's turn opening; without a template, the
    same as paragraphs, each reply after `cue`, the prompt ending in `cue`."""
    turns = [m for u, a in examples for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    turns.append({"role": "user", "content": message})
    if has_chat_template(tokenizer):
        if system:
            try:
                return _chat(tokenizer, [{"role": "system", "content": system}, *turns])
            except Exception:  # templates without a system role (Gemma's raises): the system text opens the turn
                turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
        return _chat(tokenizer, turns)
    parts = [system] if system else []
    parts += [f"{u}\n\n{cue} {a}" for u, a in examples]
    return "\n\n".join([*parts, f"{message}\n\n{cue}"])


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer: Any, message: str, cue: str = PLAIN_CUE) -> list[int]:
    return encode(tokenizer, render(tokenizer, message, cue))


def layout(question: str, instruction: str, pieces: Sequence[str], open_with_question: bool = True) -> str:
    """The window's message: the question, the instruction, the passages ("[n] text"), the question again."""
    head = [f"Question: {question}"] if open_with_question else []
    return "\n\n".join([*head, instruction, *pieces, f"Question: {question}"])


# ----------------------------------------------------------------------------------------------------------------
# the window


@dataclass(frozen=True)
class Frame:
    """What a window holds besides the passages."""

    question: str
    style: Style
    open_with_question: bool

    def text(self, tokenizer: Any, passages: Sequence[Passage]) -> str:
        style = self.style
        message = layout(self.question, style.instruction, [_piece(p) for p in passages], self.open_with_question)
        examples = [] if style.example is None else [_example_turn(style)]
        return render(tokenizer, message, system=style.system, examples=examples)


def frames(question: str, style: Style) -> list[Frame]:
    """The window's frames, fullest first: each leaves out one more of the example, the opening question and the
    system message; the instruction and the closing question are in all of them."""
    bare = Style(style.instruction, style.system)
    return [Frame(question, style, True), Frame(question, bare, True), Frame(question, bare, False),
            Frame(question, Style(style.instruction), False)]


def fit_window(tokenizer: Any, question: str, hits: Sequence[Hit], budget: int, style: Style | str,
               min_passage: int = MIN_PASSAGE_TOKENS) -> Window:
    """The question, the instruction and as much of the hits as fits in `budget` tokens (see the module
    docstring); `style` is the instruction, or a Style with a system message and an example. The fullest frame
    that leaves the best passage min(its need, `min_passage`) tokens is used, else the fullest that fits. Raises
    WindowTooSmall when not even the instruction and one copy of the question fit."""
    style = Style(style) if isinstance(style, str) else style
    separator = count_tokens(tokenizer, "\n\n")
    labels = [count_tokens(tokenizer, f"[{n}] ") + separator for n in range(1, len(hits) + 1)]
    needs = [label + count_tokens(tokenizer, h.chunk.text) for label, h in zip(labels, hits)]
    first = min(needs[0], min_passage) if needs else 0
    sized = [(f, count_tokens(tokenizer, f.text(tokenizer, []))) for f in frames(question, style)]
    fitting = [(f, size) for f, size in sized if size <= budget]
    if not fitting:
        raise WindowTooSmall(f"the reader's window holds {budget} tokens, but its instruction and the question "
                             f"alone take {sized[-1][1]}: ask a shorter question or give the reader a larger window")
    frame, size = next(((f, size) for f, size in fitting if budget - size >= first), fitting[-1])

    def assemble(passages: Sequence[Passage]) -> tuple[str, list[int]]:
        text = frame.text(tokenizer, passages)
        return text, encode(tokenizer, text)

    shares = allot(needs, budget - size, min_passage)
    passages = _trimmed(tokenizer, question, hits, [s - label for s, label in zip(shares, labels)])
    text, ids = assemble(passages)
    while len(ids) > budget:  # tokens merge differently across the joins: take the excess from the last passage
        last = passages.pop()
        room = count_tokens(tokenizer, last.text) - (len(ids) - budget)
        passages += _trimmed(tokenizer, question, [last.hit], [room], first_number=last.number)
        text, ids = assemble(passages)
    return Window(ids, text, passages, budget)


def _example_turn(style: Style) -> tuple[str, str]:
    example = style.example
    return layout(example.question, style.instruction, list(example.passages)), example.answer


def _piece(p: Passage) -> str:
    return f"[{p.number}] {p.text}"


def _trimmed(tokenizer: Any, question: str, hits: Sequence[Hit], rooms: Sequence[int],
             first_number: int = 1) -> list[Passage]:
    """Each hit trimmed to its room in tokens, numbered from `first_number`; those trimmed to nothing left out."""
    passages = []
    for number, (hit, room) in enumerate(zip(hits, rooms), start=first_number):
        text = hit.chunk.text
        if room <= 0 or not text.strip():
            continue
        shown = trim(text, anchors(hit, question), room, lambda t: count_tokens(tokenizer, t))
        if shown.strip(f" {ELLIPSIS}"):
            passages.append(Passage(number, hit, shown, shown != text))
    return passages


def allot(needs: Sequence[int], budget: int, min_share: int = MIN_PASSAGE_TOKENS) -> list[int]:
    """Tokens for each passage, in rank order: max-min fair shares of `budget` (a passage that needs less than an
    equal share gets what it needs; the others split the rest, the better-ranked first for odd tokens), leaving
    out the lowest-ranked passages while one would get fewer than min(its need, min_share).

    >>> allot([10, 100, 100], 150)
    [10, 70, 70]
    >>> allot([100, 100, 100], 150)
    [75, 75, 0]
    >>> allot([500], 40)
    [40]
    """
    budget = max(0, budget)
    for n in range(len(needs), 0, -1):
        shares = _water_fill(needs[:n], budget)
        if n == 1 or all(s >= min(need, min_share) for s, need in zip(shares, needs)):
            return shares + [0] * (len(needs) - n)
    return []


def _water_fill(needs: Sequence[int], budget: int) -> list[int]:
    shares = [0] * len(needs)
    open_, left = list(range(len(needs))), budget
    while open_:
        share = left // len(open_)
        small = [i for i in open_ if needs[i] <= share]
        if not small:
            extra = left - share * len(open_)
            for j, i in enumerate(open_):
                shares[i] = share + (1 if j < extra else 0)
            break
        for i in small:
            shares[i] = needs[i]
            left -= needs[i]
        open_ = [i for i in open_ if i not in small]
    return shares


# ----------------------------------------------------------------------------------------------------------------
# trimming a passage around its evidence


def anchors(hit: Hit, question: str) -> list[tuple[int, int]]:
    """Char spans of the hit's text to keep first, best first: its evidence spans; without evidence, its sentences
    sharing words with the question (most shared first); else its start."""
    if hit.evidence:
        return [(e.start, e.end) for e in hit.evidence]
    return sentences_like(hit.chunk.text, question) or [(0, 0)]


def sentences_like(text: str, question: str) -> list[tuple[int, int]]:
    """The sentences of `text` that share words (stemmed, no stop words) with `question`, most shared first."""
    from ragkit.readers.extractive import split_sentences
    from ragkit.tokens import tokenize

    spans = split_sentences(text)
    if not spans:
        return []
    query, *words = tokenize([question] + [text[a:b] for a, b in spans])
    overlap = [len(set(query) & set(w)) for w in words]
    order = sorted(range(len(spans)), key=lambda i: -overlap[i])
    return [spans[i] for i in order if overlap[i] > 0]


def trim(text: str, keep_first: Sequence[tuple[int, int]], max_tokens: int, count: Callable[[str], int]) -> str:
    """`text` cut to at most `max_tokens` (as `count` measures), keeping the words of the spans `keep_first` (in
    their order) and then the words nearest to them; cuts show as "…". Whole when it fits; "" when nothing does.

    >>> text = "Intro words here. The fee is due in March. Closing words there."
    >>> trim(text, [(22, 25)], 5, lambda t: len(t.split()))
    '… The fee is …'
    """
    if count(text) <= max_tokens:
        return text
    units = word_units(text)
    order = priority(units, keep_first)

    def shown(k: int) -> str:
        return join_units(text, units, sorted(order[:k]))

    lo, hi = 0, len(order)  # the most units whose rendering fits; shown(0) is "", which always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(shown(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return shown(lo)


def word_units(text: str) -> list[tuple[int, int]]:
    """Char spans of the words of `text` (runs without spaces, long ones cut every MAX_UNIT_CHARS chars)."""
    units = []
    for m in re.finditer(r"\S+", text):
        units.extend((a, min(a + MAX_UNIT_CHARS, m.end())) for a in range(m.start(), m.end(), MAX_UNIT_CHARS))
    return units


def priority(units: Sequence[tuple[int, int]], keep_first: Sequence[tuple[int, int]]) -> list[int]:
    """Unit indices, the order in which a trimmed text keeps them: inside a span of `keep_first` (by its rank),
    then by distance in words to the nearest span (nearer ranks first on ties), then in reading order."""
    starts = [a for a, _ in units]
    ranges = []
    for a, b in keep_first:
        first = max(0, bisect.bisect_right(starts, a) - 1)
        if units and units[first][1] <= a:  # `a` falls in the gap after unit `first`
            first += 1
        last = max(first, bisect.bisect_right(starts, max(a, b - 1)) - 1)
        if first < len(units):
            ranges.append((first, min(last, len(units) - 1)))
    if not ranges:
        ranges = [(0, 0)]

    def key(i: int) -> tuple[int, int, int]:
        return min((max(first - i, i - last, 0), rank, i) for rank, (first, last) in enumerate(ranges))

    return sorted(range(len(units)), key=key)


def join_units(text: str, units: Sequence[tuple[int, int]], kept: Sequence[int]) -> str:
    """The kept units (sorted indices) as text: runs of neighbours as written, gaps as "…"."""
    if not kept:
        return ""
    runs, start = [], kept[0]
    for prev, i in itertools.pairwise(kept):
        if i != prev + 1:
            runs.append((start, prev))
            start = i
    runs.append((start, kept[-1]))
    body = f" {ELLIPSIS} ".join(text[units[a][0] : units[b][1]] for a, b in runs)
    head = f"{ELLIPSIS} " if runs[0][0] > 0 else ""
    tail = f" {ELLIPSIS}" if runs[-1][1] < len(units) - 1 else ""
    return head + body + tail


# ----------------------------------------------------------------------------------------------------------------
# long text in window-sized sections


def split_sections(text: str, fits: Callable[[str], bool]) -> list[str]:
    """`text` cut into consecutive sections, each as long as `fits` allows (at a paragraph or sentence end when
    one lies in the section's second half, else between words). A single word that does not fit is cut."""
    units = word_units(text)
    sections, i = [], 0
    while i < len(units):
        lo, hi = i + 1, len(units)  # the most units from i whose text fits; at least one
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(text[units[i][0] : units[mid - 1][1]]):
                lo = mid
            else:
                hi = mid - 1
        end = lo if lo == len(units) else _natural_end(text, units, i, lo)
        sections.append(text[units[i][0] : units[end - 1][1]])
        i = end
    return sections


def _natural_end(text: str, units: Sequence[tuple[int, int]], first: int, end: int) -> int:
    """Where a section of units [first, end) that fits should stop instead: after its last paragraph break, else
    after its last sentence end, when that lies in the section's second half; else at `end`."""
    second_half = range(end - 1, first + (end - first) // 2 - 1, -1)
    for j in second_half:
        if "\n\n" in re.sub(r"[ \t\r]", "", text[units[j][1] : units[j + 1][0]]):
            return j + 1
    for j in second_half:
        if re.search(r"[.!?][\"')\]]*$", text[units[j][0] : units[j][1]]):
            return j + 1
    return end


def fit_tail(text: str, fits: Callable[[str], bool]) -> int:
    """Where the longest tail of `text` that `fits` starts: 0 when all of it fits, else the start of a word
    (len(text) when not even the last word fits)."""
    if fits(text):
        return 0
    units = word_units(text)
    lo, hi = 1, len(units)  # the first unit from which the tail fits; len(units): none does
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(text[units[mid][0] :]):
            hi = mid
        else:
            lo = mid + 1
    return units[lo][0] if lo < len(units) else len(text)
