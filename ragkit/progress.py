"""Progress reporting: the library calls a callback; the CLI renders it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressEvent:
    """`done` of `total` units of `stage` are finished.

    An index run reports "scan", "parse" (files), "encode" (dense) and "late" (chunks), "write" and, inside
    "write", "switch" (0 once the new generation is renamed into place, 1 once CURRENT names it). An evaluation
    reports "eval" (questions). Reader training reports "tokenize" (files) and, while it evaluates recall,
    "eval MODE ×SEGMENTS" (batches)."""

    stage: str
    done: int
    total: int
    tokens: int = 0  # tokens so far ("encode", "late" and "tokenize")


Progress = Callable[[ProgressEvent], None]


def silent(event: ProgressEvent) -> None:
    """A progress callback that ignores every event."""
