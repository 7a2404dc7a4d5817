"""Late interaction: the ColBERT encoder, the token store and PLAID, incremental consistency, evidence spans."""

from __future__ import annotations

import numpy as np
import pytest

from ragkit import store
from ragkit.api import Index
from ragkit.config import Settings
from ragkit.errors import RagkitError
from ragkit.indexes.late import LateIndex, PlaidState, write_late_index

TOPICS = ["zeppelin", "volcano", "harpsichord", "glacier", "saxophone", "meteorite", "lighthouse", "cathedral"]


def write_corpus(folder, n: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        text = f"Report {i} on the {topic} number {i}.\n\n" + " ".join(
            f"The {topic} sentence {j} says something about item{i}x{j}." for j in range(6))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")


@pytest.fixture
def settings(tiny_encoder, tiny_colbert) -> Settings:
    return Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))


def random_parts(rng, n: int, dim: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    parts = []
    for _ in range(n):
        v = rng.normal(size=(int(rng.integers(20, 40)), dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        parts.append((v.astype(np.float16), np.full((len(v), 2), -1, dtype=np.int32)))
    return parts


def test_token_store_round_trip_and_exact_maxsim(tmp_path):
    rng = np.random.default_rng(0)
    parts = random_parts(rng, 60)
    ids = [f"c{i}" for i in range(60)]
    write_late_index(tmp_path / "late", parts, ids, {"model": "m", "dim": 8}, None, None, plaid=True)
    late = LateIndex.load(tmp_path / "late")
    assert len(late) == 60 and late.total_tokens == sum(len(v) for v, _ in parts)
    query = parts[17][0][:5].astype(np.float32)
    expected = [float((v.astype(np.float32) @ query.T).max(axis=0).sum()) for v, _ in parts]
    assert np.allclose(late.maxsim_all(query), expected, atol=1e-3)
    assert late.search([query], 3, exact_max_tokens=10**9)[0][0][0] == 17
    assert late.has_plaid
    assert late.search([query], 3, exact_max_tokens=0)[0][0][0] == 17  # PLAID candidates, exact re-rank


def test_exact_maxsim_of_many_queries_across_blocks_and_groups(tmp_path, monkeypatch):
    from ragkit.indexes import late as late_module

    monkeypatch.setattr(late_module, "BLOCK_TOKENS", 100)  # several blocks of whole chunks
    monkeypatch.setattr(late_module, "MAX_BLOCK_SCORES", 100 * 12)  # a handful of queries per group
    rng = np.random.default_rng(1)
    parts = random_parts(rng, 30)
    write_late_index(tmp_path / "late", parts, [f"c{i}" for i in range(30)], {"model": "m", "dim": 8}, None, None,
                     plaid=False)
    late = LateIndex.load(tmp_path / "late")
    queries = [parts[i][0][: 2 + i % 5].astype(np.float32) for i in range(0, 30, 3)]  # lengths 2 to 6
    many = late.maxsim_all_many(queries)
    for query, scores in zip(queries, many):
        expected = [float((v.astype(np.float32) @ query.T).max(axis=0).sum()) for v, _ in parts]
        assert np.allclose(scores, expected, atol=1e-3)
    hits = late.search(queries, 1)
    assert [h[0][0] for h in hits] == list(range(0, 30, 3))


def test_exact_maxsim_scores_the_stored_float16_vectors_in_every_search(tmp_path, monkeypatch):
    from ragkit.indexes import late as late_module

    monkeypatch.setattr(late_module, "BLOCK_TOKENS", 90)
    rng = np.random.default_rng(2)
    parts = random_parts(rng, 25)
    parts[7] = (np.zeros((0, 8), dtype=np.float16), np.zeros((0, 2), dtype=np.int32))  # a chunk with no tokens
    write_late_index(tmp_path / "late", parts, [f"c{i}" for i in range(25)], {"model": "m", "dim": 8}, None, None,
                     plaid=False)
    late = LateIndex.load(tmp_path / "late")
    assert late.tokens.dtype == np.float16
    queries = [parts[i][0][:4].astype(np.float32) for i in (3, 11, 19)]
    expected = [np.array([(v.astype(np.float64) @ q.T).max(axis=0).sum() if len(v) else 0.0 for v, _ in parts])
                for q in queries]
    rows = np.array([24, 7, 3, 3, 0])
    for _ in range(2):  # a second round scores as the first: nothing is cached between searches
        for scores, reference in zip(late.maxsim_all_many(queries), expected):
            assert np.allclose(scores, reference, atol=1e-4)
        scored = late.maxsim(queries[0], rows)
        assert np.allclose(scored, expected[0][rows], atol=1e-4) and scored[1] == 0.0
    assert late.maxsim(queries[0], np.array([], dtype=np.int64)).shape == (0,)


def test_plaid_carried_over_stays_consistent_with_rows(tmp_path):
    rng = np.random.default_rng(1)
    parts = random_parts(rng, 80)
    ids = [f"c{i}" for i in range(80)]
    write_late_index(tmp_path / "g1", parts, ids, {"model": "m", "dim": 8}, None, None)
    first = LateIndex.load(tmp_path / "g1")
    # delete three chunks and add two new ones (few enough that PLAID is updated, not retrained)
    kept = [i for i in range(80) if i not in (3, 40, 79)]
    new_parts = random_parts(rng, 2)
    parts2 = [parts[i] for i in kept] + new_parts
    ids2 = [ids[i] for i in kept] + ["n0", "n1"]
    params = write_late_index(tmp_path / "g2", parts2, ids2, {"model": "m", "dim": 8}, first, ids)
    assert params["plaid"] == {"trained_docs": 80, "added_since_training": 2}
    second = LateIndex.load(tmp_path / "g2")
    queries = [vectors[:4].astype(np.float32) for vectors, _ in parts2]
    assert [hits[0][0] for hits in second.plaid_search(queries, 1)] == list(range(len(parts2)))  # each at its row
    returned = {row for hits in second.plaid_search(queries, 20) for row, _ in hits}
    assert returned <= set(range(len(parts2)))


def test_plaid_retrains_when_much_is_new(tmp_path):
    assert PlaidState(trained_docs=100, added_since_training=4).needs_retraining(2)
    assert not PlaidState(trained_docs=100, added_since_training=0).needs_retraining(5)
    rng = np.random.default_rng(2)
    parts = random_parts(rng, 40)
    ids = [f"c{i}" for i in range(40)]
    write_late_index(tmp_path / "g1", parts, ids, {"model": "m", "dim": 8}, None, None)
    more = parts + random_parts(rng, 10)
    params = write_late_index(tmp_path / "g2", more, ids + [f"n{i}" for i in range(10)], {"model": "m", "dim": 8},
                              LateIndex.load(tmp_path / "g1"), ids)
    assert params["plaid"] == {"trained_docs": 50, "added_since_training": 0}


def test_plaid_collects_garbage_over_a_frozen_heap_and_leaves_gc_as_it_was(tmp_path, monkeypatch):
    import gc

    frozen_at_collect = []  # fast-plaid calls gc.collect() often: each should skip the objects older than the call
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: frozen_at_collect.append(gc.get_freeze_count() > 0) or collect(*a))
    rng = np.random.default_rng(3)
    parts, ids = random_parts(rng, 40), [f"c{i}" for i in range(40)]
    write_late_index(tmp_path / "g1", parts, ids, {"model": "m", "dim": 8}, None, None)
    assert LateIndex.load(tmp_path / "g1").plaid_search([parts[0][0].astype(np.float32)], 1)[0][0][0] == 0
    assert frozen_at_collect and all(frozen_at_collect)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a heap frozen by the caller stays frozen
    try:
        write_late_index(tmp_path / "g2", parts, ids, {"model": "m", "dim": 8}, None, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_index_builds_all_three_stages(tmp_path, settings):
    write_corpus(tmp_path / "docs")
    idx = Index(tmp_path / "index", settings.replace(late_exact_max_tokens=0, late_candidates="plaid"))
    report = idx.add(tmp_path / "docs")
    assert report.late_encoded_chunks == report.chunks == report.encoded_chunks
    generation = store.current_generation(idx.path)
    assert (generation / "late" / "plaid" / "metadata.json").is_file()
    small = Index(tmp_path / "small", settings.replace(plaid_min_tokens=10**9, late_candidates="plaid"))  # no PLAID
    small.add(tmp_path / "docs")
    assert not (store.current_generation(small.path) / "late" / "plaid").exists()
    assert small.search("harpsichord", k=3, mode="late")
    manifest = store.read_manifest(generation)
    # the late model reads exactly the chunk length: 64 - 2 dense special tokens - 15 of context (a quarter of
    # what the dense encoder reads), + CLS, [D], SEP
    assert manifest["models"]["late"]["document_length"] == 62 - 15 + 3
    for mode in ("late", "hybrid"):
        hits = idx.search("harpsichord", k=5, mode=mode)
        assert len(hits) == 5 and all(h.evidence for h in hits)
        for h in hits:
            assert all(0 <= e.start < e.end <= len(h.chunk.text) for e in h.evidence)


@pytest.mark.parametrize("stage", ["centroids", "plaid"])
def test_deleted_files_never_come_back_in_any_mode(tmp_path, settings, stage):
    write_corpus(tmp_path / "docs")
    # the candidate stage serves late search here (exact_max_tokens=0), so its delete semantics are what is tested
    idx = Index(tmp_path / "index", settings.replace(late_exact_max_tokens=0, late_candidates=stage))
    idx.add(tmp_path / "docs")
    gone = {f"doc{i:02d}.txt" for i in (2, 10, 18)}  # all about "harpsichord"
    for name in gone:
        (tmp_path / "docs" / name).unlink()
    (tmp_path / "docs" / "doc05.txt").write_text("Now this file is about a harpsichord restoration.\n")
    report = idx.add(tmp_path / "docs")
    assert (report.removed, report.updated) == (3, 1)
    assert report.late_encoded_chunks == 1
    for mode in ("dense", "bm25", "late", "hybrid"):
        paths = {h.chunk.path for h in idx.search("harpsichord number", k=50, mode=mode)}
        assert not paths & gone, mode
    assert "doc05.txt" in {h.chunk.path for h in idx.search("harpsichord restoration", k=5, mode="late")}


def test_each_stage_rebuilds_alone(tmp_path, settings, tiny_encoder):
    from models import build_colbert

    write_corpus(tmp_path / "docs", n=12)
    idx = Index(tmp_path / "index", settings)
    first = idx.add(tmp_path / "docs")
    other_late = build_colbert(tmp_path / "other-colbert", tiny_encoder.parent / "backbone", seed=3)
    report = Index(idx.path, settings.replace(late_model=str(other_late))).add(tmp_path / "docs")
    assert report.rebuilt == "changed late model"
    assert report.encoded_chunks == 0 and report.late_encoded_chunks == first.chunks
    off = Index(idx.path, settings.replace(late_model=str(other_late), late=False)).add(tmp_path / "docs")
    assert off.encoded_chunks == 0 and off.late_encoded_chunks == 0 and off.rebuilt is None
    with pytest.raises(RagkitError, match=r"no late-interaction stage \(built with --no-late\)"):
        Index(idx.path, settings).search("volcano", mode="late")
    assert Index(idx.path, settings).search("volcano", k=3, mode="hybrid")  # hybrid uses what there is


def test_pooled_index_is_smaller_and_still_has_evidence(tmp_path, settings):
    write_corpus(tmp_path / "docs", n=12)
    plain = Index(tmp_path / "plain", settings)
    pooled = Index(tmp_path / "pooled", settings.replace(pool_factor=2))
    plain.add(tmp_path / "docs")
    pooled.add(tmp_path / "docs")
    assert pooled.searcher.late.total_tokens < 0.7 * plain.searcher.late.total_tokens
    hits = pooled.search("glacier", k=3, mode="late")
    assert hits and all(h.evidence for h in hits)


def test_pooled_index_recomputes_evidence_from_the_hits_text(tmp_path, minilm, monkeypatch):
    """Pooled vectors are means of tokens: the evidence of the hits shown comes from their text encoded again,
    unpooled, so it lands on the query's own word, as in an unpooled index."""
    write_corpus(tmp_path / "docs", n=16)
    settings = Settings(dense_model=str(minilm), late_model=str(minilm))
    plain = Index(tmp_path / "plain", settings)
    pooled = Index(tmp_path / "pooled", settings.replace(pool_factor=3))
    plain.add(tmp_path / "docs")
    pooled.add(tmp_path / "docs")
    encoder = pooled.searcher.late_document_encoder  # the model itself: the query encoder is its ONNX export
    encoded: list[str] = []
    real_encode = encoder.encode_documents
    monkeypatch.setattr(encoder, "encode_documents",
                        lambda texts, *args, **kwargs: encoded.extend(texts) or real_encode(texts, *args, **kwargs))
    hits = pooled.search("glacier", k=4, mode="late")
    assert sorted(encoded) == sorted(h.chunk.text for h in hits)  # once per hit shown, from its text
    unpooled = {h.chunk_id: h for h in plain.search("glacier", k=16, mode="late")}
    relevant = [h for h in hits if "glacier" in h.chunk.text]
    assert len(relevant) == 2 and hits[:2] == relevant
    for hit in relevant:
        best = hit.evidence[0]
        assert hit.chunk.text[best.start:best.end] == "glacier"
        assert (best.start, best.end) == (unpooled[hit.chunk_id].evidence[0].start,
                                          unpooled[hit.chunk_id].evidence[0].end)


def test_evidence_lands_on_the_query_terms(tmp_path, minilm):
    """With real MiniLM token vectors (through an untrained projection), identical words align."""
    from models import build_colbert

    late_model = build_colbert(tmp_path / "colbert", minilm, document_length=256)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The committee met on Tuesday. Afterwards the zeppelin landed near the harbour, "
                                "and everyone went home for dinner.\n")
    idx = Index(tmp_path / "index", Settings(dense_model=str(minilm), late_model=str(late_model)))
    idx.add(docs)
    hit = idx.search("zeppelin harbour", k=1, mode="late")[0]
    marked = [hit.chunk.text[e.start:e.end] for e in hit.evidence[:2]]
    assert any("zeppelin" in m for m in marked) and any("harbour" in m for m in marked)
    answer = idx.ask("Where did the zeppelin land?", mode="hybrid")
    assert "zeppelin landed near the harbour" in answer.citations[0].text
