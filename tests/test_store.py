"""The index folder without models: what a killed writer leaves and who removes it, and who holds the lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragkit import store
from ragkit.errors import IndexLockedError
from ragkit.progress import ProgressEvent


def generations(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(store.GEN_PREFIX))


def live(root: Path) -> str:
    return store.current_generation(root).name


def start_writer(root: Path) -> store.GenerationWriter:
    """A generation written up to its commit, as a run under the lock leaves it."""
    writer = store.GenerationWriter(root)
    writer.write_chunks(store.chunk_schema().empty_table())
    writer.write_manifest({"files": {}})
    return writer


def complete_run(root: Path, **commit_args) -> str:
    """One whole run: lock, write, commit; returns the new generation's name."""
    with store.write_lock(root):
        writer = start_writer(root)
        writer.commit(**commit_args)
    return writer.name


def killed_after_rename(root: Path) -> str:
    """A run killed between the rename of its generation and the switch of CURRENT; returns the orphan's name."""
    with store.write_lock(root):
        writer = start_writer(root)
        os.rename(writer.folder, root / writer.name)
    return writer.name


def test_complete_runs_keep_the_live_generation_and_the_one_before(tmp_path):
    names = [complete_run(tmp_path) for _ in range(4)]
    assert names == ["gen-000001", "gen-000002", "gen-000003", "gen-000004"]
    assert generations(tmp_path) == names[-2:] and live(tmp_path) == names[-1]


def test_an_orphan_from_a_run_killed_before_its_switch_is_removed_not_the_previous_live_one(tmp_path):
    complete_run(tmp_path)
    before = complete_run(tmp_path)
    orphan = killed_after_rename(tmp_path)
    assert live(tmp_path) == before and orphan in generations(tmp_path)
    new = complete_run(tmp_path)
    # a reader that opened `before` just before this switch still has it; the orphan was never live
    assert generations(tmp_path) == sorted([before, new]) and live(tmp_path) == new


def test_taking_the_lock_removes_orphans_and_tmp_leftovers(tmp_path):
    first = complete_run(tmp_path)
    second = complete_run(tmp_path)
    killed_after_rename(tmp_path)
    (tmp_path / "gen-000009.tmp").mkdir()
    (tmp_path / (store.CURRENT + store.TMP_SUFFIX)).write_text("gen-000009\n")
    with store.write_lock(tmp_path):  # a run with nothing to write still cleans up
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([store.CURRENT, store.LOCK, first, second])


def test_only_ragkit_s_own_unfinished_entries_are_removed(tmp_path):
    """A user's *.tmp files beside the index are not ragkit's to remove."""
    complete_run(tmp_path)
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / "gen-photos.tmp").mkdir()
    (tmp_path / "gen-000009.tmp").mkdir()
    with store.write_lock(tmp_path):
        pass
    assert (tmp_path / "notes.tmp").read_text() == "mine" and (tmp_path / "gen-photos.tmp").is_dir()
    assert not (tmp_path / "gen-000009.tmp").exists()


def test_an_index_folder_is_refused_when_it_is_the_documents_a_file_or_someone_else_s_folder(tmp_path):
    from ragkit.errors import RagkitError

    docs = tmp_path / "docs"
    docs.mkdir()
    with pytest.raises(RagkitError, match="cannot be the folder it indexes"):
        store.check_index_folder(docs, docs)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RagkitError, match="is a file, not an index folder"):
        store.check_index_folder(tmp_path / "a-file", docs)
    with pytest.raises(RagkitError, match="is a file, not an index folder"):
        store.current_generation(tmp_path / "a-file")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.txt").write_text("keep me")
    with pytest.raises(RagkitError, match=r"holds other files \(report.txt\) and no ragkit index"):
        store.check_index_folder(theirs, docs)
    store.check_index_folder(tmp_path / "new", docs)  # a folder not made yet
    (tmp_path / "empty").mkdir()
    store.check_index_folder(tmp_path / "empty", docs)
    index = tmp_path / "index"
    complete_run(index)
    (index / "a-note-of-the-user.txt").write_text("")  # an index stays an index, whatever sits beside it
    store.check_index_folder(index, docs)
    half = tmp_path / "half"  # what a first run that failed leaves: the lock file only
    with store.write_lock(half):
        pass
    store.check_index_folder(half, docs)


def test_a_run_killed_after_its_switch_leaves_generations_the_next_run_removes(tmp_path, monkeypatch):
    names = [complete_run(tmp_path) for _ in range(2)]
    monkeypatch.setattr(store, "prune_generations", lambda root: None)  # killed before it pruned
    names.append(complete_run(tmp_path))
    monkeypatch.undo()
    assert generations(tmp_path) == names and live(tmp_path) == names[-1]
    with store.write_lock(tmp_path):
        pass
    assert generations(tmp_path) == names[-2:]


def test_a_new_generation_is_numbered_above_every_one_present(tmp_path):
    complete_run(tmp_path)
    killed_after_rename(tmp_path)  # gen-000002, removed when the next run takes the lock
    with store.write_lock(tmp_path):
        assert generations(tmp_path) == ["gen-000001"]
        assert store.GenerationWriter(tmp_path).name == "gen-000002"
        (tmp_path / "gen-000007").mkdir()  # whatever is present, even if it should not be
        assert store.GenerationWriter(tmp_path).name == "gen-000008"


def test_a_damaged_pointer_leaves_the_generations_alone(tmp_path):
    names = [complete_run(tmp_path) for _ in range(2)]
    (tmp_path / store.CURRENT).write_text("not a generation\n")
    with store.write_lock(tmp_path):
        pass
    assert generations(tmp_path) == names


def test_a_first_run_killed_before_its_switch_leaves_nothing_behind(tmp_path):
    killed_after_rename(tmp_path)
    with store.write_lock(tmp_path):
        pass
    assert generations(tmp_path) == []


def test_commit_reports_the_rename_and_the_switch(tmp_path):
    complete_run(tmp_path)
    seen: list[tuple[ProgressEvent, str, list[str]]] = []

    def progress(event: ProgressEvent) -> None:
        seen.append((event, live(tmp_path), generations(tmp_path)))

    new = complete_run(tmp_path, progress=progress)
    (renamed, live_then, gens_then), (switched, live_after, _) = seen
    assert (renamed.stage, renamed.done, renamed.total) == ("switch", 0, 1)
    assert live_then == "gen-000001" and new in gens_then  # renamed, not yet switched
    assert (switched.stage, switched.done, switched.total) == ("switch", 1, 1) and live_after == new


def test_the_commit_pause_hook_widens_both_windows(tmp_path, monkeypatch):
    complete_run(tmp_path)
    monkeypatch.setenv(store.COMMIT_PAUSE_ENV, "0.2")
    started = time.monotonic()
    complete_run(tmp_path)
    assert time.monotonic() - started >= 0.4


# ---------------------------------------------------------------------------------------------------- the lock

HOLD = """
import sys, time
from pathlib import Path
from ragkit import store
with store.write_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path (killed at the end if still alive)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    yield child
    child.kill()
    child.wait()


def lock_text(root: Path) -> str:
    return (root / store.LOCK).read_text()


def test_the_lock_file_names_the_holder_only_while_it_holds_the_lock(tmp_path):
    with store.write_lock(tmp_path):
        assert lock_text(tmp_path) == f"pid {os.getpid()}"
    assert lock_text(tmp_path) == ""


def test_the_lock_file_is_cleared_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), store.write_lock(tmp_path):
        raise RuntimeError("a run that fails")
    assert lock_text(tmp_path) == ""


def test_a_second_writer_is_told_who_holds_the_lock(tmp_path, holder):
    with pytest.raises(IndexLockedError, match=f"being written by pid {holder.pid};"):
        with store.write_lock(tmp_path):
            pass


def test_a_killed_holders_text_is_not_reported_once_the_lock_is_free(tmp_path, holder):
    holder.kill()
    holder.wait()
    assert lock_text(tmp_path) == f"pid {holder.pid}"  # a killed holder cannot clear it
    # the next holder, in the instant between taking the lock and writing its pid
    with open(tmp_path / store.LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexLockedError, match="being written by another process;"):
            with store.write_lock(tmp_path):
                pass
    with store.write_lock(tmp_path):  # free: taken at once
        assert lock_text(tmp_path) == f"pid {os.getpid()}"
    assert lock_text(tmp_path) == ""
