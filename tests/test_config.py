"""Settings: defaults ← ragkit.toml / [tool.ragkit] ← RAGKIT_* env ← flags, typed and validated."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ragkit.config import MODES, Settings, load_settings
from ragkit.errors import ConfigError, RagkitError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    return str(info.value)


def test_defaults_without_files_env_or_flags(tmp_path):
    s = load_settings(env={})
    assert s == Settings()
    assert (s.index, s.mode, s.k, s.rrf_k, s.name_weight) == (".ragkit", "hybrid", 10, 10, 0.5)
    assert s.device is None and s.max_file_mb == 50.0
    assert s.mode in MODES
    # settings that shape an index are unset: an existing index keeps its own, a new one takes the defaults
    assert (s.dense_model, s.chunk_tokens, s.late, s.late_model, s.pool_factor) == (None,) * 5
    new = s.for_index(None)
    assert (new.dense_model, new.chunk_tokens, new.late, new.late_model, new.pool_factor) == (
        "Alibaba-NLP/gte-modernbert-base", 8192, True, "lightonai/GTE-ModernColBERT-v1", 1)


def test_an_existing_index_keeps_what_it_was_built_with_unless_a_setting_names_another():
    recorded = {"dense_model": "/models/minilm", "chunk_tokens": 256, "late": False, "late_model": "/models/colbert",
                "pool_factor": 2}
    kept = load_settings(env={}).for_index(recorded)
    assert (kept.dense_model, kept.chunk_tokens, kept.late, kept.late_model, kept.pool_factor) == (
        "/models/minilm", 256, False, "/models/colbert", 2)
    named = load_settings(env={"RAGKIT_LATE": "1"}, dense_model="other", chunk_tokens=512).for_index(recorded)
    assert (named.dense_model, named.chunk_tokens, named.late, named.late_model) == ("other", 512, True,
                                                                                   "/models/colbert")
    # the default model named explicitly is a choice too, not "unset"
    assert load_settings(env={}, dense_model="Alibaba-NLP/gte-modernbert-base").for_index(recorded).dense_model \
        == "Alibaba-NLP/gte-modernbert-base"


def test_ragkit_toml_in_cwd(tmp_path):
    write(tmp_path / "ragkit.toml", 'index = "idx"\nchunk-tokens = 512\nmax_file_mb = 5\nmode = "bm25"\n')
    s = load_settings(env={})  # the test runs inside tmp_path
    assert (s.index, s.chunk_tokens, s.max_file_mb, s.mode) == ("idx", 512, 5.0, "bm25")
    assert isinstance(s.max_file_mb, (int, float))
    assert s.k == Settings().k  # untouched settings keep their defaults


def test_cwd_argument_is_where_files_are_looked_for(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write(other / "ragkit.toml", "k = 3\n")
    assert load_settings(env={}).k == 10
    assert load_settings(cwd=other, env={}).k == 3


def test_tool_ragkit_in_pyproject(tmp_path):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.ragkit]\nk = 4\ndense-model = "m"\n')
    s = load_settings(env={})
    assert (s.k, s.dense_model) == (4, "m")


def test_pyproject_without_tool_ragkit_gives_defaults(tmp_path):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.other]\nk = "not ours"\n')
    assert load_settings(env={}) == Settings()


def test_ragkit_toml_wins_over_pyproject_entirely(tmp_path):
    # ragkit.toml replaces [tool.ragkit]: the two are not merged
    write(tmp_path / "ragkit.toml", "k = 7\n")
    write(tmp_path / "pyproject.toml", '[tool.ragkit]\nk = 4\nmode = "dense"\n')
    s = load_settings(env={})
    assert s.k == 7
    assert s.mode == "hybrid"


def test_env_over_files(tmp_path):
    write(tmp_path / "ragkit.toml", 'k = 7\nmode = "bm25"\n')
    s = load_settings(env={"RAGKIT_K": "12", "RAGKIT_DEVICE": "cpu"})
    assert (s.k, s.mode, s.device) == (12, "bm25", "cpu")


def test_env_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv("RAGKIT_INDEX", "/data/idx")
    monkeypatch.setenv("RAGKIT_CANDIDATES", "250")
    s = load_settings()
    assert (s.index, s.candidates) == ("/data/idx", 250)


def test_env_ignores_other_variables():
    s = load_settings(env={"K": "3", "RAGKITK": "3", "RAGKIT_HOME": "/x", "PATH": "/bin"})
    assert s == Settings()


def test_flags_over_env_over_files(tmp_path):
    write(tmp_path / "ragkit.toml", "k = 7\ncandidates = 30\nrrf_k = 10\n")
    s = load_settings(env={"RAGKIT_K": "12", "RAGKIT_CANDIDATES": "40"}, k=20)
    assert (s.k, s.candidates, s.rrf_k) == (20, 40, 10)


def test_none_flags_are_ignored(tmp_path):
    write(tmp_path / "ragkit.toml", 'k = 7\nindex = "from-file"\n')
    s = load_settings(env={"RAGKIT_MODE": "dense"}, k=None, index=None, mode=None, device=None)
    assert (s.k, s.index, s.mode, s.device) == (7, "from-file", "dense", None)


def test_env_strings_are_coerced_to_numbers():
    s = load_settings(env={"RAGKIT_K": "5", "RAGKIT_MAX_FILE_MB": "2.5", "RAGKIT_ENCODE_BATCH_TOKENS": " 4096 ",
                           "RAGKIT_RRF_K": "0"})
    assert (s.k, s.max_file_mb, s.encode_batch_tokens, s.rrf_k) == (5, 2.5, 4096, 0)
    assert type(s.k) is int and type(s.max_file_mb) is float and type(s.rrf_k) is int


def test_integer_in_toml_for_a_float_setting_and_path_flags(tmp_path):
    write(tmp_path / "ragkit.toml", "max_file_mb = 1\n")
    s = load_settings(env={}, index=tmp_path / "idx", dense_model=Path("models/m"))
    assert s.max_file_mb == 1
    assert s.index == str(tmp_path / "idx") and s.dense_model == str(Path("models/m"))


@pytest.mark.parametrize("env, words", [
    ({"RAGKIT_K": "five"}, ["'k'", "number", "five"]),
    ({"RAGKIT_K": "2.5"}, ["'k'", "number", "2.5"]),
    ({"RAGKIT_CHUNK_TOKENS": ""}, ["'chunk_tokens'", "number"]),
    ({"RAGKIT_MAX_FILE_MB": "big"}, ["'max_file_mb'", "number", "big"]),
])
def test_bad_env_values_are_config_errors(env, words):
    message = config_error(env=env)
    assert all(w in message for w in words), message


def test_unknown_key_in_ragkit_toml(tmp_path):
    write(tmp_path / "ragkit.toml", "chunk_size = 512\n")
    message = config_error(env={})
    assert "unknown setting 'chunk_size'" in message
    assert "chunk_tokens" in message  # the known settings are listed


def test_unknown_key_in_pyproject(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.ragkit]\ntop_k = 3\n")
    assert "unknown setting 'top_k'" in config_error(env={})


def test_unknown_flag():
    assert "unknown setting 'colour'" in config_error(env={}, colour="red")


def test_malformed_toml_names_the_file(tmp_path):
    write(tmp_path / "ragkit.toml", "k = = 3\n")
    message = config_error(env={})
    assert "cannot read" in message and "ragkit.toml" in message


@pytest.mark.parametrize("line, words", [
    ('k = "many"', ["'k'", "number"]),
    ("k = [1, 2]", ["'k'", "number"]),
    ("k = {a = 1}", ["'k'", "number"]),
    ("k = true", ["'k'", "number"]),
    ("k = 2.5", ["'k'", "number"]),
    ("max_file_mb = [50]", ["'max_file_mb'", "number"]),
    ("max_file_mb = false", ["'max_file_mb'", "number"]),
    ("index = 5", ["'index'", "text"]),
    ("dense_model = [\"a\"]", ["'dense_model'", "text"]),
])
def test_bad_values_in_files_are_config_errors(tmp_path, line, words):
    write(tmp_path / "ragkit.toml", line + "\n")
    message = config_error(env={})
    assert all(w in message for w in words), message


def test_whole_float_is_accepted_for_an_integer_setting(tmp_path):
    write(tmp_path / "ragkit.toml", "k = 4.0\n")
    s = load_settings(env={})
    assert s.k == 4 and type(s.k) is int


def test_tool_ragkit_must_be_a_table(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool]\nragkit = 5\n")
    assert "[tool.ragkit]" in config_error(env={})


@pytest.mark.parametrize("flags, words", [
    ({"mode": "semantic"}, ["mode must be one of", "dense", "bm25", "hybrid", "semantic"]),
    ({"mode": "DENSE"}, ["mode must be one of"]),
    ({"k": 0}, ["'k'", "at least 1"]),
    ({"candidates": -3}, ["'candidates'", "at least 1"]),
    ({"answer_sentences": 0}, ["'answer_sentences'", "at least 1"]),
    ({"encode_batch_tokens": 0}, ["'encode_batch_tokens'", "at least 1"]),
    ({"chunk_tokens": 15}, ["chunk_tokens", "at least 16"]),
    ({"max_file_mb": 0}, ["max_file_mb", "positive"]),
    ({"max_file_mb": -1.5}, ["max_file_mb", "positive"]),
    ({"max_file_mb": "nan"}, ["max_file_mb", "positive"]),
    ({"rrf_k": -60}, ["'rrf_k'", "at least 0"]),
])
def test_invalid_values_are_rejected(flags, words):
    message = config_error(env={}, **flags)
    assert all(w in message for w in words), message


def test_invalid_mode_from_env_and_file(tmp_path):
    assert "mode must be one of" in config_error(env={"RAGKIT_MODE": "fuzzy"})
    write(tmp_path / "ragkit.toml", 'mode = "fuzzy"\n')
    assert "mode must be one of" in config_error(env={})
    assert load_settings(env={"RAGKIT_MODE": "dense"}).mode == "dense"  # a later layer can fix it


def test_smallest_valid_values_are_accepted():
    s = load_settings(env={}, chunk_tokens=16, k=1, candidates=1, answer_sentences=1, encode_batch_tokens=1,
                      max_file_mb=0.001, rrf_k=0)
    assert (s.chunk_tokens, s.k, s.rrf_k) == (16, 1, 0)


def test_config_error_is_a_user_facing_error():
    assert issubclass(ConfigError, RagkitError)


def test_replace_applies_non_none_changes_and_validates():
    base = Settings(k=3)
    changed = base.replace(k="8", mode="bm25", device=None, max_file_mb="1.5")
    assert (changed.k, changed.mode, changed.device, changed.max_file_mb) == (8, "bm25", None, 1.5)
    assert base.k == 3 and base.mode == "hybrid"  # frozen: the original is unchanged
    assert base.replace() == base
    assert base.replace(k=None) == base
    with pytest.raises(ConfigError, match="mode must be one of"):
        base.replace(mode="nope")
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        base.replace(nope=1)
    with pytest.raises(ConfigError, match="number"):
        base.replace(k="x")
    with pytest.raises(ConfigError, match="at least 16"):
        base.replace(chunk_tokens=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.k = 4  # type: ignore[misc]


def test_replace_converts_paths_to_text(tmp_path):
    assert Settings().replace(index=tmp_path).index == str(tmp_path)
