"""Dense encoder backends: the ONNX export makes torch's vectors, int8 ranks as torch does, and a query needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings
from ragkit.encoders.int8 import RECIPE
from ragkit.errors import ConfigError, ModelLoadError

TEXTS = ["alpha beta gamma", "  the quick brown fox jumps over the lazy dog  ", "delta " * 200]  # last: truncated


DOCS = {"oil.txt": "The oil crisis began in October 1973.\nPrices rose fourfold.\n",
        "fox.md": "# Animals\n\nThe quick brown fox jumps over the lazy dog.\n",
        "tea.txt": "Green tea is steamed; black tea is oxidised before drying.\n"}


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def prompted_encoder(tiny_encoder, tmp_path) -> Path:
    """The tiny encoder with query and document prompts, as E5-style models have."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_encoder), device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    model.save(str(tmp_path / "prompted"))
    return tmp_path / "prompted"


def test_the_onnx_backend_and_the_query_encoder_make_torch_s_vectors(prompted_encoder):
    from ragkit.encoders.dense import DenseEncoder
    from ragkit.encoders.onnx import OnnxEncoder

    reference = DenseEncoder(str(prompted_encoder))
    onnx = DenseEncoder(str(prompted_encoder), backend="onnx")
    lengths = [reference.count_tokens(t) for t in TEXTS]
    assert max(lengths) > reference.max_tokens  # the truncation of a long text is checked too
    documents = reference.encode_documents(TEXTS, lengths)

    def torch_encodes(*args, **kwargs):
        raise AssertionError("the onnx backend encoded through torch")

    onnx.model.encode_document = onnx.model.encode_query = torch_encodes
    assert np.abs(onnx.encode_documents(TEXTS, lengths) - documents).max() < 1e-5
    assert np.abs(onnx.encode_queries(TEXTS) - reference.encode_queries(TEXTS)).max() < 1e-5
    light = OnnxEncoder.cached(reference.name, reference.revision, int8=False)  # what a query uses: no torch
    queries = reference.encode_queries(TEXTS)
    assert np.abs(light.encode_queries(TEXTS) - queries).max() < 1e-5
    assert np.abs(queries - documents).max() > 1e-3  # the prompts differ, and both are applied


def test_the_export_traces_eager_attention_and_gives_the_model_back_as_it_was(minilm, tmp_path, monkeypatch):
    """The traced graph adds the padding mask to the scores once (no IsNaN / Where guard over every score tensor),
    and the model keeps its own attention for torch's encoding afterwards."""
    import onnx

    from ragkit.encoders.dense import DenseEncoder

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))  # exported here, not found from another test
    encoder = DenseEncoder(str(minilm))
    before = encoder.model[0].auto_model.config._attn_implementation
    assert before != "eager" and encoder.export_for_queries() is None
    graph = onnx.load(str(DenseEncoder(str(minilm), backend="onnx")._onnx.folder / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "IsNaN" not in ops and ops.count("Softmax") == 6
    assert encoder.model[0].auto_model.config._attn_implementation == before


@pytest.mark.parametrize("late_model", ["tiny_colbert", "tiny_encoder"])  # [Q] and [MASK] expansion; identity
def test_the_late_query_export_makes_pylate_s_query_vectors(request, late_model):
    from ragkit.encoders.late import LateEncoder
    from ragkit.encoders.late_onnx import OnnxLateQueryEncoder

    reference = LateEncoder(str(request.getfixturevalue(late_model)), 64)
    assert reference.export_for_queries() is None
    light = OnnxLateQueryEncoder.cached(reference.name, reference.revision)
    queries = ["oil crisis", "  What did the fox jump over, and when?  ", "word " * 80]
    for query, ours, theirs in zip(queries, light.encode_queries(queries), reference.encode_queries(queries)):
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-5
        assert np.array_equal(light.word_positions(query), reference.word_positions(query))
    assert light.encode_queries(["oil crisis"])[0].shape == reference.encode_queries(["oil crisis"])[0].shape


def test_an_int8_index_ranks_as_the_torch_index(tmp_path, minilm, shared_data):
    squad = shared_data / "squad-v1.1-dev"
    docs = tmp_path / "docs"
    docs.mkdir()
    for path in sorted((squad / "docs").iterdir())[:4]:
        (docs / path.name).write_text(path.read_text())
    questions = [json.loads(line) for line in (squad / "questions.jsonl").read_text().splitlines()]
    questions = [q["question"] for q in questions if (docs / q["doc"]).is_file()][:20]
    tops = {}
    for backend in ("torch", "onnx-int8"):
        idx = Index(tmp_path / backend, Settings(dense_model=str(minilm), late=False, dense_backend=backend))
        idx.add(docs)
        tops[backend] = [[h.chunk_id for h in idx.search(q, k=5, mode="dense")] for q in questions]
    assert len(questions) == 20
    same_first = sum(a[0] == b[0] for a, b in zip(tops["torch"], tops["onnx-int8"]))
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(tops["torch"], tops["onnx-int8"])])
    assert same_first >= 18 and overlap >= 0.8


def test_the_backend_is_part_of_the_dense_fingerprint(tmp_path, docs, tiny_encoder):
    settings = Settings(dense_model=str(tiny_encoder), late=False)
    idx = Index(tmp_path / "i", settings)
    idx.add(docs)
    assert "backend" not in idx.manifest()["models"]["dense"]  # as indexes made before backends existed
    report = Index(tmp_path / "i", settings.replace(dense_backend="onnx-int8")).add(docs)
    assert report.encoded_chunks == report.chunks and "dense" in report.rebuilt
    dense = Index(tmp_path / "i").manifest()["models"]["dense"]
    assert dense["backend"] == "onnx-int8" and dense["int8"] == RECIPE  # another recipe's vectors are re-encoded
    same = Index(tmp_path / "i", settings)  # the backend is kept when not named again
    assert same.add(docs).encoded_chunks == 0
    assert same.searcher.encoder.backend == "onnx-int8" and same.search("oil crisis", k=1, mode="dense")
    status = CliRunner().invoke(app, ["status", "--index", str(tmp_path / "i")])
    assert "onnx-int8" in " ".join(status.stdout.split())
    report = Index(tmp_path / "i", settings.replace(dense_backend="onnx")).add(docs)
    assert report.encoded_chunks == report.chunks


def test_an_int8_index_of_an_earlier_recipe_gets_its_query_encoder_with_a_warning(tmp_path, docs, tiny_encoder):
    import warnings

    from ragkit.encoders.onnx import query_encoder
    from ragkit.errors import RagkitWarning

    idx = Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late=False, dense_backend="onnx-int8"))
    idx.add(docs)
    dense = idx.manifest()["models"]["dense"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert query_encoder(dense, None).backend == "onnx-int8"  # the current recipe: no warning
    with pytest.warns(RagkitWarning, match="re-encode"):
        assert query_encoder({**dense, "int8": "dynamic-per-channel-outlier-channels-float32"}, None).backend \
            == "onnx-int8"


def test_a_hybrid_search_from_the_shell_imports_no_torch_and_finds_the_same(tmp_path, docs, tiny_encoder,
                                                                            tiny_colbert):
    Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(docs)
    code = ("import sys; from ragkit.cli import app; "
            f"app(['search', 'oil crisis', '--index', {str(tmp_path / 'i')!r}, '--json'], standalone_mode=False); "
            "print('torch' in sys.modules, 'pylate' in sys.modules)")

    def run(**env: str) -> tuple[list[dict], list[str]]:
        import os

        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        return json.loads("\n".join(lines[:-1]))["hits"], lines[-1].split()

    fast, imported = run()
    assert imported == ["False", "False"]
    large, imported = run(RAGKIT_LATE_EXACT_MAX_TOKENS="0")  # the centroid stage serves late search: no torch either
    assert imported == ["False", "False"] and [h["chunk_id"] for h in large] == [h["chunk_id"] for h in fast]
    slow, imported = run(RAGKIT_ONNX_QUERIES="false")  # the models themselves, when asked
    assert imported == ["True", "True"]
    assert [h["chunk_id"] for h in fast] == [h["chunk_id"] for h in slow] and fast[0]["evidence"]
    assert np.allclose([h["score"] for h in fast], [h["score"] for h in slow], atol=1e-4)
    assert [h["evidence"] for h in fast] == [h["evidence"] for h in slow]


def test_a_model_that_does_not_export_is_searched_through_torch(tmp_path, docs, tiny_encoder, monkeypatch):
    from ragkit.encoders import onnx
    from ragkit.encoders.dense import DenseEncoder

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def failing(st_model, work):
        calls.append(work)
        raise RuntimeError("this exporter cannot trace the model")

    monkeypatch.setattr(onnx, "export_dense", failing)
    idx = Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late=False))
    report = idx.add(docs)
    assert any("dense queries will start slower" in w and "cannot trace" in w for w in report.warnings)
    assert len(calls) == 1 and list((tmp_path / "cache" / "onnx").glob("*/failed.json"))
    assert not list((tmp_path / "cache" / "onnx").glob(".*"))  # the half-made export is gone
    assert isinstance(idx.searcher.encoder, DenseEncoder) and idx.search("oil crisis", k=1, mode="dense")
    assert len(calls) == 1  # recorded: not tried again at every query
    with pytest.raises(ModelLoadError, match="cannot run on the onnx backend"):
        DenseEncoder(str(tiny_encoder), backend="onnx")


def test_an_unknown_backend_is_a_clear_error(tmp_path, docs):
    with pytest.raises(ConfigError, match="dense_backend must be one of torch, onnx, onnx-int8"):
        Settings().replace(dense_backend="tensorrt")
    result = CliRunner().invoke(app, ["index", str(docs), "--index", str(tmp_path / "i"), "--dense-backend", "fast"])
    assert result.exit_code == 1 and "dense_backend must be one of" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_cache_that_cannot_be_written_costs_only_the_fast_start(tmp_path, docs, tiny_encoder, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "a-file"))  # no folder can be made under a file
    idx = Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late=False))
    report = idx.add(docs)
    assert any("cannot be written" in w for w in report.warnings)
    assert idx.search("oil crisis", k=1, mode="dense")


def test_the_onnx_backends_cut_chunks_to_fit_their_attention(tmp_path, docs, tiny_encoder, monkeypatch):
    from ragkit import store
    from ragkit.encoders import dense
    from ragkit.errors import RagkitError

    monkeypatch.setattr(dense, "ONNX_MAX_TOKENS", 12)  # the tiny model reads 64
    settings = Settings(dense_model=str(tiny_encoder), late=False)
    Index(tmp_path / "i", settings).add(docs)
    live = (tmp_path / "i" / store.CURRENT).read_text()
    lengths = store.load_chunks(store.current_generation(tmp_path / "i")).column("n_tokens").to_pylist()
    assert max(lengths) > 12
    with pytest.raises(RagkitError, match="reads at most .* --rebuild"):  # kept chunks are too long for it
        Index(tmp_path / "i", settings.replace(dense_backend="onnx")).add(docs)
    assert (tmp_path / "i" / store.CURRENT).read_text() == live  # the previous generation stays live
    fresh = Index(tmp_path / "j", settings.replace(dense_backend="onnx"))
    fresh.add(docs)
    assert fresh.manifest()["models"]["dense"]["max_tokens"] == 12
    lengths = store.load_chunks(store.current_generation(tmp_path / "j")).column("n_tokens").to_pylist()
    assert max(lengths) <= 12 - 2 and fresh.search("oil crisis", k=1, mode="dense")


def test_an_export_whose_vectors_differ_from_torch_s_is_refused_and_torch_serves(tmp_path, docs, tiny_encoder,
                                                                                 monkeypatch):
    from ragkit.encoders import onnx
    from ragkit.encoders.dense import DenseEncoder

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx, "FLOAT32_TOLERANCE", -1.0)  # as if the traced graph computed something else
    with pytest.raises(ModelLoadError, match="cannot run on the onnx backend .*differ from torch"):
        DenseEncoder(str(tiny_encoder), backend="onnx")
    failed = list((tmp_path / "cache" / "onnx").glob("*/failed.json"))
    assert len(failed) == 1 and "differ from torch" in json.loads(failed[0].read_text())["reason"]
    assert not list((tmp_path / "cache" / "onnx").glob("*/model.onnx"))
    idx = Index(tmp_path / "i", Settings(dense_model=str(tiny_encoder), late=False))
    idx.add(docs)
    assert isinstance(idx.searcher.encoder, DenseEncoder) and idx.search("oil crisis", k=1, mode="dense")


def test_an_int8_graph_too_far_from_torch_is_dropped_and_the_float32_export_still_serves(tiny_encoder, tmp_path,
                                                                                       monkeypatch):
    from ragkit.encoders import onnx
    from ragkit.encoders.dense import DenseEncoder

    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx, "INT8_MIN_COSINE", 1.01)  # no int8 vector can be this close
    with pytest.raises(ModelLoadError, match="strays too far"):
        DenseEncoder(str(tiny_encoder), backend="onnx-int8")
    (folder,) = [meta.parent for meta in (tmp_path / "cache" / "onnx").glob("*/encoder.json")]
    meta = json.loads((folder / onnx.META).read_text())
    assert meta["int8"] is False and meta["int8_min_cosine"] < 1.01 and not (folder / onnx.MODEL_INT8).exists()
    reference = DenseEncoder(str(tiny_encoder))
    lengths = [reference.count_tokens(t) for t in TEXTS]
    float32 = DenseEncoder(str(tiny_encoder), backend="onnx")
    assert np.abs(float32.encode_documents(TEXTS, lengths) - reference.encode_documents(TEXTS, lengths)).max() < 1e-5
