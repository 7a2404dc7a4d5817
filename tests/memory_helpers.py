"""Tiny memory readers and the recall task they are trained on, made at test time (no download), for the memory tests."""

from __future__ import annotations

from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import RecallTask

SEG = 16


def tiny(seed: int = 0, segment_length: int = SEG):
    model, _ = build_reader(tiny=True, segment_length=segment_length, d_model=32, layers=2, heads=2, seed=seed)
    return model


def tiny_hmt(seed: int = 0):
    model, _ = build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, seed=seed,
                            sensory_tokens=4, cache_size=8)
    return model


def hmt_task() -> RecallTask:  # facts out of the question's segment and out of the 4 sensory tokens before it
    return RecallTask(segment_length=SEG, digits=3, protect=SEG - 6 + 4)
