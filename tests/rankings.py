"""Comparing two rankings of the same index made by different code paths (another engine, shards, Qdrant)."""

from __future__ import annotations

import pytest


def assert_same_ranking(got, expected, tie: float = 1e-4) -> None:
    """The same scores (within float32 summation order) and the same chunks at each score; chunks whose scores
    differ by less than `tie` may come in either order, and those tied at the cut may differ."""
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=tie)
    groups: list[list[int]] = []
    for i, hit in enumerate(expected):
        if groups and abs(expected[groups[-1][0]].score - hit.score) < tie:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups[:-1] if len(expected) == len(got) else groups:
        assert {got[i].chunk_id for i in group} == {expected[i].chunk_id for i in group}
