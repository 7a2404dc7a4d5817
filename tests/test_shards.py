"""A sharded index (`ragkit index --shards N`) searches as one unsharded index: the same hits and scores for dense,
BM25 (statistics merged across shards), late and hybrid search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rankings import assert_same_ranking
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings
from ragkit.shards import shard_of

runner = CliRunner()
ARTICLES = 9
QUERIES = ["oil embargo prices", "what is oxygen used for", "amazon rainforest deforestation",
           "apollo moon landing", "black death plague"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data, tiny_encoder, tiny_colbert) -> tuple[Path, Settings]:
    """SQuAD articles, cut to keep the tiny models quick, and an unsharded index of them."""
    root = tmp_path_factory.mktemp("shards")
    (root / "docs").mkdir()
    for path in sorted((shared_data / "squad-v1.1-dev" / "docs").glob("*.txt"))[:ARTICLES]:
        (root / "docs" / path.name).write_text(path.read_text()[:4000])
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), reader="extractive")
    Index(root / "one", settings).add(root / "docs")
    return root, settings


def same(a: Index, b: Index, query: str, mode: str) -> None:
    assert_same_ranking(a.search(query, k=8, mode=mode), b.search(query, k=8, mode=mode))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_sharded_index_ranks_as_the_unsharded_one(corpus, count):
    root, settings = corpus
    one = Index(root / "one", settings)
    sharded = Index(root / f"shards-{count}", settings)
    report = sharded.add(root / "docs", shards=count)
    assert sharded.shards == count and report.added == ARTICLES and report.chunks == one.status()["chunks"]
    owners = {path.name: shard_of(path.name, count) for path in (root / "docs").iterdir()}
    for i in range(count):  # each shard holds exactly the files that hash to it
        manifest = json.loads(next((root / f"shards-{count}" / f"shard-{i}").glob("gen-*/manifest.json"))
                              .read_text())
        assert set(manifest["files"]) == {name for name, shard in owners.items() if shard == i}
    for mode in ("dense", "bm25", "late", "hybrid"):
        for query in QUERIES:
            same(sharded, one, query, mode)
    shown = lambda hit: {k: v for k, v in hit.to_json().items() if k not in ("score", "ranks")}  # noqa: E731
    assert [shown(h) for h in sharded.search(QUERIES[0], k=3)] == [shown(h) for h in one.search(QUERIES[0], k=3)]
    status, expected = sharded.status(), one.status()
    assert {key: status[key] for key in ("files", "chunks", "tokens", "root")} == \
        {key: expected[key] for key in ("files", "chunks", "tokens", "root")}
    only = sharded.search("moon landing", k=5, mode="bm25", paths=["Apollo_*"])
    assert only and {h.chunk.path for h in only} == {"Apollo_program.txt"}


def test_merged_bm25_statistics_are_those_of_the_whole_collection(corpus):
    """Shard by shard, BM25 would weigh a word by its frequency in that shard alone; merged, a chunk scores as in
    one index over every file (the first test compares rankings)."""
    root, settings = corpus
    sharded, one = Index(root / "shards-3", settings), Index(root / "one", settings)
    if not sharded.exists():
        sharded.add(root / "docs", shards=3)
    lexical = sharded.searcher.lexical
    merged = dict(lexical.search(["moon rocket"], 50)[0])
    whole = {h.chunk_id: h.score for h in one.search("moon rocket", k=50, mode="bm25")}
    ids = sharded.searcher.table.column("chunk_id").to_pylist()
    assert {ids[row]: round(score, 4) for row, score in merged.items()} == {c: round(s, 4) for c, s in whole.items()}
    differ = 0
    for s, part in enumerate(lexical.parts):
        for row, score in part.search(["moon rocket"], 50)[0]:
            differ += abs(score - merged[row + lexical.offsets[s]]) > 1e-3
    assert differ > 0  # each shard alone would have scored some chunks otherwise


def test_an_incremental_run_updates_only_the_changed_files_shard(corpus, tmp_path):
    root, settings = corpus
    docs = tmp_path / "docs"
    shutil.copytree(root / "docs", docs)
    index = Index(tmp_path / "index", settings)
    index.add(docs, shards=2)
    changed = sorted(docs.iterdir())[0]
    changed.write_text("Glaciers retreat when summers warm; the ice keeps old air.\n")
    (docs / "new.txt").write_text("A brand new note on tidal power.\n")
    report = index.add(docs)  # stays sharded, with its 2 shards
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 0, ARTICLES - 1)
    assert index.search("tidal power", k=1, mode="bm25")[0].chunk.path == "new.txt"
    one = Index(tmp_path / "one", settings)
    one.add(docs)
    for mode in ("dense", "bm25", "hybrid"):
        same(index, one, "glaciers retreat", mode)


def test_the_number_of_shards_is_kept_and_a_plain_index_is_not_sharded_in_place(corpus, tmp_path):
    root, settings = corpus
    result = runner.invoke(app, ["index", str(root / "docs"), "--index", str(tmp_path / "s"), "--shards", "2",
                                 "--dense-model", settings.dense_model, "--late-model", settings.late_model,
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == ARTICLES
    again = runner.invoke(app, ["index", str(root / "docs"), "--index", str(tmp_path / "s"), "--shards", "3"])
    assert again.exit_code == 1 and "has 2 shards, not 3" in again.stderr
    plain = runner.invoke(app, ["index", str(root / "docs"), "--index", str(root / "one"), "--shards", "2"])
    assert plain.exit_code == 1 and "is not sharded" in plain.stderr
    found = runner.invoke(app, ["search", "apollo moon", "--index", str(tmp_path / "s"), "--mode", "bm25", "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout)["hits"][0]["path"] == "Apollo_program.txt"


def test_more_shards_than_files_leaves_some_empty_and_still_ranks_as_one(corpus, tmp_path):
    root, settings = corpus
    one = Index(root / "one", settings)
    sharded = Index(tmp_path / "twelve", settings)
    report = sharded.add(root / "docs", shards=12)
    sizes = [len(json.loads(next((tmp_path / "twelve" / f"shard-{i}").glob("gen-*/manifest.json")).read_text())
                            ["files"]) for i in range(12)]
    assert 0 in sizes and sum(sizes) == ARTICLES  # some shards hold no file
    assert not report.warnings  # an empty shard is no cause for a warning
    for mode in ("dense", "bm25", "late", "hybrid"):
        same(sharded, one, QUERIES[1], mode)
    assert_same_ranking(sharded.search("moon landing", k=5, mode="bm25", paths=["Apollo_*", "Black_*"]),
                        one.search("moon landing", k=5, mode="bm25", paths=["Apollo_*", "Black_*"]))


def test_status_tells_the_last_run_over_all_shards(corpus, tmp_path):
    root, settings = corpus
    docs = tmp_path / "docs"
    shutil.copytree(root / "docs", docs)
    index = Index(tmp_path / "index", settings)
    index.add(docs, shards=3)
    (docs / "new.txt").write_text("A note on tidal power.\n")
    report = index.add(docs)
    last = index.status()["last_run"]
    assert (last["added"], last["unchanged"], last["chunks"]) == (1, ARTICLES, report.chunks)


def test_a_failed_first_run_does_not_fix_the_number_of_shards(corpus, tmp_path):
    root, settings = corpus
    index = Index(tmp_path / "index", settings)
    with pytest.raises(Exception, match="missing does not exist"):
        index.add(tmp_path / "missing", shards=2)
    assert not index.exists()
    assert index.add(root / "docs", shards=3).added == ARTICLES and index.shards == 3
