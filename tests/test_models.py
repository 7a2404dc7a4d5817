"""Model loading by hub id (from an offline cache) and by local path, and its failure messages."""

from __future__ import annotations

import shutil

import pytest

from ragkit.encoders.dense import DenseEncoder
from ragkit.errors import ModelLoadError
from ragkit.models import model_revision, resolve_model_name


def test_hub_id_loads_from_the_local_cache(tmp_path, tiny_encoder, monkeypatch):
    """A hub id resolves through the Hugging Face cache layout, offline, and records the snapshot."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-encoder" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_encoder, snapshot)
    (cache / "models--acme--tiny-encoder" / "refs").mkdir()
    (cache / "models--acme--tiny-encoder" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(cache))

    encoder = DenseEncoder("acme/tiny-encoder")
    assert encoder.name == "acme/tiny-encoder"
    assert encoder.revision == snapshot.name
    assert encoder.encode_queries(["hello"]).shape == (1, encoder.dim)


def test_relative_local_path_is_made_absolute(tmp_path, tiny_encoder, monkeypatch):
    shutil.copytree(tiny_encoder, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("models/tiny") == str((tmp_path / "models" / "tiny").resolve())
    assert resolve_model_name("org/not-here") == "org/not-here"
    assert DenseEncoder("models/tiny").name == str((tmp_path / "models" / "tiny").resolve())


def test_local_revision_changes_with_the_weights(tmp_path, tiny_encoder):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder, copy)
    before = model_revision(str(copy))
    (copy / "extra.txt").write_text("changed")
    assert model_revision(str(copy)) != before


def test_incomplete_local_folder_is_a_clear_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="does not hold a model that loads"):
        DenseEncoder(str(tmp_path / "broken"))


def test_uncached_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        DenseEncoder("acme/never-downloaded")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "dense_model=/path/to/model" in message


def test_a_load_error_names_the_setting_and_the_cli_shows_its_flag(monkeypatch):
    from ragkit.cli.common import with_flags
    from ragkit.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("late", "acme/never-downloaded", lambda name: 1 / 0)
    message = str(info.value)
    assert info.value.settings == ("late_model",) and "--late-model" not in message
    assert "Point ragkit at a local copy: late_model=/path/to/model (or RAGKIT_LATE_MODEL" in message
    assert ("Point ragkit at a local copy: --late-model /path/to/model (or RAGKIT_LATE_MODEL, or late_model in "
            "ragkit.toml)") in with_flags(message, info.value.settings)


def test_an_unreachable_hub_is_found_once_and_fast(monkeypatch):
    """Without HF_HUB_OFFLINE and without network, the hub client would retry for minutes before failing; ragkit
    checks the hub once, switches to the local cache, and says why the model is missing."""
    import time

    import huggingface_hub.constants

    from ragkit import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_checked", False)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        DenseEncoder("acme/never-downloaded")
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "hub cannot be reached" in message and "dense_model=/path/to/model" in message
    assert "HF_HUB_OFFLINE" in message and huggingface_hub.constants.HF_HUB_OFFLINE
