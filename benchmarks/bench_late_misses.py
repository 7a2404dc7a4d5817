"""Where the centroid candidate stage loses the exact top 10 on a large collection of real text, and whether
residual codes (exact token scores for the tokens it probes) would bring it back.

    python benchmarks/bench_late_misses.py --workdir DIR [--queries-per-set 30]

Runs on the folders bench_late_collection.py leaves in DIR (the collection, its 64·√T centroid stage and the
encoded parts). For each question, the share of the exact top 10 (exact MaxSim over every chunk) found among the
best P chunks of each candidate score, at the default probe:
- centroid score alone: centroid interaction over the probed lists, the next centroid as floor;
- the default: that score plus the chunk-direction score, both standardised (what `ragkit search` re-ranks);
- probed tokens exact: the same probes, but each probed token scored exactly (q_i · t, not q_i · its centroid),
  alone and with the chunk-direction score: what any residual code (PLAID's 2-bit, 8-bit) can at best approach;
- centroid interaction of the pool: the default's best 8,192 chunks re-scored with the centroid of every one of
  their tokens (PLAID's second stage), not only the probed ones.
A re-rank of P candidates by exact MaxSim returns exactly the share found among them, so these are the recall@10
each would give with P candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.bench_late_collection import SETS, questions_of  # noqa: E402
from benchmarks.common import minilm_model, record  # noqa: E402

POOLS = (1024, 2048, 4096, 8192)
POOL = 8192  # chunks re-scored by centroid interaction


def standardised(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / scores.std()


class ProbedTokens:
    """Every token listed under its centroid, to score the probed ones exactly."""

    def __init__(self, late, lists, codes: np.ndarray, probe: int) -> None:
        self.late, self.lists, self.probe = late, lists, probe
        self.order = np.argsort(codes, kind="stable")  # token ids grouped by centroid
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(lists.centroids)))])
        self.row_of_token = np.repeat(np.arange(len(late), dtype=np.int64), np.diff(late.offsets))

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Σ_i max(floor_i, max over the chunk's probed tokens of q_i · t), less Σ_i floor_i."""
        sims = query @ self.lists.centroids.T
        best = np.zeros(len(self.late), dtype=np.float32)
        for q, row in zip(query, sims):
            nearest = np.argsort(-row)[: self.probe + 1]
            floor, probed = row[nearest[-1]], nearest[:-1]
            starts, ends = self.offsets[probed], self.offsets[probed + 1]
            lengths = ends - starts
            tokens = np.sort(self.order[np.arange(int(lengths.sum()))
                                        + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)])
            gains = np.maximum(np.asarray(self.late.tokens[tokens], dtype=np.float32) @ q - floor, 0)
            maxima = np.zeros(len(self.late), dtype=np.float32)
            np.maximum.at(maxima, self.row_of_token[tokens], gains)
            best += maxima
        return best


def centroid_interaction(late, lists, codes: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Σ_i max over every token t of each row of q_i · centroid(t)."""
    by_centroid = np.ascontiguousarray((query @ lists.centroids.T).T)  # (K, q_tokens)
    lengths = late.offsets[rows + 1] - late.offsets[rows]
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum())) + np.repeat(late.offsets[rows] - starts, lengths)
    return np.maximum.reduceat(by_centroid[codes[positions]], starts, axis=0).sum(axis=1)


def found_in(order: np.ndarray, truth: set[int]) -> dict[int, float]:
    return {p: len(truth & set(order[:p].tolist())) / len(truth) for p in POOLS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--queries-per-set", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from ragkit.config import Settings
    from ragkit.indexer import IndexReport, _Encoders
    from ragkit.indexes.late import LateIndex
    from ragkit.indexes.late_centroids import CODES, CentroidLists

    late = LateIndex.load(args.workdir / "collection")
    stage = args.workdir / "centroids-64"
    lists = CentroidLists.load(stage, len(late))
    codes = np.load(stage / CODES)
    encoders = _Encoders(Settings(dense_model=minilm_model(), late_model=str(args.workdir / "colbert")).for_index({}),
                         True, True, IndexReport())
    questions = [q for name in SETS for q in questions_of(name, args.queries_per_set)]
    queries = encoders.late.encode_queries(questions)
    truths = [{r for r, _ in hits} for hits in late.search(queries, 10, exact_max_tokens=10**12)]
    probe = Settings().late_probe
    probed = ProbedTokens(late, lists, codes, probe)
    pool_label = f"centroid interaction of the default's best {POOL:,}"
    labels = ("centroid score alone", "default: centroid score + chunk direction", "probed tokens exact",
              "probed tokens exact + chunk direction", pool_label)
    shares: dict[str, list[dict[int, float]]] = {label: [] for label in labels}
    for query, truth in zip(queries, truths):
        centroid = lists.approximate_scores(query, probe)
        direction = standardised(lists.directions @ query.sum(axis=0))
        exact_probed = probed.scores(query)
        default = np.argsort(-(standardised(centroid) + direction), kind="stable")
        pool = np.sort(default[:POOL])
        rescored = pool[np.argsort(-centroid_interaction(late, lists, codes, query, pool), kind="stable")]
        for label, order in zip(labels, (np.argsort(-centroid, kind="stable"), default,
                                         np.argsort(-exact_probed, kind="stable"),
                                         np.argsort(-(standardised(exact_probed) + direction), kind="stable"),
                                         rescored)):
            shares[label].append(found_in(order, truth))
        print(len(shares[labels[0]]), {k: v[-1] for k, v in shares.items()}, flush=True)
    raw = {"tokens": late.total_tokens, "chunks": len(late), "centroids": len(lists.centroids), "probe": probe,
           "questions": len(queries),
           "recall@10": {k: {p: float(np.mean([s[p] for s in v])) for p in POOLS} for k, v in shares.items()}}
    lines = [f"{raw['tokens']:,} tokens, {raw['chunks']:,} chunks, K = {raw['centroids']:,}, probe {probe}, "
             f"{raw['questions']} questions. Share of the exact top 10 among the best P chunks of each score "
             "(= recall@10 after an exact re-rank of P candidates):", "",
             "| candidate score | " + " | ".join(f"P = {p:,}" for p in POOLS) + " |",
             "|---|" + "---:|" * len(POOLS)]
    lines += [f"| {k} | " + " | ".join(f"{v[p]:.3f}" for p in POOLS) + " |" for k, v in raw["recall@10"].items()]
    if not args.no_record:
        record("bench_late_misses", "Where the centroid stage loses the exact top 10 on 10M tokens of real text",
               raw, "\n".join(lines), command=f"python benchmarks/bench_late_misses.py {' '.join(sys.argv[1:])}")
    else:
        print("\n".join(lines))
    print(json.dumps(raw["recall@10"], indent=1))


if __name__ == "__main__":
    main()
