"""Training memory readers: the synthetic recall tasks, the training loop (gate warm-up, loss), recall evaluation
(memory on / gates shut / another sequence's memory), checkpoints and `ragkit reader train`. Tiny models, one thread;
the slow test reproduces the CPU passkey ablation (2 layers, d_model 64)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ragkit.errors import ConfigError
from ragkit.memory.tasks import (EQUALS, FILLER, IGNORE, KEY, KEY_IDS, QUERY, VOCAB_SIZE, RecallTask,
                                  fact_slots, make_recall_batch,
                                  segment_fact_ids, slot_fact_ids, slot_fact_values)
from ragkit.memory.recall_eval import _seeded, evaluate_recall
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import DocumentBatches, RecallBatches
from ragkit.memory.train import TrainConfig, train

torch.set_num_threads(1)

SEG = 16


def tiny(seed: int = 0, segment_length: int = SEG):
    model, _ = build_reader(tiny=True, segment_length=segment_length, d_model=32, layers=2, heads=2, seed=seed)
    return model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the task generator ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys,segments,protect", [(1, 2, None), (1, 6, None), (3, 4, None), (4, 8, 40),
                                                   (2, 5, 0)])
def test_no_fact_inside_the_protected_window(keys, segments, protect):
    task = RecallTask(segment_length=SEG, keys=keys, digits=3, protect=protect)
    batch = make_recall_batch(task, 64, segments, gen(keys + segments))
    n = segments * SEG
    question = n - task.question_length
    window = SEG - task.question_length if protect is None else protect
    ends = batch.key_positions + task.fact_length  # (b, K), exclusive
    assert int(ends.max()) <= question - window
    if protect is None:  # the default keeps every fact out of the question's segment
        assert int(ends.max()) <= n - SEG
    # facts never straddle a segment boundary, never overlap, and KEY appears only where a fact starts
    assert bool(((batch.key_positions // SEG) == ((ends - 1) // SEG)).all())
    starts = batch.key_positions.sort(dim=1).values
    assert bool((starts[:, 1:] - starts[:, :-1] >= task.fact_length).all())
    assert bool(((batch.input_ids == KEY).sum(dim=1) == keys).all())
    assert bool((batch.input_ids[:, :question - window] != QUERY).all())


def test_one_key_is_the_passkey_task():
    task = RecallTask(segment_length=SEG, keys=1, digits=5)
    batch = make_recall_batch(task, 32, 4, gen(1))
    ids = batch.input_ids
    assert bool(((ids == KEY).sum(dim=1) == 1).all())
    assert bool(((ids == QUERY).sum(dim=1) == 1).all())
    for row, start in zip(ids, batch.key_positions[:, 0].tolist()):
        fact = row[start : start + task.fact_length]
        assert fact[0] == KEY and int(fact[1]) in KEY_IDS and fact[2] == EQUALS
        question = row[-task.question_length :]
        assert question[0] == QUERY and question[1] == fact[1] and question[2] == EQUALS  # it asks for that key
        assert torch.equal(question[3:], fact[3:])  # and its answer is that key's value
    others = ids.clone()
    for row, start in zip(others, batch.key_positions[:, 0].tolist()):
        row[start : start + task.fact_length] = FILLER[0]
    assert bool((others[:, : -task.question_length] < 10).sum() == 0)  # no digit anywhere but the fact
    assert bool(((batch.depth >= 0) & (batch.depth < 1)).all())


def test_many_keys_have_distinct_ids_and_the_question_names_one():
    task = RecallTask(segment_length=SEG, keys=4, digits=3)
    batch = make_recall_batch(task, 16, 8, gen(2))
    for row, starts in zip(batch.input_ids, batch.key_positions.tolist()):
        names = [int(row[s + 1]) for s in starts]
        assert len(set(names)) == 4
        assert int(row[-task.question_length + 1]) == names[0]


def test_segment_fact_ids_mark_each_fact_id_in_the_segment_that_holds_it():
    task = RecallTask(segment_length=SEG, keys=4, digits=3)
    batch = make_recall_batch(task, 16, 8, gen(3))
    targets = segment_fact_ids(batch, SEG)  # (b, segments, ids)
    assert targets.shape == (16, 8, len(KEY_IDS)) and targets.sum().item() == 16 * 4
    for row, ids, starts in zip(targets, batch.input_ids, batch.key_positions.tolist()):
        for start in starts:
            assert row[start // SEG, int(ids[start + 1]) - KEY_IDS[0]] == 1.0


def test_slot_fact_ids_give_a_segments_facts_to_its_memories_in_reading_order():
    task = RecallTask(segment_length=SEG, keys=4, digits=3)
    batch = make_recall_batch(task, 32, 4, gen(5))  # 4 facts in 3 segments: some share one
    one = slot_fact_ids(batch, SEG, 1)
    assert torch.equal(one[:, :, 0], segment_fact_ids(batch, SEG))
    two = slot_fact_ids(batch, SEG, 2)  # (b, segments, 2, ids)
    assert two.shape == (32, 4, 2, len(KEY_IDS)) and torch.equal(two.sum(2), segment_fact_ids(batch, SEG))
    shared = 0
    for row, ids, starts in zip(two, batch.input_ids, batch.key_positions.tolist()):
        for segment in {s // SEG for s in starts}:
            mine = sorted(s for s in starts if s // SEG == segment)  # reading order
            for rank, start in enumerate(mine):
                assert row[segment, min(rank, 1), int(ids[start + 1]) - KEY_IDS[0]] == 1.0
            assert row[segment, 0].sum() == 1.0  # the first slot names exactly the first fact
            shared += len(mine) > 1
    assert shared > 0  # the draw did put two facts in one segment
    slots = fact_slots(batch, SEG, 2)  # (b, K): the slot each fact was given, column 0 the asked one
    for row, ids, starts, slot in zip(two, batch.input_ids, batch.key_positions.tolist(), slots.tolist()):
        for start, s in zip(starts, slot):
            assert row[start // SEG, s, int(ids[start + 1]) - KEY_IDS[0]] == 1.0


def test_slot_fact_values_give_each_memory_the_digits_of_its_one_fact():
    task = RecallTask(segment_length=SEG, keys=4, digits=3)
    batch = make_recall_batch(task, 32, 4, gen(5))
    for slots in (1, 2):
        values = slot_fact_values(batch, SEG, slots)  # (b, segments, slots, digits)
        assert values.shape == (32, 4, slots, 3)
        given = slot_fact_ids(batch, SEG, slots).sum(-1)  # (b, segments, slots): facts given to each memory
        assert bool(((values != IGNORE).all(-1) == (given == 1)).all())  # scored exactly where one fact is given
        for row, ids, starts, slot in zip(values, batch.input_ids, batch.key_positions.tolist(),
                                          fact_slots(batch, SEG, slots).tolist()):
            for start, j in zip(starts, slot):
                if (row[start // SEG, j] != IGNORE).all():
                    assert row[start // SEG, j].tolist() == ids[start + 3 : start + 6].tolist()
    assert (slot_fact_values(batch, SEG, 2) != IGNORE).sum() > (slot_fact_values(batch, SEG, 1) != IGNORE).sum()


def test_the_cue_opens_the_question_segment_without_giving_the_answer():
    task = RecallTask(segment_length=SEG, keys=4, digits=3, cue=True)
    plain = make_recall_batch(RecallTask(segment_length=SEG, keys=4, digits=3), 16, 6, gen(4))
    batch = make_recall_batch(task, 16, 6, gen(4))
    c0 = 5 * SEG
    assert bool((batch.input_ids[:, c0] == QUERY).all() and (batch.input_ids[:, c0 + 2] == EQUALS).all())
    assert torch.equal(batch.input_ids[:, c0 + 1], batch.input_ids[:, -task.question_length + 1])  # the asked id
    assert bool((batch.input_ids[:, c0 : -task.question_length] < 10).sum() == 0)  # no digit before the answer
    changed = (batch.input_ids != plain.input_ids).any(dim=0).nonzero().squeeze(1)
    assert set(changed.tolist()) <= {c0, c0 + 1, c0 + 2}  # everything else is the same sequence
    assert torch.equal(batch.labels, plain.labels)
    with pytest.raises(ConfigError, match="out of the question's segment"):
        RecallTask(segment_length=SEG, cue=True, protect=2)


def test_labels_mark_only_the_answer_digits():
    task = RecallTask(segment_length=SEG, keys=2, digits=4)
    batch = make_recall_batch(task, 8, 3, gen(3))
    marked = (batch.labels != IGNORE).nonzero()[:, 1].view(8, 4)
    assert bool((marked == batch.answer_positions).all())
    ids = batch.input_ids
    assert torch.equal(batch.labels[:, batch.answer_positions], ids[:, batch.answer_positions + 1])
    assert torch.equal(batch.labels[:, batch.answer_positions], batch.answer)
    assert int(batch.input_ids.max()) < VOCAB_SIZE


def test_the_generator_is_deterministic():
    task = RecallTask(segment_length=SEG, keys=3, digits=3)
    a, b = (make_recall_batch(task, 4, 5, gen(7)) for _ in range(2))
    c = make_recall_batch(task, 4, 5, gen(8))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.key_positions, b.key_positions)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_facts_that_nearly_fill_the_room_are_always_placed():
    task = RecallTask(segment_length=32, keys=16, protect=32, cue=True)  # 128 fact tokens before position 216
    for seed in range(300):
        batch = make_recall_batch(task, 32, 8, gen(seed))
        ends = batch.key_positions.sort(dim=1).values
        assert bool((ends[:, 1:] - ends[:, :-1] >= task.fact_length).all())  # never overlapping


def test_a_task_that_cannot_fit_is_refused():
    with pytest.raises(ConfigError, match="keys must be"):
        RecallTask(keys=len(KEY_IDS) + 1)
    with pytest.raises(ConfigError, match="add segments"):
        make_recall_batch(RecallTask(segment_length=SEG, keys=3, digits=3), 2, 2, gen())


# --- the training loop ----------------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_moves_the_gates_only_after_the_warmup():
    model = tiny()
    events = []
    config = TrainConfig(steps=24, batch_size=8, lr=3e-3, gate_warmup=0.5, log_every=1, seed=0)
    result = train(model, RecallBatches(RecallTask(segment_length=SEG, digits=3)), config, progress=events.append)
    assert result.steps == 24 and len(events) == 24
    first = sum(e.loss for e in events[:3]) / 3
    last = sum(e.loss for e in events[-3:]) / 3
    assert last < first - 0.3
    held = [e for e in events if e.gates_frozen]
    assert len(held) == 12 and all(e.step <= 12 for e in held)
    for e in held:  # sigmoid(0) = 0.5 exactly while held
        assert all(g == 0.5 for layer in e.gates for g in layer)
    assert any(abs(g - 0.5) > 1e-3 for layer in events[-1].gates for g in layer)


def test_only_the_gates_train_on_a_frozen_backbone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(steps=3, batch_size=4, train_all=False, gate_warmup=0.0, gate_lr=0.05, log_every=1)
    train(model, RecallBatches(RecallTask(segment_length=SEG, digits=3)), config)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("self_attn.gate") for k in changed)


def test_the_loop_refuses_a_reader_that_detaches_every_segment():
    model = tiny()
    model.config.bptt_segments = 1
    with pytest.raises(ConfigError, match="every segment"):
        train(model, RecallBatches(RecallTask(segment_length=SEG, digits=3)), TrainConfig(steps=1))


def test_mixed_lengths_are_drawn_from_the_range():
    seen = []

    def batches(batch_size, segments, generator):
        seen.append(segments)
        return RecallBatches(RecallTask(segment_length=SEG, digits=3))(batch_size, segments, generator)

    train(tiny(), batches, TrainConfig(steps=12, batch_size=2, segments=(2, 5)))
    assert set(seen) <= {2, 3, 4, 5} and len(set(seen)) > 1


def test_the_keys_curriculum_draws_one_then_two_then_all_facts():
    drawn = []

    class Counting(RecallBatches):
        def __call__(self, batch_size, segments, generator, keys=None):
            ids, labels = super().__call__(batch_size, segments, generator, keys)
            drawn.append(int((ids == KEY).sum(dim=1)[0]))  # facts in the first row
            return ids, labels

    events = []
    config = TrainConfig(steps=30, batch_size=2, segments=(6, 6), keys_curriculum=2 / 3, log_every=1)
    train(tiny(), Counting(RecallTask(segment_length=SEG, keys=4, digits=3)), config, progress=events.append)
    want = [1] * 10 + [2] * 10 + [4] * 10  # thirds of the run: the curriculum's two levels, then K
    assert drawn == want and [e.keys for e in events] == want


def test_the_keys_curriculum_needs_recall_batches():
    def batches(batch_size, segments, generator):
        return RecallBatches(RecallTask(segment_length=SEG, digits=3))(batch_size, segments, generator)

    with pytest.raises(ConfigError, match="recall"):
        train(tiny(), batches, TrainConfig(steps=1, keys_curriculum=0.5))


def test_language_modelling_over_a_folder(tmp_path):
    from models import TRAINING_TEXT, build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TRAINING_TEXT)
    (docs / "short.md").write_text("# Too short\n\nA line.\n")
    batches = DocumentBatches(docs, tokenizer, segment_length=SEG)
    ids, labels = batches(3, 4, gen())
    assert ids.shape == labels.shape == (3, 4 * SEG)
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and bool((labels[:, -1] == IGNORE).all())
    model, _ = build_reader(tiny=True, segment_length=SEG, d_model=32, layers=1, heads=2, vocab_size=len(tokenizer))
    result = train(model, batches, TrainConfig(steps=2, batch_size=2, segments=(2, 3), log_every=1))
    assert result.steps == 2
    with pytest.raises(ConfigError, match="no document has"):
        batches(1, 10_000, gen())


# --- evaluation ------------------------------------------------------------------------------------------------------


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


# --- HMT ----------------------------------------------------------------------------------------


# --- HMT: two-stage training, the adapter in checkpoints, evaluation, the CLI ------------------------------------


def tiny_hmt(seed: int = 0):
    model, _ = build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, seed=seed,
                            sensory_tokens=4, cache_size=8)
    return model


def hmt_task() -> RecallTask:  # facts out of the question's segment and out of the 4 sensory tokens before it
    return RecallTask(segment_length=SEG, digits=3, protect=SEG - 6 + 4)


def test_build_reader_hmt_tiny_fits_the_memory_tokens_in_its_positions():
    model = tiny_hmt()
    assert type(model).__name__ == "HMTLM"
    assert model.model.config.max_position_embeddings == SEG + 4 + 2
    assert (model.config.sensory_tokens, model.config.cache_size, model.config.memory_search) == (4, 8, True)
    two = build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=1, heads=2, memory_tokens=2)[0]
    assert two.config.memory_tokens == 2 and two.model.config.max_position_embeddings == SEG + 8 + 3
    with pytest.raises(ConfigError, match="unknown memory reader"):
        build_reader("rmt", tiny=True)


def test_hmt_parameters_get_their_own_group_without_decay():
    from ragkit.memory.train import param_groups

    model = tiny_hmt()
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, hmt_lr=5e-3))}
    assert {id(p) for p in groups["hmt"]["params"]} == {id(p) for p in model.adapter_parameters()}
    assert groups["hmt"]["weight_decay"] == 0.0 and groups["hmt"]["base_lr"] == 5e-3
    assert not {id(p) for p in groups["decay"]["params"]} & {id(p) for p in model.adapter_parameters()}


def test_two_stage_training_reduces_the_loss_searches_only_in_stage_two_and_saves_the_search_on(tmp_path):
    from ragkit.memory.train import train_two_stage

    model = tiny_hmt()
    events, searches = [], []
    forward = model.forward

    def spy(*args, **kwargs):
        searches.append((model.config.memory_search, kwargs.get("input_ids", args[0] if args else None).shape[1]))
        return forward(*args, **kwargs)

    model.forward = spy
    config = TrainConfig(steps=10, batch_size=8, segments=(3, 3), lr=3e-3, log_every=1, seed=0)
    result = train_two_stage(model, RecallBatches(hmt_task()), config, stage1_steps=12, progress=events.append,
                             out=tmp_path / "ck")
    assert result.steps == 22 and [e.step for e in events] == list(range(1, 23))
    assert all(e.steps == 22 for e in events)
    assert searches[:12] == [(False, 2 * SEG)] * 12 and searches[12:] == [(True, 3 * SEG)] * 10
    first = sum(e.loss for e in events[:3]) / 3
    last = sum(e.loss for e in events[-3:]) / 3
    assert last < first - 0.3
    assert model.config.memory_search
    saved = json.loads((tmp_path / "ck" / "hmt_config.json").read_text())
    assert saved["config"]["memory_search"] is True
    record = json.loads((tmp_path / "ck" / "train.json").read_text())
    assert record["reader"] == "hmt" and record["stages"]["stage1_steps"] == 12


def test_two_stage_training_boxes_stage_one_in_time_and_gives_stage_two_the_rest():
    from ragkit.memory.train import train_two_stage

    calls = []
    batches = RecallBatches(hmt_task())

    def source(name):
        def draw(batch_size, segments, generator):
            calls.append(name)
            return batches(batch_size, segments, generator)
        return draw

    config = TrainConfig(steps=10**6, batch_size=2, segments=(3, 3), max_seconds=3.0, log_every=1000)
    result = train_two_stage(tiny_hmt(), source("two"), config, stage1_steps=10**6, stage1_batches=source("one"),
                             stage1_seconds=1.0)
    assert calls.count("one") > 0 and calls.count("two") > 0 and calls == sorted(calls)  # "one" before "two"
    assert 2.5 < result.seconds < 6.0


def test_stage_one_recall_batches_open_only_the_sensory_window():
    from ragkit.memory.tasks import make_recall_batch
    from ragkit.memory.tasks import stage1_recall_batches

    task = hmt_task()
    opened = stage1_recall_batches(task).task
    assert opened.protect is None and (opened.keys, opened.digits, opened.segment_length) == (1, 3, SEG)
    assert stage1_recall_batches(replace(task, keys=4, cue=True)).task == opened  # one fact, no cue, in stage 1
    starts = make_recall_batch(opened, 512, 2, torch.Generator().manual_seed(0)).key_positions[:, 0]
    assert int(starts.max()) + opened.fact_length <= SEG  # never in the question's segment
    assert bool((starts + opened.fact_length > SEG - 4).any())  # but some reach the 4 sensory tokens
    kept = make_recall_batch(task, 512, 3, torch.Generator().manual_seed(0)).key_positions[:, 0]
    assert int(kept.max()) + task.fact_length <= 2 * SEG - 4  # the task itself keeps them out


def test_two_stage_training_draws_stage_one_from_its_own_batches():
    from ragkit.memory.train import train_two_stage

    calls = []

    def source(name, batches):
        def draw(batch_size, segments, generator):
            calls.append((name, segments))
            return batches(batch_size, segments, generator)
        return draw

    batches = RecallBatches(hmt_task())
    config = TrainConfig(steps=2, batch_size=4, segments=(3, 3), log_every=1)
    train_two_stage(tiny_hmt(), source("two", batches), config, stage1_steps=3,
                    stage1_batches=source("one", batches))
    assert calls == [("one", 2)] * 3 + [("two", 3)] * 2


def test_search_supervision_trains_the_search_and_needs_hmt_on_recall_batches():
    model = tiny_hmt()
    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)  # facts out of the question's segment
    calls = []
    forward = model.forward

    def spy(*args, **kwargs):
        calls.append((kwargs.get("search_target") is not None, kwargs.get("teacher_search")))
        return forward(*args, **kwargs)

    model.forward = spy
    config = TrainConfig(steps=4, batch_size=4, segments=(4, 4), search_loss=0.5, search_teacher=0.5, log_every=1)
    train(model, RecallBatches(task), config)
    assert calls == [(True, True)] * 2 + [(True, False)] * 2  # teacher-forced for the first half of the run
    with pytest.raises(ConfigError, match="use the HMT reader"):
        train(tiny(), RecallBatches(task), TrainConfig(steps=1, search_loss=0.3))  # Infini has no search
    with pytest.raises(ConfigError, match="recall batches"):
        train(tiny_hmt(), lambda b, s, g: RecallBatches(task)(b, s, g), TrainConfig(steps=1, search_teacher=0.2))
    with pytest.raises(ConfigError, match="search_loss"):
        TrainConfig(search_loss=-1.0)


def test_search_loss_adds_its_weight_times_the_asked_memorys_negative_log_weight(monkeypatch):
    """One step's gradients of W_q and W_k are those of the answer's cross-entropy − search_loss × log(the weight the
    question's search gives the asked fact's memory), computed here on the same weights and batch."""
    import copy

    import torch.nn.functional as F

    model = tiny_hmt()
    start = copy.deepcopy(model)
    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    draws = []
    draw = RecallBatches.draw
    monkeypatch.setattr(RecallBatches, "draw", lambda self, *a, **k: draws.append(draw(self, *a, **k)) or draws[-1])
    config = TrainConfig(steps=1, batch_size=4, segments=(4, 4), search_loss=0.5, warmup=0.0, grad_clip=1e9)
    train(model, RecallBatches(task), config)
    (batch,) = draws
    logits = start.train()(batch.input_ids, search_target=batch.key_positions[:, 0] // SEG)
    answer = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
    asked = start.last_weights[torch.arange(4), 0, batch.key_positions[:, 0] // SEG]  # 4 segments: none evicted
    torch.testing.assert_close(start.target_log_weight.detach(), asked.log())
    want = torch.autograd.grad(answer - 0.5 * start.target_log_weight.mean(), [start.w_q.weight, start.w_k.weight])
    torch.testing.assert_close(model.w_q.weight.grad, want[0])
    torch.testing.assert_close(model.w_k.weight.grad, want[1])


def test_memory_id_loss_teaches_hmt_memories_to_name_the_ids_of_their_facts():
    """A linear probe reads the fact ids off each segment's memory at chance before training (about 1 in 16) and
    for most memories once the id loss has shaped them: the memory, not only the probe, learnt the ids."""
    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    events = []
    config = TrainConfig(steps=450, batch_size=8, segments=(4, 4), memory_id_loss=1.0, hmt_lr=1e-2, log_every=50)
    result = train(tiny_hmt(), RecallBatches(task), config, progress=events.append)
    hits = [hit for _, hit in result.memory_id_hits]
    assert len(hits) == 9 and [e.memory_id_hit for e in events] == hits
    assert hits[0] < 0.2 and hits[-1] > 0.7, hits
    with pytest.raises(ConfigError, match="use the HMT reader"):
        train(tiny(), RecallBatches(task), TrainConfig(steps=1, memory_id_loss=1.0))
    with pytest.raises(ConfigError, match="memory_id_loss"):
        TrainConfig(memory_id_loss=-1.0)


def test_two_stage_training_keeps_the_memory_id_loss_in_both_stages_unless_told():
    from ragkit.memory.tasks import stage1_recall_batches
    from ragkit.memory.train import train_two_stage

    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    config = TrainConfig(steps=2, batch_size=8, segments=(4, 4), memory_id_loss=1.0, log_every=1)
    result = train_two_stage(tiny_hmt(), RecallBatches(task), config, stage1_steps=2,
                             stage1_batches=stage1_recall_batches(task))
    assert [step for step, _ in result.memory_id_hits] == [1, 2, 3, 4]
    result = train_two_stage(tiny_hmt(), RecallBatches(task), config, stage1_steps=2,
                             stage1_batches=stage1_recall_batches(task), stage1_memory_id_loss=0.0)
    assert [step for step, _ in result.memory_id_hits] == [3, 4]  # stage 2 only


def test_memory_id_terms_score_the_memories_before_the_question_against_their_segments():
    from ragkit.memory.probes import memory_id_terms as _memory_id_terms

    targets = torch.zeros(1, 4, 1, 3)  # 4 segments, 1 slot, 3 ids: segment 1 holds id 2, segment 2 ids 0 and 1
    targets[0, 1, 0, 2] = targets[0, 2, 0, 0] = targets[0, 2, 0, 1] = 1.0
    cache = torch.eye(3)[[0, 2, 1]][None]  # memories of segments 1, 2, 3 (the question's, left out)
    probe = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(3))  # names id i for memory e_i: segment 1 gets id 0, segment 2 id 2 (wrong)
    loss, hit = _memory_id_terms(cache, probe, targets)
    assert hit == 0.0
    with torch.no_grad():
        probe.weight.copy_(torch.eye(3)[[2, 1, 0]] * 4)  # memory e0 → id 2, e2 → id 0: both right
    better, hit = _memory_id_terms(cache, probe, targets)
    assert hit == 1.0 and better < loss
    assert _memory_id_terms(cache[:, -1:], probe, targets) is None  # only the question's memory: nothing to name


def test_memory_id_terms_score_each_of_several_memories_per_segment_against_its_slot():
    from ragkit.memory.probes import memory_id_terms as _memory_id_terms

    targets = torch.zeros(1, 3, 2, 3)  # 3 segments, 2 slots, 3 ids: segment 1 holds ids 0 then 2
    targets[0, 1, 0, 0] = targets[0, 1, 1, 2] = 1.0
    cache = torch.eye(3)[[1, 1, 0, 2, 1, 1]][None]  # segments 0, 1, 2 (the question's), 2 memories each
    probe = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        probe.weight.copy_(torch.eye(3) * 4)  # memory e_i names id i: segment 1's slots name 0 and 2, both right
    loss, hit = _memory_id_terms(cache, probe, targets)
    assert hit == 1.0
    swapped = cache[:, [0, 1, 3, 2, 4, 5]]  # segment 1's slots swapped: each names the other's fact
    worse, hit = _memory_id_terms(swapped, probe, targets)
    assert hit == 0.0 and worse > loss
    assert _memory_id_terms(cache[:, -3:], probe, targets) is None  # less than two segments' memories cached


def test_memory_value_term_scores_the_digits_of_the_memories_given_one_fact():
    from ragkit.memory.probes import memory_value_term as _memory_value_term

    targets = torch.full((1, 3, 1, 2), IGNORE)  # 3 segments, 1 slot, 2 digits: segment 1 holds the fact "3 1"
    targets[0, 1, 0] = torch.tensor([3, 1])
    cache = torch.eye(3)[[0, 1, 2]][None]  # segments 0, 1, 2 (the question's, left out)
    probe = nn.Linear(3, 2 * 10, bias=False)
    with torch.no_grad():
        probe.weight.zero_()
        probe.weight[3, 1] = probe.weight[10 + 1, 1] = 8.0  # memory e1 → digit 3 first, digit 1 second
    right, accuracy = _memory_value_term(cache, probe, targets)
    assert accuracy == 1.0
    with torch.no_grad():
        probe.weight[3, 1] = probe.weight[10 + 1, 1] = 0.0
    guess = float(_memory_value_term(cache, probe, targets)[0].detach())  # every digit at 1/10
    assert float(right.detach()) < 0.01 and guess == pytest.approx(2 * math.log(10), rel=1e-4)
    assert _memory_value_term(cache, probe, torch.full((1, 3, 1, 2), IGNORE)) is None  # no memory given one fact


def memory_digit_targets(batch, segments: int, slots: int, digits: int) -> torch.Tensor:
    """(b, segments, slots, d): the digits of the one fact each HMT memory is given, read off the tokens (the i-th
    fact of a segment in reading order to its i-th memory, the rest to the last), IGNORE where it is given none or
    several."""
    out = torch.full((len(batch.input_ids), segments, slots, digits), IGNORE)
    for b, (row, starts) in enumerate(zip(batch.input_ids, batch.key_positions.tolist())):
        for segment in range(segments):
            mine = sorted(s for s in starts if s // SEG == segment)
            given = [mine[i : i + 1] if i < slots - 1 else mine[i:] for i in range(slots)]
            for slot, facts in enumerate(given):
                if len(facts) == 1:
                    out[b, segment, slot] = row[facts[0] + 3 : facts[0] + 3 + digits]
    return out


def test_memory_value_loss_adds_hmts_weighted_probe_term_and_trains_the_probe(monkeypatch):
    """Every step adds `memory_value_loss` × the probe's cross-entropy, summed over the digits, of the one fact each
    memory before the question's is given, read from HMT's cached memories; the probe trains at probe_lr without
    decay, its term's gradient reaches HMT's parameters and the backbone, the history keeps the task's loss, the hit
    rate logged is the probe's digit accuracy, and the probe is not part of the reader."""
    import ragkit.memory.probes as probes_module

    def hmt_model():
        return build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=1, heads=2, sensory_tokens=4,
                            cache_size=8, memory_tokens=2)[0]

    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    base = TrainConfig(steps=3, batch_size=8, segments=(3, 3), seed=0, lr=1e-3, log_every=1, warmup=0.0,
                       grad_clip=1e9)
    weight, probe_lr = 0.5, 0.03
    plain = train(hmt_model(), RecallBatches(task), base)
    model = hmt_model()
    names = set(model.state_dict())
    reached = [*model.adapter_parameters(), model.model.model.layers[0].self_attn.v_proj.weight]
    draws, calls = [], []
    draw, real = RecallBatches.draw, probes_module.memory_value_term

    def recorded(self, *args, **kwargs):
        draws.append(draw(self, *args, **kwargs))
        return draws[-1]

    def spy(cache, probe, targets):
        loss, hit = real(cache, probe, targets)
        assert cache is model.cache and cache.shape == (8, 2 * 3, 32)  # 3 segments, 2 memories each
        wanted = memory_digit_targets(draws[-1], 3, 2, task.digits)[:, :2]  # the memories before the question's
        logits = probe(cache[:, :-2].unflatten(1, (2, 2))).unflatten(-1, (task.digits, 10))  # (b, 2, 2, d, 10)
        scored = wanted != IGNORE
        assert bool(scored.any())
        log_p = logits.log_softmax(-1).gather(-1, wanted.clamp(min=0)[..., None]).squeeze(-1)
        torch.testing.assert_close(loss, -log_p[scored].mean() * task.digits)
        assert hit == float((logits.argmax(-1) == wanted)[scored].float().mean())
        own = list(probe.parameters())
        grads = torch.autograd.grad(loss, own + reached, retain_graph=True)
        params = [p.detach().clone() for p in own]
        calls.append((probe, float(loss.detach()), hit, grads[: len(own)], grads[len(own) :], params))
        return loss, hit

    monkeypatch.setattr(RecallBatches, "draw", recorded)
    monkeypatch.setattr(probes_module, "memory_value_term", spy)
    events = []
    valued = train(model, RecallBatches(task), replace(base, memory_value_loss=weight, probe_lr=probe_lr),
                   progress=events.append)
    assert len(calls) == 3 and all(math.isfinite(loss) and loss > 0 for _, loss, *_ in calls)
    probe = calls[0][0]
    assert all(c[0] is probe for c in calls)
    assert valued.history[0] == plain.history[0]  # step 1: same weights, same batch, the task's loss alone
    assert valued.memory_value_hits == [(step, c[2]) for step, c in enumerate(calls, start=1)]
    assert [e.memory_value_hit for e in events] == [c[2] for c in calls] and plain.memory_value_hits == []
    for grad in calls[0][4]:
        assert grad.abs().sum() > 0  # T, the initial memory, W_q, W_k, the slots and the backbone all get some
    for p, g in zip(probe.parameters(), calls[-1][3], strict=True):  # the last step's gradient is weight × term's
        torch.testing.assert_close(p.grad, weight * g, rtol=1e-5, atol=1e-8)
    for before, after, g in zip(calls[0][5], calls[1][5], calls[0][3], strict=True):  # Adam's first step: ±lr
        moved, big = (after - before).abs(), g.abs() > 1e-4
        torch.testing.assert_close(moved[big], torch.full_like(moved[big], probe_lr), rtol=1e-3, atol=0.0)
    assert set(model.state_dict()) == names  # the probe is dropped
    assert not {id(p) for p in probe.parameters()} & {id(p) for p in model.parameters()}


def test_memory_value_loss_needs_recall_batches_and_a_memory():
    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    with pytest.raises(ConfigError, match="memory_value_loss"):
        TrainConfig(memory_value_loss=-1.0)
    with pytest.raises(ConfigError, match="recall batches"):
        train(tiny_hmt(), lambda b, s, g: RecallBatches(task)(b, s, g), TrainConfig(steps=1, memory_value_loss=1.0))
    with pytest.raises(ConfigError, match="memory reader"):  # a model with no memory to train
        train(nn.Sequential(nn.Embedding(VOCAB_SIZE, 8), nn.Linear(8, VOCAB_SIZE)), RecallBatches(task),
              TrainConfig(steps=1, memory_value_loss=1.0))


def test_teacher_forcing_ends_once_the_search_is_right(monkeypatch):
    import ragkit.memory.probes as probes_module

    model = tiny_hmt()
    task = replace(hmt_task(), keys=2, cue=True, protect=SEG - 6)
    forced = []
    forward = model.forward

    def spy(*args, **kwargs):
        forced.append(kwargs["teacher_search"])
        return forward(*args, **kwargs)

    model.forward = spy
    always = lambda self, segment, prefix, slot=None: torch.ones(len(segment), dtype=torch.bool)  # noqa: E731
    monkeypatch.setattr(type(model), "search_hits", always)  # a search that is always right
    events = []
    config = TrainConfig(steps=24, batch_size=2, segments=(3, 3), search_loss=0.3, search_teacher=1.0, log_every=4)
    result = train(model, RecallBatches(task), config, progress=events.append)
    assert forced == [True] * probes_module.SEARCH_TAUGHT_STEPS + [False] * 4
    assert [e.search_hit for e in events] == [1.0] * 6 and result.search_hits == [(s, 1.0) for s in range(4, 25, 4)]


def test_search_supervision_names_the_asked_facts_memory_when_a_segment_writes_several(monkeypatch):

    task = replace(hmt_task(), keys=4, cue=True, protect=SEG - 6)
    for memory_tokens in (1, 2):
        model = build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, sensory_tokens=4,
                             cache_size=8, memory_tokens=memory_tokens)[0]
        seen, draws = [], []
        forward, draw = model.forward, RecallBatches.draw

        def spy(*args, **kwargs):
            seen.append(kwargs.get("search_slot"))
            return forward(*args, **kwargs)

        def recorded(self, *args, **kwargs):
            draws.append(draw(self, *args, **kwargs))
            return draws[-1]

        model.forward = spy
        monkeypatch.setattr(RecallBatches, "draw", recorded)
        train(model, RecallBatches(task), TrainConfig(steps=2, batch_size=8, segments=(3, 3), search_loss=0.3))
        monkeypatch.undo()
        if memory_tokens == 1:
            assert seen == [None, None]  # one memory per segment: the segment names it
        else:
            for slot, batch in zip(seen, draws, strict=True):
                assert torch.equal(slot, fact_slots(batch, SEG, 2)[:, 0])


def test_only_the_hmt_parameters_train_on_a_frozen_backbone():
    model = tiny_hmt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(steps=2, batch_size=4, segments=(2, 2), train_all=False, gate_warmup=0.0, lr=1e-2)
    train(model, RecallBatches(hmt_task()), config)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("model.") for n in changed)


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


# --- the CPU ablation -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cpu_passkey_ablation_memory_carries_the_key():
    """2 layers, d_model 64, 2 heads, 32-token segments, trained on 4 segments with the gates held at
    0.5 for 40% of the steps; the memory must carry the key (≥ 0.9 of digits) and nothing else may (≤ 0.2 shut)."""
    model, _ = build_reader(tiny=True, segment_length=32, d_model=64, layers=2, heads=2, seed=0)
    task = RecallTask(segment_length=32, keys=1)
    train(model, RecallBatches(task), TrainConfig(steps=4500, batch_size=16, lr=1e-3, seed=0))
    on, shut, other = evaluate_recall(model, task, [4], sequences=256)
    assert on.digit >= 0.9, on
    assert shut.digit <= 0.2 and other.digit <= 0.2, (shut, other)
    assert on.digit - shut.digit >= 0.6


@pytest.mark.slow
def test_cpu_hmt_passkey_memory_carries_the_key_beyond_the_trained_length():
    """HMT on a Llama backbone: 2 layers, d_model 64, k = 8, N = 64; stage 1 on 2 segments (facts may reach
    the sensory window), stage 2 on 4 segments with the search. Memory on must recall the key at the trained length
    and at 16× it; off and another sequence's memory must stay near chance (0.1)."""
    from ragkit.memory.tasks import stage1_recall_batches
    from ragkit.memory.train import train_two_stage

    torch.set_flush_denormal(True)
    model, _ = build_reader("hmt", tiny=True, segment_length=32, d_model=64, layers=2, heads=2, seed=0,
                            sensory_tokens=8, cache_size=64)
    task = RecallTask(segment_length=32, keys=1, protect=32 - 8 + 8)  # out of the sensory window
    config = TrainConfig(steps=600, batch_size=32, segments=(4, 4), lr=1e-3, seed=0)
    train_two_stage(model, RecallBatches(task), config, stage1_steps=800, stage1_batches=stage1_recall_batches(task))
    cells = evaluate_recall(model, task, [4, 64], sequences=128, batch_size=64)
    by = {(c.segments, c.mode): c for c in cells}
    assert by[4, "on"].digit >= 0.95 and by[64, "on"].digit >= 0.9, cells
    assert all(by[n, mode].digit <= 0.2 for n in (4, 64) for mode in ("shut", "other")), cells


@pytest.mark.slow
def test_cpu_infini_associative_recall_picks_the_fact_by_its_name():
    """Four facts, a question naming one (K = 4, the cue and protection of bench_recall): Infini-attention with the
    delta rule and the memory value loss, 2 layers × d_model 64 on 8 segments of 32 tokens, the learning rate held
    at its peak, 9,000 steps (~40 min on one core of a shared machine). Memory on ≥ 0.9 of the asked digits at the
    trained length and ≥ 0.85 at 4×, where reading the right digit of a random one of the four facts would score
    0.325 (1/4 + 3/4 · 1/10); the backbone alone and another sequence's memory stay at chance (0.1). Without the
    value loss the same model stayed near the guessing loss for 1,200 s (about 4,500 steps), and on 4 segments
    7,872 steps scored 0.583 (benchmarks/RESULTS.md, "Associative recall")."""
    model, _ = build_reader(tiny=True, segment_length=32, d_model=64, layers=2, heads=2, seed=0, update="delta")
    task = RecallTask(segment_length=32, keys=4, protect=RecallTask.protect_with_sensory(32, 8), cue=True)
    config = TrainConfig(steps=9000, batch_size=32, segments=(8, 8), lr=1e-3, min_lr_ratio=1.0, seed=0,
                         memory_value_loss=1.0)
    train(model, RecallBatches(task), config)
    cells = {(c.segments, c.mode): c for c in evaluate_recall(model, task, [8, 32], sequences=256)}
    assert cells[8, "on"].digit >= 0.9, cells[8, "on"]
    assert cells[32, "on"].digit >= 0.85, cells[32, "on"]
    assert all(cells[n, mode].digit <= 0.2 for n in (8, 32) for mode in ("shut", "other")), cells


@pytest.mark.slow
def test_cpu_hmt_search_finds_the_asked_fact_by_its_name_with_the_memory_id_loss():
    """Four facts, a question naming one (K = 4, bench_recall's cue and protection), HMT on 2 layers × d_model 64:
    stage 1 for 800 steps, then 700 steps of stage 2 with the memory id loss, the search loss and a teacher-forced
    search (~3.5 min on one core). The search must pick the asked fact's memory for ≥ 90% of questions at the
    trained length and among 15 memories at 4× (at random: 1/3 and 1/15); without the memory id loss it reached 0.50
    at best in 1,200 s (benchmarks/RESULTS.md, "search supervision"). Reading the fact out of the memory it found is
    not asserted: it varies with the seed, from chance to 0.33 of digits in this budget."""
    from ragkit.memory.tasks import stage1_recall_batches
    from ragkit.memory.train import train_two_stage

    model, _ = build_reader("hmt", tiny=True, segment_length=32, d_model=64, layers=2, heads=2, seed=0,
                            sensory_tokens=8, cache_size=16)
    task = RecallTask(segment_length=32, keys=4, protect=RecallTask.protect_with_sensory(32, 8), cue=True)
    config = TrainConfig(steps=700, batch_size=32, segments=(4, 4), lr=1e-3, min_lr_ratio=1.0, seed=0,
                         search_loss=0.3, search_teacher=0.7, memory_id_loss=1.0, hmt_lr=1e-2)
    result = train_two_stage(model, RecallBatches(task), config, stage1_steps=800,
                             stage1_batches=stage1_recall_batches(task))
    assert result.memory_id_hits[-1][1] > 0.9, result.memory_id_hits[-3:]
    cells = {(c.segments, c.mode): c for c in evaluate_recall(model, task, [4, 16], sequences=256)}
    assert cells[4, "on"].search_hit >= 0.9 and cells[16, "on"].search_hit >= 0.9, cells
    assert all(cells[n, mode].digit <= 0.2 for n in (4, 16) for mode in ("shut", "other")), cells


@pytest.mark.slow
def test_cpu_hmt_associative_recall_reads_the_fact_it_finds_by_name():
    """K = 4 on 8 segments of 32 tokens (bench_recall's cue and protection), HMT on 2 layers × d_model 64 writing two
    memories per segment: stage 1 for 800 steps, then 3,200 steps of stage 2 with the search loss and a
    teacher-forced search, the memory id and value losses in both stages, the learning rate held (~20 min on one
    core). Memory on ≥ 0.9 of the asked digits at the trained length, for facts alone in their segment and for facts
    sharing it (0.96-0.98 overall in 1,200 s, benchmarks/RESULTS.md; one memory per segment read shared facts at
    about 0.46), and ≥ 0.9 at 4× with a cache of every segment; the backbone alone and another sequence's memory
    stay at chance."""
    from ragkit.memory.tasks import stage1_recall_batches
    from ragkit.memory.train import train_two_stage

    model, _ = build_reader("hmt", tiny=True, segment_length=32, d_model=64, layers=2, heads=2, seed=0,
                            sensory_tokens=8, cache_size=32, memory_tokens=2)
    task = RecallTask(segment_length=32, keys=4, protect=RecallTask.protect_with_sensory(32, 8), cue=True)
    config = TrainConfig(steps=3200, batch_size=32, segments=(8, 8), lr=1e-3, min_lr_ratio=1.0, seed=0,
                         search_loss=0.3, search_teacher=0.7, memory_id_loss=1.0, memory_value_loss=1.0, hmt_lr=1e-2)
    train_two_stage(model, RecallBatches(task), config, stage1_steps=800, stage1_batches=stage1_recall_batches(task))
    cells = {(c.segments, c.mode): c for c in evaluate_recall(model, task, [8, 32], sequences=256)}
    on, long = cells[8, "on"], cells[32, "on"]
    assert on.search_hit >= 0.9 and on.digit >= 0.9 and on.digit_alone >= 0.9 and on.digit_shared >= 0.85, on
    assert long.digit >= 0.9, long
    assert all(cells[n, mode].digit <= 0.2 for n in (8, 32) for mode in ("shut", "other")), cells
