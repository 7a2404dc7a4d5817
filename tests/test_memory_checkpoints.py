"""Memory readers on disk: adapters and checkpoints round trip, every earlier format still loads (fixtures written
by the format-1 code, with the logits they gave), and a missing, broken, foreign or newer file is one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.memory.checkpoints import (ADAPTER_MIGRATIONS, ADAPTER_VERSION, CHECKPOINT_VERSION, load_checkpoint,
                                       migrate, read_adapter, read_checkpoint_meta, save_checkpoint, write_adapter)
from ragkit.memory.recipes import build_reader
from ragkit.memory.tasks import VOCAB_SIZE, RecallBatches, RecallTask
from ragkit.memory.train import TrainConfig, train

torch.set_num_threads(1)

FORMAT_1 = Path(__file__).parent / "fixtures" / "format-v1"
SEG = 16


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(seed: int = 0):
    return build_reader(tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, seed=seed)[0]


def tiny_hmt(seed: int = 0):
    return build_reader("hmt", tiny=True, segment_length=SEG, d_model=32, layers=2, heads=2, seed=seed,
                        sensory_tokens=4, cache_size=8)[0]


# --- adapters -------------------------------------------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    meta = {"version": ADAPTER_VERSION, "reader": "infini", "config": {}, "note": "x"}
    write_adapter(tmp_path / "ad", "w.safetensors", "c.json", tensors, meta)
    back_meta, back = read_adapter(tmp_path / "ad", "infini", "w.safetensors", "c.json", "test")
    assert back_meta == meta
    assert set(back) == {"a", "b"} and torch.equal(back["a"], tensors["a"])


def test_missing_broken_newer_or_foreign_adapters_are_one_clear_message(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not read the test adapter"):
        read_adapter(tmp_path / "nothing", "infini", "w.safetensors", "c.json", "test")
    write_adapter(tmp_path / "ad", "w.safetensors", "c.json", {"a": torch.zeros(1)},
                  {"version": ADAPTER_VERSION + 1})
    with pytest.raises(ModelLoadError, match=f"format version {ADAPTER_VERSION + 1}; this ragkit reads versions 1"):
        read_adapter(tmp_path / "ad", "infini", "w.safetensors", "c.json", "test")
    write_adapter(tmp_path / "ad", "w.safetensors", "c.json", {"a": torch.zeros(1)},
                  {"version": ADAPTER_VERSION, "reader": "hmt", "config": {}})
    with pytest.raises(ModelLoadError, match="adapter of the hmt reader, not test"):
        read_adapter(tmp_path / "ad", "infini", "w.safetensors", "c.json", "test")
    (tmp_path / "ad" / "c.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Could not read the test adapter"):
        read_adapter(tmp_path / "ad", "infini", "w.safetensors", "c.json", "test")


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_an_adapter_for_another_backbone_is_refused(tmp_path, reader):
    small, _ = build_reader(reader, tiny=True, segment_length=16, d_model=32, layers=2, heads=2)
    wide, _ = build_reader(reader, tiny=True, segment_length=16, d_model=64, layers=3, heads=4)
    small.save_adapter(tmp_path / "ad")
    with pytest.raises(ModelLoadError, match="was made for a backbone with"):
        wide.load_adapter(tmp_path / "ad")


def test_migrations_bring_a_format_1_adapter_to_the_newest_format_and_refuse_unknown_versions():
    old = {"version": 1, "backbone": "", "num_layers": 2, "infini": {"segment_length": 8}}
    assert migrate(old, ADAPTER_MIGRATIONS, "x") == {"version": 2, "backbone": "", "num_layers": 2,
                                                     "reader": "infini", "config": {"segment_length": 8}}
    newest = {"version": ADAPTER_VERSION, "reader": "hmt", "config": {}}
    assert migrate(newest, ADAPTER_MIGRATIONS, "x") == newest  # nothing to do
    for version in (0, None, "1", ADAPTER_VERSION + 1):
        with pytest.raises(ModelLoadError, match="format version"):
            migrate({"version": version}, ADAPTER_MIGRATIONS, "x")


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_format_1_files_load_and_read_as_they_did(reader):
    """The adapter and the checkpoint written by the format-1 code give the logits they gave then: as a checkpoint,
    and as an adapter put on the backbone saved with it."""
    expected = json.loads((FORMAT_1 / "expected.json").read_text())
    ids = torch.tensor(expected["ids"])
    want = torch.tensor(expected["logit_sums"][reader])
    assert json.loads((FORMAT_1 / f"{reader}-checkpoint" / "train.json").read_text())["version"] == 1
    from_checkpoint = load_checkpoint(FORMAT_1 / f"{reader}-checkpoint")
    assert read_checkpoint_meta(FORMAT_1 / f"{reader}-checkpoint")["recipe"] is None  # format 1 had none
    from ragkit.memory.base import reader_class

    with_adapter = reader_class(reader).from_pretrained(str(FORMAT_1 / f"{reader}-checkpoint"),
                                                        adapter=FORMAT_1 / f"{reader}-adapter").eval()
    blank = reader_class(reader).from_pretrained(str(FORMAT_1 / f"{reader}-checkpoint"),
                                                 config=with_adapter.config).eval()
    with torch.no_grad():
        for model in (from_checkpoint, with_adapter):
            torch.testing.assert_close(model(ids).sum(-1), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(blank(ids).sum(-1), want, rtol=1e-4, atol=1e-4)  # the adapter is what differs


def test_a_format_1_adapter_saved_again_is_written_in_the_newest_format(tmp_path):
    reader = load_checkpoint(FORMAT_1 / "hmt-checkpoint")
    reader.save_adapter(tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "hmt_config.json").read_text())
    assert meta["version"] == ADAPTER_VERSION and meta["reader"] == "hmt" and meta["config"]["memory_tokens"] == 2
    assert meta["embedding_dim"] == reader.dim
    again = type(reader)(reader.model, reader.config)
    again.load_adapter(tmp_path / "ad")
    for a, b in zip(again.adapter_parameters(), reader.adapter_parameters(), strict=True):
        assert torch.equal(a, b)


# --- checkpoints ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_records_its_format_reader_and_meta(tmp_path):
    save_checkpoint(tiny(), tmp_path / "ck", full=True, meta={"step": 4, "recipe": {"name": "r"}})
    record = json.loads((tmp_path / "ck" / "train.json").read_text())
    assert record["version"] == CHECKPOINT_VERSION and record["reader"] == "infini" and record["full"]
    assert record["step"] == 4 and record["recipe"] == {"name": "r"} and record["backbone"] == "."
    record["version"] = CHECKPOINT_VERSION + 1
    (tmp_path / "ck" / "train.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="format version"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "train.json").unlink()
    with pytest.raises(ModelLoadError, match="does not hold a reader checkpoint"):
        load_checkpoint(tmp_path / "ck")


def test_full_checkpoint_round_trip(tmp_path):
    model = tiny(seed=3)
    with torch.no_grad():
        for i, g in enumerate(model.gate_parameters()):
            g.fill_(0.5 * i - 1)
    save_checkpoint(model, tmp_path / "ck", full=True, meta={"step": 7})
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, VOCAB_SIZE, (2, 3 * SEG), generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert torch.equal(loaded.gate_values(), model.gate_values())
    assert json.loads((tmp_path / "ck" / "train.json").read_text())["step"] == 7


def test_adapter_checkpoint_names_its_backbone(tmp_path):
    from ragkit.memory.infini import InfiniConfig, InfiniLM

    tiny(seed=4).model.save_pretrained(tmp_path / "backbone")  # a "pretrained" causal LM in a local folder
    reader = InfiniLM.from_pretrained(str(tmp_path / "backbone"), InfiniConfig(segment_length=SEG))
    config = TrainConfig(steps=2, batch_size=2, train_all=False, gate_warmup=0.0, gate_lr=0.1)
    train(reader, RecallBatches(RecallTask(segment_length=SEG, digits=3)), config, out=tmp_path / "ck")
    assert not (tmp_path / "ck" / "model.safetensors").exists()
    loaded = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.gate_values(), reader.gate_values())
    x = torch.randint(0, VOCAB_SIZE, (1, 2 * SEG), generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reader(x))


def test_hmt_full_checkpoint_round_trip(tmp_path):
    model = tiny_hmt(seed=5)
    model.config.cache_size = 5
    save_checkpoint(model, tmp_path / "ck", full=True, meta={"step": 3})
    loaded = load_checkpoint(tmp_path / "ck")
    assert type(loaded).__name__ == "HMTLM" and loaded.config == model.config
    for a, b in zip(loaded.adapter_parameters(), model.adapter_parameters()):
        assert torch.equal(a, b)
    x = torch.randint(0, VOCAB_SIZE, (2, 4 * SEG), generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
