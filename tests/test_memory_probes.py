"""The auxiliary memory losses: Infini-attention's memory value probe (what it reads, the memory it is given,
training with it), and for HMT the search supervision with its teacher forcing, the memory id loss and the memory
value loss (the terms they score, and what adding them to the task's loss trains). Tiny models, one thread."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from memory_helpers import SEG, hmt_task, tiny, tiny_hmt
from ragkit.errors import ConfigError
from ragkit.memory.infini import write
from ragkit.memory.probes import InfiniValueProbe, forward_keeping_memory
from ragkit.memory.tasks import IGNORE, KEY_IDS, VOCAB_SIZE, RecallTask, fact_slots
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import RecallBatches
from ragkit.memory.train import TrainConfig, train

torch.set_num_threads(1)


def tiny_infini(seed: int = 0):
    return build_reader("infini", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, seed=seed)[0]


def test_probe_reads_the_digit_bound_to_each_id_and_position():
    # one layer, one KV head, head_dim 10: key feature e_i (i = 2 · id + digit index) holds value e_<digit>
    probe = InfiniValueProbe(layers=1, kv_heads=1, head_dim=10, digits=2, ids=4)
    facts = {(0, 0): 3, (0, 1): 7, (2, 0): 5, (2, 1): 1}  # (id, digit index) → digit
    keys = torch.stack([torch.eye(10)[2 * name + j] for name, j in facts])  # (4, 10) one-hot key features
    values = torch.stack([torch.eye(10)[d] for d in facts.values()])  # (4, 10) one-hot digit values
    memory, normalizer = write(None, None, keys[None, None], values[None, None], "linear", 1e-6)
    with torch.no_grad():
        probe.query.fill_(-30.0)  # elu1(-30) ≈ 0: a query's feature is 1 only where it is set to 0 below
        for name, j in facts:
            probe.query[name, j, 0, 0, 2 * name + j] = 0.0
        probe.out.weight.copy_(torch.eye(10) * 10)
        probe.out.bias.zero_()
    logits = probe([(memory, normalizer)], torch.tensor([[2, 0]]))  # (1, K = 2, digits = 2, 10)
    assert logits.shape == (1, 2, 2, 10)
    assert logits.argmax(-1).tolist() == [[[5, 1], [3, 7]]]


def test_forward_keeping_memory_gives_the_logits_and_the_memory_the_last_segment_reads():
    model = tiny_infini().eval()
    ids = torch.randint(20, (2, 3 * SEG), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids)
        logits, states = forward_keeping_memory(model, ids)
        model.reset()
        model.read(ids[:, : 2 * SEG])  # the first two segments, as the third reads them
        expected = [(attn.memory, attn.normalizer) for attn in model.layers]
    assert torch.allclose(logits, whole, atol=1e-5)
    assert len(states) == len(expected) == 2
    for (m, z), (m_ref, z_ref) in zip(states, expected):
        assert torch.allclose(m, m_ref, atol=1e-5) and torch.allclose(z, z_ref, atol=1e-4)
    single, none = forward_keeping_memory(model, ids[:, :SEG])  # one segment: no memory is read
    assert none is None and single.shape == (2, SEG, whole.shape[-1])


def facts_of(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fact's key id (an index into KEY_IDS) and digits, (b, K) and (b, K, d), read off the tokens KEY id = d…"""
    digits = batch.answer.shape[1]
    names = [[int(row[s + 1]) - KEY_IDS[0] for s in starts] for row, starts in zip(batch.input_ids,
                                                                                   batch.key_positions.tolist())]
    values = [[row[s + 3 : s + 3 + digits].tolist() for s in starts] for row, starts in zip(batch.input_ids,
                                                                                            batch.key_positions.tolist())]
    return torch.tensor(names), torch.tensor(values)


def test_memory_value_loss_adds_the_weighted_probe_term_trains_the_probe_and_logs_the_task_loss(monkeypatch):
    """Every step adds `memory_value_loss` × the probe's cross-entropy, summed over the digits, of every fact's
    digits read from the memory the question's segment reads; the probe trains at probe_lr without decay, its term's
    gradient reaches what the layers write (K and V projections), the history keeps the task's loss alone, the hit
    rate logged is the probe's digit accuracy, and the probe is not part of the reader."""
    import ragkit.memory.probes as probes_module

    task = RecallTask(segment_length=SEG, keys=2, cue=True)
    base = TrainConfig(steps=3, batch_size=4, segments=(3, 3), seed=0, log_every=1, warmup=0.0, grad_clip=1e9)
    weight, probe_lr = 0.5, 0.03
    plain = train(tiny_infini(), RecallBatches(task), base)
    model = tiny_infini()
    names = set(model.state_dict())
    writes = [attn.k_proj.weight for attn in model.layers] + [attn.v_proj.weight for attn in model.layers]
    calls = []
    real = probes_module.infini_value_term

    def spy(probe, states, batch):
        loss, hit = real(probe, states, batch)
        ids, digits = facts_of(batch)
        logits = probe(states, ids)  # (b, K, d, 10)
        log_p = logits.log_softmax(-1).gather(-1, digits[..., None]).squeeze(-1)  # (b, K, d)
        torch.testing.assert_close(loss, -log_p.mean() * task.digits)  # summed over digits, averaged over facts
        assert hit == float((logits.argmax(-1) == digits).float().mean())
        own = list(probe.parameters())  # the query per (id, digit), the output layer's weight and bias
        grads = torch.autograd.grad(loss, own + writes, retain_graph=True)
        with torch.no_grad():  # the memory it was given is the one the question's segment reads
            model.reset()
            model.read(batch.input_ids[:, :-SEG])
            for (m, z), attn in zip(states, model.layers, strict=True):
                torch.testing.assert_close(m, attn.memory, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(z, attn.normalizer, atol=1e-4, rtol=1e-5)
        params = [p.detach().clone() for p in probe.parameters()]
        calls.append((probe, float(loss.detach()), hit, grads[: len(own)], grads[len(own) :], params))
        return loss, hit

    monkeypatch.setattr(probes_module, "infini_value_term", spy)
    events = []
    valued = train(model, RecallBatches(task), replace(base, memory_value_loss=weight, probe_lr=probe_lr),
                   progress=events.append)
    assert len(calls) == 3 and all(math.isfinite(loss) and loss > 0 for _, loss, *_ in calls)
    assert abs(calls[0][1] - task.digits * math.log(10)) < 1.0  # an untrained probe: about ln 10 per digit
    probe = calls[0][0]
    assert all(c[0] is probe for c in calls)  # one probe, trained across the steps
    assert valued.history[0] == plain.history[0]  # step 1: same weights, same batch, the task's loss alone
    assert valued.memory_value_hits == [(step, c[2]) for step, c in enumerate(calls, start=1)]
    assert [e.memory_value_hit for e in events] == [c[2] for c in calls] and plain.memory_value_hits == []
    for grad in calls[0][4]:
        assert grad.abs().sum() > 0  # the term reaches the K and V projections: it shapes what is written
    for p, g in zip(probe.parameters(), calls[-1][3], strict=True):  # the last step's gradient is weight × term's
        torch.testing.assert_close(p.grad, weight * g, rtol=1e-5, atol=1e-8)
    for before, after, g in zip(calls[0][5], calls[1][5], calls[0][3], strict=True):  # Adam's first step: ±lr
        moved = (after - before).abs()
        torch.testing.assert_close(moved[g.abs() > 1e-4], torch.full_like(moved[g.abs() > 1e-4], probe_lr),
                                   rtol=1e-3, atol=0.0)
        assert bool((moved[g == 0] == 0).all())  # no decay: what had no gradient (ids not drawn) stays put
    assert set(model.state_dict()) == names  # the probe is dropped: the reader saves what it had
    assert not {id(p) for p in probe.parameters()} & {id(p) for p in model.parameters()}


def test_memory_value_loss_needs_recall_batches_all_weights_and_not_the_id_loss():
    task = RecallTask(segment_length=SEG, keys=2, cue=True)
    with pytest.raises(ConfigError, match="memory_id_loss"):  # HMT's only
        train(tiny_infini(), RecallBatches(task), TrainConfig(steps=1, memory_id_loss=1.0))
    with pytest.raises(ConfigError, match="train all weights"):  # the gates alone cannot change what is written
        train(tiny_infini(), RecallBatches(task), TrainConfig(steps=1, memory_value_loss=1.0, train_all=False,
                                                              gate_warmup=0.0))
    with pytest.raises(ConfigError, match="recall batches"):
        train(tiny_infini(), lambda b, s, g: RecallBatches(task)(b, s, g), TrainConfig(steps=1, memory_value_loss=1.0))


def test_probe_learning_rate_must_be_positive():
    with pytest.raises(ConfigError, match="learning rate|lr"):
        TrainConfig(probe_lr=0.0)


# --- HMT: search supervision, the memory id and value losses --------------------------------------------------------


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
