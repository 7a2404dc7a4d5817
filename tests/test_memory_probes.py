"""The memory value probe of Infini-attention: what it reads, the memory it is given, and training with it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ragkit.errors import ConfigError
from ragkit.memory.infini import write
from ragkit.memory.probes import InfiniValueProbe, forward_keeping_memory
from ragkit.memory.tasks import KEY_IDS, RecallTask
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import RecallBatches
from ragkit.memory.train import TrainConfig, train

SEG = 16


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
