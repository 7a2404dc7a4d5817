"""Indexing end to end with a tiny model: incremental runs, rebuilds, crash safety, the lock, bad input."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragkit import store
from ragkit.api import Index
from ragkit.config import Settings
from ragkit.errors import IndexLockedError, IndexNotFoundError, ModelLoadError, RagkitError

DOCS = {
    "oil.md": "# Oil crisis\n\nThe oil crisis began in October 1973. " + "The embargo lasted months. " * 12
    + "\n\n## Effects\n\nPrices rose fourfold.\n",
    "fox.txt": "The quick brown fox jumps over the lazy dog.\nIt was a sunny day.\n",
    "code/app.py": "def retrieve(query):\n    return index.search(query)\n",
}


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    for rel, text in docs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    write_docs(folder, DOCS)
    return folder


@pytest.fixture
def idx(tmp_path, tiny_encoder, tiny_colbert) -> Index:
    return Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert)))


def paths_of(hits) -> set[str]:
    return {h.chunk.path for h in hits}


def test_first_run_indexes_every_file(idx, docs):
    report = idx.add(docs)
    assert (report.added, report.updated, report.removed, report.unchanged) == (3, 0, 0, 0)
    assert report.skipped == []
    status = idx.status()
    assert status["files"] == 3 and status["chunks"] == report.chunks >= 3
    assert status["models"]["dense"]["max_tokens"] == 64
    assert "oil.md" in paths_of(idx.search("oil crisis October", k=3, mode="bm25"))


def test_hits_carry_provenance(idx, docs):
    idx.add(docs)
    hits = idx.search("Prices rose fourfold", k=1, mode="bm25")
    hit = hits[0].to_json()
    assert hit["path"] == "oil.md"
    assert hit["heading"] == "Oil crisis > Effects"
    assert "Prices rose fourfold" in hit["text"]
    lines = (docs / "oil.md").read_text().splitlines()
    assert "Prices rose fourfold." in "\n".join(lines[hit["start_line"] - 1 : hit["end_line"]])


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_every_mode_returns_k_hits(idx, docs, mode):
    idx.add(docs)
    hits = idx.search("oil", k=2, mode=mode)
    assert 1 <= len(hits) <= 2
    # a cosine of the random tiny encoder may be negative (its vocabulary, so its weights, vary between builds)
    assert all(h.score > 0 if mode != "dense" else -1.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_second_run_without_changes_writes_nothing(idx, docs):
    idx.add(docs)
    generation = store.current_generation(idx.path)
    report = idx.add(docs)
    assert (report.added, report.updated, report.removed, report.unchanged) == (0, 0, 0, 3)
    assert report.encoded_chunks == 0
    assert store.current_generation(idx.path) == generation


def test_incremental_modify_add_delete(idx, docs):
    idx.add(docs)
    before = {h.chunk_id for h in idx.search("fox", k=50, mode="bm25")}
    (docs / "oil.md").write_text("# Oil crisis\n\nThe embargo ended in March 1974.\n")
    (docs / "new.txt").write_text("Zebras graze on the savanna.\n")
    (docs / "code" / "app.py").unlink()
    report = idx.add(docs)
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 1)
    # only the changed and new files were encoded
    assert report.encoded_chunks == 2
    assert paths_of(idx.search("zebras savanna", k=1, mode="bm25")) == {"new.txt"}
    assert "oil.md" in paths_of(idx.search("embargo ended March", k=1, mode="bm25"))
    assert idx.search("October fourfold", k=10, mode="bm25") == []  # the old text is gone
    for mode in ("dense", "bm25", "hybrid"):
        assert "code/app.py" not in paths_of(idx.search("retrieve query index search", k=10, mode=mode))
    assert {h.chunk_id for h in idx.search("fox", k=50, mode="bm25")} == before  # unchanged file, same chunks
    assert idx.status()["files"] == 3


def test_a_new_generation_is_searched_with_the_encoders_already_loaded(idx, docs):
    idx.add(docs)
    idx.search("fox", mode="hybrid")
    first = idx.searcher
    encoder, late_encoder = first._encoder, first._late_encoder
    assert encoder is not None and late_encoder is not None
    (docs / "new.txt").write_text("Zebras graze on the savanna.\n")
    idx.add(docs)
    assert paths_of(idx.search("zebras savanna", k=1, mode="hybrid")) == {"new.txt"}
    assert idx.searcher is not first  # the new generation, opened with the same models
    assert idx.searcher._encoder is encoder and idx.searcher._late_encoder is late_encoder


def test_dense_vectors_of_kept_files_are_reused_exactly(idx, docs):
    import numpy as np

    from ragkit.indexes.faiss_index import load_vectors

    idx.add(docs)
    gen1 = store.current_generation(idx.path)
    rows1 = store.read_manifest(gen1)["files"]["fox.txt"]["rows"]
    vec1 = np.array(load_vectors(gen1 / "dense")[rows1[0] : rows1[0] + rows1[1]])
    (docs / "another.txt").write_text("Another file that sorts before fox.\n")
    idx.add(docs)
    gen2 = store.current_generation(idx.path)
    rows2 = store.read_manifest(gen2)["files"]["fox.txt"]["rows"]
    vec2 = np.array(load_vectors(gen2 / "dense")[rows2[0] : rows2[0] + rows2[1]])
    assert rows2[0] != rows1[0]
    assert np.array_equal(vec1, vec2)


def test_changing_chunk_size_rebuilds_everything(idx, docs, tiny_encoder, tiny_colbert):
    idx.add(docs)
    smaller = Index(idx.path, Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), chunk_tokens=24))
    report = smaller.add(docs)
    assert report.rebuilt and "chunk_tokens" in report.rebuilt
    assert report.encoded_chunks == report.chunks
    assert all(h.chunk.n_tokens <= 24 - 2 for h in smaller.search("the", k=50, mode="bm25"))


def test_changing_the_model_never_mixes_vectors(idx, docs, tmp_path, tiny_colbert):
    from models import build_modernbert_encoder

    idx.add(docs)
    other = build_modernbert_encoder(tmp_path / "other", seed=1)
    report = Index(idx.path, Settings(dense_model=str(other), late_model=str(tiny_colbert))).add(docs)
    assert report.rebuilt and "dense" in report.rebuilt
    assert report.encoded_chunks == report.chunks
    manifest = store.read_manifest(store.current_generation(idx.path))
    assert manifest["models"]["dense"]["model"] == str(other.resolve())


def test_search_uses_the_model_recorded_in_the_index(idx, docs):
    idx.add(docs)
    reader = Index(idx.path, Settings(dense_model="no/such-model"))  # the setting only matters for indexing
    assert reader.search("oil", k=1, mode="dense")


def test_a_different_folder_needs_rebuild(idx, docs, tmp_path):
    idx.add(docs)
    other = tmp_path / "other"
    write_docs(other, {"a.txt": "alpha beta gamma\n"})
    with pytest.raises(RagkitError, match="--rebuild"):
        idx.add(other)
    report = idx.add(other, rebuild=True)
    assert report.rebuilt == "--rebuild"
    assert idx.status()["files"] == 1


def test_bad_input_is_reported_not_fatal(idx, docs):
    (docs / "empty.txt").write_text("")
    (docs / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 garbage that is not a pdf")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n")
    (docs / "loop").symlink_to(docs, target_is_directory=True)
    (docs / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e is a dessert.".encode("latin-1"))
    report = idx.add(docs)
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["empty.txt"] == "empty file"
    assert reasons["blob.txt"] == "binary content"
    assert reasons["broken.pdf"].startswith("corrupt PDF")
    assert reasons["image.png"].startswith("unsupported file type")
    assert "loop" in reasons
    assert report.added == 4  # the three good files and the latin-1 one
    assert "latin1.txt" in paths_of(idx.search("crème brûlée dessert", k=1, mode="bm25"))
    # a failed file is not parsed again while unchanged, but stays reported
    again = idx.add(docs)
    assert {s.path for s in again.skipped} == set(reasons)
    assert again.unchanged == 4 and again.encoded_chunks == 0


def test_unreadable_model_gives_one_clear_message(tmp_path, docs):
    idx = Index(tmp_path / "index", Settings(dense_model="nobody/no-such-model-xyz"))
    with pytest.raises(ModelLoadError) as info:
        idx.add(docs)
    message = str(info.value)
    assert "nobody/no-such-model-xyz" in message and "dense_model=/path/to/model" in message
    assert not (tmp_path / "index" / store.CURRENT).exists()


def test_missing_index_and_missing_folder(tmp_path, idx):
    with pytest.raises(IndexNotFoundError):
        idx.search("anything")
    with pytest.raises(RagkitError, match="nope does not exist"):
        idx.add(tmp_path / "nope")
    (tmp_path / "a-file.txt").write_text("text")
    with pytest.raises(RagkitError, match="a-file.txt is not a folder"):
        idx.add(tmp_path / "a-file.txt")


def test_second_writer_is_refused(idx, docs):
    with store.write_lock(idx.path):
        with pytest.raises(IndexLockedError, match=f"being written by pid {os.getpid()};"):
            idx.add(docs)
    assert (idx.path / store.LOCK).read_text() == ""  # released, and says so
    assert idx.add(docs).added == 3


def _index_command(folder: Path, index: Path, model: Path, late_model: Path) -> list[str]:
    """`ragkit index` without --json: with stderr a pipe, it prints a progress line as each stage starts and ends."""
    return [sys.executable, "-m", "ragkit.cli", "index", str(folder), "--index", str(index),
            "--dense-model", str(model), "--late-model", str(late_model)]


def _wait_for(stderr, prefix: str, timeout: float) -> list[str]:
    """Read the child's unbuffered stderr line by line as it arrives until a line starts with `prefix`, the
    timeout passes or the child exits; returns the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and select.select([stderr], [], [], left)[0]:
        line = stderr.readline().decode(errors="replace")  # a raw (bufsize=0) pipe reads no further than the line
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            break
    return lines


@pytest.mark.parametrize("stage", ["encode", "write", "switch"])
def test_killed_run_leaves_previous_index_usable(tmp_path, tiny_encoder, tiny_colbert, stage):
    folder = tmp_path / "docs"
    write_docs(folder, {f"f{i:03d}.txt": f"Document {i} about topic{i}.\n" + "filler words here. " * 40
                        for i in range(60)})
    index = tmp_path / "index"
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))
    Index(index, settings).add(folder)
    generation = store.current_generation(index)
    for i in range(60):  # every file changes: the next run has real work to do
        (folder / f"f{i:03d}.txt").write_text(f"Changed {i} now mentions zeppelin{i}.\n" + "other words. " * 40)

    # "switch 0/1": renamed into place, not yet live; the pause holds the child there
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), store.COMMIT_PAUSE_ENV: "30"}
    child = subprocess.Popen(_index_command(folder, index, tiny_encoder, tiny_colbert), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
    try:
        lines = _wait_for(child.stderr, f"ragkit: {stage} 0/", 300)
    finally:
        child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    child.stderr.close()
    assert lines and lines[-1].startswith(f"ragkit: {stage} 0/"), lines[-20:]  # killed in that stage

    # the previous generation is live and whole
    assert store.current_generation(index) == generation
    assert Index(index, settings).search("topic7", k=1, mode="bm25")[0].chunk.path == "f007.txt"
    renamed = {p.name for p in index.glob(store.GEN_PREFIX + "*") if not p.name.endswith(store.TMP_SUFFIX)}
    assert len(renamed) == (2 if stage == "switch" else 1)  # with "switch", the killed run's own too: never live
    # the next run completes and cleans up what the killed one left
    report = Index(index, settings).add(folder)
    assert report.updated == 60
    assert not list(index.glob("*" + store.TMP_SUFFIX))
    assert sorted(p.name for p in index.glob(store.GEN_PREFIX + "*")) == \
        sorted([generation.name, store.current_generation(index).name])
    assert Index(index, Settings()).search("zeppelin7", k=1, mode="bm25")[0].chunk.path == "f007.txt"


def test_large_collections_use_hnsw(tmp_path, docs, tiny_encoder, tiny_colbert):
    import json as _json

    flat = Index(tmp_path / "flat", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert)))
    hnsw = Index(tmp_path / "hnsw", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), dense_exact_max=2))
    flat.add(docs)
    hnsw.add(docs)
    params = _json.loads((store.current_generation(hnsw.path) / "dense" / "params.json").read_text())
    assert params["kind"] == "hnsw" and (store.current_generation(hnsw.path) / "dense" / "index.faiss").is_file()
    for query in ("oil crisis", "fox", "retrieve"):
        vectors = flat.searcher.encoder.encode_queries([query])
        (got,), (want,) = hnsw.searcher.dense.search(vectors, 3), flat.searcher.dense.search(vectors, 3)
        # as near as the exact neighbours, rank by rank (two chunks of equal score may come in either order)
        assert [score for _, score in got] == pytest.approx([score for _, score in want], abs=1e-5), (got, want)
        exact = dict(flat.searcher.dense.search(vectors, len(flat.searcher.table))[0])
        third = sorted(exact.values(), reverse=True)[2]
        assert all(exact[row] >= third - 1e-5 for row, _ in got)  # each among the exact top 3, ties included


def test_progress_events_cover_every_stage(idx, docs):
    events = []
    report = idx.add(docs, progress=events.append)
    stages = [e.stage for e in events]
    assert stages.index("scan") < stages.index("parse") < stages.index("encode") < stages.index("write")
    last_encode = [e for e in events if e.stage == "encode"][-1]
    assert last_encode.done == last_encode.total == report.encoded_chunks
    assert last_encode.tokens == report.encoded_tokens
    parse = [e.done for e in events if e.stage == "parse"]
    assert parse == sorted(parse) and parse[-1] == 3


def test_default_late_model_out_of_reach_falls_back_with_a_warning(tmp_path, docs, tiny_encoder):
    idx = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder)))  # default late model: not cached here
    report = idx.add(docs)
    assert report.added == 3 and len(report.warnings) == 1 and "late interaction skipped" in report.warnings[0]
    assert "late" not in idx.status()["models"]
    assert idx.status()["settings"]["late_skipped"].startswith("Could not load the late model")
    assert idx.search("oil crisis", k=1)  # hybrid uses what the index has
    with pytest.raises(RagkitError, match=r"skipped when the index was built \(Could not load the late model.*"
                                          r"--late-model PATH"):
        idx.search("oil crisis", mode="late")


def test_without_model_settings_offline_the_embedded_models_serve(tmp_path, docs, minilm):
    """No network and no model named: the embedded all-MiniLM-L6-v2 encodes, the late stage is skipped, and both
    are said once; the next run, still offline, keeps the index as it is."""
    idx = Index(tmp_path / "index")
    report = idx.add(docs)
    assert report.added == 3 and len(report.warnings) == 2
    assert "embedded all-MiniLM-L6-v2" in report.warnings[0] and "late interaction skipped" in report.warnings[1]
    status = idx.status()
    assert status["models"]["dense"]["model"] == str(minilm) and "late" not in status["models"]
    assert status["settings"]["dense_model"] == "Alibaba-NLP/gte-modernbert-base"  # tried again next time
    assert status["settings"]["dense_fallback"]
    assert idx.search("oil crisis", k=1)[0].chunk.path == "oil.md"
    again = Index(tmp_path / "index").add(docs)
    assert (again.unchanged, again.encoded_chunks, again.rebuilt) == (3, 0, None)


def test_a_default_model_named_explicitly_never_falls_back(tmp_path, docs):
    with pytest.raises(ModelLoadError, match="Alibaba-NLP/gte-modernbert-base"):
        Index(tmp_path / "index", Settings(dense_model="Alibaba-NLP/gte-modernbert-base", late=False)).add(docs)
    with pytest.raises(ModelLoadError, match="lightonai/GTE-ModernColBERT-v1"):
        Index(tmp_path / "index", Settings(late_model="lightonai/GTE-ModernColBERT-v1")).add(docs)


def test_a_second_run_without_model_flags_keeps_the_index_models(tmp_path, idx, docs, tiny_encoder, tiny_colbert):
    """The hub defaults cannot load here (offline): a run that fell back to them would fail."""
    idx.add(docs)
    (docs / "fox.txt").write_text("The quick brown fox naps.\n")
    report = Index(idx.path).add(docs)
    assert (report.updated, report.unchanged, report.rebuilt) == (1, 2, None)
    manifest = Index(idx.path).manifest()
    assert manifest["models"]["dense"]["model"] == str(tiny_encoder)
    assert manifest["models"]["late"]["model"] == str(tiny_colbert)
    assert manifest["settings"]["dense_model"] == str(tiny_encoder)


def test_index_settings_are_kept_unless_named_again(tmp_path, docs, tiny_encoder, tiny_colbert):
    first = Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late=False, chunk_tokens=24))
    first.add(docs)
    (docs / "new.txt").write_text("Zeppelins once crossed the Atlantic.\n")
    report = Index(tmp_path / "i").add(docs)
    assert (report.added, report.rebuilt, report.late_encoded_chunks) == (1, None, 0)
    manifest = Index(tmp_path / "i").manifest()
    assert "late" not in manifest["models"] and manifest["settings"]["chunk_tokens"] == 24
    # naming a late model adds the late stage (chunks are cut again to fit its tokenizer too); the chunk size stays
    report = Index(tmp_path / "i", Settings(late_model=str(tiny_colbert))).add(docs)
    assert report.late_encoded_chunks == report.chunks and "late_tokenizer" in report.rebuilt
    manifest = Index(tmp_path / "i").manifest()
    assert manifest["models"]["late"]["model"] == str(tiny_colbert) and manifest["settings"]["chunk_tokens"] == 24


def test_fingerprints_name_the_model_as_loaded_not_as_it_was_before_download(tmp_path, idx, docs, monkeypatch):
    """A hub model not yet downloaded has an unknown revision until it loads; recording that would make the next
    run encode everything again."""
    from ragkit import fingerprints as indexer
    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.late import LateEncoder

    downloaded: set[str] = set()
    for encoder in (DenseEncoder, LateEncoder):
        def downloading_init(self, *args, _init=encoder.__init__, **kwargs):
            _init(self, *args, **kwargs)
            downloaded.add(self.name)

        monkeypatch.setattr(encoder, "__init__", downloading_init)
    real_revision, real_tokenizer = indexer.model_revision, indexer.tokenizer_fingerprint
    monkeypatch.setattr(indexer, "model_revision",
                        lambda name: real_revision(name) if name in downloaded else "unknown")
    monkeypatch.setattr(indexer, "tokenizer_fingerprint",
                        lambda name: real_tokenizer(name) if name in downloaded else "unknown")
    idx.add(docs)
    fingerprint = idx.manifest()["fingerprint"]
    assert "unknown" not in (fingerprint["dense"]["revision"], fingerprint["late"]["revision"],
                             fingerprint["chunks"]["dense_tokenizer"], fingerprint["chunks"]["late_tokenizer"])
    downloaded.clear()  # a new process: nothing is loaded yet, but the model is now in the cache
    monkeypatch.setattr(indexer, "model_revision", real_revision)
    monkeypatch.setattr(indexer, "tokenizer_fingerprint", real_tokenizer)
    report = idx.add(docs)
    assert (report.rebuilt, report.encoded_chunks, report.unchanged) == (None, 0, 3)
