"""Infini-attention reader: a Hugging Face Llama-family causal LM whose attention also reads and writes a
compressive memory, so that it streams a document of any length with a state of constant size.

Infini-attention (Munkhdalai et al., arXiv 2404.07143, v2 equation numbers) splits the input into segments.
In each layer and segment s, every head mixes two reads with a learned gate β (one scalar per query head):

    A_dot = softmax(Q Kᵀ · scale) V                       causal, within the segment, RoPE as usual  (Eq. 6)
    A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1} + eps)           σ = ELU + 1 on PRE-RoPE Q                  (Eq. 7)
    A     = sigmoid(β) · A_mem + (1 - sigmoid(β)) · A_dot                                          (Eq. 10)

and then writes the segment into the memory, with pre-RoPE K (retrieve from M_{s-1} first, then update):

    linear: M_s = M_{s-1} + σ(K)ᵀ V                                                                (Eq. 8)
    delta:  M_s = M_{s-1} + σ(K)ᵀ (V - σ(K) M_{s-1} / (σ(K) z_{s-1} + eps))                        (Eq. 9)
    both:   z_s = z_{s-1} + Σ_t σ(K_t)

Choices where the paper is silent:
- Retrofit, not pretraining: `InfiniAttention` takes over the q/k/v/o projections of an existing Llama or Qwen2
  attention (Qwen2's q/k/v biases come with them), its head counts, its scaling and the rotary (cos, sin) the
  backbone passes down. The backbone's state_dict keys are unchanged; only `self_attn.gate` is added.
- GQA: one memory M (d × d) and normaliser z (d) per KEY/VALUE head; each query head reads its group's memory.
- Positions restart at 0 in every segment (RoPE is relative, so any segment no longer than the backbone's window
  is in distribution). With the gate shut, segment s therefore gives exactly the backbone's logits for that
  segment fed alone.
- The first segment has no memory: its retrieval is skipped (A = A_dot), so at β₀ = logit(0.01) the model starts
  within 1% of the pretrained one.
- M and z are kept in fp32 whatever the model's dtype. They live on each layer's `InfiniAttention` as plain tensor
  attributes (not buffers: they are never saved), and are not detached between segments, so that gradients flow
  through memory (backpropagation through time); `InfiniLM.detach_state()` cuts the graph explicitly.
- Every call to `read` starts a new segment; a read whose length is a multiple of `segment_length` is the same as
  reading its segments one by one. Batches hold sequences of equal length (no padding masks), and Qwen2's
  optional sliding window is not applied (keep segments no longer than it).

The gates are the only new parameters: `save_adapter` writes them with the config as a small safetensors file
plus JSON, so that the backbone stays any HF causal LM id or local path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ragkit.errors import ConfigError, ModelLoadError
from ragkit.memory.base import MemoryLM


@dataclass
class InfiniConfig:
    segment_length: int = 2048  # tokens per segment; local attention never looks past its own segment (paper: 2048)
    update: Literal["linear", "delta"] = "linear"  # memory write rule: Eq. 8, or Eq. 9 that skips known bindings
    gate_init: float = -4.6  # β₀ of every head: sigmoid(-4.6) ≈ 0.01, so training starts near the backbone
    eps: float = 1e-6  # added to the retrieval denominator σ(Q)z, which is 0 for keys the memory never saw
    bptt_segments: int | None = None  # forward() detaches the memory every this many segments; None: never

    def __post_init__(self) -> None:
        if self.segment_length < 1:
            raise ConfigError(f"segment_length must be at least 1, got {self.segment_length}")
        if self.update not in ("linear", "delta"):
            raise ConfigError(f"update must be 'linear' or 'delta', got {self.update!r}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if self.bptt_segments is not None and self.bptt_segments < 1:
            raise ConfigError(f"bptt_segments must be at least 1 or None, got {self.bptt_segments}")

    @property
    def positions(self) -> int:
        """Positions of one backbone pass: a segment."""
        return self.segment_length


# ----------------------------------------------------------------------------------------------------------------
# the pieces of one Infini-attention layer, as plain functions


def logit(p: float) -> float:
    """The inverse of sigmoid: the gate_init that opens a gate to p (logit(0.01) ≈ -4.6)."""
    return math.log(p / (1.0 - p))


def elu1(x: Tensor) -> Tensor:
    """σ(x) = ELU(x) + 1: positive features for linear attention (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as Llama and Qwen2 apply it. x: (b, h, n, d); cos, sin: (b, n, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b, 1, n, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def retrieve(s: Tensor, memory: Tensor, normalizer: Tensor, eps: float) -> Tensor:
    """σ(Q) M / (σ(Q) z + eps). s: (..., n, d_k) features; memory: (..., d_k, d_v); normalizer: (..., d_k)."""
    return (s @ memory) / (s @ normalizer.unsqueeze(-1) + eps)  # (..., n, d_v)


def write(memory: Tensor | None, normalizer: Tensor | None, s: Tensor, v: Tensor, rule: str,
          eps: float) -> tuple[Tensor, Tensor]:
    """One segment's memory update. s: (b, h, n, d_k) key features; v: (b, h, n, d_v); memory: (b, h, d_k, d_v)
    or None when empty; normalizer: (b, h, d_k) or None. Returns the new (memory, normalizer)."""
    if memory is None:  # M_0 = 0, z_0 = 0: the delta rule's retrieval is 0 there, so both rules agree
        return s.transpose(-2, -1) @ v, s.sum(dim=-2)
    if rule == "delta":
        v = v - retrieve(s, memory, normalizer, eps)  # only what the memory does not already return for these keys
    return memory + s.transpose(-2, -1) @ v, normalizer + s.sum(dim=-2)


def local_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float) -> Tensor:
    """Causal softmax attention with torch SDPA. q: (b, H, n_q, d); k, v: (b, H_kv, n_k, d), where the last n_q
    keys belong to the queries and the earlier ones come from the KV cache. Returns (b, H, n_q, d)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    mask = None
    if 1 < n_q < n_k:  # a chunk of queries after cached keys: query i sees keys up to n_k - n_q + i
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and n_q == n_k and n_q > 1,
                                          dropout_p=dropout, scale=scale, enable_gqa=True)


# ----------------------------------------------------------------------------------------------------------------
# the attention module that replaces each decoder layer's self_attn


class InfiniAttention(nn.Module):
    """Drop-in for a Llama/Qwen2 `self_attn`: causal attention within the segment, mixed by a learned gate per
    query head with a read from the compressive memory of the segments before it."""

    def __init__(self, attn: nn.Module, config: InfiniConfig) -> None:
        super().__init__()
        # the backbone's own projections (Qwen2: q/k/v with biases), head layout and scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.layer_idx: int = attn.layer_idx
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.attention_dropout: float = attn.attention_dropout
        self.n_head: int = attn.config.num_attention_heads
        self.n_kv_head: int = attn.config.num_key_value_heads
        self.infini = config
        # β, one per query head, in fp32 on the backbone's device
        self.gate = nn.Parameter(torch.full((self.n_head,), config.gate_init, dtype=torch.float32,
                                            device=attn.q_proj.weight.device))
        self.write_memory = True  # False while generating: the local window is read, never written
        self.gate_shut = False  # True: A = A_dot exactly (the backbone's own attention), for ablations and tests
        self.memory: Tensor | None = None  # (b, H_kv, d, d) fp32, M_{s-1}; None before the first segment
        self.normalizer: Tensor | None = None  # (b, H_kv, d) fp32, z_{s-1}

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Tensor | None = None, past_key_values: Any = None,
                cache_position: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        """One segment (or, while generating, the next tokens of the local window). hidden_states: (b, n, C).
        The backbone's causal mask is not used: SDPA builds its own (sequences are unpadded)."""
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (b, H, n, d)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (b, H_kv, n, d)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)  # (b, H_kv, n, d)

        # local path: the backbone's attention within the segment, with its RoPE and (while generating) KV cache
        cos, sin = position_embeddings  # (b, n, d) each
        q_rot, k_rot, v_loc = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        if past_key_values is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            k_rot, v_loc = past_key_values.update(k_rot, v, self.layer_idx, cache_kwargs)  # (b, H_kv, n_k, d)
        dropout = self.attention_dropout if self.training else 0.0
        out = local_attention(q_rot, k_rot, v_loc, self.scaling, dropout)  # (b, H, n, d)

        # memory path: pre-RoPE Q and K, in fp32; read M_{s-1}, then write this segment
        if self.memory is not None and self.memory.shape[0] != b:
            raise ValueError(f"the memory holds a batch of {self.memory.shape[0]}, got {b}: call reset() first")
        if self.memory is not None and not self.gate_shut:
            group = self.n_head // self.n_kv_head  # query heads per KV head, in repeat_kv order
            s_q = elu1(q.float()).view(b, self.n_kv_head, group, n, self.head_dim)  # (b, H_kv, G, n, d)
            a_mem = retrieve(s_q, self.memory[:, :, None], self.normalizer[:, :, None], self.infini.eps)
            a_mem = a_mem.view(b, self.n_head, n, self.head_dim)  # (b, H, n, d)
            g = torch.sigmoid(self.gate.float()).view(1, self.n_head, 1, 1)
            out = (g * a_mem + (1.0 - g) * out.float()).to(out.dtype)  # (b, H, n, d)
        if self.write_memory:
            s_k = elu1(k.float())  # (b, H_kv, n, d)
            self.memory, self.normalizer = write(self.memory, self.normalizer, s_k, v.float(), self.infini.update,
                                                 self.infini.eps)

        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, n, H * d)
        return self.o_proj(out), None

    def reset(self) -> None:
        """Forget the memory."""
        self.memory = self.normalizer = None

    def detach_state(self) -> None:
        """Keep the memory's values but cut its autograd history (truncated backpropagation through time)."""
        if self.memory is not None:
            self.memory, self.normalizer = self.memory.detach(), self.normalizer.detach()

    def state_bytes(self) -> int:
        """Bytes of the carried state (M and z)."""
        if self.memory is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.memory, self.normalizer))


# ----------------------------------------------------------------------------------------------------------------
# the reader: a causal LM with every attention replaced, streamed segment by segment


class InfiniLM(MemoryLM):
    """A Hugging Face Llama-family causal LM (LlamaForCausalLM, Qwen2ForCausalLM, …) with Infini-attention in every
    layer. The model is changed in place: each `self_attn` is replaced, its weights kept."""

    kind = "infini"
    label = "Infini-attention"
    config_class = InfiniConfig
    adapter_weights = "infini_adapter.safetensors"
    adapter_config = "infini_config.json"
    tiny_defaults = {"gate_init": 0.0}  # from scratch, the gates start half open: sigmoid(0) = 0.5

    def __init__(self, model: nn.Module, config: InfiniConfig | None = None) -> None:
        super().__init__()
        self.config = config or InfiniConfig()
        self.model = model
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or not all(_is_llama_attention(layer.self_attn) for layer in layers):
            raise ModelLoadError(f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers[i]."
                                 "self_attn with q/k/v/o projections): the Infini-attention reader cannot wrap it")
        for layer in layers:
            layer.self_attn = InfiniAttention(layer.self_attn, self.config)

    @property
    def layers(self) -> list[InfiniAttention]:
        """The Infini-attention module of every layer, in order."""
        return [layer.self_attn for layer in self.model.model.layers]

    # --- state -------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything read so far."""
        for attn in self.layers:
            attn.reset()

    def detach_state(self) -> None:
        """Cut the memory's autograd history, keeping its values."""
        for attn in self.layers:
            attn.detach_state()

    def state_bytes(self) -> int:
        """Bytes of the carried state: batch × layers × H_kv × d × (d + 1) × 4 once anything was read, whatever
        the length read."""
        return sum(attn.state_bytes() for attn in self.layers)

    def shut_gates(self, shut: bool = True) -> None:
        """Shut (or reopen) every memory gate: shut, each segment gets exactly the backbone's own attention."""
        for attn in self.layers:
            attn.gate_shut = shut

    def gate_values(self) -> Tensor:
        """sigmoid(β) of every head, (layers, H): the share of each head's output read from memory."""
        return torch.stack([torch.sigmoid(attn.gate.detach().float()) for attn in self.layers])

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates β, one tensor of H per layer: their own optimizer group (high LR, no decay)."""
        return [attn.gate for attn in self.layers]

    # --- reading -----------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                reset: bool = True) -> Tensor:
        """Logits (b, n, V) for a whole sequence, processed segment by segment, with gradients through the memory
        (truncated every `bptt_segments` segments if set). input_ids: (b, n), or inputs_embeds: (b, n, C).
        With reset=False the sequence continues what was read before."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if reset:
            self.reset()
        tokens = input_ids if input_ids is not None else inputs_embeds
        logits = []
        for i, seg in enumerate(self.segments(tokens.shape[1])):
            if self.config.bptt_segments and i > 0 and i % self.config.bptt_segments == 0:
                self.detach_state()
            logits.append(self._segment(tokens[:, seg], embeds=inputs_embeds is not None))  # (b, N, V)
        return torch.cat(logits, dim=1)  # (b, n, V)

    @torch.no_grad()
    def read(self, input_ids: Tensor) -> Tensor:
        """Stream input_ids (b, n) into memory, segment by segment, after what was read before; keeps only
        (M, z) per layer. Returns the logits of the last segment read, (b, N_last, V)."""
        logits = None
        for seg in self.segments(input_ids.shape[1]):
            logits = self._segment(input_ids[:, seg])
        self.detach_state()
        if logits is None:
            raise ValueError("read() needs at least one token")
        return logits

    def _segment(self, tokens: Tensor, embeds: bool = False) -> Tensor:
        """One segment through the backbone, positions from 0, no KV cache; writes it into memory."""
        if embeds:
            return self.model(inputs_embeds=tokens, use_cache=False).logits
        return self.model(input_ids=tokens, use_cache=False).logits

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """The final window and the answer read the memory but never write it."""
        for attn in self.layers:
            attn.write_memory = False
        try:
            yield
        finally:
            for attn in self.layers:
                attn.write_memory = True

    def open_window(self, window_ids: Tensor, cache: Any) -> Tensor:
        """The window (b, w) as one local segment, however long: exact causal attention (positions from 0) mixed
        with a read of the memory. With the gates shut this is the backbone's own reading of the window."""
        return self.model(input_ids=window_ids, past_key_values=cache, use_cache=True).logits[:, -1]

    # --- the adapter: gates and config, apart from the backbone -------------------------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        return self.gate_parameters()

    def adapter_names(self) -> list[str]:
        return [f"layers.{i}.gate" for i in range(len(self.layers))]

    def adapter_shape(self) -> dict[str, Any]:
        return {"num_layers": len(self.layers), "num_attention_heads": self.layers[0].n_head}

    def restore(self, config: InfiniConfig, tensors: dict[str, Tensor], folder: Any) -> None:
        super().restore(config, tensors, folder)
        for attn in self.layers:
            attn.infini = config

    def optimizer_groups(self, lr: float, gate_lr: float, adapter_lr: float | None) -> list[dict[str, Any]]:
        gates = [p for p in self.gate_parameters() if p.requires_grad]
        return [{"params": gates, "weight_decay": 0.0, "base_lr": gate_lr, "name": "gates"}] if gates else []


def _is_llama_attention(attn: nn.Module) -> bool:
    """Whether `attn` looks like LlamaAttention / Qwen2Attention (and is not wrapped yet)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "scaling", "attention_dropout", "config")
    return not isinstance(attn, InfiniAttention) and all(hasattr(attn, name) for name in names)
