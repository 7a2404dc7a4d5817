"""Recall evaluation: evaluate_recall's modes (memory on, gates shut or memory disabled, another sequence's memory)
at each length, scored against the plain backbone and against oracle readers; the facts alone in their segment apart
from those sharing it; HMT's search hits, for the asked fact's memory and for its segment, among the cached memories;
and how a hit rate is printed. Tiny models, one thread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memory_helpers import SEG, hmt_task, tiny, tiny_hmt
from ragkit.memory.recall_eval import _seeded, evaluate_recall
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import KEY, VOCAB_SIZE, RecallTask, make_recall_batch

torch.set_num_threads(1)


def test_evaluate_recall_scores_every_mode_and_length_and_shuts_the_gates_only_for_shut():
    model = tiny()
    seen: list[tuple[bool, ...]] = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(attn.gate_shut for attn in model.layers))
        return forward(*args, **kwargs)

    model.forward = spy
    task = RecallTask(segment_length=SEG, digits=3)
    cells = evaluate_recall(model, task, [2, 4], sequences=10, batch_size=4)
    assert [(c.mode, c.segments) for c in cells] == [(m, s) for s in (2, 4) for m in ("on", "shut", "other")]
    for c in cells:
        assert 0 <= c.digit <= 1 and 0 <= c.value <= c.digit + 1e-9 and c.n == 10
        assert sum(d.n for d in c.by_depth) == 10
    # 2 lengths × 3 batches: "on", then "shut" (gates shut), then "other"
    assert seen == [(False, False)] * 3 + [(True, True)] * 3 + [(False, False)] * 3 + \
        [(False, False)] * 3 + [(True, True)] * 3 + [(False, False)] * 3
    assert not any(attn.gate_shut for attn in model.layers)  # restored
    model.shut_gates(True)
    evaluate_recall(model, task, [2], sequences=2, modes=("shut",))
    assert all(attn.gate_shut for attn in model.layers)  # a caller's own setting is restored too


class AloneOracle(nn.Module):
    """Reads the facts like a perfect memory, but answers right only when the asked fact is alone in its segment."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.prefix: torch.Tensor | None = None

    def reset(self) -> None:
        self.prefix = None

    def read(self, ids: torch.Tensor) -> None:
        self.prefix = ids

    def forward(self, last: torch.Tensor, reset: bool = True) -> torch.Tensor:
        logits = torch.zeros(*last.shape, VOCAB_SIZE)
        for row, (prefix, segment) in enumerate(zip(self.prefix, last)):
            starts = (prefix == KEY).nonzero().squeeze(1).tolist()
            asked = next(s for s in starts if prefix[s + 1] == segment[-5])  # QUERY id = d d d closes the segment
            alone = sum(s // SEG == asked // SEG for s in starts) == 1
            digits = prefix[asked + 3 : asked + 6]
            logits[row, -4:-1].scatter_(1, (digits if alone else (digits + 1) % 10)[:, None], 1.0)
        return logits


def test_evaluate_recall_scores_apart_the_facts_alone_in_their_segment():
    task = RecallTask(segment_length=SEG, keys=3, digits=3)
    on, = evaluate_recall(AloneOracle(), task, [4], sequences=64, modes=("on",))
    assert on.digit_alone == 1.0 and 0.0 < on.digit < 1.0  # some asked facts share their segment, some do not
    assert on.digit_shared == 0.0  # the oracle reads every shared fact's digits off by one


def test_gate_shut_recall_equals_the_backbone_reading_the_last_segment_alone():
    model = tiny()
    with torch.no_grad():
        for g in model.gate_parameters():
            g.fill_(3.0)  # mostly memory: shutting the gates must matter
    task = RecallTask(segment_length=SEG, digits=3)
    shut = evaluate_recall(model, task, [3], sequences=8, modes=("shut",))[0]
    batch = make_recall_batch(task, 8, 3, _seeded(1234, 3, 0))  # the batch evaluate_recall scored
    with torch.no_grad():
        logits = model.model(input_ids=batch.input_ids[:, -SEG:], use_cache=False).logits  # the plain backbone
    pred = logits[:, batch.answer_positions - 2 * SEG].argmax(-1)
    assert shut.digit == pytest.approx(float((pred == batch.answer).float().mean()))


class PrefixOracle(nn.Module):
    """A perfect memory: answers the asked fact's digits when the prefix it has read holds that fact, else 0s; a
    forward with reset=True forgets the prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.prefix: torch.Tensor | None = None

    def reset(self) -> None:
        self.prefix = None

    def read(self, ids: torch.Tensor) -> None:
        self.prefix = ids

    def forward(self, last: torch.Tensor, reset: bool = True) -> torch.Tensor:
        if reset:
            self.prefix = None
        logits = torch.zeros(*last.shape, VOCAB_SIZE)
        for row, segment in enumerate(last):
            prefix = self.prefix[row] if self.prefix is not None else torch.zeros(0, dtype=torch.long)
            asked = [s for s in (prefix == KEY).nonzero().squeeze(1).tolist() if prefix[s + 1] == segment[-5]]
            digits = prefix[asked[0] + 3 : asked[0] + 6] if asked else torch.zeros(3, dtype=torch.long)
            logits[row, -4:-1].scatter_(1, digits[:, None], 1.0)  # QUERY id = d d d closes the segment
        return logits


def test_on_recall_reads_the_sequences_own_prefix_and_other_another_sequences():
    """With a perfect memory "on" scores 1.0; "other" reads the prefix of the sequence drawn with the evaluation's
    seed + 1 before the same questions, and scores what that prefix answers."""
    task = RecallTask(segment_length=SEG, digits=3)
    on, other = evaluate_recall(PrefixOracle(), task, [3], sequences=32, batch_size=16, modes=("on", "other"))
    assert (on.digit, on.value) == (1.0, 1.0)
    right = []
    for j in range(2):
        batch = make_recall_batch(task, 16, 3, _seeded(1234, 3, j))
        donor = make_recall_batch(task, 16, 3, _seeded(1235, 3, j))
        oracle = PrefixOracle()
        oracle.read(donor.input_ids[:, :-SEG])
        logits = oracle(batch.input_ids[:, -SEG:], reset=False)
        right.append(logits[:, batch.answer_positions - 2 * SEG].argmax(-1) == batch.answer)
    right = torch.cat(right)
    assert other.digit == pytest.approx(float(right.float().mean())) and other.digit < 0.5


# --- HMT: memory disabled, search hits ------------------------------------------------------------------------------


def test_evaluate_recall_for_hmt_disables_the_memory_for_shut_and_reports_search_hits():
    model = tiny_hmt()
    task = hmt_task()
    on, off, other = evaluate_recall(model, task, [3], sequences=4, batch_size=4)
    assert (on.mode, off.mode, other.mode) == ("on", "shut", "other")
    assert off.search_hit is None and other.search_hit is None
    assert not model.memory_disabled
    # "shut" is the final segment read with the memory disabled (the same sequences: one batch of 4)
    batch = make_recall_batch(task, 4, 3, _seeded(1234, 3, 0))
    model.disable_memory(True)
    with torch.no_grad():
        logits = model(batch.input_ids[:, -SEG:])
    model.disable_memory(False)
    right = logits[:, batch.answer_positions - 2 * SEG].argmax(-1) == batch.answer
    assert off.digit == pytest.approx(float(right.float().mean()))
    # "on": the prefix read into memory, then the question's segment, whose search weighs segments 0 and 1
    with torch.no_grad():
        model.reset()
        model.read(batch.input_ids[:, :-SEG])
        logits = model(batch.input_ids[:, -SEG:], reset=False)
    right = logits[:, batch.answer_positions - 2 * SEG].argmax(-1) == batch.answer
    assert on.digit == pytest.approx(float(right.float().mean()))
    asked = batch.key_positions[:, 0] // SEG  # the segment holding the asked fact
    assert model.last_weights.shape == (4, 1, 2)
    assert on.search_hit == pytest.approx(float((model.last_weights[:, 0].argmax(-1) == asked).float().mean()))


def test_the_segment_hit_counts_every_memory_of_the_asked_facts_segment(monkeypatch):
    import ragkit.memory.recall_eval as eval_module

    model = build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, sensory_tokens=4,
                         cache_size=8, memory_tokens=2)[0]
    task = hmt_task()
    exact = []
    for slot in (0, 1):  # as if every fact had been given memory `slot` of its segment
        monkeypatch.setattr(eval_module, "asked_slot", lambda m, batch, s: torch.full((len(batch.answer),), slot))
        on = evaluate_recall(model, task, [4], sequences=16, batch_size=8, modes=("on",))[0]
        exact.append(on.search_hit)
    # the search's top memory is in the fact's segment exactly when it is that segment's first or second memory
    assert 0 < on.search_segment_hit == pytest.approx(exact[0] + exact[1]) and min(exact) < on.search_segment_hit
    monkeypatch.undo()
    one = evaluate_recall(tiny_hmt(), task, [4], sequences=8, batch_size=8, modes=("on",))[0]
    assert one.search_segment_hit == one.search_hit  # one memory per segment: the same count
    from ragkit.memory.recall_eval import hit_text

    assert (hit_text(0.0, 1.0), hit_text(0.5, 0.5), hit_text(None, None)) == ("0.000 (1.000 for the segment)",
                                                                             "0.500", "")


def test_search_hits_point_at_the_key_segment_among_the_cached_memories():
    from ragkit.memory.hmt import HMTConfig, HMTLM

    _search_hits = HMTLM.search_hits  # read on a stand-in with the attributes it reads

    class Reader:
        config = HMTConfig(segment_length=16, memory_tokens=1)
        memory_disabled = False
        last_weights = torch.tensor([[[0.1, 0.8, 0.1]], [[0.7, 0.2, 0.1]], [[0.1, 0.1, 0.8]]])  # (3, 1, m=3)

    # 5 segments read before the question: the cache holds the memories of segments 2, 3, 4
    hits = _search_hits(Reader(), torch.tensor([3, 0, 4]), 5)
    assert hits.tolist() == [True, False, True]  # segment 0 was evicted: a miss

    class TwoSlots(Reader):  # 2 memories per segment: the same 3 segments, 6 memories
        config = HMTConfig(segment_length=16, memory_tokens=2)
        last_weights = torch.tensor([[[0.1, 0.0, 0.0, 0.7, 0.1, 0.1]], [[0.6, 0.1, 0.1, 0.1, 0.1, 0.0]],
                                     [[0.1, 0.1, 0.0, 0.0, 0.1, 0.7]]])  # (3, 1, 2·3)
    hits = _search_hits(TwoSlots(), torch.tensor([3, 0, 4]), 5)
    assert hits.tolist() == [True, False, True]  # the second memory of segment 3, of segment 4
    hits = _search_hits(TwoSlots(), torch.tensor([3, 0, 4]), 5, key_slot=torch.tensor([1, 0, 0]))
    assert hits.tolist() == [True, False, False]  # segment 4's fact is in its first memory: the search took the other
