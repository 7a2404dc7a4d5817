"""Auxiliary memory losses for recall tasks, where it is known which fact each segment holds and which one the
question asks: they give a memory a direct signal for what to write, where the answer at the end gives a faint one.
`Supervision` applies those a run asks for (`TrainConfig`: search_loss, search_teacher, memory_id_loss,
memory_value_loss); the training loop only adds its terms.

- HMT's search (`search_loss`, `search_teacher`): −log of the weight the question's search gives the asked fact's
  memory, and teacher forcing (the question reads that memory itself) until the search finds it.
- HMT's memory ids and values (`memory_id_loss`, `memory_value_loss`): linear probes, trained alongside and then
  dropped, must name from each segment's memory the ids of its facts, and read from a memory given one fact that
  fact's digits.
- Infini-attention's memory values (`memory_value_loss`): the probe below.

The memory value probe of Infini-attention. Learning to answer "QUERY <id> =" from a compressive memory comes late
and abruptly: the only signal is the answer at the end of the sequence, and it must shape what every earlier
segment writes. The
probe gives the writes a direct signal: after the segments that hold the facts, each layer's memory M (the one the
question's segment reads) is read with a learned query per (key id, digit index), and the reads of all layers must
name that digit of that fact. For the probe to succeed, the memory must bind each fact's digits to its id, which is
what the question needs; the probe is trained alongside the reader and then dropped.

    read_l = σ(q_l[id, j]) M_l / (σ(q_l[id, j]) z_l + eps)        per layer l and KV head, as A_mem reads (Eq. 7)
    logits[id, j] = W · concat_l(read_l) + b                       10 classes, one per digit value
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ragkit.errors import ConfigError
from ragkit.memory.base import MemoryLM
from ragkit.memory.infini import InfiniLM, elu1, retrieve
from ragkit.memory.tasks import (DIGITS, IGNORE, KEY_IDS, RecallBatch, RecallTask, fact_names, fact_slots,
                                 fact_values, slot_fact_ids, slot_fact_values)

MemoryState = tuple[Tensor, Tensor]  # one layer's (M (b, H_kv, d, d), z (b, H_kv, d)), fp32


class InfiniValueProbe(nn.Module):
    """Reads every layer's memory with a learned query per (key id, digit index); scores the digit it reads."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, digits: int, ids: int = len(KEY_IDS),
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps  # as the reader's own retrieval (InfiniConfig.eps)
        self.query = nn.Parameter(0.5 * torch.randn(ids, digits, layers, kv_heads, head_dim))  # pre-feature queries
        self.out = nn.Linear(layers * kv_heads * head_dim, len(DIGITS))

    @classmethod
    def for_reader(cls, model: InfiniLM, digits: int) -> InfiniValueProbe:
        """A probe sized for `model`'s layers and KV heads, reading with its eps, on its device."""
        attn = model.layers[0]
        probe = cls(len(model.layers), attn.n_kv_head, attn.head_dim, digits, eps=model.config.eps)
        return probe.to(attn.q_proj.weight.device)

    def forward(self, states: list[MemoryState], names: Tensor) -> Tensor:
        """Digit logits (b, K, digits, 10) for the facts `names` (b, K), key ids as indices into KEY_IDS, read from
        each layer's memory `states`."""
        b, k = names.shape
        q = self.query[names]  # (b, K, d, L, H_kv, dh)
        reads = []
        for layer, (memory, normalizer) in enumerate(states):
            s = elu1(q[:, :, :, layer]).flatten(1, 2).transpose(1, 2)  # (b, H_kv, K·d, dh)
            reads.append(retrieve(s, memory, normalizer, self.eps))  # (b, H_kv, K·d, dh)
        read = torch.cat(reads, dim=1).transpose(1, 2)  # (b, K·d, L·H_kv, dh)
        return self.out(read.flatten(2)).unflatten(1, (k, -1))  # (b, K, d, 10)


def forward_keeping_memory(model: InfiniLM, ids: Tensor) -> tuple[Tensor, list[MemoryState] | None]:
    """`model(ids)`, and each layer's memory as the last segment reads it (None for a one-segment sequence), with
    gradients through both. ids: (b, n) → logits (b, n, V)."""
    last = (ids.shape[1] - 1) // model.config.segment_length * model.config.segment_length  # the last segment's start
    if last == 0:
        return model(ids), None
    head = model(ids[:, :last])
    states = [(attn.memory, attn.normalizer) for attn in model.layers]
    return torch.cat([head, model(ids[:, last:], reset=False)], dim=1), states


# ----------------------------------------------------------------------------------------------------------------
# the losses of one run


SEARCH_TAUGHT = 0.9  # teacher forcing ends once the search finds the asked memory for this share of questions …
SEARCH_TAUGHT_STEPS = 20  # … over this many steps in a row


class Supervision:
    """The auxiliary losses of one recall run on `model`, and the probes they train (`param_groups`)."""

    def __init__(self, model: MemoryLM, task: RecallTask, search_loss: float = 0.0, search_teacher: float = 0.0,
                 memory_id_loss: float = 0.0, memory_value_loss: float = 0.0, train_all: bool = True) -> None:
        hmt = model.kind == "hmt"
        if (search_loss or search_teacher or memory_id_loss) and not hmt:
            raise ConfigError("search_loss, search_teacher and memory_id_loss train HMT's search and memories: use "
                              "the HMT reader")
        if memory_value_loss and not hmt and not train_all:
            raise ConfigError("memory_value_loss shapes what Infini-attention writes, which its gates alone cannot "
                              "change: train all weights (train_all=True)")
        self.task = task
        self.search_loss, self.search_teacher = search_loss, search_teacher
        self.memory_id_loss, self.memory_value_loss = memory_id_loss, memory_value_loss
        self.search = search_loss > 0 or search_teacher > 0
        device = next(model.parameters()).device
        # HMT: the ids of each memory's facts; the digits of its one fact, 10 classes each. Infini: every fact's
        self.id_probe = nn.Linear(model.dim, len(KEY_IDS)).to(device) if memory_id_loss else None
        self.value_probe = (nn.Linear(model.dim, task.digits * len(DIGITS)).to(device)
                            if memory_value_loss and hmt else None)
        self.infini_probe = (InfiniValueProbe.for_reader(model, task.digits)
                             if memory_value_loss and not hmt else None)
        self.recent: deque[float] = deque(maxlen=SEARCH_TAUGHT_STEPS)
        self.taught = False  # the search has been found right often enough: teacher forcing is over

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW groups of the probes, at `lr`, without decay."""
        probes = [("memory id probe", self.id_probe), ("memory value probe", self.value_probe),
                  ("memory value probe", self.infini_probe)]
        return [{"params": list(p.parameters()), "weight_decay": 0.0, "base_lr": lr, "name": name}
                for name, p in probes if p is not None]

    def step(self, model: MemoryLM, batch: RecallBatch, share: float) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Logits (b, n, V) of `batch` (on the model's device), the auxiliary loss to add (a scalar), and this
        step's hit rates by name (search_hit, memory_id_hit, memory_value_hit) for those that apply."""
        S = self.task.segment_length
        ids = batch.input_ids
        hits: dict[str, float] = {}
        extra = ids.new_zeros((), dtype=torch.float)
        states = None
        if self.search:
            segments = ids.shape[1] // S
            fact_segment = batch.key_positions[:, 0] // S  # (b,) the asked fact's
            slot = asked_slot(model, batch, S)  # (b,) or None (one memory per segment)
            teacher = share < self.search_teacher and not self.taught
            logits = model(ids, search_target=fact_segment.to(ids.device), teacher_search=teacher, search_slot=slot)
            hit = float(model.search_hits(fact_segment, segments - 1, slot).float().mean())
            self.recent.append(hit)
            hits["search_hit"] = hit
            self.taught = self.taught or (len(self.recent) == self.recent.maxlen and
                                          sum(self.recent) / len(self.recent) >= SEARCH_TAUGHT)
            if self.search_loss > 0:
                log_weight = model.target_log_weight  # (b,), NaN where the fact's memory was evicted
                kept = ~log_weight.isnan()
                if bool(kept.any()):
                    extra = extra - self.search_loss * log_weight[kept].mean()
        elif self.infini_probe is not None:
            logits, states = forward_keeping_memory(model, ids)  # states: what the question's segment reads
        else:
            logits = model(ids)
        if self.id_probe is not None:
            r = model.config.memory_tokens
            named = memory_id_terms(model.cache, self.id_probe, slot_fact_ids(batch, S, r))
            if named is not None:
                extra = extra + self.memory_id_loss * named[0]
                if not math.isnan(named[1]):
                    hits["memory_id_hit"] = named[1]
        held = None
        if self.value_probe is not None:
            held = memory_value_term(model.cache, self.value_probe,
                                     slot_fact_values(batch, S, model.config.memory_tokens))
        elif self.infini_probe is not None and states is not None:
            held = infini_value_term(self.infini_probe, states, batch)
        if held is not None:
            extra = extra + self.memory_value_loss * held[0]
            hits["memory_value_hit"] = held[1]
        return logits, extra, hits


def asked_slot(model: MemoryLM, batch: RecallBatch, segment_length: int) -> Tensor | None:
    """(b,) which of its segment's memories holds the asked fact, for HMT writing r > 1 memories per segment; None
    with one memory per segment (or a reader without such memories)."""
    r = getattr(getattr(model, "config", None), "memory_tokens", 1)
    return fact_slots(batch, segment_length, r)[:, 0] if r > 1 else None


def memory_id_terms(cache: Tensor | None, probe: nn.Module, targets: Tensor) -> tuple[Tensor, float] | None:
    """The memory id loss and hit rate of one batch, or None if no memory of a segment before the question is cached.

    cache: (b, r·m, C) HMT's memories after reading a batch of s segments, r per segment: those of segments
    s - m … s - 1, the question's last. targets: (b, s, r, I) from `slot_fact_ids`. The loss is the probe's binary
    cross-entropy summed over the I ids, averaged over the memories before the question's; the hit rate is the share
    of those memories holding a fact whose highest-scored id is one of theirs."""
    prefix = _prefix_memories(cache, targets)
    if prefix is None:
        return None
    memories, wanted = prefix
    logits = probe(memories)  # (b, m - 1, r, I)
    loss = F.binary_cross_entropy_with_logits(logits, wanted, reduction="none").sum(-1).mean()
    holding = wanted.sum(-1) > 0  # (b, m - 1, r)
    right = wanted.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1) > 0  # (b, m - 1, r)
    hit = float(right[holding].float().mean()) if bool(holding.any()) else float("nan")
    return loss, hit


def memory_value_term(cache: Tensor | None, probe: nn.Module, targets: Tensor) -> tuple[Tensor, float] | None:
    """HMT's memory value loss and the probe's digit accuracy on one batch, or None if no memory before the
    question's is given one fact. cache: (b, r·m, C) as for `memory_id_terms`; targets: (b, s, r, d) digits from
    `slot_fact_values`. The loss is the probe's cross-entropy per digit, summed over the d digits, averaged over the
    memories given one fact."""
    prefix = _prefix_memories(cache, targets)
    if prefix is None or not bool((prefix[1] != IGNORE).any()):
        return None
    memories, wanted = prefix  # (b, m - 1, r, C), (b, m - 1, r, d)
    logits = probe(memories).unflatten(-1, (wanted.shape[-1], -1))  # (b, m - 1, r, d, 10)
    return _digit_loss_and_accuracy(logits, wanted)


def infini_value_term(probe: InfiniValueProbe, states: list[MemoryState], batch: RecallBatch) -> tuple[Tensor, float]:
    """Infini-attention's memory value loss and the probe's digit accuracy on one batch: every fact's digits read
    from the memory `states` that the question's segment reads."""
    device = states[0][0].device
    logits = probe(states, fact_names(batch).to(device))  # (b, K, d, 10)
    return _digit_loss_and_accuracy(logits, fact_values(batch).to(device))


def _digit_loss_and_accuracy(logits: Tensor, wanted: Tensor) -> tuple[Tensor, float]:
    """Cross-entropy per digit summed over the d digits, and the share of digits right, where `wanted` (…, d) is not
    IGNORE. logits: (…, d, 10)."""
    scored = wanted != IGNORE
    loss = F.cross_entropy(logits.flatten(0, -2), wanted.flatten(), ignore_index=IGNORE) * wanted.shape[-1]
    right = (logits.argmax(-1) == wanted)[scored]
    return loss, float(right.float().mean())


def _prefix_memories(cache: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor] | None:
    """The cached memories of the segments before the question's, (b, m - 1, r, C), and their rows of `targets`
    (b, s, r, …), or None if fewer than two segments' memories are cached.
    cache: (b, r·m, C), the memories of segments s - m … s - 1."""
    s, r = targets.shape[1], targets.shape[2]
    if cache is None or cache.shape[1] < 2 * r:
        return None
    m = cache.shape[1] // r
    return cache[:, :-r].unflatten(1, (m - 1, r)), targets[:, s - m : s - 1].to(cache.device)
