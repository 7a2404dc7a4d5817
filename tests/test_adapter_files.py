"""Adapters on disk: round trip, and clear messages for a missing, broken or foreign adapter (both readers)."""

from __future__ import annotations

import json

import pytest
import torch

from ragkit.errors import ModelLoadError
from ragkit.readers.adapter_files import read_adapter, write_adapter
from ragkit.readers.train import build_reader


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    write_adapter(tmp_path / "ad", "w.safetensors", "c.json", tensors, {"version": 3, "note": "x"})
    meta, back = read_adapter(tmp_path / "ad", "w.safetensors", "c.json", 3, "test")
    assert meta == {"version": 3, "note": "x"}
    assert set(back) == {"a", "b"} and torch.equal(back["a"], tensors["a"])


def test_missing_or_other_version_is_one_clear_message(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not read the test adapter"):
        read_adapter(tmp_path / "nothing", "w.safetensors", "c.json", 1, "test")
    write_adapter(tmp_path / "ad", "w.safetensors", "c.json", {"a": torch.zeros(1)}, {"version": 2})
    with pytest.raises(ModelLoadError, match="adapter version 2, expected 1"):
        read_adapter(tmp_path / "ad", "w.safetensors", "c.json", 1, "test")
    (tmp_path / "ad" / "c.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Could not read the test adapter"):
        read_adapter(tmp_path / "ad", "w.safetensors", "c.json", 1, "test")


@pytest.mark.parametrize("reader", ["infini", "hmt"])
def test_an_adapter_for_another_backbone_is_refused(tmp_path, reader):
    small, _ = build_reader(reader, tiny=True, segment_length=16, d_model=32, layers=2, heads=2)
    wide, _ = build_reader(reader, tiny=True, segment_length=16, d_model=64, layers=3, heads=4)
    small.save_adapter(tmp_path / "ad")
    with pytest.raises(ModelLoadError, match="was made for"):
        wide.load_adapter(tmp_path / "ad")
    config = next(p for p in (tmp_path / "ad").iterdir() if p.suffix == ".json")
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ModelLoadError, match="expected 1"):
        small.load_adapter(tmp_path / "ad")
