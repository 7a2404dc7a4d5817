"""The synthetic recall tasks and the batch sources training draws from: where the task generator puts the facts,
the question, the cue and the labels, and the per-segment fact ids, memory slots and values it hands the memory
losses; the keys curriculum's draws (one fact, then two, then all); language-modelling batches over a folder of
documents; and stage one's recall batches, which open the sensory window. Tiny models, one thread."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest
import torch

from memory_helpers import SEG, hmt_task, tiny
from ragkit.errors import ConfigError
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import (EQUALS, FILLER, IGNORE, KEY, KEY_IDS, QUERY, VOCAB_SIZE, DocumentBatches,
                                  RecallBatches, RecallTask, fact_slots, make_recall_batch, segment_fact_ids,
                                  slot_fact_ids, slot_fact_values)
from ragkit.memory.train import TrainConfig, train

torch.set_num_threads(1)


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


# --- the keys curriculum --------------------------------------------------------------------------------------------


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


# --- language modelling over a folder -------------------------------------------------------------------------------


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


def test_held_out_documents_are_left_out_of_training_by_name_and_folders_add_up(tmp_path):
    from models import TRAINING_TEXT, build_tokenizer

    from ragkit.memory.tasks import held_out

    names = [f"doc{i}.txt" for i in range(400)]
    out = [n for n in names if held_out(n, 0.1)]
    assert 20 <= len(out) <= 60 and out == [n for n in names if held_out(n, 0.1)]  # about a tenth, always the same
    assert not any(held_out(n, 0.0) for n in names) and all(held_out(n, 1.0) for n in names)
    tokenizer = build_tokenizer(tmp_path / "tok")
    kept_name = next(n for n in names if not held_out(n, 0.5))
    gone_name = next(n for n in names if held_out(n, 0.5))
    for folder, name, text in (("a", kept_name, TRAINING_TEXT), ("b", gone_name, TRAINING_TEXT * 2),
                               ("b", "other-" + kept_name, TRAINING_TEXT[:2000])):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(text)
    both = DocumentBatches([tmp_path / "a", tmp_path / "b"], tokenizer, segment_length=SEG)
    kept = DocumentBatches([tmp_path / "a", tmp_path / "b"], tokenizer, segment_length=SEG, holdout=0.5)
    assert len(both.docs) == 3
    assert sorted(len(d) for d in kept.docs) == sorted(len(d) for d in both.docs if len(d) != max(map(len, both.docs)))


# --- stage one's recall batches -------------------------------------------------------------------------------------


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


class Characters:
    """A tokenizer with one token per character, so that a test can read back what it planted."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_a_planted_fact_lies_inside_the_document_and_never_in_the_questions_segment():
    from models import TRAINING_TEXT

    from ragkit.memory.tasks import plant_fact

    tokenizer = Characters()
    doc = tokenizer.encode(TRAINING_TEXT)[:1024]
    rng = random.Random(0)
    starts = set()
    for _ in range(50):
        fact = plant_fact(tokenizer, doc, rng)
        length = len(doc)
        assert 0 <= fact.fact_start < fact.fact_end <= length and fact.answer_tokens > 0
        said = tokenizer.decode(fact.ids[fact.fact_start : fact.fact_end])
        code = tokenizer.decode(fact.ids[-fact.answer_tokens :]).strip()
        assert code.isdigit() and len(code) == 5 and code in said  # the fact states the answer
        assert code not in tokenizer.decode(fact.ids[length : -fact.answer_tokens])  # the question does not
        assert fact.ids[: fact.fact_start] == doc[: fact.fact_start]  # the document around it is kept, in order
        assert fact.ids[fact.fact_end : length] == doc[fact.fact_start : length - (fact.fact_end - fact.fact_start)]
        starts.add(fact.fact_start)
    assert len(starts) > 20  # at every depth
    with pytest.raises(ConfigError, match="no room"):
        plant_fact(tokenizer, doc[:3], rng)


def test_several_planted_facts_keep_the_document_and_the_question_asks_one_of_them():
    from models import TRAINING_TEXT

    from ragkit.memory.tasks import FACT_SUBJECTS, plant_fact

    tokenizer = Characters()
    doc = tokenizer.encode(TRAINING_TEXT)[:2048]
    rng, asked_depths = random.Random(1), set()
    for _ in range(20):
        fact = plant_fact(tokenizer, doc, rng, facts=16)
        length, text = len(doc), tokenizer.decode(fact.ids[: len(doc)])
        said = re.findall(r" The access code of (.+?) is (\d{5})\. ", text)
        assert len(said) == 16 and len({subject for subject, _ in said}) == 16  # distinct subjects
        code = tokenizer.decode(fact.ids[-fact.answer_tokens :]).strip()
        asked = tokenizer.decode(fact.ids[fact.fact_start : fact.fact_end])
        assert f"is {code}." in asked and asked.split(" is ")[0].split("code of ")[1] in fact.question
        assert not re.search(r"\d{5}", tokenizer.decode(fact.ids[length : -fact.answer_tokens]))  # no fact after L
        rest = re.sub(r" The access code of .+? is \d{5}\. ", "", text)  # the document, in order, cut at its end
        assert tokenizer.encode(rest) == doc[: len(rest)] and fact.facts == 16
        asked_depths.add(fact.fact_start * 4 // length)
    assert asked_depths == {0, 1, 2, 3}  # the asked fact at every depth
    with pytest.raises(ConfigError, match="between 1 and"):
        plant_fact(tokenizer, doc, rng, facts=len(FACT_SUBJECTS) + 1)


def test_fact_batches_ask_at_the_end_for_a_fact_planted_before_the_last_segment():
    import torch

    from models import TRAINING_TEXT

    from ragkit.memory.tasks import FactBatches

    tokenizer = Characters()

    class Folderless(FactBatches):  # the documents given as ids, not read from folders
        def __init__(self) -> None:
            self.tokenizer, self.segment_length = tokenizer, 128
            self.docs = [torch.tensor(tokenizer.encode(TRAINING_TEXT * 3))]

    batches = Folderless()
    ids, labels = batches(4, 3, gen(1))
    assert ids.shape == labels.shape == (4, 3 * 128)
    for row, label in zip(ids.tolist(), labels.tolist()):
        scored = [t for t, y in enumerate(label) if y != IGNORE]
        code = tokenizer.decode([label[t] for t in scored]).strip()
        assert scored == list(range(3 * 128 - len(scored) - 1, 3 * 128 - 1)) and code.isdigit() and len(code) == 5
        assert code in tokenizer.decode(row[: 2 * 128])  # the fact lies before the question's segment …
        assert code not in tokenizer.decode(row[2 * 128 : -len(scored)])  # … not in it
        assert tokenizer.decode(row[:-len(scored)]).endswith("is")
    with pytest.raises(ConfigError, match="at least 2 segments"):
        batches(1, 1, gen())
