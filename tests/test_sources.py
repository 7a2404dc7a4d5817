"""Scanning a folder: what is indexed, what is silently ignored, what is reported as skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ragkit.ingest import sources
from ragkit.ingest.document import Skipped
from ragkit.ingest.parsers import parse_file
from ragkit.ingest.sources import printable_path, scan_folder

OUTSIDE_FILE = "symlink to a file outside the indexed folder (not followed; --follow-links to include it)"
OUTSIDE_FOLDER = "symlink to a folder outside the indexed folder (not followed; --follow-links to include it)"


def touch(root: Path, rel: str, content: str = "text\n") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def rels(root: Path, **kwargs: object) -> list[str]:
    return [f.rel for f in scan_folder(root, **kwargs).files]  # type: ignore[arg-type]


def reasons(root: Path, **kwargs: object) -> dict[str, str]:
    return {s.path: s.reason for s in scan_folder(root, **kwargs).skipped}  # type: ignore[arg-type]


def test_finds_supported_files_sorted(tmp_path: Path) -> None:
    for rel in ["b.md", "a/z.txt", "a/b/c.py", "A.rst", "Makefile", "docs/report.pdf"]:
        touch(tmp_path, rel)
    scan = scan_folder(tmp_path)
    expected = ["A.rst", "Makefile", "a/b/c.py", "a/z.txt", "b.md", "docs/report.pdf"]
    assert [f.rel for f in scan.files] == expected
    first = scan.files[2]
    assert first.path == tmp_path / "a" / "b" / "c.py" and first.path.is_absolute()
    assert first.size == len("text\n")
    assert scan.skipped == []


def test_relative_root_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "docs/a.md")
    monkeypatch.chdir(tmp_path)
    [found] = scan_folder(Path("docs")).files
    assert found.path == tmp_path / "docs" / "a.md" and found.rel == "a.md"


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        scan_folder(tmp_path / "nowhere")


def test_silently_ignored(tmp_path: Path) -> None:
    touch(tmp_path, "keep.md")
    for rel in [
        ".hidden.md",
        ".notes/a.md",
        ".git/config.txt",
        "sub/.cache/b.txt",
        "node_modules/pkg/index.js",
        "web/node_modules/x.js",
        "__pycache__/m.py",
        "index/chunks.json",
        ".git/image.png",  # unsupported, but inside an ignored folder: not reported either
    ]:
        touch(tmp_path, rel)
    (tmp_path / "node_modules" / "empty.md").write_text("")
    scan = scan_folder(tmp_path, exclude=[tmp_path / "sub" / ".." / "index"])
    assert [f.rel for f in scan.files] == ["keep.md"]
    assert scan.skipped == []


def test_exclude_compares_real_locations(tmp_path: Path) -> None:
    touch(tmp_path, "docs/a.md")
    touch(tmp_path, "docs/store/state.json")
    (tmp_path / "store-link").symlink_to(tmp_path / "docs" / "store")
    assert rels(tmp_path / "docs", exclude=[tmp_path / "store-link"]) == ["a.md"]
    assert rels(tmp_path / "docs", exclude=[tmp_path / "not-created-yet"]) == ["a.md", "store/state.json"]


def test_ragkitignore(tmp_path: Path) -> None:
    patterns = ["# comments and blank lines are fine", "", "*.log", "!keep.log", "build/", "docs/private"]
    patterns += ["/top.txt", "out/", "!out/wanted.md"]
    (tmp_path / ".ragkitignore").write_text("\n".join(patterns) + "\n")
    for rel in [
        "a.md",
        "server.log",
        "keep.log",
        "nested/deep.log",
        "build/x.md",
        "src/build/y.md",
        "docs/private/secret.md",
        "docs/public.md",
        "top.txt",
        "sub/top.txt",
        "out/wanted.md",  # a negation cannot re-include a file inside an ignored folder (as in git)
        "build.md",  # the folder pattern does not match a file
    ]:
        touch(tmp_path, rel)
    (tmp_path / "ignored.log").symlink_to(tmp_path / "missing")  # ignored, so not reported as broken
    (tmp_path / "build" / "photo.png").write_bytes(b"\x89PNG")
    scan = scan_folder(tmp_path)
    assert [f.rel for f in scan.files] == ["a.md", "build.md", "docs/public.md", "keep.log", "sub/top.txt"]
    assert scan.skipped == []


def test_ignored_folders_are_not_entered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "a.md")
    touch(tmp_path, "build/deep/b.md")
    (tmp_path / ".ragkitignore").write_text("build/\n")
    entered: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path: os.PathLike[str]) -> object:
        entered.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", recording_scandir)
    assert rels(tmp_path) == ["a.md"]
    assert entered == [str(tmp_path)]


def test_unsupported_types_are_reported(tmp_path: Path) -> None:
    touch(tmp_path, "a.md")
    touch(tmp_path, "img/photo.PNG")
    touch(tmp_path, "data")
    touch(tmp_path, "archive.tar.gz")
    assert reasons(tmp_path) == {
        "img/photo.PNG": "unsupported file type .png",
        "data": "unsupported file type",
        "archive.tar.gz": "unsupported file type .gz",
    }


def test_empty_file_and_size_cap(tmp_path: Path) -> None:
    touch(tmp_path, "small.md")
    touch(tmp_path, "empty.txt", "")
    with open(tmp_path / "big.txt", "wb") as f:
        f.truncate(int(2.5 * 2**20))  # sparse: costs no disk
    with open(tmp_path / "at-cap.txt", "wb") as f:
        f.truncate(2**20)
    scan = scan_folder(tmp_path, max_file_bytes=2**20)
    assert [f.rel for f in scan.files] == ["at-cap.txt", "small.md"]
    assert scan.skipped == [
        Skipped("big.txt", "larger than the size cap (2.5 MB > 1.0 MB)"),
        Skipped("empty.txt", "empty file"),
    ]


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "ok.md")
    locked = touch(tmp_path, "locked.md")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # running as root: simulate the denial
            real_access = os.access

            def access(path: os.PathLike[str], mode: int) -> bool:
                return Path(path) != locked and real_access(path, mode)

            monkeypatch.setattr(sources.os, "access", access)
        scan = scan_folder(tmp_path)
    finally:
        locked.chmod(0o644)
    assert [f.rel for f in scan.files] == ["ok.md"]
    assert scan.skipped == [Skipped("locked.md", "permission denied")]


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "ok.md")
    touch(tmp_path, "locked/inside.md")
    locked = tmp_path / "locked"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # running as root: simulate the denial
            real_scandir = os.scandir

            def scandir(path: os.PathLike[str]) -> object:
                if Path(path) == locked:
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real_scandir(path)

            monkeypatch.setattr(sources.os, "scandir", scandir)
        scan = scan_folder(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [f.rel for f in scan.files] == ["ok.md"]
    assert scan.skipped == [Skipped("locked", "permission denied")]


def symlinked_tree(tmp_path: Path) -> Path:
    """A folder with links of every kind: inside, outside, broken, looping."""
    root = tmp_path / "root"
    touch(root, "a/doc.md")
    touch(tmp_path, "outside/ext.md")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # points at an ancestor
    (root / "a" / "here").symlink_to(".", target_is_directory=True)  # points at itself
    (root / "self.md").symlink_to("self.md")  # a file symlink that refers to itself
    (root / "gone.md").symlink_to(root / "missing.md")
    (root / "linked.md").symlink_to(root / "a" / "doc.md")
    (root / "back.md").symlink_to(Path("..") / "root" / "a" / "doc.md")  # leaves and comes back in
    (root / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "out.md").symlink_to(tmp_path / "outside" / "ext.md")
    (root / "a" / "escape.md").symlink_to(Path("..") / ".." / "outside" / "ext.md")
    (root / "photo.png").symlink_to(tmp_path / "outside" / "ext.md")  # unsupported whatever it points at
    return root


def test_symlinks_inside_the_folder_are_followed_and_those_leading_out_are_not(tmp_path: Path) -> None:
    root = symlinked_tree(tmp_path)
    scan = scan_folder(root)
    assert [f.rel for f in scan.files] == ["a/doc.md", "back.md", "linked.md"]
    assert scan.skipped == [
        Skipped("a/escape.md", OUTSIDE_FILE),
        Skipped("a/here", "symlink loop"),
        Skipped("a/loop", "symlink loop"),
        Skipped("ext", OUTSIDE_FOLDER),
        Skipped("gone.md", "broken symlink"),
        Skipped("out.md", OUTSIDE_FILE),
        Skipped("photo.png", "unsupported file type .png"),
        Skipped("self.md", "symlink loop"),
    ]


def test_follow_links_follows_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    root = symlinked_tree(tmp_path)
    scan = scan_folder(root, follow_links=True)
    assert [f.rel for f in scan.files] == ["a/doc.md", "a/escape.md", "back.md", "ext/ext.md", "linked.md", "out.md"]
    assert scan.files[3].path == root / "ext" / "ext.md"
    assert scan.skipped == [
        Skipped("a/here", "symlink loop"),
        Skipped("a/loop", "symlink loop"),
        Skipped("gone.md", "broken symlink"),
        Skipped("photo.png", "unsupported file type .png"),
        Skipped("self.md", "symlink loop"),
    ]


def test_links_inside_a_linked_folder_are_judged_by_where_they_lead(tmp_path: Path) -> None:
    touch(tmp_path, "root/real/doc.md")
    touch(tmp_path, "outside/secret.md")
    (tmp_path / "root" / "real" / "leak.md").symlink_to(tmp_path / "outside" / "secret.md")
    (tmp_path / "root" / "alias").symlink_to(tmp_path / "root" / "real", target_is_directory=True)
    scan = scan_folder(tmp_path / "root")
    assert [f.rel for f in scan.files] == ["real/doc.md"]
    assert scan.skipped == [
        Skipped("alias", "same folder as real (already scanned)"),
        Skipped("real/leak.md", OUTSIDE_FILE),
    ]


def test_root_given_through_a_symlink(tmp_path: Path) -> None:
    touch(tmp_path, "root/a/doc.md")
    (tmp_path / "root" / "linked.md").symlink_to(tmp_path / "root" / "a" / "doc.md")  # the real path
    (tmp_path / "alias").symlink_to(tmp_path / "root", target_is_directory=True)
    assert rels(tmp_path / "alias") == ["a/doc.md", "linked.md"]
    assert reasons(tmp_path / "alias") == {}


def test_same_folder_reached_twice_is_scanned_once(tmp_path: Path) -> None:
    touch(tmp_path, "real/doc.md")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    scan = scan_folder(tmp_path)
    assert [f.rel for f in scan.files] == ["real/doc.md"]  # the folder's own path wins
    assert scan.skipped == [Skipped("alias", "same folder as real (already scanned)")]


def test_two_links_to_one_outside_folder(tmp_path: Path) -> None:
    touch(tmp_path, "outside/ext.md")
    touch(tmp_path, "root/a.md")
    for name in ["b-link", "a-link"]:
        (tmp_path / "root" / name).symlink_to(tmp_path / "outside", target_is_directory=True)
    scan = scan_folder(tmp_path / "root", follow_links=True)
    assert [f.rel for f in scan.files] == ["a-link/ext.md", "a.md"]
    assert scan.skipped == [Skipped("b-link", "same folder as a-link (already scanned)")]
    assert reasons(tmp_path / "root") == {"a-link": OUTSIDE_FOLDER, "b-link": OUTSIDE_FOLDER}


def test_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    # Linux allows any bytes in a name; os.scandir gives the invalid ones as lone surrogates
    good, bad = os.fsdecode(b"caf\xff.md"), os.fsdecode(b"img\xfe.png")
    touch(tmp_path, good, "# Caf\n\ntext\n")
    touch(tmp_path, bad)
    (tmp_path / ".ragkitignore").write_text("*.log\n")
    scan = scan_folder(tmp_path)
    assert [f.rel for f in scan.files] == ["caf\udcff.md"]
    assert os.fsencode(scan.files[0].rel) == b"caf\xff.md"
    assert parse_file(scan.files[0].path).text == "# Caf\n\ntext\n"
    assert scan.skipped == [Skipped("img\udcfe.png", "unsupported file type .png")]
    with pytest.raises(UnicodeEncodeError):
        scan.files[0].rel.encode("utf-8")  # so printing it, or writing it to JSON or Parquet, needs care
    assert printable_path(scan.files[0].rel) == "caf\\xff.md"


def test_deterministic(tmp_path: Path) -> None:
    for i in range(30):
        touch(tmp_path, f"d{i % 4}/f{i}.md")
        touch(tmp_path, f"d{i % 3}/x{i}.bin")
    first, second = scan_folder(tmp_path), scan_folder(tmp_path)
    assert first == second
    assert [f.rel for f in first.files] == sorted(f.rel for f in first.files)
    assert [s.path for s in first.skipped] == sorted(s.path for s in first.skipped)
