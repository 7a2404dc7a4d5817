"""Find the files to index under a folder, and report every file left out for a reason.

Silently ignored: hidden names (starting with ".", so `.git` too), `node_modules` and `__pycache__`, the
paths in `exclude` (such as the index folder) and whatever `.ragkitignore` at the root matches
(gitignore syntax). Reported as skipped: unsupported types, unreadable, empty or oversized
files, broken symlinks, symlink loops and, unless links are followed, symlinks that lead out of
the folder.

Relative paths are str as os.scandir gives them: a name that is not valid UTF-8 keeps its bytes
as lone surrogates (os.fsencode(rel) gives them back); printable_path shows it for people.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ragkit.ingest.document import SourceFile, Skipped
from ragkit.ingest.parsers import is_supported, unsupported_reason

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

IGNORE_FILE = ".ragkitignore"
_IGNORED_NAMES = frozenset({"node_modules", "__pycache__"})  # hidden names are ignored too
_OUTSIDE = "symlink to a {} outside the indexed folder (not followed; --follow-links to include it)"
_MB = 2**20

_Identity = tuple[int, int]  # (st_dev, st_ino): the same folder reached by different paths


@dataclass
class Scan:
    """The outcome of scanning a folder."""

    files: list[SourceFile]  # sorted by rel
    skipped: list[Skipped]  # every file not indexed for a reason a user should know


@dataclass(frozen=True)
class _Folder:
    path: Path
    rel: str  # "" for the root
    identity: _Identity
    ancestors: frozenset[_Identity]  # this folder and the folders above it
    linked: bool = False  # reached through a symlink


def scan_folder(
    root: Path, *, exclude: Sequence[Path] = (), max_file_bytes: int = 50 * _MB, follow_links: bool = False
) -> Scan:
    """List the files under `root` that ragkit can index.

    Symlinks that stay inside `root` are followed; those that lead outside it are reported as
    skipped, or followed too with `follow_links`. Folders reached through a symlink are scanned
    after the others, so a folder that is both in the tree and linked from it keeps its own path.
    Raises OSError if `root` cannot be read.
    """
    root = Path(os.path.abspath(root))
    scanner = _Scanner(root, exclude, max_file_bytes, follow_links)
    identity = _identity(os.stat(root))
    pending = [_Folder(root, "", identity, frozenset({identity}))]
    linked: list[_Folder] = []
    while pending or linked:
        for subfolder in scanner.scan(pending.pop() if pending else linked.pop(0)):
            (linked if subfolder.linked else pending).append(subfolder)
    return Scan(
        sorted(scanner.files, key=lambda f: f.rel),
        sorted(scanner.skipped, key=lambda s: s.path),
    )


class _Scanner:
    """The state of one scan: what was found, what was skipped, which folders were seen."""

    def __init__(self, root: Path, exclude: Sequence[Path], max_file_bytes: int, follow_links: bool) -> None:
        self.max_file_bytes = max_file_bytes
        self.real_root = os.path.realpath(root)
        self.follow_links = follow_links
        self.excluded = {_identity(os.stat(p)) for p in exclude if os.path.exists(p)}
        self.ignore = _load_ignore(root)
        self.visited: dict[_Identity, str] = {}
        self.files: list[SourceFile] = []
        self.skipped: list[Skipped] = []

    def scan(self, folder: _Folder) -> list[_Folder]:
        """Record the files in `folder`; return its subfolders still to scan."""
        if folder.identity in self.visited:
            self.skip(folder.rel, f"same folder as {self.visited[folder.identity]} (already scanned)")
            return []
        self.visited[folder.identity] = folder.rel or "."
        try:
            with os.scandir(folder.path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not folder.rel:
                raise
            self.skip(folder.rel, _os_reason(e))
            return []
        subfolders = []
        for entry in entries:
            rel = f"{folder.rel}/{entry.name}" if folder.rel else entry.name
            subfolder = self.visit(entry, rel, folder)
            if subfolder is not None:
                subfolders.append(subfolder)
        return subfolders

    def visit(self, entry: os.DirEntry[str], rel: str, parent: _Folder) -> _Folder | None:
        """Classify one entry; return it as a folder to scan, or None."""
        if entry.name.startswith(".") or entry.name in _IGNORED_NAMES:
            return None
        is_dir = _is_dir(entry)
        if self.ignore is not None and self.ignore.match_file(rel + "/" if is_dir else rel):
            return None
        try:
            info = os.stat(entry.path)
        except OSError as e:
            self.skip(rel, _stat_reason(e, entry))
            return None
        identity = _identity(info)
        if identity in self.excluded:
            return None
        leads_out = entry.is_symlink() and not self.follow_links and not self.inside(entry.path)
        if stat.S_ISDIR(info.st_mode):
            if leads_out:
                self.skip(rel, _OUTSIDE.format("folder"))
                return None
            if identity in parent.ancestors:
                self.skip(rel, "symlink loop")
                return None
            ancestors = parent.ancestors | {identity}
            return _Folder(Path(entry.path), rel, identity, ancestors, entry.is_symlink())
        if stat.S_ISREG(info.st_mode):
            self.file(Path(entry.path), rel, info.st_size, leads_out)
        else:
            self.skip(rel, "not a regular file")
        return None

    def inside(self, path: str) -> bool:
        """True if `path`, with every symlink resolved, is under the indexed folder."""
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.real_root]) == self.real_root

    def file(self, path: Path, rel: str, size: int, leads_out: bool) -> None:
        if not is_supported(path):
            self.skip(rel, unsupported_reason(path))
        elif leads_out:
            self.skip(rel, _OUTSIDE.format("file"))
        elif size == 0:
            self.skip(rel, "empty file")
        elif size > self.max_file_bytes:
            self.skip(rel, _size_reason(size, self.max_file_bytes))
        elif not os.access(path, os.R_OK):
            self.skip(rel, "permission denied")
        else:
            self.files.append(SourceFile(path, rel, size))

    def skip(self, rel: str, reason: str) -> None:
        self.skipped.append(Skipped(rel, reason))


def _load_ignore(root: Path) -> GitIgnoreSpec | None:
    """The patterns of `root/.ragkitignore`, or None if there is no such file."""
    import pathspec

    try:
        lines = (root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _size_reason(size: int, cap: int) -> str:
    """The reason shown for a file over the size cap.

    >>> _size_reason(int(12.3 * 2**20), 10 * 2**20)
    'larger than the size cap (12.3 MB > 10.0 MB)'
    """
    return f"larger than the size cap ({size / _MB:.1f} MB > {cap / _MB:.1f} MB)"


def _identity(info: os.stat_result) -> _Identity:
    return info.st_dev, info.st_ino


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stat_reason(error: OSError, entry: os.DirEntry[str]) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, FileNotFoundError) and entry.is_symlink():
        return "broken symlink"
    return _os_reason(error)


def _os_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"unreadable: {error.strerror or error}"


def printable_path(rel: str) -> str:
    r"""`rel` for printing and UTF-8 files: bytes of a name that is not UTF-8 are shown as \xNN.

    >>> printable_path(os.fsdecode(b"caf\xff.md")), printable_path("café.md")
    ('caf\\xff.md', 'café.md')
    """
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
