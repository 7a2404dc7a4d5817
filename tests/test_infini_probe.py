"""The memory value probe of Infini-attention: what it reads, the memory it is given, and training with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ragkit.errors import ConfigError
from ragkit.readers.infini import write
from ragkit.readers.infini_probe import InfiniValueProbe, forward_keeping_memory
from ragkit.readers.tasks import RecallTask
from ragkit.readers.train import RecallBatches, TrainConfig, build_reader, train

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


def test_memory_value_loss_trains_infini_attention_and_reports_the_probe():
    task = RecallTask(segment_length=SEG, keys=2, cue=True)
    base = TrainConfig(steps=4, batch_size=4, segments=(3, 3), seed=0, log_every=2)
    plain = train(tiny_infini(), RecallBatches(task), base)
    events = []
    model = tiny_infini()
    names = set(model.state_dict())
    valued = train(model, RecallBatches(task), replace(base, memory_value_loss=1.0), progress=events.append)
    assert valued.history != plain.history  # the value loss changed what was learnt
    assert [step for step, _ in valued.memory_value_hits] == [2, 4] and plain.memory_value_hits == []
    assert all(0.0 <= e.memory_value_hit <= 1.0 for e in events)
    assert set(model.state_dict()) == names  # the probe is dropped: the reader saves what it had
    with pytest.raises(ConfigError, match="memory_id_loss"):  # HMT's only
        train(tiny_infini(), RecallBatches(task), TrainConfig(steps=1, memory_id_loss=1.0))


def test_probe_learning_rate_must_be_positive():
    with pytest.raises(ConfigError, match="learning rate|lr"):
        TrainConfig(probe_lr=0.0)
