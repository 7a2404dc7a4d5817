"""The late/ folder holds no pickle: PLAID is driven so that it never writes one, and never reads one it finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_late import write_corpus

from ragkit import store
from ragkit.api import Index
from ragkit.config import Settings
from ragkit.indexes.late import PLAID, LateIndex, write_late_index

DIM = 16
PARAMS = {"model": "m", "dim": DIM}
UNPICKLED: list[str] = []  # what the tripwire saw unpickled


def _tripped(name: str) -> np.ndarray:
    UNPICKLED.append(name)
    return np.zeros((1, DIM), dtype=np.float32)


class Tripwire:
    """Unpickling one calls _tripped: proof that a pickle was loaded."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self):
        return _tripped, (self.name,)


def plant_pickle(path: Path) -> None:
    array = np.empty(1, dtype=object)
    array[0] = Tripwire(path.name)
    np.save(path, array, allow_pickle=True)


def random_parts(rng, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` chunks of 3 to 6 random unit vectors each."""
    parts = []
    for _ in range(n):
        v = rng.normal(size=(int(rng.integers(3, 7)), DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        parts.append((v.astype(np.float16), np.full((len(v), 2), -1, dtype=np.int32)))
    return parts


def next_generation(rng, parts, ids):
    """Three chunks removed, two edited in place (new id, new vectors), three added at the end: five new."""
    removed, edited = {4, len(ids) // 2, len(ids) - 1}, {7, len(ids) // 3}
    fresh = iter(random_parts(rng, 5))
    parts2, ids2 = [], []
    for i, (part, cid) in enumerate(zip(parts, ids)):
        if i in removed:
            continue
        parts2.append(next(fresh) if i in edited else part)
        ids2.append(f"{cid}-edited" if i in edited else cid)
    return parts2 + list(fresh), ids2 + ["added0", "added1", "added2"]


def assert_plain(folder: Path) -> None:
    """Every .npy under `folder`, PLAID's included, loads without pickle."""
    paths = sorted(folder.rglob("*.npy"))
    assert any(path.parent.name == PLAID for path in paths)
    for path in paths:
        np.load(path, allow_pickle=False)


def assert_plaid_finds(late: LateIndex, parts, rows) -> None:
    """For each row, the chunk that exact MaxSim ranks first for its own vectors is PLAID's first candidate, and
    survives the exact re-rank of PLAID's candidates."""
    for row in rows:
        query = parts[row][0].astype(np.float32)
        best = int(np.argmax(late.maxsim_all(query)))
        assert best == row
        assert late.plaid_search([query], 1)[0][0][0] == best
        assert late.search([query], 1, exact_max_tokens=0)[0][0][0] == best


@pytest.fixture(autouse=True)
def _no_unpickling():
    UNPICKLED.clear()
    yield
    assert not UNPICKLED, f"pickles were loaded: {UNPICKLED}"


@pytest.mark.parametrize("n", [300, 1200])  # below and above fast-plaid's 1,000-document thresholds
def test_fresh_and_updated_plaid_folders_hold_no_pickle(tmp_path, n):
    rng = np.random.default_rng(n)
    parts, ids = random_parts(rng, n), [f"c{i}" for i in range(n)]
    write_late_index(tmp_path / "g1" / "late", parts, ids, PARAMS, None, None)
    assert_plain(tmp_path / "g1")
    first = LateIndex.load(tmp_path / "g1" / "late")
    assert_plaid_finds(first, parts, [0, n // 2, n - 1])

    parts2, ids2 = next_generation(rng, parts, ids)
    params = write_late_index(tmp_path / "g2" / "late", parts2, ids2, PARAMS, first, ids)
    assert params["plaid"] == {"trained_docs": n, "added_since_training": 5}  # updated in place, not retrained
    assert_plain(tmp_path / "g2")
    second = LateIndex.load(tmp_path / "g2" / "late")
    old_centroids = np.load(tmp_path / "g1" / "late" / PLAID / "centroids.npy")
    assert np.array_equal(np.load(tmp_path / "g2" / "late" / PLAID / "centroids.npy")[: len(old_centroids)],
                          old_centroids)  # the trained centroids are kept
    changed = [ids2.index(c) for c in ids2 if not c.startswith("c") or c.endswith("-edited")]
    assert_plaid_finds(second, parts2, changed + [0, 5, len(ids2) // 2])


@pytest.mark.parametrize("n", [300, 1200])
def test_pickles_planted_in_a_carried_plaid_folder_are_never_loaded(tmp_path, n):
    rng = np.random.default_rng(n + 1)
    parts, ids = random_parts(rng, n), [f"c{i}" for i in range(n)]
    write_late_index(tmp_path / "g1" / "late", parts, ids, PARAMS, None, None)
    plaid = tmp_path / "g1" / "late" / PLAID
    for name in ("embeddings.npy", "buffer.npy"):  # where fast-plaid looks for pickled arrays
        plant_pickle(plaid / name)

    parts2, ids2 = next_generation(rng, parts, ids)
    params = write_late_index(tmp_path / "g2" / "late", parts2, ids2, PARAMS,
                              LateIndex.load(tmp_path / "g1" / "late"), ids)
    assert params["plaid"]["added_since_training"] == 5  # the rest of the folder is still carried over
    assert not (tmp_path / "g2" / "late" / PLAID / "embeddings.npy").exists()
    assert not (tmp_path / "g2" / "late" / PLAID / "buffer.npy").exists()
    assert_plain(tmp_path / "g2")
    assert_plaid_finds(LateIndex.load(tmp_path / "g2" / "late"), parts2, [0, len(ids2) - 1])


def test_a_pickle_in_place_of_a_plaid_array_makes_plaid_train_again(tmp_path):
    rng = np.random.default_rng(7)
    parts, ids = random_parts(rng, 300), [f"c{i}" for i in range(300)]
    write_late_index(tmp_path / "g1" / "late", parts, ids, PARAMS, None, None)
    plant_pickle(tmp_path / "g1" / "late" / PLAID / "centroids.npy")

    parts2, ids2 = next_generation(rng, parts, ids)
    params = write_late_index(tmp_path / "g2" / "late", parts2, ids2, PARAMS,
                              LateIndex.load(tmp_path / "g1" / "late"), ids)
    assert params["plaid"] == {"trained_docs": len(ids2), "added_since_training": 0}  # built from tokens.npy
    assert_plain(tmp_path / "g2")
    assert_plaid_finds(LateIndex.load(tmp_path / "g2" / "late"), parts2, [0, len(ids2) - 1])


def test_a_pickle_written_by_fast_plaid_fails_the_write(tmp_path, monkeypatch):
    from fast_plaid import search

    create = search.FastPlaid.create
    monkeypatch.setattr(search.FastPlaid, "create",  # a fast-plaid that keeps its pickled copy whatever it is asked
                        lambda self, *a, **kw: create(self, *a, **{**kw, "start_from_scratch": 10**6}))
    parts = random_parts(np.random.default_rng(8), 300)
    with pytest.raises(RuntimeError, match="embeddings.npy"):
        write_late_index(tmp_path / "late", parts, [f"c{i}" for i in range(300)], PARAMS, None, None)


def test_index_folder_holds_no_pickle_after_files_change(tmp_path, tiny_encoder, tiny_colbert):
    write_corpus(tmp_path / "docs")
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), late_exact_max_tokens=0,
                        late_candidates="plaid")
    idx = Index(tmp_path / "index", settings)  # PLAID serves late search
    idx.add(tmp_path / "docs")
    assert_plain(store.current_generation(idx.path))
    (tmp_path / "docs" / "doc03.txt").unlink()
    (tmp_path / "docs" / "doc05.txt").write_text("Now this file is about a harpsichord restoration.\n")
    (tmp_path / "docs" / "new.txt").write_text("A lighthouse keeper logs the passing zeppelin.\n")
    report = idx.add(tmp_path / "docs")
    assert (report.added, report.updated, report.removed) == (1, 1, 1)
    generation = store.current_generation(idx.path)
    assert (generation / "late" / PLAID / "metadata.json").is_file()
    assert_plain(idx.path)
    late = idx.searcher.late
    for name in ("doc05.txt", "new.txt"):  # the edited and the new file are in PLAID: their own vectors find them
        row = int(idx.searcher.rows_of([name])[0])
        query = late.token_data(row)[0]
        assert late.plaid_search([query], 3)[0][0][0] == row
        assert late.search([query], 1, exact_max_tokens=0)[0][0][0] == row
