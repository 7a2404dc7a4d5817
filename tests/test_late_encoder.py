"""The late-interaction encoder: a ColBERT checkpoint is used as it is; a model without a ColBERT head is read
through an identity projection, so that nothing random enters the vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings
from ragkit.encoders.late import LateEncoder, has_colbert_head

TEXTS = ["The oil crisis began in October 1973.", "Apollo 11 landed on the Moon in July 1969."]


def test_a_model_without_a_colbert_head_gives_its_own_token_vectors(minilm):
    import torch
    from transformers import AutoModel, AutoTokenizer

    assert not has_colbert_head(str(minilm))
    encoder = LateEncoder(str(minilm), 256)
    assert encoder.projection == "identity" and encoder.dim == 384 and encoder.special_tokens == 2
    encoded = encoder.encode_documents(TEXTS, [9, 12])[0]
    # the backbone's last hidden states of "[CLS] text [SEP]", normalised: no projection, no prefix token
    tokenizer, backbone = AutoTokenizer.from_pretrained(minilm), AutoModel.from_pretrained(minilm)
    with torch.no_grad():
        states = backbone(**tokenizer(TEXTS[0], return_tensors="pt")).last_hidden_state[0].numpy()
    states /= np.linalg.norm(states, axis=1, keepdims=True)
    kept = [i for i, (start, end) in enumerate(encoded.spans.tolist()) if start >= 0]
    words = [TEXTS[0][start:end] for start, end in encoded.spans[kept].tolist()]
    assert words == ["The", "oil", "crisis", "began", "in", "October", "1973"]  # "." is in PyLate's skiplist
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert len(ids) == len(encoded.vectors) + 1  # [CLS] 7 words . [SEP], without the "."
    expected = np.concatenate([states[:8], states[9:]])  # drop the "." position
    assert np.allclose(encoded.vectors.astype(np.float32), expected, atol=2e-3)


def test_two_loads_of_a_plain_model_encode_identically(minilm):
    first, second = LateEncoder(str(minilm), 256), LateEncoder(str(minilm), 256)
    for a, b in zip(first.encode_documents(TEXTS, [9, 12]), second.encode_documents(TEXTS, [9, 12])):
        assert np.array_equal(a.vectors, b.vectors) and np.array_equal(a.spans, b.spans)
    assert np.array_equal(first.encode_queries(["oil crisis"])[0], second.encode_queries(["oil crisis"])[0])
    # the query's words alone: no [Q] prefix, no expansion, and the untrained [CLS] and [SEP] left out
    assert first.encode_queries(["oil crisis"])[0].shape == (2, 384)
    assert first.word_positions("oil crisis").tolist() == [0, 1]


def test_a_colbert_checkpoint_keeps_its_trained_projection(tiny_colbert):
    import torch
    from safetensors.torch import load_file

    assert has_colbert_head(str(tiny_colbert))
    encoder = LateEncoder(str(tiny_colbert), 64)
    assert encoder.projection == "trained" and encoder.dim == 16 and encoder.special_tokens == 3
    saved = load_file(str(next((tiny_colbert / "1_Dense").glob("*.safetensors"))))
    weight = next(v for k, v in saved.items() if k.endswith("weight"))
    assert torch.equal(encoder.model[1].linear.weight.detach().cpu(), weight)


def test_hybrid_search_with_a_plain_late_model_finds_the_line_quoted_word_for_word(tmp_path, minilm):
    docs = tmp_path / "docs"
    docs.mkdir()
    lines = ["Glaciers retreat when summers grow warmer than the winters are cold.",
             "The harpsichord plucks its strings with quills instead of hammers.",
             "Lighthouse keepers trimmed the wicks of their lamps every night.",
             "Meteorites that reach the ground are mostly stony, some are iron.",
             "A zeppelin floats because its cells hold a gas lighter than air.",
             "Cathedral builders raised flying buttresses to carry the vaults.",
             "Volcanic ash can ground airliners for days over a whole continent."]
    for n, line in enumerate(lines):
        (docs / f"f{n}.txt").write_text(f"Note {n}\n\n{line}\n")
    idx = Index(tmp_path / "index", Settings(dense_model=str(minilm), late_model=str(minilm)))
    report = idx.add(docs)
    assert sum("identity projection" in w for w in report.warnings) == 1
    for n, line in enumerate(lines):
        assert idx.search(line, k=1, mode="late")[0].chunk.path == f"f{n}.txt"
        assert idx.search(line, k=1, mode="hybrid")[0].chunk.path == f"f{n}.txt"


def test_status_says_the_late_model_has_no_colbert_head(tmp_path, minilm):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The oil crisis began in October 1973.\n")
    runner = CliRunner()
    index = str(tmp_path / "index")
    result = runner.invoke(app, ["index", str(docs), "--index", index, "--dense-model", str(minilm),
                                 "--late-model", str(minilm)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("identity projection") == 1
    status = runner.invoke(app, ["status", "--index", index])
    assert "no ColBERT head" in status.stdout and "identity projection" in status.stdout
    data = json.loads(runner.invoke(app, ["status", "--index", index, "--json"]).stdout)
    assert data["models"]["late"]["projection"] == "identity"


@pytest.mark.parametrize("name", ["/no/such/model/folder", "no-such-org/no-such-model"])
def test_a_late_model_that_cannot_be_read_is_one_clear_error(name):
    from ragkit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Could not load the late model"):
        LateEncoder(name, 64)
