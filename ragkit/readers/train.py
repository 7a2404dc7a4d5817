"""Training and recall evaluation for memory readers.

Any reader whose `forward(input_ids) -> logits` streams a whole sequence segment by segment, carrying its memory with
gradients, can be trained here; what is specific to Infini-attention (its gates) is found by duck typing
(`gate_parameters()`, `gate_values()`, `shut_gates()`). Two objectives:

- recall: the synthetic tasks of `ragkit.readers.tasks` (passkey, K-key associative recall), loss on the answer only;
- lm: next-token loss over every token of long documents from a folder, the segments of a window in order.

What the papers and the runs here taught, and what this loop therefore does:
- The gates get their own AdamW group: a learning rate of ~10× the base and no weight decay ([HF-BLOG]).
- Gate warm-up: the gates are held (at sigmoid 0.5 for a model trained from scratch) for the first share of steps,
  then trained. Trained from step 0, the layer-2 gate of a tiny passkey model shut within ~600 steps and training
  stalled at ~0.87 nats (the model knew which digits, not their order); holding the gates fixed it (§7).
- Gradients flow through the memory across every segment of a sample: a reader that detaches every segment cannot
  learn what to write ([BEOMI]), so the loop refuses one.
- On CPU, denormal floats are flushed: steps slowed ~5× once a tiny model's loss fell near 1e-4 (§8).

HMT (`ragkit.readers.hmt`) trains with the paper's two stages: `train_two_stage` runs stage 1
on 2 segments with `memory_search=False` (P_n = M_{n-1}: the model learns to store the key in a memory embedding),
then stage 2 with the search on longer unrolls; trained plainly from scratch, the memory never held a usable
encoding. On recall tasks stage 1 lets facts reach the sensory tokens (`stage1_recall_batches`): with every fact
kept out of them, stage 1 never left ln 10 on a Llama backbone. HMT's new parameters (T, the initial memory, W_q,
W_k) get their own AdamW group without weight decay.

On K-key recall HMT's search must pick the asked fact's memory by its id, and trained on the answer alone it never
did (search hit ~0.28 among 7 memories after 900 s): a segment's memory did not encode which id it holds (a linear
probe read it at chance, 0.06, while the question's summary gave it at 1.0), and nothing rewards encoding it until
the search uses it. Stage 1 is where that sets in: after it, the first layer's attention from the memory token gives
each of the value's digits 0.18 and the fact's id 0.0004, and 400 s of search supervision left the id at 0.0009:
through a softmax that saturated on the digits, no gradient reaches the id. Where the asked fact's segment is known,
the search can be taught (off by default: on a tiny CPU model it worked with one draw of the data, search hit 0.98
and 0.76 of digits at 900 s, and left the search near 0.3 with five others, as with two seeds of a 4-layer × 256
model on an H200): `search_loss` adds −log of the weight the question's search gives that memory (at `hmt_lr`; 10×
the base rate was needed), and the question reads that memory itself (teacher forcing) until the search finds it for
90% of the questions of 20 steps in a row, for at most the first `search_teacher` share of the run, so that the
readout learns while the search does. Without teacher forcing the answer loss sat at ln 10 even once the search was
right; with it ending at a fixed 40% of the run, a run whose search had not yet learnt fell back to ln 10 when it
ended.

`memory_id_loss` gives the memories their ids directly: a linear probe, trained alongside and then dropped, must
name from each segment's memory the ids of the facts in that segment (binary cross-entropy per id, summed). With it
and the search loss, the search found the asked memory for 0.99 of the questions at K = 4 with each of three seeds,
and for all of them among 15 and 63 memories at 4× and 16× the trained length; with the id loss alone it stayed at
0.25, with the search loss alone it reached 0.50 (benchmarks/RESULTS.md, 2026-12-02). What then limits recall is
that one memory per segment does not keep two facts apart: on 8 segments a fact alone in its segment was read at
0.92 of its digits and one sharing its segment at 0.46 (on 4 segments, where every sequence has such a segment,
0.3-0.4 overall, and chance for some seeds). In stage 1 the id loss slows the learning to store the digits (loss
1.17 after 800 steps, 0.28 without it), yet left to stage 2 alone it was learnt too late or never for two of three
runs: `reader train` applies it in both stages (`train_two_stage(stage1_memory_id_loss=0)` leaves it to stage 2).
With `memory_tokens` = 2 each segment writes two memories, the i-th fact of a segment is given to its i-th memory
(`slot_fact_ids`), and the search loss and teacher forcing name that memory (`fact_slots`). The search then found
the right memory, yet shared facts were still read at 0.42-0.47: the memory the probe names a fact by still mixed
its digits with the neighbour's. `memory_value_loss` adds a second probe that must read from each memory given one
fact that fact's digits (`slot_fact_values`); with it, K = 4 on 8 segments reached 0.96 and 0.98 of digits (seeds 0
and 1), 0.93 and 1.00 for facts sharing a segment (RESULTS.md, "memory value loss").

Infini-attention met the same wall on K-key recall: its loss sat near that of guessing among the facts for
thousands of steps, as the answer at the end was the only signal for what every earlier segment should write.
`memory_value_loss` gives it a direct one (`ragkit.readers.infini_probe`): each layer's memory, as the question's
segment reads it, is queried by a probe with one learned query per (id, digit) and must give every fact's digits.
On 8 segments at K = 4 it lifted Infini-attention from 0.16 of digits to 0.83 in 1,200 s (the probe at the reader's
learning rate; at 10× it, 0.44: a probe that learns fast fits what the memory holds instead of reshaping it), and
to 0.8 at 16× the trained length (0.88 and 0.82 with another seed; RESULTS.md, "with memory value loss,
Infini-attention").

Checkpoints are plain files: the reader's adapter (gates or HMT parameters, and config), the whole backbone in
safetensors when its weights were trained (config.json + model.safetensors, loadable by transformers), and
`train.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ragkit.errors import ConfigError, ModelLoadError, RagkitError
from ragkit.progress import ProgressEvent
from ragkit.readers.infini import InfiniLM
from ragkit.readers.infini_probe import InfiniValueProbe, MemoryState, forward_keeping_memory
from ragkit.readers.lm import load_reader_tokenizer
from ragkit.readers.tasks import (DIGITS, IGNORE, KEY_IDS, RecallBatch, RecallTask, fact_names, fact_slots,
                                  fact_values, make_recall_batch, slot_fact_ids, slot_fact_values)

TRAIN_META = "train.json"
BACKBONE_WEIGHTS = "model.safetensors"
CHECKPOINT_VERSION = 1


class TrainingDivergedError(RagkitError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """One training run. A "share" is a fraction of the run (of its steps, or of `max_seconds` if that ends first)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per step
    segments: tuple[int, int] = (4, 4)  # segments per sequence, drawn per batch from this closed range
    length_curriculum: float = 0.0  # share of the run over which the longest length drawn rises from A to B
    keys_curriculum: float = 0.0  # recall tasks: share of the run with fewer facts than the task's K (1, 2, 4, …)
    lr: float = 1e-3  # peak learning rate of the trained weights
    gate_lr: float | None = None  # peak learning rate of the gates; None: 10 × lr
    weight_decay: float = 0.1  # AdamW decay of matrices; norms, biases and gates are never decayed
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup: float = 0.02  # share of the run with a linear learning-rate warm-up, then cosine decay
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak
    gate_warmup: float = 0.4  # share of the run with the gates held fixed; 0: train them at once
    gate_hold: float | None = 0.0  # β the gates are held at during the warm-up (0: sigmoid 0.5); None: as they are
    train_all: bool = True  # train every weight; False: only the gates or HMT parameters (a frozen backbone)
    hmt_lr: float | None = None  # peak learning rate of HMT's new parameters (T, memory, W_q, W_k); None: lr
    probe_lr: float | None = None  # peak learning rate of the memory probes; None: hmt_lr, else lr
    search_loss: float = 0.0  # HMT on recall tasks: weight of −log(search weight of the queried fact's memory)
    search_teacher: float = 0.0  # HMT on recall tasks: longest share of the run whose question reads that memory
    # itself (teacher-forced search); it ends sooner once the search finds that memory (see SEARCH_TAUGHT)
    memory_id_loss: float = 0.0  # HMT on recall tasks: weight of a loss making each segment's memory name the ids of
    # the facts in that segment, read by a linear probe trained alongside (at `hmt_lr`) and then dropped
    memory_value_loss: float = 0.0  # recall tasks: the same for the digits of the one fact an HMT memory is given;
    # Infini-attention: each layer's memory, read with a learned query per (id, digit), must give that fact's digits
    grad_clip: float = 1.0  # max global gradient norm
    max_seconds: float | None = None  # stop after this much wall time (the schedule follows time then)
    log_every: int = 10  # steps between progress events
    checkpoint_every: int = 0  # steps between checkpoints written to the output folder; 0: only at the end
    seed: int = 0  # data order and segment counts
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", …

    def __post_init__(self) -> None:
        lo, hi = self.segments = tuple(self.segments)
        if not 1 <= lo <= hi:
            raise ConfigError(f"segments must be a range A-B with 1 ≤ A ≤ B, got {lo}-{hi}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be at least 1")
        if not (self.lr > 0 and all(x is None or x > 0 for x in (self.gate_lr, self.hmt_lr, self.probe_lr))):
            raise ConfigError("learning rates must be positive")
        for name in ("search_loss", "memory_id_loss", "memory_value_loss"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("warmup", "gate_warmup", "min_lr_ratio", "length_curriculum", "keys_curriculum",
                     "search_teacher"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be positive, got {self.max_seconds}")

    @property
    def gate_learning_rate(self) -> float:
        return self.gate_lr if self.gate_lr is not None else 10 * self.lr


@dataclass(frozen=True)
class TrainEvent:
    """Progress of a run, sent every `log_every` steps and at the end."""

    step: int  # steps done
    steps: int  # steps planned (a run with max_seconds may stop sooner)
    loss: float  # mean loss over the steps since the last event
    lr: float  # current learning rate of the trained weights
    gates_frozen: bool  # True during the gate warm-up
    gates: list[list[float]] | None  # sigmoid(β) per layer and head, or None for a reader without gates
    seconds: float  # wall time since the start
    tokens: int  # tokens trained on so far
    search_hit: float | None = None  # share of questions whose search weighed the asked fact's memory highest
    keys: int | None = None  # facts per sequence of the latest batch (recall tasks)
    memory_id_hit: float | None = None  # with memory_id_loss: share of memories holding a fact whose probe names
    # one of their ids first (chance: about 1 in 16 per fact held)
    memory_value_hit: float | None = None  # with memory_value_loss: share of digits the value probe reads right


@dataclass
class TrainResult:
    """What a run did."""

    steps: int
    seconds: float
    tokens: int
    loss: float  # mean loss over the last logging window
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss) at every event
    gates: list[list[float]] | None = None  # final sigmoid(β) per layer and head
    checkpoint: str | None = None  # the folder written, if any
    search_hits: list[tuple[int, float]] = field(default_factory=list)  # (step, search hit) if the search is taught
    memory_id_hits: list[tuple[int, float]] = field(default_factory=list)  # (step, memory id hit) with memory_id_loss
    memory_value_hits: list[tuple[int, float]] = field(default_factory=list)  # (step, memory value hit), likewise

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Batches(Protocol):
    """A source of training batches: (input_ids, labels), both (batch_size, segments × segment_length)."""

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


# ----------------------------------------------------------------------------------------------------------------
# objectives


class RecallBatches:
    """Synthetic recall batches (passkey for keys = 1): loss on the answer digits only. `keys` draws sequences with
    that many facts instead of the task's K (the key curriculum)."""

    def __init__(self, task: RecallTask) -> None:
        self.task = task

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator,
                 keys: int | None = None) -> tuple[Tensor, Tensor]:
        batch = self.draw(batch_size, segments, generator, keys)
        return batch.input_ids, batch.labels

    def draw(self, batch_size: int, segments: int, generator: torch.Generator,
             keys: int | None = None) -> RecallBatch:
        """The same draw as a call, with where each fact lies (for the losses that supervise HMT's memory)."""
        task = self.task if keys is None or keys == self.task.keys else replace(self.task, keys=keys)
        return make_recall_batch(task, batch_size, segments, generator)


def curriculum_keys(share: float, keys: int, curriculum: float) -> int:
    """Facts per sequence at `share` of a run whose task has `keys` facts: 1, 2, 4, … (the powers of two below
    `keys`), each for an equal part of the first `curriculum` share of the run, then `keys`.

    A model that must pick one fact among many by its name learns first to read a fact back at all (K = 1), then
    to tell two apart by name, and so on: a 2-layer × d_model 64 Llama with full attention, trained 300 s on K = 4
    with its learning rate held, reached 0.59 of digits; with thirds of K = 1, 2, 4 it reached 0.83
    (benchmarks/RESULTS.md, "Associative recall, full attention").

    >>> [curriculum_keys(s, 4, 2 / 3) for s in (0.0, 0.3, 0.5, 0.7, 1.0)]
    [1, 1, 2, 4, 4]
    >>> curriculum_keys(0.1, 4, 0.0), curriculum_keys(0.1, 1, 0.5)
    (4, 1)
    """
    levels = [2**i for i in range(max(keys - 1, 0).bit_length())]  # powers of two below keys
    if share >= curriculum or not levels:
        return keys
    return levels[min(int(share / curriculum * len(levels)), len(levels) - 1)]


class DocumentBatches:
    """Windows of `segments × segment_length` consecutive tokens from long documents, for plain language modelling:
    every token is a target. Documents are parsed like `ragkit index` parses them and tokenized once."""

    def __init__(self, folder: str | Path, tokenizer: Any, segment_length: int, max_tokens: int = 50_000_000,
                 progress: Callable[[ProgressEvent], None] | None = None) -> None:
        from ragkit.ingest.parsers import ParseError, parse_file
        from ragkit.ingest.sources import scan_folder

        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"the training data folder {folder} does not exist")
        self.segment_length = segment_length
        files = scan_folder(folder).files
        docs: list[Tensor] = []
        total = 0
        for i, source in enumerate(files):
            try:
                text = parse_file(source.path).text
            except ParseError:
                continue
            ids = _tokenize(tokenizer, text)
            if len(ids) > 1:
                docs.append(torch.tensor(ids, dtype=torch.long))
                total += len(ids)
            if progress:
                progress(ProgressEvent("tokenize", i + 1, len(files), total))
            if total >= max_tokens:
                break
        if not docs:
            raise ConfigError(f"no readable documents in {folder}")
        self.docs = sorted(docs, key=len, reverse=True)  # (n_i,) token ids each, longest first
        self.tokens = total

    def __call__(self, batch_size: int, segments: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = segments * self.segment_length
        room = torch.tensor([max(len(d) - n + 1, 0) for d in self.docs], dtype=torch.float)  # windows per document
        if room.sum() == 0:
            raise ConfigError(f"no document has {n} tokens ({segments} segments of {self.segment_length}); the "
                              f"longest has {len(self.docs[0])}: use fewer or shorter segments, or longer documents")
        picks = torch.multinomial(room, batch_size, replacement=True, generator=generator)  # uniform over windows
        rows = []
        for d in picks.tolist():
            start = int(torch.randint(int(room[d]), (1,), generator=generator))
            rows.append(self.docs[d][start : start + n])
        ids = torch.stack(rows)  # (b, n)
        labels = torch.cat([ids[:, 1:], torch.full((batch_size, 1), IGNORE)], dim=1)  # next token; none after the last
        return ids, labels


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole document, without special tokens or the length warning of `tokenizer.encode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stage1_recall_batches(task: RecallTask) -> RecallBatches:
    """HMT's stage-1 batches for a recall task: one fact per sequence (stage 1 learns to write a memory and read it
    back; its 2 segments have no room for many facts), allowed in the sensory window before the question's segment
    (`protect=None`). With every fact out of reach of the sensory tokens, stage 1 of a model
    trained from scratch never left ln 10 (800-2,000 steps, CPU and H200): reading the digits and writing them to
    memory must be learnt at once, and neither has a gradient until the other works. The few facts that reach the
    sensory tokens teach the readout first; the memory follows within a few hundred steps. Stage 2 and every
    evaluation keep the task's own protection."""
    return RecallBatches(replace(task, keys=1, cue=False, protect=None))


# ----------------------------------------------------------------------------------------------------------------
# the loop


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed vectors (norms, biases), the gates with their own LR, no decay, and
    HMT's new parameters (T, the initial memory, W_q, W_k) at `hmt_lr` without decay (decay would blunt the search's
    near-exact lookup). Only parameters that require gradients are included."""
    gates = [p for p in _gates(model) if p.requires_grad]
    hmt = [p for p in _hmt_params(model) if p.requires_grad]
    own = {id(p) for p in gates + hmt}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in own or not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr, "name": "no_decay"},
        {"params": gates, "weight_decay": 0.0, "base_lr": config.gate_learning_rate, "name": "gates"},
        {"params": hmt, "weight_decay": 0.0, "base_lr": config.hmt_lr or config.lr, "name": "hmt"},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(progress: float, config: TrainConfig) -> float:
    """Linear warm-up over the first `warmup` share of the run, then cosine decay to `min_lr_ratio`."""
    if config.warmup > 0 and progress < config.warmup:
        return max(progress / config.warmup, 1e-3)
    t = min((progress - config.warmup) / max(1.0 - config.warmup, 1e-9), 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def train(model: nn.Module, batches: Batches, config: TrainConfig,
          progress: Callable[[TrainEvent], None] | None = None, out: str | Path | None = None,
          meta: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` on `batches` with AdamW; write checkpoints to `out` (every `checkpoint_every` steps and at the
    end) with `meta` added to train.json. Returns what the run did; the model is left trained, in eval mode (with
    train_all=False, its backbone is left with requires_grad off)."""
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals made late steps several times slower
    if getattr(getattr(model, "config", None), "bptt_segments", None) == 1:
        raise ConfigError("the reader detaches its memory after every segment (bptt_segments=1): it could not learn "
                          "what to write; use None (all segments) or at least 2")
    supervised_search = config.search_loss > 0 or config.search_teacher > 0
    supervised_ids = config.memory_id_loss > 0 or config.memory_value_loss > 0
    infini_values = config.memory_value_loss > 0 and isinstance(model, InfiniLM)  # the rest is HMT's
    if config.keys_curriculum > 0 and not isinstance(batches, RecallBatches):
        raise ConfigError("keys_curriculum varies the facts per sequence of a recall task: use recall batches")
    if supervised_search and not (isinstance(batches, RecallBatches) and _hmt_params(model)):
        raise ConfigError("search_loss and search_teacher train HMT's search on recall tasks, where the queried "
                          "fact's segment is known: use the HMT reader with recall batches")
    if supervised_ids and not isinstance(batches, RecallBatches):
        raise ConfigError("memory_id_loss and memory_value_loss train a memory to hold its facts, known on recall "
                          "tasks: use recall batches")
    if config.memory_id_loss > 0 and not _hmt_params(model):
        raise ConfigError("memory_id_loss trains HMT's memories to name their facts: use the HMT reader")
    if config.memory_value_loss > 0 and not (_hmt_params(model) or infini_values):
        raise ConfigError("memory_value_loss trains the memory of HMT or Infini-attention: use one of those readers")
    if infini_values and not config.train_all:
        raise ConfigError("memory_value_loss shapes what Infini-attention writes, which its gates alone cannot "
                          "change: train all weights (train_all=True)")
    model.to(device).train()
    gates = _gates(model)
    adapter_ids = {id(p) for p in gates + _hmt_params(model)}
    if not config.train_all:
        if not adapter_ids:
            raise ConfigError("this reader has no gates: train all weights (train_all=True)")
        if gates and config.gate_warmup > 0:
            raise ConfigError("with only the gates trained, a gate warm-up would train nothing: set gate_warmup=0")
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter_ids)
    if gates and config.gate_warmup > 0 and config.gate_hold is not None:
        with torch.no_grad():
            for g in gates:
                g.fill_(config.gate_hold)
    groups = param_groups(model, config)
    probe_lr = config.probe_lr or config.hmt_lr or config.lr

    def memory_probe(probe: nn.Module, name: str) -> nn.Module:  # trained with the reader at probe_lr, then dropped
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0, "base_lr": probe_lr, "name": name})
        return probe.to(device)

    # HMT: the ids of each memory's facts; the digits of its one fact, 10 classes each. Infini: every fact's digits
    probe = (memory_probe(nn.Linear(model.dim, len(KEY_IDS)), "memory id probe")
             if config.memory_id_loss > 0 else None)
    value_probe = (memory_probe(nn.Linear(model.dim, batches.task.digits * len(DIGITS)), "memory value probe")
                   if config.memory_value_loss > 0 and not infini_values else None)
    infini_probe = (memory_probe(InfiniValueProbe.for_reader(model, batches.task.digits), "memory value probe")
                    if infini_values else None)
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    lo, hi = config.segments
    meta = {**(meta or {}), "train": asdict(config)}

    started = time.perf_counter()
    step = tokens = 0
    window: list[float] = []
    history: list[tuple[int, float]] = []
    hits: list[float] = []  # search hit of each step since the last event
    search_hits: list[tuple[int, float]] = []
    id_hits: list[float] = []  # memory id hit of each step since the last event
    memory_id_hits: list[tuple[int, float]] = []
    value_hits: list[float] = []  # value probe's digit accuracy of each step since the last event
    memory_value_hits: list[tuple[int, float]] = []
    recent_hits: deque[float] = deque(maxlen=SEARCH_TAUGHT_STEPS)
    taught = False  # the search has been found right often enough: teacher forcing is over
    last_loss = float("nan")
    checkpoint = None
    while step < config.steps:
        elapsed = time.perf_counter() - started
        if config.max_seconds is not None and elapsed >= config.max_seconds:
            break
        share = step / config.steps
        if config.max_seconds is not None:
            share = max(share, elapsed / config.max_seconds)
        frozen = bool(gates) and share < config.gate_warmup
        factor = lr_factor(share, config)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

        top = hi if share >= config.length_curriculum else lo + round((hi - lo) * share / config.length_curriculum)
        segments = int(torch.randint(lo, top + 1, (1,), generator=generator))  # mixed lengths
        keys = None
        if isinstance(batches, RecallBatches):
            keys = curriculum_keys(share, batches.task.keys, config.keys_curriculum)
        if supervised_search or supervised_ids:  # the losses need where the facts lie, not only ids and labels
            batch = batches.draw(config.batch_size, segments, generator, keys)
            ids, labels = batch.input_ids, batch.labels
            fact_segment = batch.key_positions[:, 0] // batches.task.segment_length  # (b,) the asked fact's
            fact_slot = _asked_slot(model, batch, batches.task.segment_length)  # (b,) or None (one per segment)
        elif keys is not None:
            ids, labels = batches(config.batch_size, segments, generator, keys)
        else:
            ids, labels = batches(config.batch_size, segments, generator)
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if supervised_search:
            teacher = share < config.search_teacher and not taught
            logits = model(ids, search_target=fact_segment.to(device), teacher_search=teacher, search_slot=fact_slot)
            recent_hits.append(_search_hit_rate(model, fact_segment, segments, fact_slot))
            hits.append(recent_hits[-1])
            taught = taught or (len(recent_hits) == recent_hits.maxlen and
                                sum(recent_hits) / len(recent_hits) >= SEARCH_TAUGHT)
        elif infini_probe is not None:
            logits, states = forward_keeping_memory(model, ids)  # states: what the question's segment reads
        else:
            logits = model(ids)  # (b, n, V): every segment in order, gradients through the memory
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        value = float(loss.detach())  # the task's loss: what events and the history report
        if config.search_loss > 0:
            log_weight = model.target_log_weight  # (b,), NaN where the fact's memory was evicted
            kept = ~log_weight.isnan()
            if bool(kept.any()):
                loss = loss - config.search_loss * log_weight[kept].mean()
        if probe is not None:
            slots = model.config.memory_tokens
            named = _memory_id_terms(model.cache, probe, slot_fact_ids(batch, batches.task.segment_length, slots))
            if named is not None:
                loss = loss + config.memory_id_loss * named[0]
                if not math.isnan(named[1]):
                    id_hits.append(named[1])
        held = None
        if value_probe is not None:
            slots = model.config.memory_tokens
            held = _memory_value_term(model.cache, value_probe,
                                      slot_fact_values(batch, batches.task.segment_length, slots))
        elif infini_probe is not None and states is not None:
            held = _infini_value_term(infini_probe, states, batch)
        if held is not None:
            loss = loss + config.memory_value_loss * held[0]
            value_hits.append(held[1])
        total = float(loss.detach())
        if not math.isfinite(total):
            raise TrainingDivergedError(f"the loss became {total} at step {step + 1}: lower the learning rate "
                                        f"(now {config.lr:g}, gates {config.gate_learning_rate:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if frozen:
            for g in gates:
                g.grad = None  # AdamW skips a parameter without a gradient: the gate stays where it is held
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        step += 1
        tokens += ids.numel()
        window.append(value)
        if step % config.log_every == 0 or step == config.steps:
            last_loss = sum(window) / len(window)
            history.append((step, last_loss))
            hit = _flush_hits(hits, search_hits, step)
            id_hit = _flush_hits(id_hits, memory_id_hits, step)
            value_hit = _flush_hits(value_hits, memory_value_hits, step)
            window = []
            if progress:
                progress(TrainEvent(step, config.steps, last_loss, config.lr * factor, frozen, _gate_values(model),
                                    time.perf_counter() - started, tokens, hit, keys, id_hit, value_hit))
        if out is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint = save_checkpoint(model, out, full=config.train_all, meta={**meta, "step": step})

    if window:  # a run cut short by max_seconds between two events
        last_loss = sum(window) / len(window)
        history.append((step, last_loss))
        hit = _flush_hits(hits, search_hits, step)
        id_hit = _flush_hits(id_hits, memory_id_hits, step)
        value_hit = _flush_hits(value_hits, memory_value_hits, step)
        if progress:
            progress(TrainEvent(step, config.steps, last_loss, optimizer.param_groups[0]["lr"], False,
                                _gate_values(model), time.perf_counter() - started, tokens, hit, keys, id_hit,
                                value_hit))
    model.eval()
    if hasattr(model, "reset"):
        model.reset()  # drop the last batch's memory and its autograd graph
    if out is not None:
        checkpoint = save_checkpoint(model, out, full=config.train_all, meta={**meta, "step": step})
    return TrainResult(step, time.perf_counter() - started, tokens, last_loss, history, _gate_values(model),
                       str(checkpoint) if checkpoint else None, search_hits, memory_id_hits, memory_value_hits)


SEARCH_TAUGHT = 0.9  # teacher forcing ends once the search finds the asked memory for this share of questions …
SEARCH_TAUGHT_STEPS = 20  # … over this many steps in a row


def _search_hit_rate(model: nn.Module, fact_segment: Tensor, segments: int, fact_slot: Tensor | None) -> float:
    """Share of the last batch's questions (`segments` segments each) whose search weighed the asked fact's memory
    highest (evicted: a miss), as the evaluation counts it."""
    return float(_search_hits(model, fact_segment, segments - 1, fact_slot).float().mean())


def _asked_slot(model: nn.Module, batch: RecallBatch, segment_length: int) -> Tensor | None:
    """(b,) which of its segment's memories holds the asked fact, for HMT writing r > 1 memories per segment; None
    with one memory per segment."""
    r = getattr(getattr(model, "config", None), "memory_tokens", 1)
    return fact_slots(batch, segment_length, r)[:, 0] if r > 1 else None


def _memory_id_terms(cache: Tensor | None, probe: nn.Module, targets: Tensor) -> tuple[Tensor, float] | None:
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


def _memory_value_term(cache: Tensor | None, probe: nn.Module, targets: Tensor) -> tuple[Tensor, float] | None:
    """HMT's memory value loss and the probe's digit accuracy on one batch, or None if no memory before the
    question's is given one fact. cache: (b, r·m, C) as for `_memory_id_terms`; targets: (b, s, r, d) digits from
    `slot_fact_values`. The loss is the probe's cross-entropy per digit, summed over the d digits, averaged over the
    memories given one fact."""
    prefix = _prefix_memories(cache, targets)
    if prefix is None or not bool((prefix[1] != IGNORE).any()):
        return None
    memories, wanted = prefix  # (b, m - 1, r, C), (b, m - 1, r, d)
    logits = probe(memories).unflatten(-1, (wanted.shape[-1], -1))  # (b, m - 1, r, d, 10)
    return _digit_loss_and_accuracy(logits, wanted)


def _infini_value_term(probe: InfiniValueProbe, states: list[MemoryState], batch: RecallBatch) -> tuple[Tensor, float]:
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
    (b, s, r, …), or None if fewer than two segments' memories are cached. cache: (b, r·m, C), segments s - m … s - 1."""
    s, r = targets.shape[1], targets.shape[2]
    if cache is None or cache.shape[1] < 2 * r:
        return None
    m = cache.shape[1] // r
    return cache[:, :-r].unflatten(1, (m - 1, r)), targets[:, s - m : s - 1].to(cache.device)


def _flush_hits(hits: list[float], out: list[tuple[int, float]], step: int) -> float | None:
    """Mean of the hit rates since the last event, recorded at `step` and cleared; None if there were none."""
    if not hits:
        return None
    mean = sum(hits) / len(hits)
    out.append((step, mean))
    hits.clear()
    return mean


def _gates(model: nn.Module) -> list[nn.Parameter]:
    return list(model.gate_parameters()) if hasattr(model, "gate_parameters") else []


def _hmt_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.hmt_parameters()) if hasattr(model, "hmt_parameters") else []


def train_two_stage(model: nn.Module, batches: Batches, config: TrainConfig, stage1_steps: int,
                    stage1_segments: int = 2, progress: Callable[[TrainEvent], None] | None = None,
                    out: str | Path | None = None, meta: dict[str, Any] | None = None,
                    stage1_batches: Batches | None = None, stage1_seconds: float | None = None,
                    stage1_memory_id_loss: float | None = None) -> TrainResult:
    """HMT's multi-stage training ([HMT] App. F). Stage 1: `stage1_steps` steps on
    `stage1_segments` segments with `memory_search=False` (P_n = M_{n-1}), drawn from `stage1_batches` (None: from
    `batches`; for recall tasks pass `stage1_recall_batches(task)`); stage 2: `config` as given (its steps, its
    segment range) with the search on. Each stage has its own optimizer and warm-up + cosine schedule; with
    `max_seconds`, stage 1 is boxed to `stage1_seconds` of it (None: its share by steps) and stage 2 gets the rest.
    Events and history count steps across both stages. `stage1_memory_id_loss` is the memory id loss's weight in
    stage 1 (None: the config's, as in stage 2).
    The checkpoint is written by stage 2 only, so the saved adapter has `memory_search=True`; the model is left with
    the search on whatever happens. stage1_steps=0 is plain training with the search."""
    hmt_config = getattr(model, "config", None)
    if not hasattr(hmt_config, "memory_search"):
        raise ConfigError("two-stage training is for the HMT reader (a config with memory_search)")
    if stage1_steps < 0 or stage1_segments < 1:
        raise ConfigError("stage1_steps must be 0 or more and stage1_segments at least 1")
    total = stage1_steps + config.steps
    meta = {**(meta or {}), "stages": {"stage1_steps": stage1_steps, "stage1_segments": stage1_segments,
                                       "stage2_steps": config.steps, "stage2_segments": list(config.segments)}}

    def shifted(offset: int) -> Callable[[TrainEvent], None] | None:
        if progress is None:
            return None
        return lambda e: progress(replace(e, step=e.step + offset, steps=total, seconds=e.seconds + spent))

    first = None
    spent = 0.0
    try:
        if stage1_steps:
            seconds = None if config.max_seconds is None else \
                min(stage1_seconds or config.max_seconds * stage1_steps / total, config.max_seconds)
            stage1 = replace(config, steps=stage1_steps, segments=(stage1_segments, stage1_segments),
                             length_curriculum=0.0, keys_curriculum=0.0, max_seconds=seconds, checkpoint_every=0,
                             search_loss=0.0, search_teacher=0.0,  # no search in stage 1
                             memory_id_loss=config.memory_id_loss if stage1_memory_id_loss is None
                             else stage1_memory_id_loss)
            hmt_config.memory_search = False
            first = train(model, stage1_batches or batches, stage1, progress=shifted(0))
            spent = first.seconds
        hmt_config.memory_search = True
        stage2 = config if config.max_seconds is None else replace(config, max_seconds=max(config.max_seconds - spent,
                                                                                           1e-3))
        second = train(model, batches, stage2, progress=shifted(first.steps if first else 0), out=out, meta=meta)
    finally:
        hmt_config.memory_search = True
    if first is None:
        return second
    offset = first.steps
    history = first.history + [(step + offset, loss) for step, loss in second.history]
    return TrainResult(first.steps + second.steps, first.seconds + second.seconds, first.tokens + second.tokens,
                       second.loss, history, second.gates, second.checkpoint,
                       [(step + offset, hit) for step, hit in second.search_hits],
                       first.memory_id_hits + [(step + offset, hit) for step, hit in second.memory_id_hits],
                       first.memory_value_hits + [(step + offset, hit) for step, hit in second.memory_value_hits])


def _gate_values(model: nn.Module) -> list[list[float]] | None:
    return model.gate_values().tolist() if hasattr(model, "gate_values") else None


# ----------------------------------------------------------------------------------------------------------------
# building readers and their checkpoints


def build_reader(reader: str = "infini", model: str | None = None, tiny: bool = False, segment_length: int = 32,
                 update: str = "linear", d_model: int = 64, layers: int = 2, heads: int = 2,
                 vocab_size: int | None = None, seed: int = 0, sensory_tokens: int | None = None,
                 cache_size: int | None = None, memory_tokens: int = 1, **model_kwargs: Any) -> tuple[nn.Module, Any]:
    """A reader to train and the backbone's tokenizer (None for a tiny model, which reads task token ids).

    reader: "infini" or "hmt". tiny: a Llama of `layers` × `d_model` with `heads` heads, randomly initialised
    (CPU ablation sizes); Infini's gates start at β = 0 (sigmoid 0.5); HMT gets k = `sensory_tokens` (default 8)
    and N = `cache_size` (default 64), and the Llama's positions cover a segment plus the sensory
    tokens and the memory tokens. Otherwise `model` names a Hugging Face causal LM (id or local path): Infini's
    gates start at InfiniConfig's default (≈ 0.01), so that step 0 is the pretrained model; HMT uses HMTConfig's
    defaults for k and N unless given. `update` is Infini's only; `memory_tokens` (r, memories written per segment)
    is HMT's only."""
    if reader not in ("infini", "hmt"):
        raise ConfigError(f"unknown reader {reader!r}: the trainable readers are 'infini' and 'hmt'")
    if tiny == (model is not None):
        raise ConfigError("name a backbone (a Hugging Face id or local path) or ask for a tiny model, not both")
    if reader == "hmt":
        return _build_hmt(model, tiny, segment_length, d_model, layers, heads, vocab_size, seed, sensory_tokens,
                          cache_size, memory_tokens, **model_kwargs)
    from ragkit.readers.infini import InfiniConfig, InfiniLM

    if tiny:
        from transformers import LlamaForCausalLM

        from ragkit.readers.tasks import VOCAB_SIZE, tiny_llama_config

        torch.manual_seed(seed)
        backbone = LlamaForCausalLM(tiny_llama_config(vocab_size or VOCAB_SIZE, d_model, layers, heads,
                                                      segment_length=segment_length))
        return InfiniLM(backbone, InfiniConfig(segment_length=segment_length, update=update, gate_init=0.0)), None
    infini = InfiniLM.from_pretrained(model, InfiniConfig(segment_length=segment_length, update=update),
                                      **model_kwargs)
    return infini, load_reader_tokenizer(model)


def _build_hmt(model: str | None, tiny: bool, segment_length: int, d_model: int, layers: int, heads: int,
               vocab_size: int | None, seed: int, sensory_tokens: int | None, cache_size: int | None,
               memory_tokens: int, **model_kwargs: Any) -> tuple[nn.Module, Any]:
    from ragkit.readers.hmt import HMTConfig, HMTLM

    extra = {k: v for k, v in (("sensory_tokens", sensory_tokens), ("cache_size", cache_size)) if v is not None}
    extra["memory_tokens"] = memory_tokens
    if tiny:
        from transformers import LlamaForCausalLM

        from ragkit.readers.tasks import VOCAB_SIZE, tiny_llama_config

        config = HMTConfig(segment_length=segment_length, **{"sensory_tokens": 8, "cache_size": 64, **extra})
        torch.manual_seed(seed)
        backbone = LlamaForCausalLM(tiny_llama_config(vocab_size or VOCAB_SIZE, d_model, layers, heads,
                                                      segment_length=config.positions))
        return HMTLM(backbone, config), None
    hmt = HMTLM.from_pretrained(model, HMTConfig(segment_length=segment_length, **extra), **model_kwargs)
    return hmt, load_reader_tokenizer(model)


def reader_kind(model: nn.Module) -> str:
    """"hmt" or "infini", by what the reader exposes."""
    return "hmt" if hasattr(model, "hmt_parameters") else "infini"


def save_checkpoint(model: nn.Module, folder: str | Path, full: bool, meta: dict[str, Any] | None = None) -> Path:
    """Write the reader's adapter to `folder`, the backbone too if `full` (config.json + model.safetensors, without
    the reader's own parameters), and train.json. Files are written beside and moved in, so a killed run leaves the
    previous checkpoint whole."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_adapter(staging)
    backbone = model.model
    if full:
        tensors, seen = {}, set()
        for name, tensor in backbone.state_dict().items():
            if name.endswith("self_attn.gate"):  # the reader's own parameters live in the adapter
                continue
            if tensor.data_ptr() in seen:  # a tied weight (lm_head = embeddings): transformers ties it on load
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().cpu().contiguous()
        save_file(tensors, str(staging / BACKBONE_WEIGHTS), metadata={"format": "pt"})
        backbone.config.save_pretrained(staging)
    name = getattr(backbone.config, "_name_or_path", "") or ""
    record = {"version": CHECKPOINT_VERSION, "reader": reader_kind(model), "full": full,
              "backbone": "." if full else name, **(meta or {})}
    (staging / TRAIN_META).write_text(json.dumps(record, indent=2, default=str) + "\n")
    for path in staging.iterdir():
        os.replace(path, folder / path.name)
    staging.rmdir()
    if not full:
        (folder / BACKBONE_WEIGHTS).unlink(missing_ok=True)  # a stale backbone from an earlier full run
    return folder


def load_checkpoint(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The reader saved by `save_checkpoint` (or by `ragkit reader train`), in eval mode on `device`."""
    folder = Path(folder)
    try:
        record = json.loads((folder / TRAIN_META).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder} does not hold a reader checkpoint ({TRAIN_META}): {e}") from None
    if record.get("version") != CHECKPOINT_VERSION or record.get("reader") not in ("infini", "hmt"):
        raise ModelLoadError(f"{folder} holds an unsupported checkpoint: {record.get('reader')} "
                             f"version {record.get('version')}")
    backbone = str(folder) if record["full"] else record["backbone"]
    if not backbone:
        raise ModelLoadError(f"the checkpoint in {folder} does not name its backbone")
    if record["reader"] == "hmt":
        from ragkit.readers.hmt import HMTLM, saved_config

        return HMTLM.from_pretrained(backbone, saved_config(folder), adapter=folder).to(device).eval()
    from ragkit.readers.infini import InfiniLM

    return InfiniLM.from_pretrained(backbone, adapter=folder).to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class DepthCell:
    """Accuracy of the sequences whose queried fact starts in [lo, hi) of the room facts may use."""

    lo: float
    hi: float
    n: int
    digit: float  # share of answer digits right (teacher-forced, argmax)
    value: float  # share of answers with every digit right (= greedy exact match)


@dataclass
class RecallCell:
    """Recall of one reading mode at one length.

    mode: "on" (the memory as trained), "shut" (every gate shut: the backbone's own local attention; for HMT, the
    memory disabled: the final segment read alone), or "other" (the memory of a different sequence: its segments,
    then the final segment of this one).
    search_hit (HMT with memory search, mode "on" only): the share of sequences whose final segment's search gives
    its highest weight to the memory that holds the queried fact (that of its segment; with r > 1 memories per
    segment, the one the fact was given, `fact_slots`); a fact evicted from the cache counts as a miss; None
    otherwise. search_segment_hit: the same, counting any of the r memories of the fact's segment (equal to
    search_hit with r = 1). Unsupervised, the search may weigh another memory of the right segment highest, one the
    value loss did not give the fact, which search_hit alone would call a miss.
    digit_alone: digit accuracy over the sequences whose queried fact is the only fact in its segment (HMT keeps one
    memory per segment unless `memory_tokens` > 1, so this separates reading a memory from telling apart two facts
    in one); None if none is. digit_shared: the same over the others, whose fact shares its segment."""

    mode: str
    segments: int
    tokens: int
    keys: int
    n: int
    digit: float
    value: float
    by_depth: list[DepthCell]
    search_hit: float | None = None
    search_segment_hit: float | None = None
    digit_alone: float | None = None
    digit_shared: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MODES = ("on", "shut", "other")


def hit_text(exact: float | None, segment: float | None) -> str:
    """A search hit rate for a table, with the segment hit in brackets where it counts more (r > 1)."""
    if exact is None:
        return ""
    return f"{exact:.3f}" + (f" ({segment:.3f} for the segment)" if segment is not None and segment > exact else "")


@torch.no_grad()
def evaluate_recall(model: nn.Module, task: RecallTask, lengths: Sequence[int], sequences: int = 256,
                    batch_size: int = 64, modes: Sequence[str] = MODES, depth_buckets: int = 4, seed: int = 1234,
                    device: str | None = None,
                    progress: Callable[[ProgressEvent], None] | None = None) -> list[RecallCell]:
    """Digit and whole-value accuracy of `model` on `task` for every length (in segments) and mode, overall and per
    depth bucket of the queried fact. The same sequences (fixed `seed`) are used for every mode.

    The prefix is streamed with `read` and the final segment, which holds the question, scored with
    `forward(reset=False)`. With gates shut no segment reads the memory, so the prefix cannot change the answer:
    "shut" scores the final segment alone, with `shut_gates()` on and restored afterwards. For HMT, `shut_gates` is
    `disable_memory`: "shut" is the final segment read without memory tokens (its sensory tokens, which only the
    prefix could fill, are empty too: keep facts out of them with the task's `protect`), and "on" also measures the
    search hit rate (`RecallCell.search_hit`) from the final segment's `last_weights`."""
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if "shut" in modes and not hasattr(model, "shut_gates"):
        raise ConfigError("this reader has no gates to shut: leave 'shut' out of modes")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    cells = []
    S = task.segment_length
    try:
        for segments in lengths:
            n_batches = -(-sequences // batch_size)
            for mode in modes:
                right, depths, hits, segment_hits, alone = [], [], [], [], []
                for j in range(n_batches):  # batch j is the same for every mode: its generators are seeded by j
                    size = min(batch_size, sequences - j * batch_size)
                    batch = make_recall_batch(task, size, segments, _seeded(seed, segments, j))
                    ids = batch.input_ids.to(device)
                    last = ids[:, -S:]  # (b, S): the question's segment
                    if hasattr(model, "reset"):
                        model.reset()
                    if mode == "shut":
                        logits = _shut_forward(model, last)
                    else:
                        if mode == "on":
                            prefix = ids[:, :-S]
                        else:  # a different sequence of the same length: other facts, other positions
                            donor = make_recall_batch(task, size, segments, _seeded(seed + 1, segments, j))
                            prefix = donor.input_ids[:, :-S].to(device)
                        if prefix.shape[1]:
                            model.read(prefix)
                        logits = model(last, reset=prefix.shape[1] == 0)  # (b, S, V)
                        if mode == "on":
                            asked_segment = batch.key_positions[:, 0] // S
                            hit = _search_hits(model, asked_segment, segments - 1, _asked_slot(model, batch, S))
                            if hit is not None:
                                hits.append(hit)
                                segment_hits.append(_search_hits(model, asked_segment, segments - 1))
                    pos = batch.answer_positions - (ids.shape[1] - S)  # (d,) within the last segment
                    pred = logits[:, pos].argmax(dim=-1).cpu()  # (b, d)
                    right.append(pred == batch.answer)
                    depths.append(batch.depth)
                    fact_segments = batch.key_positions // S  # (b, K), column 0 the queried fact's
                    alone.append(~(fact_segments[:, 1:] == fact_segments[:, :1]).any(dim=1))
                    if progress:
                        progress(ProgressEvent(f"eval {mode} ×{segments}", j + 1, n_batches))
                if hasattr(model, "reset"):
                    model.reset()
                right_all, alone_rows = torch.cat(right), torch.cat(alone)
                cell = _cell(mode, segments, S, task.keys, right_all, torch.cat(depths), depth_buckets)
                if hits:
                    cell.search_hit = float(torch.cat(hits).float().mean())
                    cell.search_segment_hit = float(torch.cat(segment_hits).float().mean())
                if bool(alone_rows.any()):
                    cell.digit_alone = float(right_all[alone_rows].float().mean())
                if not bool(alone_rows.all()):
                    cell.digit_shared = float(right_all[~alone_rows].float().mean())
                cells.append(cell)
    finally:
        model.train(was_training)
    return cells


def _search_hits(model: nn.Module, key_segment: Tensor, prefix_segments: int,
                 key_slot: Tensor | None = None) -> Tensor | None:
    """(b,) bool: did the latest memory search weigh the asked fact's memory highest: memory `key_slot` (b,) of
    segment `key_segment` (b,), or with key_slot None any memory of that segment? The cache holds the r memories
    each of the last m ≤ N of the `prefix_segments` segments read, oldest first. None for a reader without a
    search (Infini, HMT with memory_search off or memory disabled, nothing cached)."""
    weights = getattr(model, "last_weights", None)
    config = getattr(model, "config", None)
    if weights is None or not getattr(config, "memory_search", False) or getattr(model, "memory_disabled", False):
        return None
    from ragkit.readers.hmt import cache_index

    r = config.memory_tokens  # memories per segment
    index = cache_index(key_segment.to(weights.device), prefix_segments, weights.shape[-1] // r)  # (b,), -1: evicted
    best = weights[:, 0].argmax(dim=-1)  # (b,)
    if key_slot is None:
        return ((index >= 0) & (best // r == index)).cpu()
    return ((index >= 0) & (best == index * r + key_slot.to(best.device))).cpu()


def _seeded(seed: int, segments: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + segments * 10_007 + batch)


def _shut_forward(model: nn.Module, ids: Tensor) -> Tensor:
    layers = getattr(model, "layers", [])
    before = [getattr(attn, "gate_shut", False) for attn in layers]
    model.shut_gates(True)
    try:
        return model(ids)
    finally:
        if layers:
            for attn, shut in zip(layers, before):
                attn.gate_shut = shut
        else:
            model.shut_gates(False)


def _cell(mode: str, segments: int, segment_length: int, keys: int, right: Tensor, depth: Tensor,
          buckets: int) -> RecallCell:
    """right: (n, d) bool per digit; depth: (n,) in [0, 1)."""
    whole = right.all(dim=1)
    by_depth = []
    for k in range(buckets):
        lo, hi = k / buckets, (k + 1) / buckets
        inside = (depth >= lo) & (depth < hi) if k < buckets - 1 else depth >= lo
        n = int(inside.sum())
        by_depth.append(DepthCell(lo, hi, n, float(right[inside].float().mean()) if n else float("nan"),
                                  float(whole[inside].float().mean()) if n else float("nan")))
    return RecallCell(mode, segments, segments * segment_length, keys, len(right), float(right.float().mean()),
                      float(whole.float().mean()), by_depth)
