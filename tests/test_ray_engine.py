"""`ragkit index --engine ray`: a local 2-CPU Ray instance indexes a folder exactly as the local loop does, sends
only new and changed files to the cluster, reports files that fail to parse on a worker, survives a worker that
dies, and leaves the previous generation live when the cluster fails; without Ray, one clear message."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit import store
from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings
from ragkit.engines import LocalEngine

DOCS = {
    "oil.md": "# Oil crisis\n\nThe oil crisis began in October 1973. " + "The embargo lasted months. " * 30
    + "\n\n## Effects\n\nPrices rose fourfold.\n",
    "fox.txt": "The quick brown fox jumps over the lazy dog.\nIt was a sunny day.\n" * 6,
    "code/app.py": "def retrieve(query):\n    return index.search(query)\n",
    "notes/rag.md": "# Retrieval\n\nRetrieval augmented generation cites the lines and pages it used.\n" * 4,
}
BROKEN_PDF = b"%PDF-1.4 not really"
QUERIES = ["oil crisis October", "quick brown fox", "retrieve query", "lines and pages"]
MODES = ["dense", "bm25", "late", "hybrid"]
COUNTS = ("added", "updated", "removed", "unchanged", "chunks", "encoded_chunks", "encoded_tokens",
          "late_encoded_chunks")

runner = CliRunner()


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    for rel, text in docs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def snapshot(idx: Index) -> dict:
    """What a generation holds (chunk table, vectors, BM25 files, manifest) and what search answers from it."""
    generation = store.current_generation(idx.path)
    late = generation / "late"
    return {
        "chunks": store.load_chunks(generation),
        "dense": np.load(generation / "dense" / "vectors.npy"),
        "late": {name: np.load(late / f"{name}.npy") for name in ("tokens", "spans", "offsets")},
        "bm25": {p.relative_to(generation).as_posix(): p.read_bytes()
                 for p in sorted((generation / "bm25").rglob("*")) if p.is_file()},
        "manifest": store.read_manifest(generation),
        "hits": {(mode, q): [(h.chunk_id, h.score) for h in idx.search(q, k=5, mode=mode)]
                 for mode in MODES for q in QUERIES},
    }


def assert_same_index(local: dict, ray: dict) -> None:
    assert ray["chunks"].column_names == local["chunks"].column_names
    for name in local["chunks"].column_names:  # chunk ids, texts, spans, lines, headings, token counts
        assert ray["chunks"].column(name).to_pylist() == local["chunks"].column(name).to_pylist(), name
    assert ray["dense"].dtype == np.float32 and ray["dense"].shape == local["dense"].shape
    np.testing.assert_allclose(ray["dense"], local["dense"], atol=1e-5)
    assert ray["late"]["tokens"].dtype == np.float16 and ray["late"]["tokens"].shape == local["late"]["tokens"].shape
    np.testing.assert_allclose(ray["late"]["tokens"].astype(np.float32), local["late"]["tokens"].astype(np.float32),
                               atol=1e-3)
    np.testing.assert_array_equal(ray["late"]["spans"], local["late"]["spans"])
    np.testing.assert_array_equal(ray["late"]["offsets"], local["late"]["offsets"])
    assert ray["bm25"] == local["bm25"]
    for key in ("files", "skipped", "unparsable", "stats", "fingerprint", "models"):
        assert ray["manifest"][key] == local["manifest"][key], key
    for key, hits in local["hits"].items():
        assert [c for c, _ in ray["hits"][key]] == [c for c, _ in hits], key
        np.testing.assert_allclose([s for _, s in ray["hits"][key]], [s for _, s in hits], atol=1e-5)


def report_counts(report) -> dict:
    return {name: getattr(report, name) for name in COUNTS}


@pytest.fixture(scope="module")
def engine():
    """The engine's own local Ray instance with 2 CPUs, shared by this module's tests."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from ragkit.engines.ray_engine import ray_engine

    with ray_engine(workers=2) as engine:
        assert ray.cluster_resources().get("CPU") == 2
        yield engine
    assert not ray.is_initialized()  # the instance it started stops with it


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder, tiny_colbert, engine) -> SimpleNamespace:
    """A folder indexed by the local loop and by the Ray engine, then changed (one file added, one modified, one
    deleted) and indexed again by both; what each run reported and wrote, and what was sent to the cluster."""
    root = tmp_path_factory.mktemp("ray-engine")
    docs = root / "docs"
    write_docs(docs, DOCS)
    (docs / "broken.pdf").write_bytes(BROKEN_PDF)
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))
    local, ray = Index(root / "local", settings), Index(root / "ray", settings)
    out = SimpleNamespace(events=[])
    out.first = {"local": local.add(docs), "ray": ray.add(docs, engine=engine, progress=out.events.append)}
    out.first_sent = (list(engine.sent_files), dict(engine.sent_chunks))
    out.first_index = {"local": snapshot(local), "ray": snapshot(ray)}

    (docs / "fox.txt").write_text("The quick brown fox sleeps.\n" * 5)
    (docs / "code" / "app.py").unlink()
    write_docs(docs, {"new.md": "# New\n\nA new file about the oil embargo of 1973.\n"})
    out.second = {"local": local.add(docs), "ray": ray.add(docs, engine=engine)}
    out.second_sent = (engine.sent_files[len(out.first_sent[0]):],
                       {k: v - out.first_sent[1][k] for k, v in engine.sent_chunks.items()})
    out.second_index = {"local": snapshot(local), "ray": snapshot(ray)}
    return out


def test_the_ray_engine_writes_the_index_the_local_loop_writes(runs):
    assert report_counts(runs.first["ray"]) == report_counts(runs.first["local"])
    assert runs.first["ray"].warnings == runs.first["local"].warnings
    assert_same_index(runs.first_index["local"], runs.first_index["ray"])
    assert sorted(runs.first_sent[0]) == sorted([*DOCS, "broken.pdf"])
    assert runs.first_sent[1] == {"dense": runs.first["local"].encoded_chunks,
                                  "late": runs.first["local"].late_encoded_chunks}


def test_progress_from_the_workers_reaches_the_caller(runs):
    report = runs.first["ray"]
    last = {}
    for event in runs.events:
        last[event.stage] = event
    assert (last["parse"].done, last["parse"].total) == (len(DOCS) + 1, len(DOCS) + 1)
    assert (last["encode"].done, last["encode"].total) == (report.encoded_chunks, report.encoded_chunks)
    assert last["encode"].tokens == report.encoded_tokens
    assert (last["late"].done, last["late"].total) == (report.late_encoded_chunks, report.late_encoded_chunks)
    parsed = [e.done for e in runs.events if e.stage == "parse"]
    assert parsed == sorted(parsed) and parsed[0] == 0


def test_a_file_that_fails_to_parse_on_a_worker_is_skipped_with_its_reason(runs):
    local, ray = runs.first["local"], runs.first["ray"]
    assert "broken.pdf" in runs.first_sent[0]  # parsed on the cluster
    assert [(s.path, s.reason) for s in ray.skipped] == [(s.path, s.reason) for s in local.skipped]
    (skipped,) = ray.skipped
    assert skipped.path == "broken.pdf" and skipped.reason.startswith("corrupt PDF")
    assert runs.first_index["ray"]["manifest"]["unparsable"]["broken.pdf"]["reason"] == skipped.reason


def test_an_incremental_run_sends_only_new_and_changed_files(runs):
    local, ray = runs.second["local"], runs.second["ray"]
    assert (ray.added, ray.updated, ray.removed, ray.unchanged) == (1, 1, 1, 2)
    assert report_counts(ray) == report_counts(local)
    assert sorted(runs.second_sent[0]) == ["fox.txt", "new.md"]  # not broken.pdf: unchanged since it failed
    assert runs.second_sent[1] == {"dense": local.encoded_chunks, "late": local.late_encoded_chunks}
    assert_same_index(runs.second_index["local"], runs.second_index["ray"])


def test_a_worker_that_dies_is_restarted_and_the_run_completes(tmp_path, tiny_encoder, engine, monkeypatch):
    from ragkit.engines.ray_engine import _DenseActor

    class Dying(_DenseActor):  # defined here, so Ray ships the class itself to the actor
        marker = str(tmp_path / "died")

        def __call__(self, batch):
            if not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(engine, "dense_actor", Dying)
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    settings = Settings(dense_model=str(tiny_encoder), late=False)
    report = Index(tmp_path / "ray", settings).add(docs, engine=engine)
    expected = Index(tmp_path / "local", settings).add(docs)
    assert (tmp_path / "died").exists()  # an actor did die
    assert report_counts(report) == report_counts(expected)
    generations = [store.current_generation(tmp_path / name) for name in ("ray", "local")]
    np.testing.assert_allclose(*(np.load(g / "dense" / "vectors.npy") for g in generations), atol=1e-5)


def test_a_run_the_cluster_cannot_finish_leaves_the_previous_generation_live(tmp_path, tiny_encoder, engine,
                                                                              monkeypatch):
    from ragkit.engines.ray_engine import RayEngine, _DenseActor

    class Fails(_DenseActor):
        def __call__(self, batch):
            raise RuntimeError("this actor cannot encode")

    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    index = tmp_path / "index"
    code = runner.invoke(app, ["index", str(docs), "--index", str(index), "--dense-model", str(tiny_encoder),
                               "--no-late", "--json"]).exit_code
    assert code == 0
    live = store.current_generation(index)
    before = store.load_chunks(live)

    monkeypatch.setattr(RayEngine, "dense_actor", Fails)
    (docs / "fox.txt").write_text("A changed file, to be encoded on the cluster.\n")
    result = runner.invoke(app, ["index", str(docs), "--index", str(index), "--engine", "ray", "--json"])
    assert result.exit_code == 1
    message = json.loads(result.stdout)["error"]
    assert "Ray cluster failed while encoding (dense)" in message and "as it was before this run" in message
    assert "Traceback" not in result.stderr
    assert store.current_generation(index) == live
    assert store.load_chunks(live).equals(before)
    assert Index(index).search("quick brown fox", k=1, mode="bm25")[0].chunk.path == "fox.txt"


def test_without_ray_the_cli_says_how_to_install_it(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    write_docs(docs, {"a.txt": "some text\n"})
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = runner.invoke(app, ["index", str(docs), "--index", str(tmp_path / "index"), "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'ragkit[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("index/gen-*"))


def test_engine_flags_are_checked(tmp_path):
    docs = tmp_path / "docs"
    write_docs(docs, {"a.txt": "some text\n"})
    result = runner.invoke(app, ["index", str(docs), "--engine", "spark"])
    assert result.exit_code == 1 and "engine must be one of local, ray, got 'spark'" in result.stderr
    result = runner.invoke(app, ["index", str(docs), "--workers", "2"])
    assert result.exit_code == 1 and "--engine ray" in result.stderr


def test_any_engine_serves_every_shard(tmp_path, tiny_encoder):
    class Counting(LocalEngine):
        def __init__(self) -> None:
            self.parsed: list[str] = []

        def parse(self, files, spec):
            self.parsed += [rel for rel, _ in files]
            return super().parse(files, spec)

    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    counting = Counting()
    report = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False)).add(
        docs, shards=2, engine=counting)
    assert report.added == len(DOCS)
    assert sorted(counting.parsed) == sorted(DOCS)


def test_the_cli_connects_to_a_running_cluster_with_address(tmp_path, tiny_encoder, engine):
    import subprocess

    import ray

    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "ragkit.cli", "index", str(docs), "--index", str(tmp_path / "index"),
               "--dense-model", str(tiny_encoder), "--no-late", "--engine", "ray", "--address", address, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = Index(tmp_path / "local", Settings(dense_model=str(tiny_encoder), late=False)).add(docs)
    assert {name: report[name] for name in COUNTS} == report_counts(expected)
    assert ray.cluster_resources().get("CPU") == 2  # the cluster outlives a run that connected to it
