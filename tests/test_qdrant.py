"""`ragkit export qdrant` and `search --backend qdrant`, against Qdrant in local mode (a folder, no server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rankings import assert_same_ranking
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings

runner = CliRunner()
DOCS = {
    "oil.txt": "The oil crisis began in October 1973.\nPrices rose fourfold within months.\n",
    "wheat.md": "# Harvest\n\nThe wheat harvest doubled after the spring rains.\n",
    "notes/glacier.txt": "Glaciers retreat when summers warm.\nIce cores keep old air.\n",
    "notes/ledger.txt": "\n".join(f"Entry {n}: the ledger records a payment of {n * 7} crowns." for n in range(60)),
}
QUERIES = ["when did the oil crisis begin", "wheat harvest rains", "ice cores", "payment of crowns"]


@pytest.fixture
def indexed(tmp_path, tiny_encoder, tiny_colbert) -> tuple[Path, Settings]:
    docs = tmp_path / "docs"
    for rel, text in DOCS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), reader="extractive")
    Index(tmp_path / "index", settings).add(docs)
    return tmp_path, settings


def unscored(hit) -> dict:
    return {key: value for key, value in hit.to_json().items() if key != "score"}


def test_search_from_qdrant_gives_the_local_top_k_in_every_mode(indexed):
    root, settings = indexed
    report = Index(root / "index", settings).export_qdrant(path=root / "qdrant")
    chunks = Index(root / "index", settings).status()["chunks"]
    assert (report.upserted, report.deleted, report.points, report.recreated) == (chunks, 0, chunks, None)
    local = Index(root / "index", settings)
    remote = Index(root / "index", settings, backend="qdrant", qdrant_path=str(root / "qdrant"))
    for mode in ("dense", "late", "hybrid"):
        for query in QUERIES:
            expected, got = local.search(query, k=5, mode=mode), remote.search(query, k=5, mode=mode)
            assert_same_ranking(got, expected)
            scores = [h.score for h in local.search(query, k=6, mode=mode)]  # and the one after the cut
            if all(a - b > 1e-4 for a, b in zip(scores, scores[1:])):  # no near ties: the very same hits
                assert [unscored(h) for h in got] == [unscored(h) for h in expected]  # evidence and places too
    assert remote.searcher.qdrant is not None and remote.searcher.qdrant.stale == 0
    only = remote.search("entry payment", k=5, mode="dense", paths=["notes/*"])
    assert only and {h.chunk.path for h in only} <= {"notes/glacier.txt", "notes/ledger.txt"}
    assert_same_ranking(only, local.search("entry payment", k=5, mode="dense", paths=["notes/*"]))


def test_a_second_export_upserts_what_changed_and_deletes_what_is_gone(indexed):
    root, settings = indexed
    index = Index(root / "index", settings)
    index.export_qdrant(path=root / "qdrant")
    (root / "docs" / "wheat.md").unlink()
    (root / "docs" / "oil.txt").write_text("The oil embargo ended in March 1974.\n")
    index.add(root / "docs")
    before = {h["path"] for h in index.status()["skipped"]}
    report = index.export_qdrant(path=root / "qdrant")
    table_paths = {h.chunk.path for h in index.search("harvest oil glacier ledger", k=50, mode="bm25")}
    assert "wheat.md" not in table_paths and not before
    assert report.deleted == 2 and report.upserted == 1  # wheat.md's chunk and oil.txt's old one; oil.txt's new one
    assert report.points == index.status()["chunks"] and report.unchanged == report.points - 1
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(root / "qdrant"))
    paths = {p.payload["path"] for p in client.scroll("ragkit", limit=1000, with_payload=["path"])[0]}
    client.close()
    assert "wheat.md" not in paths and "oil.txt" in paths
    again = index.export_qdrant(path=root / "qdrant")
    assert (again.upserted, again.deleted, again.unchanged) == (0, 0, report.points)


def test_other_models_make_the_collection_afresh_and_a_stale_one_is_refused(indexed, minilm):
    root, settings = indexed
    Index(root / "index", settings).export_qdrant(path=root / "qdrant")
    other = Index(root / "other", Settings(dense_model=str(minilm), late=False))
    other.add(root / "docs")
    stale = Index(root / "other", Settings(dense_model=str(minilm), late=False), backend="qdrant",
                  qdrant_path=str(root / "qdrant"))
    with pytest.raises(Exception, match="other models or chunks than this index"):
        stale.search("oil", mode="dense")
    stale.searcher._qdrant_client.close()
    report = other.export_qdrant(path=root / "qdrant")
    assert report.recreated == "the index's models or chunks differ from the collection's"
    assert report.points == other.status()["chunks"]
    rechunked = Index(root / "other", Settings(dense_model=str(minilm), late=False, chunk_tokens=32))
    rechunked.add(root / "docs")  # the same chunk ids for the first chunk of each file, other texts and vectors
    again = rechunked.export_qdrant(path=root / "qdrant")
    assert again.recreated and again.upserted == again.points == rechunked.status()["chunks"]


def test_the_cli_exports_and_searches_through_qdrant(indexed):
    root, _ = indexed
    index, qdrant = str(root / "index"), str(root / "qdrant")
    result = runner.invoke(app, ["export", "qdrant", "--index", index, "--path", qdrant, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["upserted"] > 0
    local = runner.invoke(app, ["search", "oil crisis", "--index", index, "--mode", "late", "-k", "3", "--json"])
    remote = runner.invoke(app, ["search", "oil crisis", "--index", index, "--mode", "late", "-k", "3", "--json",
                                 "--backend", "qdrant", "--qdrant-path", qdrant])
    assert remote.exit_code == 0, remote.output
    got, expected = json.loads(remote.stdout)["hits"], json.loads(local.stdout)["hits"]
    assert_same_ranking([SimpleNamespace(**h) for h in got], [SimpleNamespace(**h) for h in expected])
    local_hits = {h["chunk_id"]: {**h, "score": 0, "ranks": None} for h in expected}  # tied hits may swap places
    assert all(local_hits[h["chunk_id"]] == {**h, "score": 0, "ranks": None}
               for h in got if h["chunk_id"] in local_hits)
    missing = runner.invoke(app, ["search", "oil", "--index", index, "--backend", "qdrant", "--qdrant-path",
                                  str(root / "elsewhere"), "--collection", "nope"])
    assert missing.exit_code == 1 and "there is no Qdrant collection 'nope'" in missing.stderr
    unnamed = runner.invoke(app, ["search", "oil", "--index", index, "--backend", "qdrant"])
    assert unnamed.exit_code == 1 and "--qdrant-path DIR" in unnamed.stderr


def test_without_qdrant_installed_the_message_says_what_to_install(indexed, monkeypatch):
    root, _ = indexed
    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    result = runner.invoke(app, ["export", "qdrant", "--index", str(root / "index"), "--path", str(root / "q")])
    assert result.exit_code == 1 and "pip install 'ragkit[qdrant]'" in result.stderr
    assert "Traceback" not in result.output


def test_point_ids_are_the_chunk_ids():
    from ragkit.indexes.qdrant import point_id

    ids = ["ffffffffffffffff", "0000000000000001", "8000000000000000"]
    assert [point_id(i) for i in ids] == [2**64 - 1, 1, 2**63]
    assert len({point_id(f"{n:016x}") for n in np.arange(1000)}) == 1000
