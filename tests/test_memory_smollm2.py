"""The memory adapter trained for the embedded SmolLM2-135M-Instruct by a committed recipe, in the product: `ask` and
`summarize` read with it, on the backbone it names, with its trained gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings

ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "infini-smollm2"
runner = CliRunner()


@pytest.fixture
def indexed(tmp_path, tiny_encoder, tiny_colbert, monkeypatch) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oil.txt").write_text("The oil crisis began in October 1973, when the embargo was proclaimed.\n\n"
                                  + "Prices rose fourfold over the following months. " * 20)
    (docs / "fox.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert))).add(docs)
    monkeypatch.setenv("RAGKIT_ANSWER_TOKENS", "16")
    return tmp_path / "index"


def test_the_committed_adapter_was_trained_by_its_recipe_for_the_embedded_model():
    from ragkit.memory.infini import InfiniLM

    record = json.loads((ADAPTER / "train.json").read_text())
    assert (record["reader"], record["backbone"], record["full"]) == ("infini", "embedded", False)
    recipe = (Path(__file__).resolve().parents[1] / "recipes" / f"{record['recipe']['name']}.toml")
    assert recipe.is_file() and 'model = "embedded"' in recipe.read_text()
    assert InfiniLM.saved_backbone(ADAPTER) == "embedded"


def test_ask_and_summarize_read_with_the_trained_adapter(indexed, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from ragkit.readers.generative import MemoryReader

    readers = []
    init = MemoryReader.__init__
    monkeypatch.setattr(MemoryReader, "__init__", lambda self, spec: init(self, spec) or readers.append(self))
    result = runner.invoke(app, ["ask", "When did the oil crisis begin?", "--index", str(indexed), "--mode", "bm25",
                                 "--reader", "infini", "--adapter", str(ADAPTER), "--json"])
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["reader"] == "infini" and answer["answer"].strip() and answer["model"].endswith(".gguf")
    (reader,) = readers
    assert reader.name.endswith(".gguf")  # the embedded SmolLM2, named by the adapter
    saved = load_file(str(ADAPTER / "infini_adapter.safetensors"))
    gates = torch.stack([saved[f"layers.{i}.gate"] for i in range(len(saved))])
    assert torch.equal(torch.stack(reader.model.gate_parameters()).detach(), gates)
    assert float(torch.sigmoid(gates).max()) > 0.02  # trained: the gates left their start at sigmoid 0.01
    result = runner.invoke(app, ["summarize", str(indexed.parent / "docs" / "oil.txt"), "--reader", "infini",
                                 "--adapter", str(ADAPTER), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["summary"].strip()
