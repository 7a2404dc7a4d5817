"""The centroid candidate stage of late search: approximate scores, recall against exact MaxSim, carry-over."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragkit import store
from ragkit.api import Index
from ragkit.config import Settings
from ragkit.fingerprints import recorded_settings
from ragkit.indexes.late import LateIndex, write_late_index
from ragkit.indexes.late_centroids import (CENTROIDS, CODES, COARSE, COARSE_OFFSETS, DIRECTIONS, IVF, IVF_OFFSETS,
                                           Codebook, CentroidLists, centroid_count, chunk_directions)
from test_late import write_corpus

DIM = 16


def topical_parts(rng, n: int, topics: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chunks whose tokens lie near two or three of `topics` directions, as words of a few subjects do."""
    centres = rng.normal(size=(topics, DIM))
    parts = []
    for _ in range(n):
        length = int(rng.integers(8, 40))
        chosen = rng.choice(topics, int(rng.integers(2, 4)), replace=False)
        vectors = centres[rng.choice(chosen, length)] + 0.35 * rng.normal(size=(length, DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        parts.append((vectors.astype(np.float16), np.full((length, 2), -1, dtype=np.int32)))
    return parts


def queries_from(rng, parts, n: int) -> list[np.ndarray]:
    """Queries of 8 tokens, each a noisy token of one chunk."""
    out = []
    for row in rng.choice(len(parts), n, replace=False):
        tokens = parts[row][0].astype(np.float32)
        query = tokens[rng.choice(len(tokens), 8)] + 0.2 * rng.normal(size=(8, DIM))
        out.append((query / np.linalg.norm(query, axis=1, keepdims=True)).astype(np.float32))
    return out


def write(folder, parts, ids=None, previous=None, previous_ids=None) -> LateIndex:
    ids = ids or [f"c{i}" for i in range(len(parts))]
    write_late_index(folder, parts, ids, {"model": "m", "dim": DIM}, previous, previous_ids, plaid=False,
                     centroids=True)
    return LateIndex.load(folder)


def stage_and_query(tmp_path, seed: int) -> tuple[LateIndex, CentroidLists, np.ndarray]:
    """A centroid stage over 150 topical chunks, and one query drawn from them."""
    rng = np.random.default_rng(seed)
    parts = topical_parts(rng, 150)
    late = write(tmp_path / "late", parts)
    return late, CentroidLists.load(late.folder, len(late)), queries_from(rng, parts, 1)[0]


def reference_scores(late: LateIndex, query: np.ndarray, probe: int) -> np.ndarray:
    """Centroid interaction written out per chunk: Σ_i max(floor_i, max over its probed centroids of q_i · c)."""
    centroids = np.load(late.folder / CENTROIDS)
    codes = np.load(late.folder / CODES)
    similarities = query @ centroids.T
    ranked = np.argsort(-similarities, axis=1)
    if probe < len(centroids):
        floors = similarities[np.arange(len(query)), ranked[:, probe]]
    else:  # every centroid probed: the floor is the lowest score, or 0 when none is negative
        floors = np.minimum(0.0, similarities.min(axis=1))
    out = np.zeros(len(late))
    for row in range(len(late)):
        held = set(codes[late.offsets[row] : late.offsets[row + 1]].tolist())
        for i in range(len(query)):
            probed = [similarities[i, c] for c in ranked[i, :probe] if c in held]
            out[row] += max([floors[i], *probed]) - floors[i]
    return out


def test_approximate_scores_are_centroid_interaction_with_the_next_centroid_as_floor(tmp_path):
    rng = np.random.default_rng(0)
    parts = topical_parts(rng, 150)
    late = write(tmp_path / "late", parts)
    lists = CentroidLists.load(late.folder, len(late))
    for probe in (1, 3, 8, len(lists.centroids)):
        for query in queries_from(rng, parts, 3):
            np.testing.assert_allclose(lists.approximate_scores(query, probe), reference_scores(late, query, probe),
                                       atol=1e-5)


def test_approximate_scores_are_the_same_when_query_tokens_are_scored_in_groups(tmp_path, monkeypatch):
    from ragkit.indexes import late_centroids

    late, lists, query = stage_and_query(tmp_path, seed=4)
    whole = lists.approximate_scores(query, 4)
    monkeypatch.setattr(late_centroids, "SCORE_CELLS", 3 * len(late))  # 8 query tokens in groups of 3
    np.testing.assert_allclose(lists.approximate_scores(query, 4), whole, rtol=1e-6)
    np.testing.assert_allclose(whole, reference_scores(late, query, 4), atol=1e-5)


def test_each_chunk_direction_is_its_mean_token_vector_at_unit_length(tmp_path, monkeypatch):
    from ragkit.indexes import late_centroids

    monkeypatch.setattr(late_centroids, "ASSIGN_BLOCK", 50)  # directions summed over several blocks of chunks
    parts = topical_parts(np.random.default_rng(5), 40)
    parts[3] = (np.zeros((0, DIM), dtype=np.float16), np.zeros((0, 2), dtype=np.int32))
    late = write(tmp_path / "late", parts)
    directions = np.load(late.folder / DIRECTIONS)
    assert directions.shape == (40, DIM) and directions.dtype == np.float16
    assert not directions[3].any()  # no tokens, no direction
    for row, (vectors, _) in enumerate(parts):
        if len(vectors):
            mean = vectors.astype(np.float64).mean(axis=0)
            np.testing.assert_allclose(directions[row], mean / np.linalg.norm(mean), atol=2e-3)
    some = np.array([0, 2, 3, 4, 9, 10, 11, 30, 39])  # runs of chunks, gaps, the empty chunk
    part = late_centroids.chunk_directions(late.tokens, late.offsets, some)
    assert np.array_equal(part[some], directions[some]) and not np.delete(part, some, axis=0).any()


def test_candidates_add_the_standardised_centroid_and_direction_scores(tmp_path):
    late, lists, query = stage_and_query(tmp_path, seed=6)
    approximate = lists.approximate_scores(query, 4)
    closeness = np.load(late.folder / DIRECTIONS).astype(np.float32) @ query.sum(axis=0)
    blended = (approximate - approximate.mean()) / approximate.std() + (closeness - closeness.mean()) / closeness.std()
    found = lists.candidates(query, 20, 4)
    np.testing.assert_allclose(blended[found], np.sort(blended)[::-1][:20], rtol=1e-5)
    assert set(found) != set(np.argsort(-approximate, kind="stable")[:20])  # the directions change the candidates
    (late.folder / DIRECTIONS).unlink()  # a folder written before the directions: the centroid score alone
    before = CentroidLists.load(late.folder, len(late))
    assert before.directions is None
    np.testing.assert_allclose(approximate[before.candidates(query, 20, 4)], np.sort(approximate)[::-1][:20])


def test_a_chunk_without_tokens_comes_last_among_the_candidates(tmp_path):
    rng = np.random.default_rng(7)
    parts = topical_parts(rng, 80)
    parts[5] = (np.zeros((0, DIM), dtype=np.float16), np.zeros((0, 2), dtype=np.int32))
    late = write(tmp_path / "late", parts)
    lists = CentroidLists.load(late.folder, len(late))
    query = -np.asarray(parts[9][0][:6], dtype=np.float32)  # far from most chunks: their closeness is below 0
    closeness = lists.directions @ query.sum(axis=0)
    assert closeness[5] == 0 and np.mean(closeness) < 0  # the empty chunk's direction alone would rank it high
    assert 5 not in lists.candidates(query, len(late) - 1, 4)
    assert lists.candidates(query, len(late), 4)[-1] == 5


def test_every_token_sits_under_the_nearest_fine_centroid_of_its_nearest_coarse_cell(tmp_path):
    parts = topical_parts(np.random.default_rng(1), 120)
    late = write(tmp_path / "late", parts)
    centroids, codes = np.load(late.folder / CENTROIDS), np.load(late.folder / CODES)
    coarse, cells = np.load(late.folder / COARSE), np.load(late.folder / COARSE_OFFSETS)
    tokens = np.asarray(late.tokens, dtype=np.float32)
    # the sample covers every token here, so every cell gets the fine centroids K asks of it
    assert len(centroids) == centroid_count(late.total_tokens) and len(coarse) > 1 and cells[-1] == len(centroids)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    cell_of_code = np.searchsorted(cells, codes, side="right") - 1
    nearest_cell = np.argmax(tokens @ coarse.T, axis=1)
    assert np.mean(cell_of_code == nearest_cell) > 0.99  # ties aside
    for t in np.flatnonzero(cell_of_code == nearest_cell):
        a, b = cells[cell_of_code[t]], cells[cell_of_code[t] + 1]
        assert tokens[t] @ centroids[codes[t]] >= (tokens[t] @ centroids[a:b].T).max() - 1e-5
    ivf, ivf_offsets = np.load(late.folder / IVF), np.load(late.folder / IVF_OFFSETS)
    listed = {(c, int(r)) for c in range(len(centroids)) for r in ivf[ivf_offsets[c] : ivf_offsets[c + 1]]}
    held = {(int(c), row) for row in range(len(late)) for c in codes[late.offsets[row] : late.offsets[row + 1]]}
    assert listed == held
    assert all(np.all(np.diff(ivf[ivf_offsets[c] : ivf_offsets[c + 1]]) > 0) for c in range(len(centroids)))


def test_centroid_candidates_find_the_exact_top_10_on_a_generated_collection(tmp_path):
    rng = np.random.default_rng(2)
    parts = topical_parts(rng, 1500)
    late = write(tmp_path / "late", parts)
    queries = queries_from(rng, parts, 40)
    exact = late.search(queries, 10, exact_max_tokens=10**12)
    found = late.search(queries, 10, exact_max_tokens=0, candidates=100, probe=32)
    recall = np.mean([len({r for r, _ in f} & {r for r, _ in e}) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9  # 100 candidates of 1,500 chunks (a random 100 would find 0.07)
    for f, e in zip(found, exact):  # a hit's score is its exact MaxSim
        exact_scores = dict(e)
        assert all(abs(score - exact_scores[row]) < 1e-4 for row, score in f if row in exact_scores)
    blind = late.search(queries, 10, exact_max_tokens=0, candidates=100, probe=1)
    blind_recall = np.mean([len({r for r, _ in f} & {r for r, _ in e}) / 10 for f, e in zip(blind, exact)])
    assert blind_recall < recall  # probing more centroids finds more: the lists are what is searched
    everything = late.search(queries, 10, exact_max_tokens=0, candidates=len(parts), probe=1)
    assert [[r for r, _ in f] for f in everything] == [[r for r, _ in e] for e in exact]


def test_centroids_are_carried_over_and_trained_again_when_much_is_new(tmp_path):
    rng = np.random.default_rng(3)
    parts = topical_parts(rng, 400)
    ids = [f"c{i}" for i in range(400)]
    first = write(tmp_path / "g1", parts, ids)
    # three chunks removed, two added: the centroids stay, every kept token keeps its centroid
    parts2 = parts[3:] + topical_parts(rng, 2)
    ids2 = ids[3:] + ["n0", "n1"]
    second = write(tmp_path / "g2", parts2, ids2, first, ids)
    assert np.array_equal(np.load(tmp_path / "g1" / CENTROIDS), np.load(tmp_path / "g2" / CENTROIDS))
    codes1, codes2 = np.load(tmp_path / "g1" / CODES), np.load(tmp_path / "g2" / CODES)
    assert np.array_equal(codes2[: second.offsets[397]], codes1[first.offsets[3] :])
    assert np.array_equal(np.load(tmp_path / "g2" / DIRECTIONS), chunk_directions(second.tokens, second.offsets))
    new_tokens = int(second.offsets[-1] - second.offsets[397])
    state = json.loads((tmp_path / "g2" / "params.json").read_text())["centroids"]
    assert state == {"count": centroid_count(first.total_tokens), "trained_tokens": first.total_tokens,
                     "added_since_training": new_tokens}
    for row in (397, 398):  # the new chunks are found through the lists
        query = second.token_data(row)[0]
        assert second.search([query], 1, exact_max_tokens=0, candidates=5)[0][0][0] == row
    # a quarter new: trained again on everything; kept chunks' directions are still read, not computed again
    directions2 = np.load(tmp_path / "g2" / DIRECTIONS)
    marked = directions2.copy()
    marked[5] = -marked[5]  # a mark only a copy of g2's file carries
    np.save(tmp_path / "g2" / DIRECTIONS, marked)
    parts3 = parts2 + topical_parts(rng, 100)
    third = write(tmp_path / "g3", parts3, ids2 + [f"m{i}" for i in range(100)], second, ids2)
    state = json.loads((tmp_path / "g3" / "params.json").read_text())["centroids"]
    assert state["added_since_training"] == 0 and state["trained_tokens"] == sum(len(v) for v, _ in parts3)
    assert not np.array_equal(np.load(tmp_path / "g3" / CENTROIDS), np.load(tmp_path / "g2" / CENTROIDS))
    codes3 = np.load(tmp_path / "g3" / CODES)
    assert np.mean(codes3 == Codebook.load(tmp_path / "g3").assign(np.asarray(third.tokens))) > 0.99  # ties aside
    directions3 = np.load(tmp_path / "g3" / DIRECTIONS)
    assert np.array_equal(directions3[5], -directions2[5]) and np.array_equal(directions3[:5], directions2[:5])
    assert np.array_equal(directions3[399:], chunk_directions(third.tokens, third.offsets)[399:])  # the new ones


def test_an_empty_chunk_and_an_empty_collection(tmp_path):
    parts = topical_parts(np.random.default_rng(4), 50)
    parts[7] = (np.zeros((0, DIM), dtype=np.float16), np.zeros((0, 2), dtype=np.int32))
    late = write(tmp_path / "late", parts)
    query = late.token_data(3)[0]
    hits = late.search([query], 50, exact_max_tokens=0, candidates=50)[0]
    assert hits[0][0] == 3 and dict(hits)[7] == 0.0
    empty = write(tmp_path / "empty", [])
    assert not empty.has_centroids and empty.search([query], 3, exact_max_tokens=0) == [[]]


def test_an_index_builds_the_stage_it_is_asked_for_and_keeps_it(tmp_path, tiny_encoder, tiny_colbert):
    write_corpus(tmp_path / "docs")
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), late_exact_max_tokens=0)
    idx = Index(tmp_path / "index", settings)
    idx.add(tmp_path / "docs")
    late_dir = store.current_generation(idx.path) / "late"
    assert (late_dir / IVF_OFFSETS).is_file() and not (late_dir / "plaid").exists()
    exact = Index(tmp_path / "index", settings.replace(late_exact_max_tokens=10**12))
    for question in ("harpsichord restoration", "zeppelin number 8"):  # every chunk a candidate: the exact top 3
        found, truth = idx.search(question, k=3, mode="late"), exact.search(question, k=3, mode="late")
        np.testing.assert_allclose([h.score for h in found], [h.score for h in truth], rtol=1e-5)
    # naming the other stage, with no file changed, writes a generation with it (the vectors are not encoded again)
    report = Index(tmp_path / "index", settings.replace(late_candidates="plaid")).add(tmp_path / "docs")
    assert report.late_encoded_chunks == 0
    late_dir = store.current_generation(idx.path) / "late"
    assert (late_dir / "plaid" / "metadata.json").is_file() and not (late_dir / IVF_OFFSETS).exists()
    # a later run that names none keeps the index's stage
    assert Index(tmp_path / "index", settings).add(tmp_path / "docs").unchanged == 40
    assert store.current_generation(idx.path) / "late" == late_dir
    manifest = store.read_manifest(store.current_generation(idx.path))
    assert recorded_settings(manifest)["late_candidates"] == "plaid"


def test_an_index_from_before_the_centroid_stage_keeps_plaid():
    manifest = {"settings": {"late": True, "late_model": "m"}, "models": {"late": {"model": "m"}}}
    assert recorded_settings(manifest)["late_candidates"] == "plaid"
    assert recorded_settings({"settings": {"late": False}, "models": {"late": None}})["late_candidates"] is None
    assert Settings().for_index(None).late_candidates == "centroids"


def test_an_unknown_stage_is_refused():
    from ragkit.errors import ConfigError

    with pytest.raises(ConfigError, match="late_candidates"):
        Settings(late_candidates="warp").replace()


def test_the_centroid_count_is_the_largest_power_of_two_under_64_root_t_and_t_over_16():
    for tokens in (1, 100, 10_000, 294_965, 1_179_860, 9_957_952):
        count = centroid_count(tokens)
        bound = max(1.0, min(64 * tokens**0.5, tokens / 16))
        assert count & (count - 1) == 0 and count <= bound < 2 * count
    assert centroid_count(1_179_860) == 65_536  # 64·√T binds above a million tokens, where the stage is searched
    assert centroid_count(294_965) == 16_384  # T/16 binds below: at most 32 bytes of 128-d centroids per token
