"""The HMT reader on tiny random Llama and Qwen2 models built at test time (hidden 32, 4 query heads over 2 KV
heads, vocab 64); segments of 16 tokens, 4 sensory tokens, a cache of 3 memories."""

from __future__ import annotations


import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.memory.hmt import HMTConfig, HMTLM, memory_search

SEG = 16
K = 4
N = 3
VOCAB = 64


def tiny_backbone(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A random causal LM: hidden 32, 2 layers, 4 query heads / 2 KV heads, vocab 64, 512 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, attn_implementation="sdpa")
    model = LlamaForCausalLM(LlamaConfig(**kwargs)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kwargs))
    return model.eval()


def reader_for(backbone: torch.nn.Module, seed: int = 0, **config) -> HMTLM:
    """Wrap `backbone` (HMT never modifies it) with seeded new parameters."""
    torch.manual_seed(seed)
    return HMTLM(backbone, HMTConfig(segment_length=SEG, sensory_tokens=K, cache_size=N, **config)).eval()


def ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def hand_hmt(reader: HMTLM, backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HMT's logits (b, n, V) written out from the paper's equations with the backbone as the only model, for a
    sequence whose memories all stay cached (r = 1). Segment n reads [P_n ‖ the k tokens before it ‖ H_n ‖ P_n]
    (Eq. 4); P_1 is the initial memory; later P_n = softmax((S_n W_q)(M W_k)ᵀ / √d_h) M over the memories so far,
    S_n the last state of [T ‖ H_n[0, j) ‖ T] (Eqs. 1-3); M_n is the last state at the trailing P_n (Eq. 5)."""
    with torch.no_grad():
        e = backbone.get_input_embeddings()(x)  # (b, n, C)
        b, _, c = e.shape
        memories, logits = [], []
        for start in range(0, x.shape[1], SEG):
            h = e[:, start : start + SEG]
            if not memories:
                p = reader.memory_init.view(1, 1, c).expand(b, 1, c)
            else:
                t = reader.prompt.view(1, 1, c).expand(b, 1, c)
                s = backbone(inputs_embeds=torch.cat([t, h[:, : SEG // 2], t], 1),
                             output_hidden_states=True).hidden_states[-1][:, -1:]  # S_n (b, 1, C)
                m = torch.cat(memories, 1)  # (b, n - 1, C)
                scores = (s @ reader.w_q.weight.T) @ (m @ reader.w_k.weight.T).transpose(1, 2) / c**0.5
                p = torch.softmax(scores, -1) @ m  # (b, 1, C)
            sensory = e[:, max(0, start - K) : start]
            out = backbone(inputs_embeds=torch.cat([p, sensory, h, p], 1), output_hidden_states=True)
            logits.append(out.logits[:, 1 + sensory.shape[1] : 1 + sensory.shape[1] + h.shape[1]])
            memories.append(out.hidden_states[-1][:, -1:])
    return torch.cat(logits, 1)


def test_memory_search_is_a_convex_combination_of_the_memories():
    g = torch.Generator().manual_seed(0)
    memories = torch.randn(2, 5, 32, generator=g)  # (b, m, C)
    query = torch.randn(2, 1, 32, generator=g)  # (b, 1, C)
    w_q, w_k = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)  # (d_h, C)
    p, weights = memory_search(query, memories, w_q, w_k)
    assert p.shape == (2, 1, 32) and weights.shape == (2, 1, 5)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1))
    for i in range(2):  # softmax((S W_q)(M W_k)ᵀ / √d_h) M, written out
        scores = torch.stack([(w_q @ query[i, 0]) @ (w_k @ memories[i, j]) for j in range(5)]) / 8**0.5
        manual = torch.softmax(scores, 0) @ memories[i]  # (C,)
        torch.testing.assert_close(p[i, 0], manual)
        coef = torch.linalg.lstsq(memories[i].T, p[i, 0, :, None]).solution  # P lies in the memories' span
        torch.testing.assert_close(memories[i].T @ coef, p[i, 0, :, None], atol=1e-4, rtol=1e-4)


def test_cache_and_state_stay_bounded():
    reader = reader_for(tiny_backbone("qwen2"))
    x = ids(40 * SEG, batch=2)
    assert reader.state_bytes() == 0
    reader.read(x[:, :SEG])
    assert reader.cache.shape == (2, 1, 32)
    for i in range(1, 10):
        reader.read(x[:, i * SEG : (i + 1) * SEG])
        assert reader.cache.shape[1] <= N
    after_ten = reader.state_bytes()
    reader.read(x[:, 10 * SEG :])
    assert reader.cache.shape == (2, N, 32) and reader.cache.dtype == torch.float32
    assert reader.state_bytes() == after_ten == 2 * (N * 32 * 4 + K * 32 * 4)  # batch·(N·C·fp32 + k·C·fp32)
    weights = reader.last_weights  # the last search looked at exactly N memories
    assert weights.shape == (2, 1, N) and torch.allclose(weights.sum(-1), torch.ones(2, 1))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_disabled_memory_is_the_backbone_on_sensory_tokens_and_segment(family):
    backbone = tiny_backbone(family)
    reader = reader_for(backbone)
    x = ids(2 * SEG + 8, batch=2)  # two full segments and a partial one
    with torch.no_grad():
        want = []
        for i in range(0, x.shape[1], SEG):
            start = max(0, i - K)  # segment n reads the k tokens before it, positions from 0
            want.append(backbone(x[:, start : i + SEG], use_cache=False).logits[:, i - start :])
        want = torch.cat(want, dim=1)
        reader.disable_memory()
        off = reader(x)
        assert reader.cache is None  # nothing written
        reader.disable_memory(False)
        on = reader(x)
    torch.testing.assert_close(off, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on, hand_hmt(reader, backbone, x), atol=1e-5, rtol=1e-5)  # and on, the equations


def test_memory_on_follows_the_equations_with_and_without_the_search():
    """Three segments with the memory on: the memory prompt, the sensory tokens, the search over the memories so far
    (the third segment weighs two) and the memory written, all by hand from the backbone; without the search
    (stage 1) P_n is M_{n-1}."""
    backbone = tiny_backbone()
    reader = reader_for(backbone)
    x = ids(3 * SEG, batch=2)
    with torch.no_grad():
        on = reader(x)
    torch.testing.assert_close(on, hand_hmt(reader, backbone, x), atol=1e-5, rtol=1e-5)
    assert reader.last_weights.shape == (2, 1, 2) and bool((reader.last_weights < 0.999).all())  # a real mix
    reader.config.memory_search = False
    reader.reset()
    with torch.no_grad():
        reader.read(x[:, :SEG])
        m1 = reader.cache[:, -1:]
        e = backbone.get_input_embeddings()(x)
        inputs = torch.cat([m1, e[:, SEG - K : SEG], e[:, SEG : 2 * SEG]], 1)  # [M_1 ‖ sensory ‖ H_2]
        want = backbone(inputs_embeds=inputs).logits[:, 1 + K :]
        torch.testing.assert_close(reader(x[:, SEG : 2 * SEG], reset=False), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("search", [True, False])
def test_streaming_reads_equal_one_call(search):
    reader = reader_for(tiny_backbone(), memory_search=search)
    x = ids(5 * SEG, batch=2)
    with torch.no_grad():
        whole = reader(x)
        assert whole.shape == (2, 5 * SEG, VOCAB)
        reader.reset()
        for i in range(0, 5 * SEG, SEG):
            last = reader.read(x[:, i : i + SEG])
        torch.testing.assert_close(last, whole[:, 4 * SEG :], atol=1e-5, rtol=1e-5)
        reader.reset()
        reader.read(x[:, : 2 * SEG])
        rest = reader(x[:, 2 * SEG :], reset=False)
    torch.testing.assert_close(rest, whole[:, 2 * SEG :], atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_memory_across_segments():
    reader = reader_for(tiny_backbone())
    x = ids(3 * SEG)

    def grads() -> torch.Tensor:
        embeds = reader.model.get_input_embeddings()(x).detach().requires_grad_()  # (1, 48, C)
        reader.zero_grad()
        logits = reader(inputs_embeds=embeds)
        logits[:, 2 * SEG :].logsumexp(-1).sum().backward()  # a loss on segment 3 only
        return embeds.grad

    g = grads()
    assert g[:, :SEG].abs().sum() > 0  # segment 1 reaches segment 3 only through its memory M_1
    for p in reader.adapter_parameters():  # T, P_1, W_q, W_k: the search over [M_1, M_2] depends on all of them
        assert p.grad is not None and p.grad.abs().sum() > 0
    reader.config.bptt_segments = 1  # detach every segment: nothing flows back
    assert grads()[:, :SEG].abs().sum() == 0
    reader.config.bptt_segments = None
    reader.config.memory_search = False  # stage 1: P_n = M_{n-1}, still a path from segment 1
    assert grads()[:, :SEG].abs().sum() > 0
    assert reader.w_q.weight.grad is None or reader.w_q.weight.grad.abs().sum() == 0
    reader.config.memory_search = True
    reader.disable_memory()  # no memory: only the sensory tokens link segments, and k < L
    assert grads()[:, :SEG].abs().sum() == 0


def test_search_target_reports_its_log_weight_and_teacher_forcing_reads_that_memory(monkeypatch):
    import ragkit.memory.hmt as hmt_module

    reader = reader_for(tiny_backbone())  # N = 3 memories
    x = ids(4 * SEG, batch=2)
    target = torch.tensor([0, 2])  # segment 0 for row 0, segment 2 for row 1
    logits = reader(x, search_target=target)
    weights = reader.last_weights[:, 0]  # (2, 3): the last segment's search over the memories of segments 0-2
    torch.testing.assert_close(reader.target_log_weight.detach(), weights[torch.arange(2), target].log())
    assert reader.target_log_weight.requires_grad  # a loss on it trains the search
    torch.testing.assert_close(logits, reader(x))  # naming a target alone changes nothing read
    forced = reader(x, search_target=target, teacher_search=True)
    torch.testing.assert_close(forced[:, : 3 * SEG], logits[:, : 3 * SEG])  # only the last segment is forced
    assert not torch.allclose(forced[:, 3 * SEG :], logits[:, 3 * SEG :])

    real, searches = hmt_module.memory_search, []

    def pick_the_target_last(query, memories, w_q, w_k):  # segments 1, 2, 3 search; the third is the last
        p, w = real(query, memories, w_q, w_k)
        searches.append(1)
        return (memories[torch.arange(2), target][:, None] if len(searches) == 3 else p), w

    monkeypatch.setattr(hmt_module, "memory_search", pick_the_target_last)
    torch.testing.assert_close(reader(x), forced)


def test_search_target_evicted_from_the_cache_has_no_log_weight():
    reader = reader_for(tiny_backbone())  # N = 3: the last of 5 segments searches segments 1-3
    reader(ids(5 * SEG, batch=2), search_target=torch.tensor([0, 3]))
    assert torch.isnan(reader.target_log_weight[0]) and torch.isfinite(reader.target_log_weight[1])
    with pytest.raises(ValueError, match="reset=True"):
        reader(ids(SEG), reset=False, search_target=torch.tensor([0]))


def test_adapter_round_trip(tmp_path):
    backbone = tiny_backbone("qwen2")
    saved = reader_for(backbone, seed=3, search_dim=8)
    folder = saved.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["hmt_adapter.safetensors", "hmt_config.json"]

    loaded = HMTLM(backbone, HMTConfig(segment_length=64)).eval()  # d_h = 32 until the adapter says otherwise
    loaded.load_adapter(folder)
    assert loaded.config == saved.config
    for a, b in zip(saved.adapter_parameters(), loaded.adapter_parameters()):
        assert torch.equal(a, b)
    x = ids(5 * SEG)
    with torch.no_grad():
        assert torch.equal(saved(x), loaded(x))

    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ModelLoadError):
        HMTLM(wider).load_adapter(folder)
    with pytest.raises(ModelLoadError):
        HMTLM(wider).load_adapter(tmp_path / "missing")


def test_generate_is_greedy_decoding_of_the_window_after_the_prefixs_memory():
    """The KV-cached answer equals an uncached greedy loop over [P ‖ the k tokens before the window ‖ window ‖ the
    answer so far], P searched by the window after the prefix was read; the window is not written into memory."""
    backbone = tiny_backbone()
    reader = reader_for(backbone)
    prompt = ids(3 * SEG, batch=2)
    new = reader.generate(prompt, max_new_tokens=5)
    assert reader.cache.shape == (2, 2, 32)  # the memories of the two prefix segments only
    embed = backbone.get_input_embeddings()
    reader.reset()
    with torch.no_grad():
        reader.read(prompt[:, : 2 * SEG])
        e = embed(prompt)
        p = reader._memory_prompt(e[:, 2 * SEG :])  # (2, 1, C): the window's search over the prefix's memories
        x = torch.cat([p, e[:, 2 * SEG - K : 2 * SEG], e[:, 2 * SEG :]], 1)
        greedy = []
        for _ in range(5):
            greedy.append(backbone(inputs_embeds=x).logits[:, -1].argmax(-1))  # (2,)
            x = torch.cat([x, embed(greedy[-1])[:, None]], 1)
        first = reader(prompt)[:, -1].argmax(-1)  # the segmented forward pass over the prompt
    assert torch.equal(new, torch.stack(greedy, 1))
    assert torch.equal(new[:, 0], first)
    eos = int(new[0, 0])
    assert reader.generate(prompt[:1], max_new_tokens=5, eos_token_id=eos).tolist() == [[eos]]


def test_generate_with_memory_disabled_is_the_backbone_on_the_last_window():
    backbone = tiny_backbone("qwen2")
    reader = reader_for(backbone)
    reader.disable_memory()
    prompt = ids(5 * SEG + 3)
    new = reader.generate(prompt, max_new_tokens=6)
    seq = prompt[:, -(SEG + K) :]  # the window and its sensory tokens
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, backbone(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(new, seq[:, SEG + K :])


def test_only_causal_lms_are_wrapped():
    with pytest.raises(ModelLoadError):
        HMTLM(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# several memory tokens per segment (memory_tokens = r > 1)

R = 2


def test_several_memory_tokens_write_distinct_memories_and_keep_the_cache_to_n_segments():
    reader = reader_for(tiny_backbone(), memory_tokens=R)
    x = ids(6 * SEG, batch=2)
    with torch.no_grad():
        reader.read(x[:, :SEG])
        assert reader.cache.shape == (2, R, 32) and reader.cached_segments() == 1
        first = reader.cache.clone()
        reader.read(x[:, SEG:])
        # segment 1 reads [P_1 ‖ H_1 ‖ P_1 + E_1 ‖ P_1 + E_2]; its memories are the last states at the write tokens
        p1 = reader.memory_init.view(1, 1, 32).expand(2, 1, 32)
        inputs = torch.cat([p1, reader.model.get_input_embeddings()(x[:, :SEG]), p1 + reader.memory_slots], 1)
        want = reader.model(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1][:, -R:]
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[:, 0], first[:, 1])  # the slot embeddings make the writes differ
    assert reader.cache.shape == (2, R * N, 32) and reader.cached_segments() == N
    assert reader.last_weights.shape == (2, 1, R * N)  # the search weighs every memory of the N segments
    assert reader.state_bytes() == 2 * (R * N * 32 * 4 + K * 32 * 4)
    assert len(reader.adapter_parameters()) == 5 and reader.memory_slots.shape == (R, 32)
    assert reader_for(tiny_backbone()).memory_slots is None  # r = 1: the paper's layout, no slot embeddings


def test_several_memory_tokens_stream_like_one_call_and_stage1_reads_their_mean():
    reader = reader_for(tiny_backbone(), memory_tokens=R)
    x = ids(4 * SEG, batch=2)
    with torch.no_grad():
        whole = reader(x)
        reader.reset()
        reader.read(x[:, : 2 * SEG])
        torch.testing.assert_close(reader(x[:, 2 * SEG :], reset=False), whole[:, 2 * SEG :], atol=1e-5, rtol=1e-5)
        reader.config.memory_search = False
        reader.reset()
        reader.read(x[:, :SEG])
        mean = reader.cache.mean(dim=1, keepdim=True)  # (2, 1, C)
        torch.testing.assert_close(reader._memory_prompt(reader._embed(x[:, SEG : 2 * SEG])), mean)


def test_several_memory_tokens_search_target_sums_its_segments_memories_and_teacher_reads_their_mix(monkeypatch):
    import ragkit.memory.hmt as hmt_module

    reader = reader_for(tiny_backbone(), memory_tokens=R)
    x = ids(4 * SEG, batch=2)
    target = torch.tensor([0, 2])
    logits = reader(x, search_target=target)
    weights = reader.last_weights[:, 0]  # (2, R·3)
    chosen = torch.stack([weights[i, R * t : R * t + R] for i, t in enumerate(target.tolist())])  # (2, R)
    torch.testing.assert_close(reader.target_log_weight.detach(), chosen.sum(1).log())
    forced = reader(x, search_target=target, teacher_search=True)
    torch.testing.assert_close(forced[:, : 3 * SEG], logits[:, : 3 * SEG])
    assert not torch.allclose(forced[:, 3 * SEG :], logits[:, 3 * SEG :])

    real, searches = hmt_module.memory_search, []

    def mix_of_the_target_last(query, memories, w_q, w_k):  # the target's memories, by the search's own weights
        p, w = real(query, memories, w_q, w_k)
        searches.append(1)
        if len(searches) < 3:
            return p, w
        mine = torch.stack([memories[i, R * t : R * t + R] for i, t in enumerate(target.tolist())])  # (2, R, C)
        share = torch.stack([w[i, 0, R * t : R * t + R] for i, t in enumerate(target.tolist())])  # (2, R)
        return (share / share.sum(1, keepdim=True))[:, None] @ mine, w

    monkeypatch.setattr(hmt_module, "memory_search", mix_of_the_target_last)
    torch.testing.assert_close(reader(x), forced)


def test_several_memory_tokens_adapter_round_trip_and_positions(tmp_path):
    backbone = tiny_backbone("qwen2")
    saved = reader_for(backbone, seed=3, memory_tokens=R)
    folder = saved.save_adapter(tmp_path / "adapter")
    loaded = HMTLM(backbone, HMTConfig(segment_length=64)).eval()  # r = 1 until the adapter says otherwise
    loaded.load_adapter(folder)
    assert loaded.config == saved.config and loaded.config.memory_tokens == R
    for a, b in zip(saved.adapter_parameters(), loaded.adapter_parameters(), strict=True):
        assert torch.equal(a, b)
    x = ids(4 * SEG)
    with torch.no_grad():
        assert torch.equal(saved(x), loaded(x))
    back = reader_for(backbone).save_adapter(tmp_path / "one")  # and back to r = 1: no slots left over
    loaded.load_adapter(back)
    assert loaded.memory_slots is None and len(loaded.adapter_parameters()) == 4

    from ragkit.errors import ConfigError

    assert HMTConfig(segment_length=SEG, sensory_tokens=K, memory_tokens=3).positions == SEG + K + 3 + 1
    with pytest.raises(ConfigError, match="memory_tokens"):
        HMTConfig(memory_tokens=0)
    with pytest.raises(ConfigError, match="positions"):
        HMTLM(backbone, HMTConfig(segment_length=500, sensory_tokens=8, memory_tokens=4))  # 513 > 512


def test_search_slot_names_one_memory_of_the_segment_and_teacher_forcing_reads_it(monkeypatch):
    import ragkit.memory.hmt as hmt_module

    reader = reader_for(tiny_backbone(), memory_tokens=R)
    x = ids(4 * SEG, batch=2)
    target, slot = torch.tensor([0, 2]), torch.tensor([1, 0])  # memory 1 of segment 0, memory 0 of segment 2
    logits = reader(x, search_target=target, search_slot=slot)
    weights = reader.last_weights[:, 0]  # (2, R·3)
    torch.testing.assert_close(reader.target_log_weight.detach(), weights[torch.arange(2), R * target + slot].log())
    forced = reader(x, search_target=target, teacher_search=True, search_slot=slot)
    assert not torch.allclose(forced[:, 3 * SEG :], logits[:, 3 * SEG :])

    real, searches = hmt_module.memory_search, []

    def pick_that_memory_last(query, memories, w_q, w_k):
        p, w = real(query, memories, w_q, w_k)
        searches.append(1)
        return (memories[torch.arange(2), R * target + slot][:, None] if len(searches) == 3 else p), w

    monkeypatch.setattr(hmt_module, "memory_search", pick_that_memory_last)
    torch.testing.assert_close(reader(x), forced)
