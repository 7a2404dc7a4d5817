"""One training loop for memory readers: AdamW over the reader's parameters, warm-up and cosine schedule, optional
gate warm-up, gradients through the memory across every segment of a sample, checkpoints. It knows no reader type:
what is a reader's own (its optimizer groups, its gates) the reader says (`ragkit.memory.base.MemoryLM`), and the
auxiliary memory losses of recall tasks are `ragkit.memory.probes.Supervision`'s. HMT's two stages
(`train_two_stage`) are two calls of the same loop. What the runs taught is in docs/memory-readers.md."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ragkit.errors import ConfigError, RagkitError
from ragkit.memory.base import MemoryLM
from ragkit.memory.checkpoints import save_checkpoint
from ragkit.memory.probes import Supervision
from ragkit.memory.tasks import IGNORE, Batches, curriculum_keys


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


def param_groups(model: MemoryLM, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed vectors (norms, biases), and the reader's own groups (gates, HMT's
    new parameters) at their own learning rates without decay (decay would blunt HMT's near-exact lookup). Only
    parameters that require gradients are included."""
    own_groups = model.optimizer_groups(config.lr, config.gate_learning_rate, config.hmt_lr)
    own = {id(p) for group in own_groups for p in group["params"]}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in own or not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr, "name": "no_decay"},
        *own_groups,
    ]
    return [g for g in groups if g["params"]]


def lr_factor(progress: float, config: TrainConfig) -> float:
    """Linear warm-up over the first `warmup` share of the run, then cosine decay to `min_lr_ratio`."""
    if config.warmup > 0 and progress < config.warmup:
        return max(progress / config.warmup, 1e-3)
    t = min((progress - config.warmup) / max(1.0 - config.warmup, 1e-9), 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _Hits:
    """Hit rates by name (search_hit, memory_id_hit, memory_value_hit): each step's, averaged at every event."""

    NAMES = ("search_hit", "memory_id_hit", "memory_value_hit")

    def __init__(self) -> None:
        self.pending: dict[str, list[float]] = {name: [] for name in self.NAMES}
        self.history: dict[str, list[tuple[int, float]]] = {name: [] for name in self.NAMES}

    def add(self, hits: dict[str, float]) -> None:
        for name, value in hits.items():
            self.pending[name].append(value)

    def flush(self, step: int) -> dict[str, float | None]:
        """The mean of each since the last event (None if there was none), recorded at `step`."""
        means: dict[str, float | None] = {}
        for name, values in self.pending.items():
            means[name] = sum(values) / len(values) if values else None
            if values:
                self.history[name].append((step, means[name]))
                values.clear()
        return means


def train(model: MemoryLM, batches: Batches, config: TrainConfig,
          progress: Callable[[TrainEvent], None] | None = None, out: str | Path | None = None,
          meta: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` on `batches` with AdamW; write checkpoints to `out` (every `checkpoint_every` steps and at the
    end) with `meta` added to train.json. Returns what the run did; the model is left trained, in eval mode (with
    train_all=False, its backbone is left with requires_grad off)."""
    if not isinstance(model, MemoryLM):
        raise ConfigError(f"train() trains a memory reader (a MemoryLM such as InfiniLM or HMTLM), not "
                          f"{type(model).__name__}")
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats made late steps of tiny models several times slower
    if getattr(model.config, "bptt_segments", None) == 1:
        raise ConfigError("the reader detaches its memory after every segment (bptt_segments=1): it could not learn "
                          "what to write; use None (all segments) or at least 2")
    task = getattr(batches, "task", None)  # the recall task, or None for documents
    if config.keys_curriculum > 0 and task is None:
        raise ConfigError("keys_curriculum varies the facts per sequence of a recall task: use recall batches")
    supervised = any((config.search_loss, config.search_teacher, config.memory_id_loss, config.memory_value_loss))
    if supervised and task is None:
        raise ConfigError("search_loss, search_teacher, memory_id_loss and memory_value_loss train a memory to find "
                          "and hold its facts, known on recall tasks: use recall batches")
    model.to(device).train()
    gates = model.gate_parameters()
    if not config.train_all:
        adapter = {id(p) for p in model.adapter_parameters()}
        if gates and config.gate_warmup > 0:
            raise ConfigError("with only the gates trained, a gate warm-up would train nothing: set gate_warmup=0")
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter)
    if gates and config.gate_warmup > 0 and config.gate_hold is not None:
        with torch.no_grad():
            for g in gates:
                g.fill_(config.gate_hold)
    groups = param_groups(model, config)
    supervision = None
    if supervised:
        supervision = Supervision(model, task, config.search_loss, config.search_teacher, config.memory_id_loss,
                                  config.memory_value_loss, config.train_all)
        groups += supervision.param_groups(config.probe_lr or config.hmt_lr or config.lr)
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    lo, hi = config.segments
    meta = {**(meta or {}), "train": asdict(config)}

    started = time.perf_counter()
    step = tokens = 0
    window: list[float] = []
    history: list[tuple[int, float]] = []
    hits = _Hits()
    last_loss = float("nan")
    keys = None

    def event(lr: float, frozen: bool) -> None:
        nonlocal last_loss, window
        last_loss = sum(window) / len(window)
        history.append((step, last_loss))
        window = []
        means = hits.flush(step)
        if progress:
            progress(TrainEvent(step, config.steps, last_loss, lr, frozen, _gate_values(model),
                                time.perf_counter() - started, tokens, means["search_hit"], keys,
                                means["memory_id_hit"], means["memory_value_hit"]))

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
        keys = curriculum_keys(share, task.keys, config.keys_curriculum) if task is not None else None
        if supervision is not None:  # its losses need where the facts lie, not only ids and labels
            batch = batches.draw(config.batch_size, segments, generator, keys).to(device)
            ids, labels = batch.input_ids, batch.labels
            logits, extra, step_hits = supervision.step(model, batch, share)
            hits.add(step_hits)
        else:
            ids, labels = (batches(config.batch_size, segments, generator) if keys is None else
                           batches(config.batch_size, segments, generator, keys))
            ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits, extra = model(ids), None  # (b, n, V): every segment in order, gradients through the memory
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        window.append(float(loss.detach()))  # the task's loss: what events and the history report
        if extra is not None:
            loss = loss + extra
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
        if step % config.log_every == 0 or step == config.steps:
            event(config.lr * factor, frozen)
        if out is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(model, out, full=config.train_all, meta={**meta, "step": step})

    if window:  # a run cut short by max_seconds between two events
        event(optimizer.param_groups[0]["lr"], False)
    model.eval()
    model.reset()  # drop the last batch's memory and its autograd graph
    checkpoint = None
    if out is not None:
        checkpoint = save_checkpoint(model, out, full=config.train_all, meta={**meta, "step": step})
    return TrainResult(step, time.perf_counter() - started, tokens, last_loss, history, _gate_values(model),
                       str(checkpoint) if checkpoint else None, hits.history["search_hit"],
                       hits.history["memory_id_hit"], hits.history["memory_value_hit"])


def train_two_stage(model: MemoryLM, batches: Batches, config: TrainConfig, stage1_steps: int,
                    stage1_segments: int = 2, progress: Callable[[TrainEvent], None] | None = None,
                    out: str | Path | None = None, meta: dict[str, Any] | None = None,
                    stage1_batches: Batches | None = None, stage1_seconds: float | None = None,
                    stage1_memory_id_loss: float | None = None) -> TrainResult:
    """HMT's multi-stage training (the HMT paper, arXiv 2405.06067, App. F). Stage 1: `stage1_steps` steps on
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


def _gate_values(model: MemoryLM) -> list[list[float]] | None:
    values = model.gate_values()
    return None if values is None else values.tolist()
