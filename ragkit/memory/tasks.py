"""Synthetic recall tasks for memory readers, in a tiny vocabulary of token ids.

A sequence is filler with K facts scattered across its segments, then a question that names one of them:

    … filler … KEY 7 = 3 1 4 1 5 … filler … KEY 2 = 9 2 6 5 3 … filler … QUERY 2 = 9 2 6 5 3
                                                                              └── answer: loss here only

K = 1 is the passkey task (the Infini-attention paper, arXiv 2404.07143, App. B); K > 1 is multi-query associative
recall (MQAR), which needs content-addressed reads: the question's id must pick its value out of the memory. Facts
never straddle a segment boundary and never fall within `protect` tokens of the question, so a reader cannot answer
from its local window (Infini-attention) or its sensory tokens (HMT): the fact has to come through memory.

With `cue`, the question's segment also opens with the question without its answer (QUERY <id> =), as ragkit's
memory readers put the question first and last in their final window: HMT searches its memory with a summary of
a segment's first half, which would otherwise never see the question, so without the cue its search cannot be
content-addressed. The cue holds no value, so it gives nothing away.

The question and its answer close the sequence, whose length is a whole number of segments; the answer digits are
fed teacher-forced, so a sequence is scored in one forward pass, and "every digit right" equals greedy exact match.

>>> task = RecallTask(segment_length=32, keys=2)
>>> batch = make_recall_batch(task, batch_size=3, segments=4, generator=torch.Generator().manual_seed(0))
>>> batch.input_ids.shape, batch.answer.shape, int((batch.labels != IGNORE).sum())
(torch.Size([3, 128]), torch.Size([3, 5]), 15)
>>> bool((batch.input_ids[:, -5:] == batch.answer).all())
True
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from ragkit.errors import ConfigError
from ragkit.progress import ProgressEvent

# --- the vocabulary ---------------------------------------------------------------------------------------------
DIGITS = tuple(range(10))  # token d is the digit d
FILLER = (10, 11, 12, 13)  # haystack tokens, drawn uniformly
KEY = 14  # starts a fact: KEY <id> = <digits>
EQUALS = 15  # between a fact's id and its digits, and after the question's id
QUERY = 16  # starts the question: QUERY <id> = <answer digits>
KEY_IDS = tuple(range(17, 33))  # 16 key ids; K facts of one sequence get K distinct ids
VOCAB_SIZE = 33
CUE_LENGTH = 3  # QUERY <id> =, the question without its answer
IGNORE = -100  # label of every position that is not scored (torch cross_entropy's ignore_index)


@dataclass
class RecallTask:
    """What a recall sequence looks like; the length (number of segments) is chosen per batch."""

    segment_length: int = 32  # tokens per segment: the reader's segment (Infini) or window
    keys: int = 1  # facts per sequence, K; 1 is the passkey task
    digits: int = 5  # digits per value
    protect: int | None = None  # tokens before the question that hold no fact; None: all of the question's segment
    cue: bool = False  # the question's segment opens with QUERY <id> = (no answer): see the module docstring

    def __post_init__(self) -> None:
        if not 1 <= self.keys <= len(KEY_IDS):
            raise ConfigError(f"keys must be between 1 and {len(KEY_IDS)}, got {self.keys}")
        if self.digits < 1 or self.segment_length < self.fact_length:
            raise ConfigError(f"a fact of {self.fact_length} tokens must fit in a segment of {self.segment_length}")
        if self.question_length > self.segment_length:
            raise ConfigError(f"the question ({self.question_length} tokens) must fit in one segment")
        if self.protect is not None and self.protect < 0:
            raise ConfigError(f"protect must be at least 0, got {self.protect}")
        if self.cue and self.segment_length < CUE_LENGTH + self.question_length:
            raise ConfigError(f"the cue and the question ({CUE_LENGTH + self.question_length} tokens) must fit in "
                              f"one segment of {self.segment_length}")
        if self.cue and self.protect is not None and self.protect < self.segment_length - self.question_length:
            raise ConfigError("with a cue, facts must stay out of the question's segment: protect must be at least "
                              f"{self.segment_length - self.question_length} (or None)")

    @property
    def fact_length(self) -> int:
        """Tokens of one fact: KEY id = d…d."""
        return 3 + self.digits

    @property
    def question_length(self) -> int:
        """Tokens of the question and its answer: QUERY id = d…d."""
        return 3 + self.digits

    @staticmethod
    def protect_with_sensory(segment_length: int, sensory_tokens: int, digits: int = 5) -> int:
        """`protect` that keeps facts out of the question's segment and out of the `sensory_tokens` before it
        (HMT's sensory window)."""
        return segment_length - (3 + digits) + sensory_tokens

    def fact_limit(self, segments: int) -> int:
        """Facts end at or before this position in a sequence of `segments` segments."""
        length = segments * self.segment_length
        question = length - self.question_length
        protect = self.segment_length - self.question_length if self.protect is None else self.protect
        return question - protect


@dataclass
class RecallBatch:
    """A batch of recall sequences. b: batch, n: tokens, d: digits, K: facts per sequence."""

    input_ids: Tensor  # (b, n) int64
    labels: Tensor  # (b, n) int64: labels[:, t] is the target of the logits at t; IGNORE except the answer digits
    answer: Tensor  # (b, d) the queried value's digits
    answer_positions: Tensor  # (d,) positions whose logits predict the answer digits (the same in every row)
    depth: Tensor  # (b,) float: where the queried fact starts, as a share of the room facts may use, in [0, 1)
    key_positions: Tensor  # (b, K) where each fact starts (column 0 is the queried one)

    def to(self, device: str | torch.device) -> RecallBatch:
        """The same batch on `device`."""
        return RecallBatch(**{name: value.to(device) for name, value in vars(self).items()})


def make_recall_batch(task: RecallTask, batch_size: int, segments: int,
                      generator: torch.Generator | None = None) -> RecallBatch:
    """`batch_size` sequences of `segments` segments each; deterministic for a seeded CPU `generator`."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    length = segments * task.segment_length
    limit = task.fact_limit(segments)
    if limit < task.keys * task.fact_length:
        raise ConfigError(f"{task.keys} facts of {task.fact_length} tokens do not fit before position {limit} of "
                          f"{segments} segments of {task.segment_length} (the question's protected window follows): "
                          "add segments")
    filler = torch.tensor(FILLER)
    ids = filler[torch.randint(len(FILLER), (batch_size, length), generator=g)]  # (b, n)
    values = torch.randint(10, (batch_size, task.keys, task.digits), generator=g)  # (b, K, d)
    starts = _fact_starts(task, batch_size, limit, g)  # (b, K)
    names = torch.stack([torch.randperm(len(KEY_IDS), generator=g)[: task.keys] for _ in range(batch_size)])
    names = torch.tensor(KEY_IDS)[names]  # (b, K) distinct key ids per row
    fact = torch.cat([torch.full((batch_size, task.keys, 1), KEY), names[..., None],
                      torch.full((batch_size, task.keys, 1), EQUALS), values], dim=-1)  # (b, K, fact_length)
    offsets = starts[..., None] + torch.arange(task.fact_length)  # (b, K, fact_length)
    ids.scatter_(1, offsets.view(batch_size, -1), fact.view(batch_size, -1))

    # the question asks for fact 0 (the facts' order in the sequence is random, so that is any of them)
    q0 = length - task.question_length
    question = torch.cat([torch.full((batch_size, 1), QUERY), names[:, :1], torch.full((batch_size, 1), EQUALS),
                          values[:, 0]], dim=-1)  # (b, question_length)
    ids[:, q0:] = question
    if task.cue:  # the question's segment opens with QUERY <id> =
        c0 = (segments - 1) * task.segment_length
        ids[:, c0 : c0 + CUE_LENGTH] = question[:, :CUE_LENGTH]
    answer_positions = torch.arange(length - task.digits - 1, length - 1)  # logits at t predict token t + 1
    labels = torch.full_like(ids, IGNORE)
    labels[:, answer_positions] = values[:, 0]
    depth = starts[:, 0].float() / max(limit - task.fact_length + 1, 1)
    return RecallBatch(ids, labels, values[:, 0].clone(), answer_positions, depth, starts)


def segment_fact_ids(batch: RecallBatch, segment_length: int) -> Tensor:
    """(b, segments, len(KEY_IDS)) float: 1 where the segment holds a fact with that key id (column i is
    KEY_IDS[i]), 0 elsewhere; what each segment's memory should be able to name.

    >>> task = RecallTask(segment_length=32, keys=2)
    >>> batch = make_recall_batch(task, batch_size=3, segments=4)
    >>> targets = segment_fact_ids(batch, 32)
    >>> targets.shape, targets.sum(dim=(1, 2)).tolist()
    (torch.Size([3, 4, 16]), [2.0, 2.0, 2.0])
    """
    return slot_fact_ids(batch, segment_length, 1)[:, :, 0]


def slot_fact_ids(batch: RecallBatch, segment_length: int, slots: int) -> Tensor:
    """(b, segments, slots, len(KEY_IDS)) float: which key ids each of a segment's `slots` memories should name.
    The i-th fact of a segment (in reading order, from 0) goes to slot min(i, slots - 1), so that with as many slots
    as facts each memory names one fact; slots = 1 is `segment_fact_ids` with a slot axis."""
    b, k = batch.key_positions.shape
    columns = fact_names(batch)  # (b, K)
    segment = batch.key_positions // segment_length  # (b, K)
    slot = fact_slots(batch, segment_length, slots)  # (b, K)
    targets = torch.zeros(b, batch.input_ids.shape[1] // segment_length, slots, len(KEY_IDS))
    targets[torch.arange(b)[:, None].expand(b, k), segment, slot, columns] = 1.0
    return targets


def slot_fact_values(batch: RecallBatch, segment_length: int, slots: int) -> Tensor:
    """(b, segments, slots, digits) long: the digits of the one fact each memory is given (as `slot_fact_ids` gives
    them), IGNORE where a memory is given no fact or more than one."""
    b, k = batch.key_positions.shape
    digits = batch.answer.shape[1]
    values = fact_values(batch)  # (b, K, d)
    segment, slot = batch.key_positions // segment_length, fact_slots(batch, segment_length, slots)  # (b, K)
    given = slot_fact_ids(batch, segment_length, slots).sum(-1)  # (b, segments, slots): facts given to each memory
    targets = torch.full((*given.shape, digits), IGNORE, dtype=torch.long)
    targets[torch.arange(b)[:, None].expand(b, k), segment, slot] = values
    targets[given != 1] = IGNORE
    return targets


def fact_names(batch: RecallBatch) -> Tensor:
    """(b, K) long: each fact's key id as an index into KEY_IDS (column 0 the queried one)."""
    return batch.input_ids.gather(1, batch.key_positions + 1) - KEY_IDS[0]  # KEY <id> = …


def fact_values(batch: RecallBatch) -> Tensor:
    """(b, K, d) long: each fact's digits (column 0 the queried one)."""
    b, k = batch.key_positions.shape
    digits = batch.answer.shape[1]
    offsets = batch.key_positions[..., None] + 3 + torch.arange(digits)  # (b, K, d): KEY <id> = d d d …
    return batch.input_ids.gather(1, offsets.flatten(1)).view(b, k, digits) - DIGITS[0]


def fact_slots(batch: RecallBatch, segment_length: int, slots: int) -> Tensor:
    """(b, K) long: the slot of each fact (column 0 the queried one), min(its rank among its segment's facts in
    reading order, slots - 1), as `slot_fact_ids` assigns them."""
    segment = batch.key_positions // segment_length  # (b, K)
    same = segment[:, :, None] == segment[:, None, :]  # (b, K, K)
    earlier = batch.key_positions[:, None, :] < batch.key_positions[:, :, None]  # [i, j]: fact j before fact i
    return (same & earlier).sum(-1).clamp(max=slots - 1)  # (b, K)


PLACEMENT_TRIES = 100  # a row whose random placement runs out of room is drawn again, up to this many times


def _fact_starts(task: RecallTask, batch_size: int, limit: int, g: torch.Generator) -> Tensor:
    """Start positions (b, K) of K facts that neither overlap, nor straddle a segment, nor end past `limit`.

    Each row places its facts one by one, uniformly among the starts still free (random sequential placement); a
    row that runs out of room before its K-th fact (rare unless the facts nearly fill the room) is drawn again."""
    n_starts = limit - task.fact_length + 1
    pos = torch.arange(max(n_starts, 0))
    allowed = (pos % task.segment_length) <= task.segment_length - task.fact_length  # within one segment
    rows = []
    for _ in range(batch_size):
        for _ in range(PLACEMENT_TRIES):
            row = _place_row(task, allowed, g)
            if row is not None:
                break
        else:
            raise ConfigError(f"no room for {task.keys} facts before position {limit}: add segments")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)  # (b, K)


def _place_row(task: RecallTask, allowed: Tensor, g: torch.Generator) -> list[int] | None:
    """One row's K fact starts among the `allowed` ones, or None if the room ran out."""
    free = allowed.clone()
    row = []
    for _ in range(task.keys):
        choices = free.nonzero().squeeze(1)
        if len(choices) == 0:
            return None
        start = int(choices[torch.randint(len(choices), (1,), generator=g)])
        row.append(start)
        free[max(start - task.fact_length + 1, 0): start + task.fact_length] = False  # no overlap
    return row


def tiny_llama_config(vocab_size: int = VOCAB_SIZE, d_model: int = 64, layers: int = 2, heads: int = 2,
                      kv_heads: int | None = None, segment_length: int = 32, **overrides: Any):
    """A `LlamaConfig` for a small model trained from scratch on these tasks (2 layers, d_model 64,
    2 heads, 32-token segments). Positions restart in every segment, so the window is one segment."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=segment_length,
        initializer_range=0.02, tie_word_embeddings=False, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return config


# --- batch sources for training ---------------------------------------------------------------------------------


class Batches(Protocol):
    """A source of training batches: (input_ids, labels), both (batch_size, segments × segment_length). `task` is
    the recall task for synthetic recall, None for documents."""

    task: RecallTask | None

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator,
                 keys: int | None = None) -> tuple[Tensor, Tensor]: ...


class RecallBatches:
    """Synthetic recall batches (passkey for keys = 1): loss on the answer digits only. `keys` draws sequences with
    that many facts instead of the task's K (the key curriculum)."""

    def __init__(self, task: RecallTask) -> None:
        self.task = task

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator,
                 keys: int | None = None) -> tuple[Tensor, Tensor]:
        batch = self.draw(batch_size, segments, generator, keys)
        return batch.input_ids, batch.labels

    def draw(self, batch_size: int, segments: int, generator: torch.Generator,
             keys: int | None = None) -> RecallBatch:
        """The same draw as a call, with where each fact lies (for the losses that supervise the memory)."""
        task = self.task if keys is None or keys == self.task.keys else replace(self.task, keys=keys)
        return make_recall_batch(task, batch_size, segments, generator)


def stage1_recall_batches(task: RecallTask) -> RecallBatches:
    """HMT's stage-1 batches for a recall task: one fact per sequence (stage 1 learns to write a memory and read it
    back; its 2 segments have no room for many facts), allowed in the sensory window before the question's segment
    (`protect=None`). With every fact out of reach of the sensory tokens, stage 1 of a model trained from scratch
    never left ln 10: reading the digits and writing them to memory must be learnt at once, and neither has a
    gradient until the other works. The few facts that reach the sensory tokens teach the readout first; the memory
    follows within a few hundred steps. Stage 2 and every evaluation keep the task's own protection."""
    return RecallBatches(replace(task, keys=1, cue=False, protect=None))


def curriculum_keys(share: float, keys: int, curriculum: float) -> int:
    """Facts per sequence at `share` of a run whose task has `keys` facts: 1, 2, 4, … (the powers of two below
    `keys`), each for an equal part of the first `curriculum` share of the run, then `keys`. A model that must pick
    one fact among many by its name learns first to read a fact back at all (K = 1), then to tell two apart by
    name, and so on.

    >>> [curriculum_keys(s, 4, 2 / 3) for s in (0.0, 0.3, 0.5, 0.7, 1.0)]
    [1, 1, 2, 4, 4]
    >>> curriculum_keys(0.1, 4, 0.0), curriculum_keys(0.1, 1, 0.5)
    (4, 1)
    """
    levels = [2**i for i in range(max(keys - 1, 0).bit_length())]  # powers of two below keys
    if share >= curriculum or not levels:
        return keys
    return levels[min(int(share / curriculum * len(levels)), len(levels) - 1)]


def held_out(name: str, share: float) -> bool:
    """Whether the document `name` (a file name) is held out of training, for evaluation: the same `share` of
    names, chosen by a hash of the name, whatever the folder or the machine."""
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < round(share * 10_000)


class DocumentBatches:
    """Windows of `segments × segment_length` consecutive tokens from long documents, for plain language modelling:
    every token is a target. Documents are parsed like `ragkit index` parses them and tokenized once; those
    `held_out` at `holdout` are left for evaluation."""

    task = None

    def __init__(self, folders: str | Path | Sequence[str | Path], tokenizer: Any, segment_length: int,
                 max_tokens: int = 50_000_000, progress: Callable[[ProgressEvent], None] | None = None,
                 holdout: float = 0.0) -> None:
        from ragkit.ingest.parsers import ParseError, parse_file
        from ragkit.ingest.sources import scan_folder
        from ragkit.tokens import token_ids

        folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
        for folder in folders:
            if not folder.is_dir():
                raise ConfigError(f"the training data folder {folder} does not exist")
        self.segment_length = segment_length
        files = [source for folder in folders for source in scan_folder(folder).files
                 if not held_out(source.path.name, holdout)]
        docs: list[Tensor] = []
        total = 0
        for i, source in enumerate(files):
            try:
                text = parse_file(source.path).text
            except ParseError:
                continue
            ids = token_ids(tokenizer, text)
            if len(ids) > 1:
                docs.append(torch.tensor(ids, dtype=torch.long))
                total += len(ids)
            if progress:
                progress(ProgressEvent("tokenize", i + 1, len(files), total))
            if total >= max_tokens:
                break
        if not docs:
            raise ConfigError(f"no readable documents in {', '.join(map(str, folders))}")
        self.docs = sorted(docs, key=len, reverse=True)  # (n_i,) token ids each, longest first
        self.tokens = total

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator,
                 keys: int | None = None) -> tuple[Tensor, Tensor]:
        n = segments * self.segment_length
        room = torch.tensor([max(len(d) - n + 1, 0) for d in self.docs], dtype=torch.float)  # windows per document
        if room.sum() == 0:
            raise ConfigError(f"no document has {n} tokens ({segments} segments of {self.segment_length}); the "
                              f"longest has {len(self.docs[0])}: use fewer or shorter segments, or longer documents")
        picks = torch.multinomial(room, batch_size, replacement=True, generator=generator)  # uniform over windows
        rows = []
        for d in picks.tolist():
            start = int(torch.randint(int(room[d]), (1,), generator=generator))
            rows.append(self.docs[d][start : start + n])
        ids = torch.stack(rows)  # (b, n)
        labels = torch.cat([ids[:, 1:], torch.full((batch_size, 1), IGNORE)], dim=1)  # next token; none after the last
        return ids, labels


# --- a fact planted in a real document --------------------------------------------------------------------------

FACT_SUBJECTS = ("the Marlow archive", "the north gate", "hangar seven", "the Orlov account", "the blue cabinet",
                 "the east wing server", "the harbour office", "the Linden vault", "the night shift locker",
                 "the Kestrel project", "the west stairwell", "the Tamsin ledger", "dock four", "the grey safe",
                 "the Halden mailbox", "the river depot")


@dataclass
class PlantedFact:
    """A document's first tokens with fact sentences inside, then a question on one of them and its answer."""

    ids: list[int]  # the L document tokens (facts included), then the question's and the answer's
    fact_start: int  # where the asked fact's tokens start in `ids`
    fact_end: int  # where they end (≤ L: the question, from L on, never holds a fact)
    question: str  # the question's text, without the answer
    answer_tokens: int  # the answer's tokens, which close `ids`
    facts: int = 1  # facts planted (the others are distractors: other subjects, other codes)


def plant_fact(tokenizer: Any, doc_ids: list[int], rng: Any, facts: int = 1) -> PlantedFact:
    """Put `facts` sentences "The access code of <subject> is <5 digits>." (distinct subjects) at random depths of
    `doc_ids`, keeping its length L, so that a question starting at L starts a segment of its own when L is a whole
    number of segments; then the question on one of them and its answer. `rng`: a random.Random."""
    from ragkit.tokens import token_ids

    if not 1 <= facts <= len(FACT_SUBJECTS):
        raise ConfigError(f"between 1 and {len(FACT_SUBJECTS)} facts can be planted, not {facts}")
    pool, planted = list(FACT_SUBJECTS), []
    for _ in range(facts):
        subject, code = rng.choice(pool), rng.randrange(10_000, 100_000)
        pool.remove(subject)
        planted.append((subject, code, token_ids(tokenizer, f" The access code of {subject} is {code}. ")))
    length, room = len(doc_ids), len(doc_ids) - sum(len(ids) for _, _, ids in planted)
    if room < 0:
        raise ConfigError(f"a document of {length} tokens has no room for {facts} fact(s) of "
                          f"{length - room} tokens")
    depths = sorted(rng.randrange(room + 1) for _ in planted)  # in the document's tokens that stay
    asked = rng.randrange(facts) if facts > 1 else 0
    prefix, kept, spans = [], 0, []
    for depth, (_, _, fact) in zip(depths, planted):
        prefix += doc_ids[kept:depth]
        spans.append((len(prefix), len(prefix) + len(fact)))
        prefix, kept = prefix + fact, depth
    prefix += doc_ids[kept:room]  # (L,)
    subject, code, _ = planted[asked]
    question = f"\n\nQuestion: What is the access code of {subject}?\nAnswer: The access code of {subject} is"
    answer = token_ids(tokenizer, f" {code}")
    return PlantedFact(prefix + token_ids(tokenizer, question) + answer, *spans[asked], question, len(answer), facts)


class FactBatches(DocumentBatches):
    """Windows of real documents with a fact planted in all but the last segment and a question on it closing the
    last (`plant_fact`): loss on the answer's tokens only, so that the memory must carry the fact to the question."""

    def __init__(self, folders: str | Path | Sequence[str | Path], tokenizer: Any, segment_length: int,
                 **kwargs: Any) -> None:
        super().__init__(folders, tokenizer, segment_length, **kwargs)
        self.tokenizer = tokenizer

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator,
                 keys: int | None = None) -> tuple[Tensor, Tensor]:
        if segments < 2:
            raise ConfigError("a planted fact needs at least 2 segments: one to hold it, one for the question")
        n, body = segments * self.segment_length, (segments - 1) * self.segment_length
        ids, _ = super().__call__(batch_size, segments, generator)  # (b, n) document windows
        rng = random.Random(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        rows, labels = [], torch.full((batch_size, n), IGNORE)
        for i, window in enumerate(ids.tolist()):
            fact = plant_fact(self.tokenizer, window[:body], rng)
            tail = fact.ids[body:]  # the question and its answer
            if len(tail) >= self.segment_length:
                raise ConfigError(f"segments of {self.segment_length} tokens are too short for the question")
            rows.append(fact.ids[:body] + window[body : n - len(tail)] + tail)  # (n,)
            answer = torch.tensor(rows[-1][n - fact.answer_tokens :])
            labels[i, n - fact.answer_tokens - 1 : n - 1] = answer  # the logits before each answer token
        return torch.tensor(rows), labels
