"""Centroid candidates for late search over large collections: centroid interaction, then exact MaxSim.

Every token vector is assigned one of K centroids of a two-level spherical k-means: √K coarse centroids, and
within each coarse cell about √K fine ones (so that training and assigning cost √K products per token, not K, and
K can be finer than PLAID's); a token goes to the nearest fine centroid of its nearest coarse cell. For a query,
each query token q_i probes its `probe` nearest centroids; a chunk's approximate MaxSim is Σ_i max_c q_i · c over
the probed centroids of q_i that hold a token of the chunk, and q_i's score with its next (unprobed) centroid where
none does (no unprobed centroid scores higher). A chunk none of whose tokens lies in q_i's probed lists gets that
floor whatever it holds, so the stage also scores every chunk's mean token direction d̄ against the sum of the query
tokens, Σ_i q_i · d̄, which ranks those chunks by their overall closeness to the query; the candidate score is the
sum of the two scores, each standardised over the collection. The best `candidates` chunks by it are then scored
exactly from the token matrix. The work per query is the product q · Cᵀ, the probed lists and one product with the
chunk directions, not the token matrix: it grows with the square root of the collection (K does) and with its
number of chunks, where exact MaxSim grows with its tokens.

Files (in the late folder, plain npy):
    centroids.npy    float32 (K, dim): unit-length fine centroids, grouped by coarse cell
    coarse.npy       float32 (K1, dim): unit-length coarse centroids
    coarse_offsets.npy int64 (K1 + 1,): the fine centroids of coarse cell c are rows coarse_offsets[c]:[c + 1]
    codes.npy        int32 (T,): the centroid of each token (carried over with its chunk between generations)
    ivf.npy          int32 (E,): for each centroid in turn, the sorted chunk rows with a token there
    ivf_offsets.npy  int64 (K + 1,): centroid c holds ivf[ivf_offsets[c]:ivf_offsets[c + 1]]
    directions.npy   float16 (n, dim): each chunk row's mean token vector, unit length (zeros for a chunk without
                     tokens; carried over with its chunk); absent in folders written before it, whose candidates use
                     the centroid score alone
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CENTROIDS, COARSE, COARSE_OFFSETS = "centroids.npy", "coarse.npy", "coarse_offsets.npy"
CODES, IVF, IVF_OFFSETS, DIRECTIONS = "codes.npy", "ivf.npy", "ivf_offsets.npy", "directions.npy"
FILES = (CENTROIDS, COARSE, COARSE_OFFSETS, CODES, IVF, IVF_OFFSETS, DIRECTIONS)
RETRAIN_SHARE = 0.05  # train a candidate stage again once this share of it arrived after training (centroids, PLAID)
CENTROIDS_PER_ROOT_TOKEN = 64  # K ≈ 64·√T (see centroid_count)
MIN_TOKENS_PER_CENTROID = 16  # and K ≤ T/16
SAMPLE_PER_CENTROID = 32  # k-means trains on at most this many sampled tokens per fine centroid
KMEANS_ITERATIONS = 10
ASSIGN_BLOCK = 1 << 16  # tokens assigned to centroids per step (bounds memory)
SCORE_CELLS = 1 << 22  # (query token, chunk row) maxima held at once when scoring (bounds memory)


@dataclass
class CentroidState:
    """What the centroids were trained on, to know when to train them again."""

    count: int = 0  # K asked for (a coarse cell with few sampled tokens gets fewer fine centroids)
    trained_tokens: int = 0
    added_since_training: int = 0

    def needs_training(self, new_tokens: int, total_tokens: int) -> bool:
        return (self.count != centroid_count(total_tokens)
                or self.added_since_training + new_tokens > RETRAIN_SHARE * max(self.trained_tokens, 1))


def centroid_count(tokens: int) -> int:
    """K for a collection of T = `tokens` token vectors: the power of two at or below 64·√T and T/16 (at least 1).

    Four times PLAID's 16·√T: PLAID corrects a token's centroid with its stored residual, centroid interaction has
    only the centroid, and finer centroids bring its scores nearer the exact ones. T/16 bounds what the centroids
    cost per token in collections under a million tokens, which exact search serves while the stage waits."""
    if tokens < 1:
        return 0
    return 1 << int(math.log2(max(1.0, min(CENTROIDS_PER_ROOT_TOKEN * math.sqrt(tokens),
                                           tokens / MIN_TOKENS_PER_CENTROID))))


@dataclass
class Codebook:
    """Two-level centroids: coarse (K1, dim); fine (K, dim) grouped by coarse cell, cell c's at rows
    offsets[c]:offsets[c + 1]."""

    coarse: np.ndarray
    centroids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def train(cls, tokens: np.ndarray, count: int, seed: int) -> "Codebook":
        """Spherical k-means (FAISS) on at most SAMPLE_PER_CENTROID·count tokens drawn evenly: 2^⌈log2(K)/2⌉
        coarse centroids, then as many fine ones in each coarse cell as K asks for and its sampled tokens allow."""
        total = len(tokens)
        sample = np.sort(np.random.default_rng(seed).choice(total, min(total, SAMPLE_PER_CENTROID * count),
                                                            replace=False))
        vectors = np.ascontiguousarray(tokens[sample], dtype=np.float32)
        coarse_count = min(len(vectors), 1 << math.ceil(math.log2(max(count, 1)) / 2))
        coarse = _kmeans(vectors, coarse_count, seed)
        cell = _nearest(vectors, coarse)
        fine_count = max(1, count // coarse_count)
        fine = [_kmeans(vectors[cell == c], min(fine_count, int(np.sum(cell == c))), seed) for c in range(len(coarse))]
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in fine])]).astype(np.int64)
        return cls(coarse, np.concatenate(fine), offsets)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The code of each vector (t, dim): the nearest fine centroid of its nearest coarse cell; (t,) int32."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        cell = _nearest(vectors, self.coarse)
        codes = np.empty(len(vectors), dtype=np.int32)
        for c in np.unique(cell):
            members = np.flatnonzero(cell == c)
            a, b = self.offsets[c], self.offsets[c + 1]
            if a == b:  # a coarse cell that got no sampled token: the nearest fine centroid of any cell
                codes[members] = _nearest(vectors[members], self.centroids)
            else:
                codes[members] = a + np.argmax(vectors[members] @ self.centroids[a:b].T, axis=1)
        return codes

    def save(self, folder: Path) -> None:
        np.save(folder / COARSE, self.coarse)
        np.save(folder / CENTROIDS, self.centroids)
        np.save(folder / COARSE_OFFSETS, self.offsets)

    @classmethod
    def load(cls, folder: Path) -> "Codebook":
        return cls(np.load(folder / COARSE), np.load(folder / CENTROIDS), np.load(folder / COARSE_OFFSETS))


class CentroidLists:
    """The fine centroids and, per centroid, the chunk rows that hold one of its tokens: what a query searches."""

    def __init__(self, centroids: np.ndarray, ivf: np.ndarray, ivf_offsets: np.ndarray, rows: int,
                 directions: np.ndarray | None = None) -> None:
        self.centroids = centroids
        self.ivf = ivf
        self.ivf_offsets = ivf_offsets
        self.rows = rows
        self.directions = directions  # (rows, dim) float32, or None in a folder written before them
        self._empty = None if directions is None else ~directions.any(axis=1)  # rows without tokens

    @classmethod
    def load(cls, folder: Path, rows: int) -> "CentroidLists":
        directions = np.load(folder / DIRECTIONS).astype(np.float32) if (folder / DIRECTIONS).is_file() else None
        return cls(np.load(folder / CENTROIDS), np.load(folder / IVF, mmap_mode="r"), np.load(folder / IVF_OFFSETS),
                   rows, directions)

    def candidates(self, query: np.ndarray, count: int, probe: int) -> np.ndarray:
        """The `count` chunk rows of best candidate score for one query (q_tokens, dim), best first: the
        standardised approximate MaxSim plus the standardised closeness of the chunk's direction to the query."""
        scores = _standardised(self.approximate_scores(query, probe))
        if self.directions is not None:
            scores += _standardised(self.directions @ np.asarray(query, dtype=np.float32).sum(axis=0))
            scores[self._empty] = -np.inf  # a chunk without tokens matches nothing: last, whatever the standardising
        count = min(count, self.rows)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        top = np.argpartition(-scores, count - 1)[:count]
        return top[np.argsort(-scores[top], kind="stable")].astype(np.int64)

    def approximate_scores(self, query: np.ndarray, probe: int) -> np.ndarray:
        """Approximate MaxSim of every chunk row (rows,), less Σ_i of q_i's floor (the same for every row)."""
        similarities = np.asarray(query, dtype=np.float32) @ self.centroids.T  # (q_tokens, K)
        q_tokens, count = similarities.shape
        probe = min(max(probe, 1), count)
        token = np.arange(q_tokens)[:, None]
        if probe < count:  # each token's `probe` nearest centroids, and the next one, whose score is the floor
            nearest = np.argpartition(-similarities, probe, axis=1)[:, : probe + 1]  # (q_tokens, probe + 1)
            scores = similarities[token, nearest]
            lowest = scores.argmin(axis=1)
            floors = scores[token[:, 0], lowest]
            keep = np.ones(nearest.shape, dtype=bool)
            keep[token[:, 0], lowest] = False
            probed = nearest[keep].reshape(q_tokens, probe)
        else:  # every centroid probed: the floor is the lowest score, or 0 when none is negative
            probed = np.broadcast_to(np.arange(count), similarities.shape)
            floors = np.minimum(0.0, similarities.min(axis=1))
        gains = similarities[token, probed] - floors[:, None]  # (q_tokens, probe), ≥ 0
        best = np.zeros(self.rows, dtype=np.float32)
        group = max(1, SCORE_CELLS // max(self.rows, 1))  # query tokens whose (token, row) maxima are held at once
        for first in range(0, q_tokens, group):
            best += self._token_maxima(probed[first : first + group], gains[first : first + group]).sum(axis=0)
        return best

    def _token_maxima(self, probed: np.ndarray, gains: np.ndarray) -> np.ndarray:
        """(tokens, rows): for each query token, each row's highest gain among the probed centroids holding one
        of its tokens (0 where none does), from the tokens' probed centroids and gains, both (tokens, probe)."""
        tokens, probe = probed.shape
        starts = self.ivf_offsets[probed.ravel()]
        lengths = self.ivf_offsets[probed.ravel() + 1] - starts
        # the concatenated lists of every probed centroid: position j of list p is ivf[starts[p] + j]
        positions = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        keys = np.repeat(np.repeat(np.arange(tokens, dtype=np.int64) * self.rows, probe), lengths)
        keys += self.ivf[positions]
        maxima = np.zeros(tokens * self.rows, dtype=np.float32)
        np.maximum.at(maxima, keys, np.repeat(gains.ravel(), lengths))
        return maxima.reshape(tokens, self.rows)


def write_centroids(folder: Path, tokens: np.ndarray, offsets: np.ndarray,
                    carried: dict[int, tuple[int, int, int]], previous: "tuple[Path, CentroidState] | None",
                    seed: int = 0) -> CentroidState:
    """Write the centroid files of a late folder whose token matrix is `tokens` (T, dim) and `offsets` (n + 1).

    `carried` maps a chunk row to (its row, its token range a, b) of the same chunk in `previous`'s folder: those
    tokens keep their centroid there, unless the centroids are trained again (K changes with the collection's size,
    or more than RETRAIN_SHARE of the tokens are new since they were trained), and the chunk keeps its direction."""
    total = int(offsets[-1])
    for name in FILES:
        (folder / name).unlink(missing_ok=True)
    if total == 0:
        return CentroidState()
    np.save(folder / DIRECTIONS, carried_directions(tokens, offsets, carried, previous and previous[0]))
    carried_tokens = sum(b - a for _, a, b in carried.values())
    if previous is not None and not previous[1].needs_training(total - carried_tokens, total):
        old_folder, state = previous
        codebook = Codebook.load(old_folder)
        old_codes = np.load(old_folder / CODES, mmap_mode="r")
        codes = np.full(total, -1, dtype=np.int32)
        for row, (_, a, b) in carried.items():
            codes[offsets[row] : offsets[row + 1]] = old_codes[a:b]
        state = CentroidState(state.count, state.trained_tokens, state.added_since_training + total - carried_tokens)
    else:
        codebook = Codebook.train(tokens, centroid_count(total), seed)
        codes = np.full(total, -1, dtype=np.int32)
        state = CentroidState(centroid_count(total), total, 0)
    missing = np.flatnonzero(codes < 0)
    for start in range(0, len(missing), ASSIGN_BLOCK):
        part = missing[start : start + ASSIGN_BLOCK]
        codes[part] = codebook.assign(tokens[part])
    ivf, ivf_offsets = inverted_lists(codes, offsets, len(codebook.centroids))
    codebook.save(folder)
    np.save(folder / CODES, codes)
    np.save(folder / IVF, ivf)
    np.save(folder / IVF_OFFSETS, ivf_offsets)
    return state


def carried_directions(tokens: np.ndarray, offsets: np.ndarray, carried: dict[int, tuple[int, int, int]],
                       old_folder: Path | None) -> np.ndarray:
    """`chunk_directions`, with each carried chunk's direction read from `old_folder`'s file where it has one."""
    if old_folder is None or not carried or not (old_folder / DIRECTIONS).is_file():
        return chunk_directions(tokens, offsets)
    rows = np.fromiter(carried, dtype=np.int64, count=len(carried))
    old_rows = np.array([carried[row][0] for row in rows.tolist()], dtype=np.int64)
    todo = np.ones(len(offsets) - 1, dtype=bool)
    todo[rows] = False
    out = chunk_directions(tokens, offsets, np.flatnonzero(todo))
    out[rows] = np.load(old_folder / DIRECTIONS, mmap_mode="r")[old_rows]
    return out


def chunk_directions(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Each chunk row's mean token vector scaled to unit length (zeros for a chunk without tokens): (n, dim) float16.
    Only the sorted `rows` are computed when given; the others stay zero."""
    n = len(offsets) - 1
    out = np.zeros((n, tokens.shape[1]), dtype=np.float32)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    rows = rows[offsets[rows + 1] > offsets[rows]]  # chunks with tokens
    sizes = offsets[rows + 1] - offsets[rows]
    ends = np.cumsum(sizes)
    start = 0
    while start < len(rows):  # blocks of whole chunks, about ASSIGN_BLOCK tokens each
        before = ends[start - 1] if start else 0
        end = min(max(int(np.searchsorted(ends, before + ASSIGN_BLOCK, side="right")), start + 1), len(rows))
        block_rows, count = rows[start:end], int(ends[end - 1] - before)
        starts = ends[start:end] - before - sizes[start:end]  # each chunk's first row in the block
        first = int(offsets[block_rows[0]])
        if int(offsets[block_rows[-1] + 1]) - first == count:  # whole consecutive chunks: one slice of the matrix
            block = np.asarray(tokens[first : first + count], dtype=np.float32)
        else:
            positions = np.arange(count) + np.repeat(offsets[block_rows] - starts, sizes[start:end])
            block = np.asarray(tokens[positions], dtype=np.float32)
        out[block_rows] = np.add.reduceat(block, starts, axis=0)
        start = end
    return _unit(out).astype(np.float16)


def _standardised(scores: np.ndarray) -> np.ndarray:
    """(scores − mean) / standard deviation; zeros when every score is the same."""
    deviation = float(scores.std())
    return (scores - scores.mean()) / deviation if deviation > 0 else np.zeros_like(scores)


def _kmeans(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` unit-length spherical k-means centroids of `vectors` (FAISS); the vectors themselves when they are
    no more than `count`."""
    import faiss

    if count >= len(vectors):
        return _unit(vectors.copy())
    kmeans = faiss.Kmeans(vectors.shape[1], count, niter=KMEANS_ITERATIONS, spherical=True, seed=seed,
                          max_points_per_centroid=SAMPLE_PER_CENTROID, min_points_per_centroid=1, verbose=False)
    kmeans.train(vectors)
    return _unit(np.asarray(kmeans.centroids, dtype=np.float32))


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The centroid of highest inner product of each vector (t, dim): (t,) int64."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(vectors, 1)[1][:, 0]


def inverted_lists(codes: np.ndarray, offsets: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per centroid, the sorted unique chunk rows holding one of its tokens: (ivf int32 (E,), ivf_offsets (K + 1,))."""
    rows = len(offsets) - 1
    row_of_token = np.repeat(np.arange(rows, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(codes.astype(np.int64) * rows + row_of_token)  # sorted by centroid, then row
    ivf = (pairs % rows).astype(np.int32)
    ivf_offsets = np.concatenate([[0], np.cumsum(np.bincount(pairs // rows, minlength=count))]).astype(np.int64)
    return ivf, ivf_offsets


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)

