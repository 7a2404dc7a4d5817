"""The memory value probe of Infini-attention, a training aid for recall tasks (`TrainConfig.memory_value_loss`).

Learning to answer "QUERY <id> =" from a compressive memory comes late and abruptly (benchmarks/RESULTS.md):
the only signal is the answer at the end of the sequence, and it must shape what every earlier segment writes. The
probe gives the writes a direct signal: after the segments that hold the facts, each layer's memory M (the one the
question's segment reads) is read with a learned query per (key id, digit index), and the reads of all layers must
name that digit of that fact. For the probe to succeed, the memory must bind each fact's digits to its id, which is
what the question needs; the probe is trained alongside the reader and then dropped.

    read_l = σ(q_l[id, j]) M_l / (σ(q_l[id, j]) z_l + eps)        per layer l and KV head, as A_mem reads (Eq. 7)
    logits[id, j] = W · concat_l(read_l) + b                       10 classes, one per digit value
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ragkit.readers.infini import InfiniLM, elu1, retrieve
from ragkit.readers.tasks import DIGITS, KEY_IDS

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
