"""Fusion of the retrievers' ranked runs into one ranking of chunks, and the evidence of document names added to it.

`fuse` applies a `FusionRule`: weighted reciprocal rank fusion (or a weighted mean of min-max normalised scores),
then the evidence of a document's name (`ragkit.names`): a chunk whose file name holds the year or code the
question names (the year of a filing) gains `name_weight` × its document's name score (in (0, 1]) in `unit`s, the
score of a chunk ranked first by every retriever. Rows are chunk rows of one index; ranks are kept per retriever
for each fused row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

Fused = list[tuple[int, float, dict[str, int]]]  # (row, score, rank in each retriever that found it), best first


@dataclass(frozen=True)
class FusionRule:
    """How runs are fused (see the module docstring); the defaults are plain reciprocal rank fusion."""

    method: str = "rrf"  # rrf (reciprocal rank) or convex (mean of min-max normalised scores)
    rrf_k: int = 60  # reciprocal rank fusion constant (Cormack et al. 2009)
    weights: Mapping[str, float] = field(default_factory=dict)  # per retriever; 1.0 when not named
    name_weight: float = 0.0  # bonus for a chunk of a document the query names, in units

    @classmethod
    def from_settings(cls, s: Any) -> "FusionRule":
        """The rule that `ragkit.config.Settings` `s` name."""
        return cls(s.fusion, s.rrf_k, {"dense": s.dense_weight, "bm25": s.bm25_weight, "late": s.late_weight},
                   s.name_weight)

    def weight(self, retriever: str) -> float:
        return float(self.weights.get(retriever, 1.0))

    def unit(self, retrievers: Sequence[str]) -> float:
        """The score of a chunk ranked first by every retriever in `retrievers`."""
        total = sum(self.weight(r) for r in retrievers)
        return total / (self.rrf_k + 1) if self.method == "rrf" else total / max(1, len(retrievers))


def reciprocal_rank_fusion(runs: dict[str, list[int]], k: int = 60,
                           weights: Mapping[str, float] | None = None) -> Fused:
    """Fuse ranked row lists: score(d) = Σ w_r / (k + rank_r(d)), ranks from 1, w_r = 1 unless `weights` says
    otherwise. Ties keep first-seen order.

    >>> [(row, round(score, 4)) for row, score, _ in reciprocal_rank_fusion({"a": [7, 3], "b": [3]}, k=60)]
    [(3, 0.0325), (7, 0.0164)]
    >>> [row for row, _, _ in reciprocal_rank_fusion({"a": [7, 3], "b": [3]}, k=60, weights={"b": 0.0})]
    [7, 3]
    """
    weights = weights or {}
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, rows in runs.items():
        w = float(weights.get(name, 1.0))
        for rank, row in enumerate(rows, start=1):
            scores[row] = scores.get(row, 0.0) + w / (k + rank)
            ranks.setdefault(row, {})[name] = rank
    order = sorted(scores, key=lambda row: -scores[row])
    return [(row, scores[row], ranks[row]) for row in order]


def convex_fusion(runs: dict[str, list[tuple[int, float]]], weights: Mapping[str, float] | None = None) -> Fused:
    """Fuse scored runs by the weighted mean of min-max normalised scores (a row a retriever missed scores 0 there).

    >>> [(row, round(s, 3)) for row, s, _ in convex_fusion({"a": [(1, 9.0), (2, 5.0)], "b": [(2, 0.8), (1, 0.4)]})]
    [(1, 0.5), (2, 0.5)]
    """
    weights = weights or {}
    totals: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, results in runs.items():
        if not results:
            continue
        w = float(weights.get(name, 1.0))
        values = np.array([score for _, score in results], dtype=np.float64)
        low, span = values.min(), values.max() - values.min()
        for rank, (row, score) in enumerate(results, start=1):
            totals[row] = totals.get(row, 0.0) + w * float((score - low) / span if span > 0 else 1.0) / len(runs)
            ranks.setdefault(row, {})[name] = rank
    order = sorted(totals, key=lambda row: -totals[row])
    return [(row, totals[row], ranks[row]) for row in order]


def fuse(runs: dict[str, list[tuple[int, float]]], rule: FusionRule, paths: Sequence[str] | None = None,
         name_scores: Mapping[str, float] | None = None) -> Fused:
    """The runs fused by `rule`, best first. `paths[row]` is a row's document and `name_scores` maps the documents
    the query names to their name score (both needed by the name rule)."""
    if rule.method == "convex":
        fused = convex_fusion(runs, rule.weights)
    else:
        fused = reciprocal_rank_fusion({name: [row for row, _ in result] for name, result in runs.items()},
                                       rule.rrf_k, rule.weights)
    if paths is None or not fused or not (rule.name_weight and name_scores):
        return fused
    bonus = rule.name_weight * rule.unit(list(runs))
    rescored = [(row, score + bonus * name_scores.get(paths[row], 0.0), ranks) for row, score, ranks in fused]
    order = sorted(range(len(rescored)), key=lambda i: -rescored[i][1])  # stable: ties keep the fused order
    return [rescored[i] for i in order]
