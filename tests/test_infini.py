"""The Infini-attention reader on tiny random Llama and Qwen2 models built at test time (GQA: 4 query heads over
2 KV heads, head dim 8); segments of 16 tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.memory.infini import InfiniConfig, InfiniLM, write

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


# ----------------------------------------------------------------------------------------------------------------
# Infini-attention by hand, in float64 numpy, from a layer's own projections (arXiv 2404.07143, Eqs. 6-10)


def elu1_np(x: np.ndarray) -> np.ndarray:
    """σ(x) = ELU(x) + 1."""
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def projections(attn, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre-RoPE Q (H, n, d), K and V (H_kv, n, d) of one sequence h (1, n, C), from the layer's own projections."""
    with torch.no_grad():
        q, k, v = (proj(h)[0].double().numpy() for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (n, ·)
    n, d = h.shape[1], attn.head_dim
    return tuple(x.reshape(n, -1, d).transpose(1, 0, 2) for x in (q, k, v))


def rope_tables(reader: InfiniLM, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], np.ndarray, np.ndarray]:
    """The backbone's rotary embedding for positions 0 … n-1 as the layers receive it, and its (n, d) cos, sin."""
    x = torch.zeros(1, n, 32)
    cos, sin = reader.model.model.rotary_emb(x, position_ids=torch.arange(n)[None])
    return (cos, sin), cos[0].double().numpy(), sin[0].double().numpy()


def hand_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def hand_local(q, k, v, cos, sin, scale: float) -> np.ndarray:
    """A_dot = causal softmax(RoPE(Q) RoPE(K)ᵀ · scale) V per query head (Eq. 6), GQA: head h reads KV head
    h // (H / H_kv). Returns (H, n, d)."""
    q, k = hand_rope(q, cos, sin), hand_rope(k, cos, sin)
    group, n = q.shape[0] // k.shape[0], q.shape[1]
    future = np.triu(np.ones((n, n), dtype=bool), 1)
    out = []
    for h in range(q.shape[0]):
        scores = np.where(future, -np.inf, q[h] @ k[h // group].T * scale)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out.append(weights / weights.sum(-1, keepdims=True) @ v[h // group])
    return np.stack(out)


def hand_read(q, memory, normalizer, eps: float) -> np.ndarray:
    """A_mem = σ(Q) M / (σ(Q) z + eps) per query head on pre-RoPE Q (Eq. 7), from its KV head's memory."""
    s, group = elu1_np(q), q.shape[0] // memory.shape[0]
    return np.stack([s[h] @ memory[h // group] / (s[h] @ normalizer[h // group][:, None] + eps)
                     for h in range(q.shape[0])])


def hand_write(memory, normalizer, k, v, rule: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """M += σ(K)ᵀ V (Eq. 8), or σ(K)ᵀ (V − σ(K) M / (σ(K) z + eps)) with the delta rule (Eq. 9); z += Σ_t σ(K_t).
    An empty memory is M = 0, z = 0."""
    s = elu1_np(k)  # (H_kv, n, d)
    if memory is None:
        memory, normalizer = np.zeros((k.shape[0], k.shape[2], v.shape[2])), np.zeros((k.shape[0], k.shape[2]))
    if rule == "delta":
        v = v - (s @ memory) / (s @ normalizer[..., None] + eps)
    return memory + s.transpose(0, 2, 1) @ v, normalizer + s.sum(1)


def hand_output(attn, h: torch.Tensor, cos, sin, memory, normalizer, beta: np.ndarray, eps: float) -> np.ndarray:
    """One segment's layer output by hand (Eqs. 6, 7, 10, 11): o_proj of sigmoid(β)·A_mem + (1 − sigmoid(β))·A_dot
    per head, or of A_dot alone when the memory is empty. Returns (n, C)."""
    q, k, v = projections(attn, h)
    mixed = hand_local(q, k, v, cos, sin, attn.scaling)  # (H, n, d)
    if memory is not None:
        g = 1.0 / (1.0 + np.exp(-beta))[:, None, None]  # (H, 1, 1)
        mixed = g * hand_read(q, memory, normalizer, eps) + (1.0 - g) * mixed
    heads = torch.from_numpy(mixed.transpose(1, 0, 2).reshape(h.shape[1], -1)).float()  # (n, H·d)
    with torch.no_grad():
        return attn.o_proj(heads).double().numpy()


def capture_o_proj_input(attn) -> list[torch.Tensor]:
    """What each call of `attn` hands its output projection: the mixed heads, (b, n, H·d)."""
    seen: list[torch.Tensor] = []
    attn.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gate_shut_gives_the_backbone_segment_by_segment(family):
    backbone = tiny_backbone(family)
    reader = reader_for(backbone)
    x = ids(2 * SEG + 8, batch=2)  # two full segments and a partial one
    open_gates(reader, 2.0)  # shut must override a gate that is mostly open
    with torch.no_grad():
        # position scheme: every segment is fed alone, positions restarting at 0
        want = torch.cat([backbone(x[:, i : i + SEG], use_cache=False).logits for i in range(0, x.shape[1], SEG)], 1)
        reader.shut_gates()
        shut = reader(x)
    torch.testing.assert_close(shut, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_open_gates_mix_each_layers_memory_read_into_its_local_attention(family):
    """Every layer's output on every segment is o_proj(sigmoid(β)·A_mem + (1 − sigmoid(β))·A_dot) per head, A_mem
    read from the memory of that layer's earlier segments of the same row; the first segment reads nothing."""
    backbone = tiny_backbone(family)
    reader = reader_for(backbone)
    with torch.no_grad():
        for layer, gate in enumerate(reader.gate_parameters()):
            gate.copy_(torch.tensor([-1.5, -0.2, 0.6, 2.0]) + layer)  # a different gate per head and layer
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in reader.layers]
    for layer, attn in enumerate(reader.layers):
        attn.register_forward_hook(lambda module, args, kwargs, out, layer=layer: calls[layer].append(
            (kwargs["hidden_states"].detach().clone(), out[0].detach().clone())), with_kwargs=True)
    x = ids(3 * SEG, batch=2)
    with torch.no_grad():
        opened = reader(x)
        alone = backbone(x[:, :SEG], use_cache=False).logits
    torch.testing.assert_close(opened[:, :SEG], alone, atol=1e-5, rtol=1e-5)  # no memory yet: the backbone
    _, cos, sin = rope_tables(reader, SEG)
    for attn, segments in zip(reader.layers, calls, strict=True):
        assert len(segments) == 3
        beta, eps = attn.gate.detach().double().numpy(), attn.infini.eps
        for row in range(2):
            memory = normalizer = None
            for hidden, out in segments:
                h = hidden[row : row + 1]
                want = hand_output(attn, h, cos, sin, memory, normalizer, beta, eps)
                np.testing.assert_allclose(out[row].double().numpy(), want, rtol=1e-4, atol=1e-5)
                _, k, v = projections(attn, h)
                memory, normalizer = hand_write(memory, normalizer, k, v, "linear", eps)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_fully_open_gate_gives_the_memory_read_and_a_shut_one_the_backbones_attention(family):
    backbone = tiny_backbone(family)
    reader = reader_for(backbone)
    attn, original = reader.layers[0], backbone.model.layers[0].self_attn
    rope, cos, sin = rope_tables(reader, SEG)
    g = torch.Generator().manual_seed(4)
    h1, h2 = (torch.randn(1, SEG, 32, generator=g) for _ in range(2))
    open_gates(reader, 40.0)  # sigmoid(40) is exactly 1 in float32
    heads = capture_o_proj_input(attn)
    with torch.no_grad():
        attn(h1, rope)
        opened = attn(h2, rope)[0]  # reads the memory of h1
    _, k, v = projections(attn, h1)
    memory, normalizer = hand_write(None, None, k, v, "linear", attn.infini.eps)
    q, _, _ = projections(attn, h2)
    read = hand_read(q, memory, normalizer, attn.infini.eps)  # (H, n, d)
    np.testing.assert_allclose(heads[1][0].view(SEG, 4, 8).transpose(0, 1).double().numpy(), read,
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(opened, attn.o_proj(heads[1]))
    attn.gate_shut = True
    with torch.no_grad():
        shut = attn(h2, rope)[0]
        own = original(h2, rope, attention_mask=None)[0]  # the backbone's own attention module, unwrapped
    torch.testing.assert_close(shut, own, atol=1e-6, rtol=1e-5)
    local = hand_output(attn, h2, cos, sin, None, None, np.zeros(4), attn.infini.eps)  # and A_dot by hand agrees
    np.testing.assert_allclose(own[0].double().numpy(), local, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("eps", [1e-6, 1.0])
def test_memory_read_and_write_equal_the_equations_by_hand(update, eps):
    """After each of four segments, the layer's M and z equal Eq. 8 (linear) or Eq. 9 (delta) computed in float64
    from its own pre-RoPE K and V, and its read of the next segment equals σ(Q) M / (σ(Q) z + eps) on pre-RoPE Q
    (Eq. 7; read at a fully open gate, right before the output projection). A large eps shows where it enters."""
    reader = reader_for(tiny_backbone("qwen2"), update=update, eps=eps)  # Qwen2: q/k/v biases too
    attn = reader.layers[0]
    open_gates(reader, 40.0)
    heads = capture_o_proj_input(attn)
    n = 6
    rope, _, _ = rope_tables(reader, n)  # positions 0 … 5: every token but the first is rotated
    g = torch.Generator().manual_seed(5)
    segments = [torch.randn(2, n, 32, generator=g) for _ in range(4)]  # (b, n, C) hidden states
    states: list[tuple[np.ndarray | None, np.ndarray | None]] = [(None, None), (None, None)]  # per row
    for s, h in enumerate(segments):
        with torch.no_grad():
            attn(h, rope)
        for row in range(2):
            q, k, v = projections(attn, h[row : row + 1])
            memory, normalizer = states[row]
            if s > 0:
                got = heads[s][row].view(n, 4, 8).transpose(0, 1).double().numpy()  # (H, n, d)
                np.testing.assert_allclose(got, hand_read(q, memory, normalizer, eps), rtol=1e-5, atol=1e-6)
            states[row] = hand_write(memory, normalizer, k, v, update, eps)
            np.testing.assert_allclose(attn.memory[row].double().numpy(), states[row][0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(attn.normalizer[row].double().numpy(), states[row][1], rtol=1e-6)
    assert attn.memory.dtype == attn.normalizer.dtype == torch.float32


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


def test_generate_is_greedy_decoding_of_the_window_over_the_prefixs_memory():
    """The KV-cached answer equals, token by token, an uncached greedy loop: the prefix read into memory, then the
    last window and the answer so far in one local pass (positions from 0) that reads the memory, never writes it."""
    reader = reader_for(tiny_backbone())
    open_gates(reader)
    prompt = ids(3 * SEG + 5, batch=2)
    new = reader.generate(prompt, max_new_tokens=5)
    reader.reset()
    reader.read(prompt[:, : 2 * SEG + 5])
    memory = [attn.memory.clone() for attn in reader.layers]
    for attn in reader.layers:
        attn.write_memory = False
    seq = prompt[:, -SEG:]
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, reader.model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    for attn, before in zip(reader.layers, memory):
        attn.write_memory = True
        assert torch.equal(attn.memory, before)  # nothing of the window was written
    assert torch.equal(new, seq[:, SEG:])
    eos = int(new[0, 0])
    stopped = reader.generate(prompt[:1], max_new_tokens=5, eos_token_id=eos)
    assert stopped.tolist() == [[eos]]


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
