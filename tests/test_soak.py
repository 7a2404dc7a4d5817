"""`ragkit index` killed with SIGKILL in each phase, and searches in another process while it writes
(benchmarks/soak_index.py): a few trials in the default suite, the full soak marked slow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import soak_index  # noqa: E402


def quiet(line: str) -> None:
    """Progress of a soak, dropped: pytest shows the assertion that failed."""


@pytest.fixture
def models(tiny_encoder, tiny_colbert) -> dict[str, str]:
    return {"dense": str(tiny_encoder), "late": str(tiny_colbert)}


def assert_recovered_exactly(result: dict) -> None:
    """After the trials and one complete run: what a fresh index of the same folder holds, nothing left over."""
    after = result["after_recovery"]
    assert (after["lost"], after["duplicated"], after["stale"]) == (0, 0, 0), after
    assert after["same_ids_in_order"] and after["same_rows"] and after["vectors_match"], after
    assert after["leftovers"] == {"generations": [after["previous"]], "tmp": []}, after  # the one before, kept
    assert set(after["consistency"].values()) == {0}, after["consistency"]


def test_runs_killed_in_encode_and_in_both_commit_windows_leave_a_usable_index(tmp_path, models):
    setup = soak_index.Setup.library(models, tmp_path, commit_pause=1.0)
    targets = ["encode", "rename→switch", "after switch"]
    result = soak_index.soak(tmp_path / "soak", setup, trials=len(targets), seed=1, targets=targets, files=10,
                             log=quiet)
    trials = result["trials"]
    assert [t["problems"] for t in trials] == [[]] * len(targets), trials
    hit = {t["target"]: t["phase"] for t in trials}
    assert hit["rename→switch"] == "rename→switch" and hit["after switch"] == "after switch", hit
    assert hit["encode"] in soak_index.PHASES, hit  # killed, in encode or, on a slow machine, a little later
    assert_recovered_exactly(result)


def test_readers_during_writes_never_fail_nor_mix_generations(tmp_path, models):
    setup = soak_index.Setup.library(models, tmp_path)
    result = soak_index.readers_during_writes(tmp_path / "readers", setup, runs=1, seed=0, log=quiet)
    assert result["queries"] > 0 and result["errors"] == 0, result["error_samples"]
    assert (result["mixed_markers"], result["ids_outside_the_generation"], result["empty"]) == (0, 0, 0), result
    assert result["generations_seen"] == 2, result  # the reader searched both generations


@pytest.mark.slow
def test_soak_of_100_killed_runs_hits_every_phase_and_recovers_exactly(tmp_path, models):
    result = soak_index.soak(tmp_path / "soak", soak_index.Setup.cli(models, tmp_path), trials=100, seed=0)
    assert result["trials_with_problems"] == 0, [t for t in result["trials"] if t["problems"]]
    assert all(result["phases_hit"][phase] >= 3 for phase in soak_index.PHASES), result["phases_hit"]
    assert result["most_generations_not_live_after_a_kill"] <= 2 and result["most_tmp_after_a_kill"] <= 2, result
    assert_recovered_exactly(result)


@pytest.mark.slow
def test_readers_during_20_writer_runs(tmp_path, models):
    result = soak_index.readers_during_writes(tmp_path / "readers", soak_index.Setup.cli(models, tmp_path), runs=20,
                                              seed=0)
    assert result["errors"] == 0, result["error_samples"]
    assert (result["mixed_markers"], result["ids_outside_the_generation"], result["empty"]) == (0, 0, 0), result
    assert result["generations_seen"] == 21, result
