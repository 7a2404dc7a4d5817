"""HMT reader: a Hugging Face causal LM, left unchanged, wrapped in the Hierarchical Memory Transformer, so that it
streams a document of any length with a state of bounded size.

HMT (He et al., arXiv 2405.06067, §3) splits the input into segments of L tokens. For segment n, with token
embeddings H_n (b, L, C) from the backbone's own embedding layer, it runs four steps:

    S_n = BBM([T ‖ H_n[0, j) ‖ T])[trailing T]          representation extraction, j = L/2       (Eq. 1)
    P_n = softmax((S_n W_q)(M W_k)ᵀ / √d_h) M            memory search over the last N memories   (Eqs. 2-3)
    H   = BBM([P_n ‖ H_{n-1}[L-k, L) ‖ H_n ‖ P_n])       sensory memory: the previous k tokens    (Eq. 4)
    logits_n = H[positions of H_n],  M_n = H[trailing P_n] → pushed into the cache M               (Eq. 5)

BBM is the backbone read with `inputs_embeds` and the last layer's hidden state (`output_hidden_states=True`,
after the final norm) is what S_n and M_n are. T (the summary prompt), W_q, W_k and the initial memory are the
only new parameters; the memory embedding M_n, a last-layer state, is fed back as an input embedding, which is
why the paper fine-tunes the backbone with them.

Choices where the paper is silent (as in the official code, OswaldHe/HMT-pytorch, unless said otherwise):
- Every segment is an independent backbone pass with positions from 0, so the backbone never sees more than
  L + k + 2 positions: no positional extrapolation. The trailing P_n comes last, so the causal mask keeps it out
  of the segment's logits: they equal the backbone reading [P_n ‖ sensory ‖ H_n].
- Empty cache (the first segment): P_1 is a learned initial memory embedding (official code: randn · std of the
  embedding table, as T). Searching a cache of one memory returns that memory.
- `memory_search=False` is the paper's training stage 1: no search, P_n = M_{n-1} (the RMT recurrence; the
  initial memory for the first segment).
- `disable_memory(True)` is the ablation "no memory at all": no P_n tokens, no summary pass, no cache write.
  Segment n is then exactly the backbone reading [sensory ‖ H_n] alone; the sensory tokens stay.
- Sensory memory: the last k token embeddings of everything read before the segment (for full segments with
  L ≥ k, the last k tokens of the previous segment, as in the paper). They are kept as embeddings, not ids, so
  `inputs_embeds` and gradients work.
- A partial last segment of m < L tokens is summarized from its first min(j, m) tokens (official code too).
- The cache holds at most N memories, oldest dropped first; memories, the search and the new parameters are
  fp32 whatever the backbone's dtype (P_n is cast to the backbone's dtype when fed; casting the wrapper itself
  with `.to(dtype)` casts the new parameters too), and the cache lives on the backbone's device (the official
  code moves it to CPU and back every segment).
- The search divides by √d_h in training and generation alike (the official code divides by d_h for d ≥ 4096
  outside `generate`, a train/inference mismatch that is not copied).
- Several memory tokens per segment (`memory_tokens` = r > 1; the paper has one): the segment's pass ends with r
  write tokens P_n + E_i, E_1 … E_r learned slot embeddings (r, C), and their r last-layer states are all cached,
  so that facts of one segment need not share one vector. The cache then holds r memories for each of the last N
  segments; the search still returns one P_n, a convex combination over all of them. Without search (stage 1),
  P_n is the mean of the previous segment's r memories. r = 1 is the paper's layout exactly (no slot embeddings).
- The state (cache and sensory embeddings) is not detached between segments, so that gradients flow through
  memory (backpropagation through time); `detach_state()` cuts the graph explicitly. Batches hold sequences of
  equal length (no padding masks); every call to `read` starts a new segment.

The new parameters are saved apart from the backbone as a small safetensors file plus JSON, so that the backbone
stays any HF causal LM id or local path.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ragkit.errors import ConfigError, ModelLoadError
from ragkit.memory.base import MemoryLM

ADAPTER_TENSORS = ("prompt", "memory_init", "w_q", "w_k", "memory_slots")  # as adapter_parameters() orders them


@dataclass
class HMTConfig:
    segment_length: int = 1024  # L, tokens per segment; each backbone pass reads L + k + 2 positions (paper: 1024)
    sensory_tokens: int = 32  # k, raw token embeddings carried over from before the segment (paper: 32, Table 8)
    cache_size: int = 300  # N, memory embeddings kept for the search, oldest dropped first (paper: 300 or 400)
    search_dim: int | None = None  # d_h, width of W_q and W_k; None: the backbone's embedding width (7B paper: 4096)
    summary_fraction: float = 0.5  # j = round(L × this): the share of a segment read to make its query S_n (0.5)
    memory_search: bool = True  # False: P_n = M_{n-1}, no search (training stage 1: 2 segments, no retrieval)
    bptt_segments: int | None = None  # forward() detaches the state every this many segments; None: never
    memory_tokens: int = 1  # r, memories written per segment (paper: 1); the cache holds r × N of them

    def __post_init__(self) -> None:
        if self.segment_length < 1:
            raise ConfigError(f"segment_length must be at least 1, got {self.segment_length}")
        if self.sensory_tokens < 0:
            raise ConfigError(f"sensory_tokens must be 0 or more, got {self.sensory_tokens}")
        if self.cache_size < 1:
            raise ConfigError(f"cache_size must be at least 1, got {self.cache_size}")
        if self.search_dim is not None and self.search_dim < 1:
            raise ConfigError(f"search_dim must be at least 1 or None, got {self.search_dim}")
        if not 0.0 < self.summary_fraction <= 1.0:
            raise ConfigError(f"summary_fraction must be in (0, 1], got {self.summary_fraction}")
        if self.bptt_segments is not None and self.bptt_segments < 1:
            raise ConfigError(f"bptt_segments must be at least 1 or None, got {self.bptt_segments}")
        if self.memory_tokens < 1:
            raise ConfigError(f"memory_tokens must be at least 1, got {self.memory_tokens}")

    @property
    def positions(self) -> int:
        """Positions of one backbone pass: [P_n ‖ k sensory ‖ L segment ‖ r write tokens]."""
        return self.segment_length + self.sensory_tokens + self.memory_tokens + 1

    @property
    def summary_length(self) -> int:
        """j: tokens of a full segment read by the representation extraction."""
        return max(1, round(self.segment_length * self.summary_fraction))


# ----------------------------------------------------------------------------------------------------------------
# memory search, as a plain function


def memory_search(query: Tensor, memories: Tensor, w_q: Tensor, w_k: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-attention from S_n to the cached memories, without value or output projection (Eqs. 2-3).
    query: (b, 1, C) S_n; memories: (b, m, C); w_q, w_k: (d_h, C) as nn.Linear weights.
    Returns P_n (b, 1, C), a convex combination of the memories, and its weights (b, 1, m)."""
    q = query @ w_q.t()  # (b, 1, d_h)
    k = memories @ w_k.t()  # (b, m, d_h)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(w_q.shape[0]), dim=-1)  # (b, 1, m)
    return weights @ memories, weights  # (b, 1, C), (b, 1, m)


def cache_index(segment: Tensor, current: int, cached: int) -> Tensor:
    """Where the memory of `segment` (b,) sits in the cache searched by segment `current` of one stream, the cache
    holding the memories of the `cached` segments just before it, oldest first; -1 where it was evicted."""
    index = segment - (current - cached)  # (b,)
    return torch.where((index >= 0) & (index < cached), index, -1)


# ----------------------------------------------------------------------------------------------------------------
# the reader: an unchanged causal LM, streamed segment by segment through HMT's memory


class HMTLM(MemoryLM):
    """A Hugging Face causal LM (Llama, Qwen2, SmolLM, OPT, …) wrapped in HMT. The backbone is not modified: it is
    only ever called with `inputs_embeds`."""

    kind = "hmt"
    label = "HMT"
    config_class = HMTConfig
    adapter_weights = "hmt_adapter.safetensors"
    adapter_config = "hmt_config.json"
    tiny_defaults = {"sensory_tokens": 8, "cache_size": 64}  # sized for the synthetic tasks' short sequences

    def __init__(self, model: nn.Module, config: HMTConfig | None = None) -> None:
        super().__init__()
        self.config = config or HMTConfig()
        self.model = model
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if weight is None or weight.dim() != 2 or not hasattr(model, "config"):
            raise ModelLoadError(f"{type(model).__name__} is not a Hugging Face causal LM with an input embedding "
                                 "table: the HMT reader cannot wrap it")
        self.dim: int = weight.shape[1]  # C, the embedding width (OPT: word_embed_proj_dim)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and self.config.positions > max_positions:
            raise ConfigError(f"segment_length + sensory_tokens + memory_tokens + 1 = {self.config.positions} "
                              f"exceeds the backbone's {max_positions} positions")
        # new parameters, fp32 on the backbone's device; T and the initial memory start at the embeddings' scale
        std = float(weight.detach().float().std())
        kw = {"device": weight.device, "dtype": torch.float32}
        self.prompt = nn.Parameter(torch.randn(self.dim, **kw) * std)  # T, the summary prompt (C,)
        self.memory_init = nn.Parameter(torch.randn(self.dim, **kw) * std)  # P_1 while the cache is empty (C,)
        d_h = self.config.search_dim or self.dim
        self.w_q = nn.Linear(self.dim, d_h, bias=False, **kw)  # S_n → query (C → d_h)
        self.w_k = nn.Linear(self.dim, d_h, bias=False, **kw)  # memory → key (C → d_h)
        r = self.config.memory_tokens  # E_1 … E_r, told apart from the start: unit-scale random directions
        self.memory_slots = nn.Parameter(torch.randn(r, self.dim, **kw) * std) if r > 1 else None  # (r, C)
        self.memory_disabled = False  # True: no P_n tokens at all (ablations); see the module docstring
        self.cache: Tensor | None = None  # (b, ≤ r·N, C) fp32, the last N segments' r memories each, oldest first
        self.sensory: Tensor | None = None  # (b, ≤ k, C) backbone dtype, the last k token embeddings read
        self.last_weights: Tensor | None = None  # (b, 1, m) the latest search's weights over the cache, detached
        self.target_log_weight: Tensor | None = None  # (b,) log-weight of the search target (forward's search_target)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    # --- state -------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything read so far."""
        self.cache = self.sensory = self.last_weights = self.target_log_weight = None

    def detach_state(self) -> None:
        """Cut the state's autograd history, keeping its values."""
        if self.cache is not None:
            self.cache = self.cache.detach()
        if self.sensory is not None:
            self.sensory = self.sensory.detach()

    def cached_segments(self) -> int:
        """How many segments' memories the cache holds now (r memories each)."""
        return 0 if self.cache is None else self.cache.shape[1] // self.config.memory_tokens

    def state_bytes(self) -> int:
        """Bytes of the carried state, whatever the length read:
        batch × (≤ r·N memories × C × 4 + ≤ k sensory embeddings × C × the backbone's dtype size)."""
        return sum(t.numel() * t.element_size() for t in (self.cache, self.sensory) if t is not None)

    def disable_memory(self, disabled: bool = True) -> None:
        """Turn the memory off (or back on): off, no P_n tokens are read or written and each segment is exactly
        the backbone reading [sensory tokens ‖ segment]."""
        self.memory_disabled = disabled

    def shut_gates(self, shut: bool = True) -> None:
        """`disable_memory` under InfiniLM's name, so that code written for either reader runs the ablation."""
        self.disable_memory(shut)

    def search_hits(self, key_segment: Tensor, prefix_segments: int, key_slot: Tensor | None = None) -> Tensor | None:
        """(b,) bool: did the latest memory search weigh the asked fact's memory highest: memory `key_slot` (b,) of
        segment `key_segment` (b,), or with key_slot None any memory of that segment? The cache holds the r memories
        each of the last m ≤ N of the `prefix_segments` segments read, oldest first. None without a search
        (memory_search off, the memory disabled, nothing cached)."""
        weights = self.last_weights
        if weights is None or not self.config.memory_search or self.memory_disabled:
            return None
        r = self.config.memory_tokens  # memories per segment
        index = cache_index(key_segment.to(weights.device), prefix_segments, weights.shape[-1] // r)  # (b,), -1: gone
        best = weights[:, 0].argmax(dim=-1)  # (b,)
        if key_slot is None:
            return ((index >= 0) & (best // r == index)).cpu()
        return ((index >= 0) & (best == index * r + key_slot.to(best.device))).cpu()

    # --- one segment -------------------------------------------------------------------------------------------

    def _embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (b, n, C)

    def _last_hidden(self, inputs_embeds: Tensor) -> Tensor:
        """The backbone's last-layer hidden state at the last position, fp32. inputs_embeds: (b, n, C)."""
        kwargs = {"logits_to_keep": 1} if self._keep else {}
        out = self.model(inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=True, **kwargs)
        return out.hidden_states[-1][:, -1:].float()  # (b, 1, C)

    def _memory_prompt(self, h: Tensor, target: Tensor | None = None, teacher: bool = False) -> Tensor | None:
        """P_n for a segment with embeddings h (b, m, C): fp32 (b, 1, C), or None with the memory disabled.
        target (b, t): the cache indices of the memories this search should find (a row of -1: evicted); the log
        of their total weight goes to `target_log_weight`, and with `teacher` P_n is made of them alone where they
        are cached (t > 1: their mix by the search's weights, renormalised among them)."""
        if self.memory_disabled:
            return None
        b = h.shape[0]
        if self.cache is not None and self.cache.shape[0] != b:
            raise ValueError(f"the memory holds a batch of {self.cache.shape[0]}, got {b}: call reset() first")
        if self.cache is None:
            return self.memory_init.view(1, 1, -1).expand(b, 1, self.dim)
        r = self.config.memory_tokens
        if not self.config.memory_search:
            return self.cache[:, -r:].mean(dim=1, keepdim=True)  # M_{n-1} (the mean of its r memories)
        t = self.prompt.to(h.dtype).view(1, 1, -1).expand(b, 1, self.dim)  # (b, 1, C)
        s = self._last_hidden(torch.cat([t, h[:, : self.config.summary_length], t], dim=1))  # S_n (b, 1, C)
        p, weights = memory_search(s, self.cache, self.w_q.weight.float(), self.w_k.weight.float())
        self.last_weights = weights.detach()
        if target is not None:
            cached = target[:, 0] >= 0  # (b,)
            index = target.clamp(min=0)  # (b, t)
            chosen = weights[:, 0].gather(1, index)  # (b, t)
            self.target_log_weight = torch.where(cached, chosen.sum(1).clamp_min(1e-12).log(), torch.nan)
            if teacher:
                found = self.cache.gather(1, index[..., None].expand(*index.shape, self.dim))  # (b, t, C)
                mix = chosen / chosen.sum(1, keepdim=True).clamp_min(1e-12)  # (b, t)
                p = torch.where(cached[:, None, None], mix[:, None] @ found, p)  # (b, 1, C)
        return p  # (b, 1, C)

    def _inputs(self, p: Tensor | None, h: Tensor, trailing: bool) -> tuple[Tensor, int]:
        """[P_n ‖ sensory ‖ h (‖ r write tokens)] as backbone input embeddings, and where h starts in it."""
        parts = [] if p is None else [p.to(h.dtype)]
        if self.sensory is not None:
            parts.append(self.sensory)
        start = sum(x.shape[1] for x in parts)
        parts.append(h)
        if trailing and p is not None:
            writes = p if self.memory_slots is None else p + self.memory_slots  # (b, r, C)
            parts.append(writes.to(h.dtype))
        return torch.cat(parts, dim=1), start

    def _remember(self, h: Tensor) -> None:
        """Keep the last k token embeddings read, h (b, m, C) being the newest."""
        k = self.config.sensory_tokens
        if k:
            self.sensory = (h if self.sensory is None else torch.cat([self.sensory, h], dim=1))[:, -k:]

    def _segment(self, h: Tensor, target: Tensor | None = None, teacher: bool = False) -> Tensor:
        """One segment of embeddings h (b, m, C): logits (b, m, V); pushes M_n into the cache. target, teacher:
        see `_memory_prompt`."""
        p = self._memory_prompt(h, target, teacher)  # (b, 1, C) or None
        x, start = self._inputs(p, h, trailing=True)  # (b, 1 + s + m + r, C)
        out = self.model(inputs_embeds=x, use_cache=False, output_hidden_states=p is not None)
        logits = out.logits[:, start : start + h.shape[1]]  # (b, m, V)
        if p is not None:
            m_n = out.hidden_states[-1][:, -self.config.memory_tokens :].float()  # M_n at the write tokens (b, r, C)
            cache = m_n if self.cache is None else torch.cat([self.cache, m_n], dim=1)
            self.cache = cache[:, -self.config.cache_size * self.config.memory_tokens :]  # (b, ≤ r·N, C)
        self._remember(h)
        return logits

    # --- reading -----------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, reset: bool = True,
                search_target: Tensor | None = None, teacher_search: bool = False,
                search_slot: Tensor | None = None) -> Tensor:
        """Logits (b, n, V) for a whole sequence, processed segment by segment, with gradients through the memory
        (truncated every `bptt_segments` segments if set). input_ids: (b, n), or inputs_embeds: (b, n, C).
        With reset=False the sequence continues what was read before.

        Training the search where the right memory is known (synthetic recall): search_target (b,) names the
        segment of this sequence (0-based) whose memory the last segment's search should find. Its log-weight is
        left in `target_log_weight` (b,), with gradients, NaN where that memory was evicted; with teacher_search
        the last segment reads that memory instead of the search's mix (teacher forcing). With r > 1 memories per
        segment, search_slot (b,) names which of that segment's memories holds the fact; without it any of them
        counts (their weights summed, their mix read)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if search_target is not None and not reset:
            raise ValueError("search_target counts segments from the start of this call: use reset=True")
        if reset:
            self.reset()
        self.target_log_weight = None
        h = self._embed(input_ids) if input_ids is not None else inputs_embeds  # (b, n, C)
        segments = self.segments(h.shape[1])
        logits = []
        for i, seg in enumerate(segments):
            if self.config.bptt_segments and i > 0 and i % self.config.bptt_segments == 0:
                self.detach_state()
            target = None
            if search_target is not None and i == len(segments) - 1:
                target = self._target_memories(cache_index(search_target, i, self.cached_segments()), search_slot)
            logits.append(self._segment(h[:, seg], target, teacher_search))  # (b, L, V)
        if search_target is not None and self.target_log_weight is None:
            raise ConfigError("search_target needs the memory search on and a memory cached before the last segment")
        return torch.cat(logits, dim=1)  # (b, n, V)

    def _target_memories(self, segment: Tensor, slot: Tensor | None) -> Tensor:
        """(b, t) cache indices of the target's memories: segment (b,) a cache segment index (-1: evicted), slot (b,)
        one of its r memories (t = 1) or None (all r of them); rows of -1 where evicted."""
        r = self.config.memory_tokens
        first = segment[:, None] * r  # (b, 1)
        index = first + (slot[:, None].to(first.device) if slot is not None else torch.arange(r, device=first.device))
        return torch.where(segment[:, None] >= 0, index, -1)  # (b, t)

    @torch.no_grad()
    def read(self, input_ids: Tensor) -> Tensor:
        """Stream input_ids (b, n) into memory, segment by segment, after what was read before; keeps only the
        cache and the sensory tokens. Returns the logits of the last segment read, (b, L_last, V)."""
        if input_ids.shape[1] == 0:
            raise ValueError("read() needs at least one token")
        for seg in self.segments(input_ids.shape[1]):  # embed one segment at a time: memory stays flat
            logits = self._segment(self._embed(input_ids[:, seg]))  # (b, L, V)
        self.detach_state()
        return logits

    def window_overhead(self) -> int:
        """A final window shares the backbone's positions with P_n and the sensory tokens."""
        return 1 + self.config.sensory_tokens

    def open_window(self, window_ids: Tensor, cache: Any) -> Tensor:
        """The window (b, w), however long, in one backbone pass as [P ‖ sensory ‖ window], P searched with the
        window's first j tokens; not written into memory. With the memory disabled this is the backbone's own
        reading of [sensory ‖ window]."""
        h = self._embed(window_ids)  # (b, w, C)
        x, _ = self._inputs(self._memory_prompt(h), h, trailing=False)  # (b, 1 + s + w, C)
        kwargs = {"logits_to_keep": 1} if self._keep else {}
        return self.model(inputs_embeds=x, past_key_values=cache, use_cache=True, **kwargs).logits[:, -1]

    # --- the adapter: new parameters and config, apart from the backbone ---------------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The new parameters T, the initial memory, W_q, W_k and the slot embeddings if r > 1."""
        slots = [] if self.memory_slots is None else [self.memory_slots]
        return [self.prompt, self.memory_init, self.w_q.weight, self.w_k.weight, *slots]

    def adapter_names(self) -> list[str]:
        return list(ADAPTER_TENSORS[: len(self.adapter_parameters())])

    def adapter_shape(self) -> dict[str, Any]:
        return {"embedding_dim": self.dim}

    def restore(self, config: HMTConfig, tensors: dict[str, Tensor], folder: Any) -> None:
        """Take `config`, rebuilding W_q, W_k and the slot embeddings in the saved shapes, and the tensors."""
        expected = set(ADAPTER_TENSORS if config.memory_tokens > 1 else ADAPTER_TENSORS[:-1])  # slots: r > 1 only
        if set(tensors) != expected:
            raise ModelLoadError(f"the HMT adapter in {folder} holds {', '.join(sorted(tensors))}; its config needs "
                                 f"{', '.join(sorted(expected))}")
        kw = {"device": self.prompt.device, "dtype": self.prompt.dtype}
        d_h = tensors["w_q"].shape[0]
        if self.w_q.weight.shape[0] != d_h:  # another search width: new W_q, W_k of the saved shape
            self.w_q = nn.Linear(self.dim, d_h, bias=False, **kw)
            self.w_k = nn.Linear(self.dim, d_h, bias=False, **kw)
        slots = tensors.get("memory_slots")
        self.memory_slots = None if slots is None else nn.Parameter(torch.empty(tuple(slots.shape), **kw))
        super().restore(config, tensors, folder)
