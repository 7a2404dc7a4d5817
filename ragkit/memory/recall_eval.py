"""Recall of a memory reader on a synthetic task: digit and whole-value accuracy per length, with the memory on,
off (gates shut, or HMT's memory disabled) and taken from another sequence, per depth of the asked fact; HMT's
search hit rate. Any model with `read`, `forward(ids, reset=False)` and optionally `shut_gates` and `search_hits`
can be scored (the benchmarks score a full-attention baseline too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ragkit.errors import ConfigError
from ragkit.memory.probes import asked_slot
from ragkit.memory.tasks import RecallTask, make_recall_batch
from ragkit.progress import ProgressEvent


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
                            hit = _search_hits(model, asked_segment, segments - 1, asked_slot(model, batch, S))
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
    """(b,) bool per question from the reader's `search_hits`, or None for a reader without a search."""
    hits = getattr(model, "search_hits", None)
    return hits(key_segment, prefix_segments, key_slot) if hits is not None else None


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
