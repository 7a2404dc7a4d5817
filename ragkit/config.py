"""One settings object, layered: defaults ← ragkit.toml / [tool.ragkit] ← RAGKIT_* env ← flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ragkit.errors import ConfigError

MODES = ("dense", "bm25", "late", "hybrid")
BACKENDS = ("local", "qdrant")
DENSE_BACKENDS = ("torch", "onnx", "onnx-int8")  # how the dense encoder runs (ragkit.encoders.onnx)
FUSIONS = ("rrf", "convex")
LATE_CANDIDATES = ("centroids", "plaid")  # candidate stages of late search over large collections
READERS = ("extractive", "generate", "infini", "hmt")
DEFAULT_DENSE_MODEL = "Alibaba-NLP/gte-modernbert-base"
DEFAULT_LATE_MODEL = "lightonai/GTE-ModernColBERT-v1"
# Settings that shape an index. Left unset (None), a run on an existing index keeps the index's own values and a
# new index takes INDEX_DEFAULTS; set by the user (flag, env, ragkit.toml, argument), they apply.
INDEX_DEFAULTS: dict[str, Any] = {
    "dense_model": DEFAULT_DENSE_MODEL,
    "dense_backend": "torch",
    "chunk_tokens": 8192,
    "context_tokens": 32,
    "late": True,
    "late_model": DEFAULT_LATE_MODEL,
    "pool_factor": 1,
    "late_candidates": "centroids",
    "follow_links": False,
}


@dataclass(frozen=True)
class Settings:
    """Every knob of ragkit, with its default."""

    index: str = ".ragkit"  # index folder
    dense_model: str | None = None  # sentence-transformers id or local path [index's, or DEFAULT_DENSE_MODEL]
    dense_backend: str | None = None  # torch | onnx (the same vectors) | onnx-int8 (int8 weights) [index's, or torch]
    onnx_queries: bool = True  # encode queries through the dense model's cached ONNX export (no torch import)
    chunk_tokens: int | None = None  # upper bound (the encoder's own maximum also bounds it) [index's, or 8192]
    context_tokens: int | None = None  # tokens of the document's name and heading path that the dense encoder and
    # BM25 read before each chunk's text (0: none) [index's, or 32]
    encode_batch_tokens: int = 16384  # padded tokens per encoder batch (batches are length-sorted)
    max_file_mb: float = 50.0  # files above this size are skipped and reported
    follow_links: bool | None = None  # follow symlinks that lead out of the indexed folder [index's, or False]
    device: str | None = None  # "cpu", "cuda", …; None lets torch choose
    mode: str = "hybrid"  # default retrieval mode: dense | bm25 | late | hybrid
    k: int = 10  # hits returned by search
    rrf_k: int = 10  # reciprocal rank fusion constant (Cormack et al. 2009 use 60; the choice: benchmarks/RESULTS.md)
    candidates: int = 100  # candidates per retriever before fusion
    dense_exact_max: int = 100_000  # exact FAISS search up to this many chunks, HNSW beyond
    answer_sentences: int = 3  # evidence sentences in an extractive answer
    late: bool | None = None  # build the late-interaction (ColBERT) stage [index's, or True]
    late_model: str | None = None  # PyLate model id or local path [index's, or DEFAULT_LATE_MODEL]
    pool_factor: int | None = None  # token pooling of document vectors (2 halves the late index) [index's, or 1]
    late_exact_max_tokens: int = 1_000_000  # exact MaxSim over all tokens up to this size, a candidate stage beyond
    late_candidates: str | None = None  # that candidate stage: centroids | plaid [index's, or centroids]
    late_rerank_candidates: int = 1024  # candidates of that stage re-scored by exact MaxSim
    late_probe: int = 128  # centroids each query token probes in the centroid stage
    plaid_min_tokens: int = 0  # with late_candidates = plaid: build PLAID only above this many tokens
    rerank_depth: int = 32  # fused candidates re-ranked by exact MaxSim in hybrid mode (0: none)
    evidence_hits: int = 10  # hits that get evidence spans (the ones a user reads)
    fusion: str = "rrf"  # rrf (reciprocal rank) or convex (weighted sum of min-max normalised scores)
    dense_weight: float = 1.0  # weight of the dense run in fusion
    bm25_weight: float = 1.0  # weight of the BM25 run in fusion
    late_weight: float = 1.0  # weight of the late-interaction run in fusion
    name_weight: float = 0.5  # fusion bonus of a chunk whose file name holds a year or code the question names
    reader: str | None = None  # extractive | generate | infini | hmt [generate when a reader model loads, else extractive]
    reader_model: str | None = None  # HF causal LM id, local folder or .gguf file [Qwen2.5-0.5B-Instruct, else embedded]
    reader_passages: int = 3  # top hits a reader model reads (the extractive reader reads every hit asked for)
    reader_window: int | None = None  # tokens of the prompt a reader model reads [what fits it with the answer]
    adapter: str | None = None  # folder of a trained memory adapter (gates and config)
    reader_segment: int = 1024  # tokens per memory segment the documents are streamed in
    answer_tokens: int = 256  # most tokens a reader model generates
    backend: str = "local"  # where dense and late candidates come from: local (the index folder) | qdrant
    qdrant_path: str | None = None  # folder of a Qdrant collection in local mode (no server)
    qdrant_url: str | None = None  # or the URL of a Qdrant server
    qdrant_collection: str = "ragkit"  # the collection `ragkit export qdrant` writes and `--backend qdrant` reads

    def replace(self, **changes: Any) -> "Settings":
        """A copy with the non-None `changes` applied and validated."""
        applied = {k: v for k, v in changes.items() if v is not None}
        return _validated(dataclasses.replace(self, **_coerce(applied)))

    def for_index(self, recorded: Mapping[str, Any] | None = None) -> "Settings":
        """These settings with every index-shaping one left unset taken from `recorded` (what an existing index
        was built with), or from INDEX_DEFAULTS. A late model named with `late` unset turns the late stage on.

        >>> s = Settings(dense_model="mine").for_index({"dense_model": "theirs", "chunk_tokens": 512})
        >>> (s.dense_model, s.chunk_tokens, s.late_model, s.pool_factor)
        ('mine', 512, 'lightonai/GTE-ModernColBERT-v1', 1)
        """
        recorded = dict(recorded or {})
        if self.late_model is not None:
            recorded["late"] = True  # naming a late model asks for the late stage
        filled = {name: recorded.get(name) if recorded.get(name) is not None else default
                  for name, default in INDEX_DEFAULTS.items() if getattr(self, name) is None}
        return self.replace(**filled)

    def named(self, name: str) -> bool:
        """Whether the index-shaping setting `name` was set by the user rather than left to the index or default."""
        return getattr(self, name) is not None


def load_settings(cwd: Path | None = None, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Settings from files in `cwd`, then RAGKIT_* variables in `env`, then non-None `flags`."""
    cwd = cwd or Path.cwd()
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    values.update(_from_files(cwd))
    values.update(_from_env(env))
    values.update({k: v for k, v in flags.items() if v is not None})
    return _validated(Settings(**_coerce(values)))


def _from_files(cwd: Path) -> dict[str, Any]:
    toml_file = cwd / "ragkit.toml"
    if toml_file.is_file():
        return _read_toml(toml_file)
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        section = _read_toml(pyproject).get("tool", {}).get("ragkit", {})
        if not isinstance(section, dict):
            raise ConfigError(f"[tool.ragkit] in {pyproject} must be a table of settings")
        return section
    return {}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if path.name == "ragkit.toml":
        return {k.replace("-", "_"): v for k, v in data.items()}
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    names = {f.name for f in fields(Settings)}
    out = {}
    for key, value in env.items():
        if key.startswith("RAGKIT_") and key[7:].lower() in names:
            out[key[7:].lower()] = value
    return out


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    """Convert strings from files and the environment to each field's type."""
    types = {f.name: f.type for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types:
            raise ConfigError(f"unknown setting '{key}' (known: {', '.join(sorted(types))})")
        kind = types[key]
        if kind.startswith("bool"):
            out[key] = _boolean(key, value)
            continue
        try:
            numeric = "int" in kind or "float" in kind
            if numeric and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
                raise ValueError  # lists, tables and booleans are not numbers
            if "int" in kind and not isinstance(value, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif "float" in kind and not isinstance(value, (int, float)):
                value = float(value)
            elif kind.startswith("str") and isinstance(value, Path):
                value = str(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"setting '{key}' expects a number, got {value!r}") from None
        if kind.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"setting '{key}' expects text, got {value!r}")
        out[key] = value
    return out


def _boolean(key: str, value: Any) -> bool:
    """A bool from TOML, or from the words people put in environment variables."""
    if isinstance(value, bool):
        return value
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ConfigError(f"setting '{key}' expects true or false, got {value!r}")


def _validated(settings: Settings) -> Settings:
    if settings.reader is not None and settings.reader not in READERS:
        raise ConfigError(f"reader must be one of {', '.join(READERS)}, got '{settings.reader}'")
    if settings.fusion not in FUSIONS:
        raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got '{settings.fusion}'")
    if settings.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got '{settings.backend}'")
    if settings.dense_backend is not None and settings.dense_backend not in DENSE_BACKENDS:
        raise ConfigError(f"dense_backend must be one of {', '.join(DENSE_BACKENDS)}, got '{settings.dense_backend}'")
    if settings.late_candidates is not None and settings.late_candidates not in LATE_CANDIDATES:
        raise ConfigError(f"late_candidates must be one of {', '.join(LATE_CANDIDATES)}, got "
                          f"'{settings.late_candidates}'")
    if settings.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{settings.mode}'")
    for name in ("chunk_tokens", "k", "candidates", "encode_batch_tokens", "answer_sentences", "pool_factor",
                 "late_rerank_candidates", "late_probe", "reader_segment", "answer_tokens", "reader_window",
                 "reader_passages"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise ConfigError(f"setting '{name}' must be at least 1")
    if settings.chunk_tokens is not None and settings.chunk_tokens < 16:
        raise ConfigError("chunk_tokens must be at least 16")
    if not settings.max_file_mb > 0:  # also rejects NaN
        raise ConfigError("max_file_mb must be positive")
    for name in ("dense_weight", "bm25_weight", "late_weight", "name_weight"):
        if not getattr(settings, name) >= 0:  # also rejects NaN
            raise ConfigError(f"setting '{name}' must be at least 0")
    for name in ("context_tokens", "rrf_k", "dense_exact_max", "rerank_depth", "evidence_hits",
                 "plaid_min_tokens"):
        if getattr(settings, name) is not None and getattr(settings, name) < 0:
            raise ConfigError(f"setting '{name}' must be at least 0")
    return settings
