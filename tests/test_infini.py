"""The Infini-attention reader on tiny random Llama and Qwen2 models built at test time (GQA: 4 query heads over
2 KV heads, head dim 8); segments of 16 tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.readers.infini import InfiniConfig, InfiniLM, write

SEG = 16
VOCAB = 64


def tiny_backbone(family: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random causal LM: hidden 32, 4 query heads / 2 KV heads, vocab 64; Qwen2 gets random q/k/v biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, attn_implementation="sdpa")
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
    return model.eval()


def reader_for(backbone: torch.nn.Module, **config) -> InfiniLM:
    """Wrap a copy of `backbone` (so it stays the unmodified reference)."""
    return InfiniLM(copy.deepcopy(backbone), InfiniConfig(segment_length=SEG, **config)).eval()


def open_gates(reader: InfiniLM, beta: float = 0.0) -> None:
    with torch.no_grad():
        for gate in reader.gate_parameters():
            gate.fill_(beta)


def ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gate_shut_gives_the_backbone_segment_by_segment(family):
    backbone = tiny_backbone(family)
    reader = reader_for(backbone)
    x = ids(2 * SEG + 8, batch=2)  # two full segments and a partial one
    with torch.no_grad():
        # position scheme: every segment is fed alone, positions restarting at 0
        want = torch.cat([backbone(x[:, i : i + SEG], use_cache=False).logits for i in range(0, x.shape[1], SEG)], 1)
        reader.shut_gates()
        shut = reader(x)
        reader.shut_gates(False)
        open_gates(reader)
        opened = reader(x)
    torch.testing.assert_close(shut, want, atol=1e-5, rtol=1e-5)
    # the first segment has no memory to read; later segments do
    torch.testing.assert_close(opened[:, :SEG], want[:, :SEG], atol=1e-5, rtol=1e-5)
    assert (opened[:, SEG:] - want[:, SEG:]).abs().max() > 1e-3


def test_default_gate_starts_near_the_backbone():
    reader = reader_for(tiny_backbone())
    assert torch.allclose(reader.gate_values(), torch.full((2, 4), 0.01), atol=1e-3)


def test_state_size_is_constant_in_the_length_read():
    reader = reader_for(tiny_backbone("qwen2"))
    x = ids(20 * SEG, batch=2)
    assert reader.state_bytes() == 0
    reader.read(x[:, : 2 * SEG])
    after_two = reader.state_bytes()
    reader.read(x[:, 2 * SEG :])
    assert reader.state_bytes() == after_two == 2 * 2 * 2 * 8 * (8 + 1) * 4  # batch·layers·H_kv·d·(d+1)·fp32
    assert all(a.memory.dtype == torch.float32 and a.memory.shape == (2, 2, 8, 8) for a in reader.layers)


def test_delta_rule_leaves_an_existing_binding_unchanged():
    # three keys with orthonormal features: after one write, the memory returns each value for its key exactly
    s = torch.eye(8)[:3].view(1, 1, 3, 8)  # (b, h, n, d_k)
    v = torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(0))  # (b, h, n, d_v)
    memory, normalizer = write(None, None, s, v, "delta", 1e-6)
    again, _ = write(memory, normalizer, s, v, "delta", 1e-6)
    torch.testing.assert_close(again, memory, atol=1e-5, rtol=1e-5)
    linear, _ = write(memory, normalizer, s, v, "linear", 1e-6)
    torch.testing.assert_close(linear, 2 * memory)


@pytest.mark.parametrize("update", ["delta", "linear"])
def test_delta_rule_inside_the_layer(update):
    # the same one-token segment written twice: the binding σ(k) → v exists after the first write
    backbone = tiny_backbone()
    reader = reader_for(backbone, update=update)
    attn = reader.layers[0]
    h = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))  # (b, n, C)
    rope = reader.model.model.rotary_emb(h, position_ids=torch.zeros(1, 1, dtype=torch.long))
    with torch.no_grad():
        attn(h, rope)
        first, z_first = attn.memory.clone(), attn.normalizer.clone()
        attn(h, rope)
    torch.testing.assert_close(attn.normalizer, 2 * z_first)  # z is a plain sum under both rules
    if update == "delta":
        torch.testing.assert_close(attn.memory, first, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(attn.memory, 2 * first)


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_streaming_reads_equal_one_call(update):
    reader = reader_for(tiny_backbone(), update=update)
    open_gates(reader)
    x = ids(3 * SEG, batch=2)
    with torch.no_grad():
        whole = reader(x)
    reader.reset()
    for i in range(0, 3 * SEG, SEG):
        last = reader.read(x[:, i : i + SEG])
    torch.testing.assert_close(last, whole[:, 2 * SEG :], atol=1e-5, rtol=1e-5)
    reader.reset()
    torch.testing.assert_close(reader.read(x), whole[:, 2 * SEG :], atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_memory_across_segments():
    reader = reader_for(tiny_backbone())
    open_gates(reader)
    x = ids(3 * SEG)

    def grads() -> torch.Tensor:
        embeds = reader.model.get_input_embeddings()(x).detach().requires_grad_()  # (1, 48, C)
        reader.zero_grad()
        logits = reader(inputs_embeds=embeds)
        logits[:, 2 * SEG :].logsumexp(-1).sum().backward()  # a loss on segment 3 only
        return embeds.grad

    g = grads()
    assert g[:, :SEG].abs().sum() > 0  # segment 1 reaches segment 3 through two memory updates
    assert all(gate.grad is not None and gate.grad.abs().sum() > 0 for gate in reader.gate_parameters())
    reader.config.bptt_segments = 1  # detach every segment: nothing flows back
    assert grads()[:, :SEG].abs().sum() == 0
    reader.config.bptt_segments = None
    reader.shut_gates()  # no memory read: segments are independent
    assert grads()[:, :SEG].abs().sum() == 0


def test_adapter_round_trip(tmp_path):
    backbone = tiny_backbone("qwen2")
    saved = reader_for(backbone, update="delta")
    with torch.no_grad():
        for gate in saved.gate_parameters():
            gate.normal_(0.0, 2.0)
    folder = saved.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["infini_adapter.safetensors", "infini_config.json"]

    loaded = InfiniLM(copy.deepcopy(backbone)).eval()  # default config until the adapter says otherwise
    loaded.load_adapter(folder)
    assert loaded.config == saved.config
    for a, b in zip(saved.gate_parameters(), loaded.gate_parameters()):
        assert torch.equal(a, b)
    x = ids(3 * SEG)
    with torch.no_grad():
        assert torch.equal(saved(x), loaded(x))

    with pytest.raises(ModelLoadError):
        InfiniLM(tiny_backbone("qwen2", layers=3)).load_adapter(folder)


def test_generate_with_memory():
    backbone = tiny_backbone()
    reader = reader_for(backbone)
    open_gates(reader)
    prompt = ids(3 * SEG)
    new = reader.generate(prompt, max_new_tokens=5)
    assert new.shape == (1, 5) and new.dtype == torch.long and 0 <= int(new.min()) and int(new.max()) < VOCAB
    # the first answer token reads the same memory as the segmented forward pass over the prompt
    with torch.no_grad():
        assert int(new[0, 0]) == int(reader(prompt)[0, -1].argmax())


def test_generate_with_the_gate_shut_ignores_the_prefix():
    backbone = tiny_backbone("qwen2")
    reader = reader_for(backbone)
    reader.shut_gates()
    prompt = ids(5 * SEG + 3)
    after_prefix = reader.generate(prompt, max_new_tokens=6)
    window_only = reader.generate(prompt[:, -SEG:], max_new_tokens=6)
    assert torch.equal(after_prefix, window_only)
    # and the KV-cached loop is the backbone's own greedy decoding of the window
    seq = prompt[:, -SEG:]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, backbone(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(after_prefix, seq[:, SEG:])


def test_only_llama_family_models_are_wrapped():
    class NotALlama(torch.nn.Module):
        pass

    with pytest.raises(ModelLoadError):
        InfiniLM(NotALlama())
