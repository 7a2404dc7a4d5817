"""What the kill -9 soak (benchmarks/soak_index.py) sets to work: a folder of text files that changes between runs,
and `ragkit` child processes whose progress lines are read as they arrive."""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from ragkit import store
from ragkit.models import CACHE_ENV

REPO = Path(__file__).resolve().parents[1]
WORDS = ("oil prices rose sharply in october the embargo lasted months retrieval augmented generation cites lines "
         "pages contracts filings papers source code transcripts are long documents reader streams whole memory "
         "quick brown fox jumps over lazy dog function argument returns value").split()


# ------------------------------------------------------------------------------------------------ the folder

class Corpus:
    """A folder of text files that changes at random (seeded): files added, edited, deleted."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.rng = random.Random(seed)
        self.made = 0
        folder.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())

    def hashes(self) -> dict[str, str]:
        """Relative path → BLAKE2b-128 of the bytes, as the manifest records them."""
        return {rel: hashlib.blake2b((self.folder / rel).read_bytes(), digest_size=16).hexdigest()
                for rel in self.files()}

    def add(self, n: int) -> None:
        for _ in range(n):
            self.made += 1
            sub = self.rng.choice(["", "notes/", "papers/"])
            suffix = self.rng.choice([".txt", ".md"])
            self._write(f"{sub}doc{self.made:04d}{suffix}")

    def edit(self, n: int) -> None:
        for rel in self.rng.sample(self.files(), min(n, len(self.files()))):
            self._write(rel)

    def delete(self, n: int) -> None:
        for rel in self.rng.sample(self.files(), min(n, max(len(self.files()) - 5, 0))):
            (self.folder / rel).unlink()

    def mutate(self) -> None:
        """One trial's changes: a few files added, edited and deleted."""
        self.add(self.rng.randint(2, 5))
        self.edit(self.rng.randint(3, 8))
        self.delete(self.rng.randint(1, 3))

    def _write(self, rel: str) -> None:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        words = [self.rng.choice(WORDS) for _ in range(self.rng.randint(100, 900))]
        tag = f"{path.stem}v{self.rng.randrange(10**6)}"
        heading = f"# {tag}\n\n" if rel.endswith(".md") else ""
        lines = [" ".join(words[i : i + 12]) + "." for i in range(0, len(words), 12)]
        path.write_text(heading + f"{tag} begins.\n" + "\n".join(lines) + "\n")


class MarkedCorpus(Corpus):
    """Files whose every line carries the marker word of the writer run that wrote it ("epochN")."""

    def rewrite(self, run: int, add: int, delete: int) -> None:
        """Every file rewritten with marker `run`, plus `add` new files and `delete` fewer."""
        self.delete(delete)
        names = self.files() + [f"doc{self.made + i + 1:04d}.txt" for i in range(add)]
        self.made += add
        for rel in names:
            lines = [f"zeppelin epoch{run} " + " ".join(self.rng.choice(WORDS) for _ in range(6)) + "."
                     for _ in range(self.rng.randint(2, 8))]
            (self.folder / rel).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- child processes

def child_env(pause: float | None = None) -> dict[str, str]:
    """The environment of every ragkit child: offline, this checkout first on the path, no stray RAGKIT_* setting
    (the cache folder is kept: it says where exports go, not how to index)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGKIT_") or k == CACHE_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if pause:
        env[store.COMMIT_PAUSE_ENV] = str(pause)
    return env


def ragkit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ragkit.cli", *args]


def index_command(folder: Path, index: Path, models: dict[str, str]) -> list[str]:
    """`ragkit index` without --json: its stderr is a pipe, so it prints progress lines."""
    return ragkit_command("index", str(folder), "--index", str(index), "--dense-model", models["dense"],
                          "--late-model", models["late"])


class Child:
    """A child process whose stderr lines are read as they arrive, each with its time since the start."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, bufsize=0)
        self.lines: list[tuple[float, str]] = []
        self.closed = False

    def read_until(self, prefix: str | None, deadline: float) -> bool:
        """Read lines until one starts with `prefix` (True), or the deadline passes or stderr closes (False)."""
        while not self.closed and (left := deadline - time.monotonic()) > 0:
            if not select.select([self.process.stderr], [], [], left)[0]:
                return False
            line = self.process.stderr.readline()  # raw pipe: reads no further than the line
            if not line:
                self.closed = True
                return False
            self.lines.append((time.monotonic() - self.started, line.decode(errors="replace").rstrip("\n")))
            if prefix is not None and self.lines[-1][1].startswith(prefix):
                return True
        return False

    def kill(self) -> bool:
        """SIGKILL the child unless it has exited; True when the kill ended it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.finish() == -signal.SIGKILL

    def finish(self, timeout: float = 600) -> int:
        """Wait for the child and read what is left of its stderr; its exit status."""
        code = self.process.wait(timeout=timeout)
        self.read_until(None, time.monotonic() + 30)
        self.process.stderr.close()
        return code

    @property
    def text(self) -> list[str]:
        return [line for _, line in self.lines]


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    done = subprocess.run(ragkit_command(*args), env=child_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)
    return done.returncode, done.stdout, done.stderr


def complete_run(folder: Path, index: Path, models: dict[str, str], cwd: Path) -> Child:
    """One `ragkit index` run to its end; raises when it fails."""
    child = Child(index_command(folder, index, models), child_env(), cwd)
    child.read_until(None, time.monotonic() + 600)  # each line as it arrives, until the child closes stderr
    code = child.finish()
    if code != 0:
        raise RuntimeError(f"ragkit index failed ({code}): " + "\n".join(child.text[-20:]))
    return child
