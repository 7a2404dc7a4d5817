"""kill -9 soak of `ragkit index`, and searches in another process while it writes.

Soak: TRIALS runs of the real `ragkit index` command (a child process) over a folder that changes between trials
(files added, edited and deleted, seeded), each killed with SIGKILL inside one of the run's phases: start-up, scan,
load models (hashing, heavy imports, model loading), parse, encode, late, write, between the rename of its
generation and the switch of CURRENT, after the switch. Each trial draws its phase (every phase equally often, in a
seeded order) and a moment within it (uniform over that phase's length in the last run that went through it); the
phase actually hit is read from the child's progress lines on stderr ("ragkit: <stage> <done>/<total>"), never
guessed. RAGKIT_DEBUG_COMMIT_PAUSE holds the two commit windows open in the trials aimed at them. After each trial
`ragkit status` and `ragkit search` must work, and the live generation must be the one from before the killed run,
or the killed run's own when its switch was seen. After the last trial one complete run must give the same chunks
and vectors as a fresh index of the same folder.

Readers: a reader process searches in a loop (one long-lived `Index`; hybrid, bm25, dense and late in turn) while
complete `ragkit index` runs rewrite every file, add and delete some. Every line of every file carries the run's
marker word, so an answer whose hits carry two markers, or whose chunk ids are not all in that run's chunk table,
mixed generations.

    python benchmarks/soak_index.py                          # 100 trials, 20 writer runs, tiny models
    python benchmarks/soak_index.py --trials 8 --writer-runs 3 --no-record
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.soak_workers import (REPO, Child, Corpus, MarkedCorpus, child_env, complete_run,  # noqa: E402
                                     index_command, run_cli)
from ragkit import store  # noqa: E402
from ragkit.errors import RagkitError  # noqa: E402

PHASES = ("startup", "scan", "load models", "parse", "encode", "late", "write", "rename→switch", "after switch")
# the progress line each phase starts with (start-up: the child's start); "load models" is what a run does between
# its scan and its parse: hash the files, import torch and the encoders, load the models
PHASE_LINE = {"scan": "ragkit: scan 0/", "load models": "ragkit: scan 1/", "parse": "ragkit: parse 0/",
              "encode": "ragkit: encode 0/", "late": "ragkit: late 0/", "write": "ragkit: write 0/",
              "rename→switch": "ragkit: switch 0/", "after switch": "ragkit: switch 1/"}
PROGRESS = re.compile(r"^ragkit: (\w+) (\d+)/(\d+)")
QUERY = "oil prices october embargo"
MARKER = re.compile(r"\bepoch(\d+)\b")
# recovered vs fresh: kept vectors were encoded in other batches than the fresh index's, which may change last bits
DENSE_ATOL = 1e-5  # float32 unit vectors
LATE_ATOL = 2e-3  # float16 token vectors: a last-bit change may round to the next float16, 4.9e-4 apart below 1


# ------------------------------------------------------------------------------------------------ phases

def observed_phase(lines: list[str]) -> str:
    """The phase a run was in when it died, by the last progress line it printed."""
    progress = [m for m in map(PROGRESS.match, lines) if m]
    if not progress:
        return "startup"
    stage, done, total = progress[-1].group(1), int(progress[-1].group(2)), int(progress[-1].group(3))
    if stage == "switch":
        return "after switch" if done == total else "rename→switch"
    if stage == "write" and done == total:
        return "after switch"
    if stage == "scan" and done == total:
        return "load models"
    return stage


def stage_durations(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from the start of each phase to the start of the next, as a complete run printed them."""
    starts = {"startup": 0.0}
    for t, line in lines:
        for phase, prefix in PHASE_LINE.items():
            if line.startswith(prefix) and phase not in starts:
                starts[phase] = t
    ordered = sorted(starts.items(), key=lambda item: item[1])
    return {phase: nxt - t for (phase, t), (_, nxt) in itertools.pairwise(ordered)}


def library_run(folder: Path, index: Path, settings) -> dict[str, float]:
    """One whole index run in this process; the seconds of each phase, by its progress events."""
    from ragkit.api import Index

    started, lines = time.monotonic(), []
    Index(index, settings).add(folder, progress=lambda e: lines.append(
        (time.monotonic() - started, f"ragkit: {e.stage} {e.done}/{e.total}")))
    return stage_durations(lines)


@dataclass
class Setup:
    """How a soak runs: the models, the folder children run in, and how whole runs and checks are made."""

    models: dict[str, str]
    cwd: Path
    complete: Callable[[Path, Path], dict[str, float]]  # (folder, index) → seconds per phase of a whole run
    check: Callable[[Path], list[str]]  # status and search on an index → problems found
    commit_pause: float = 2.0  # seconds a commit pauses after its rename and after its switch, in those phases

    @classmethod
    def cli(cls, models: dict[str, str], cwd: Path, commit_pause: float = 2.0) -> Setup:
        """Whole runs, status and search as `ragkit` child processes."""
        def complete(folder: Path, index: Path) -> dict[str, float]:
            return stage_durations(complete_run(folder, index, models, cwd).lines)

        return cls(models, cwd, complete, lambda index: check_cli(index, cwd), commit_pause)

    @classmethod
    def library(cls, models: dict[str, str], cwd: Path, commit_pause: float = 2.0) -> Setup:
        """Whole runs, status and search through the library in this process (the killed runs stay children)."""
        from ragkit.config import Settings

        settings = Settings(dense_model=models["dense"], late_model=models["late"])
        return cls(models, cwd, lambda folder, index: library_run(folder, index, settings),
                   lambda index: check_library(index, settings), commit_pause)


# ------------------------------------------------------------------------------------------------ the index

def live(index: Path) -> tuple[str, str] | None:
    """(name, manifest digest) of the live generation, or None when there is none."""
    try:
        generation = store.current_generation(index)
    except RagkitError:
        return None
    return generation.name, hashlib.blake2b((generation / store.MANIFEST).read_bytes()).hexdigest()


def leftovers(index: Path) -> dict[str, list[str]]:
    """Generations other than the live one, and `*.tmp` entries, in the index folder."""
    state = live(index)
    gens = sorted(p.name for p in index.glob(store.GEN_PREFIX + "*") if not p.name.endswith(store.TMP_SUFFIX))
    return {"generations": [g for g in gens if state is None or g != state[0]],
            "tmp": sorted(p.name for p in index.glob("*" + store.TMP_SUFFIX))}


def chunk_ids(index: Path) -> list[str]:
    return store.load_chunks(store.current_generation(index)).column("chunk_id").to_pylist()


def consistency(index: Path, corpus: Corpus) -> dict[str, int]:
    """The live generation against the folder: files missing or stale, chunk rows of no file, duplicated ids."""
    generation = store.current_generation(index)
    manifest = store.read_manifest(generation)
    table = store.load_chunks(generation)
    ids, paths = table.column("chunk_id").to_pylist(), table.column("path").to_pylist()
    files = {rel: f["hash"] for rel, f in manifest["files"].items()}
    hashes = corpus.hashes()
    rows = sum(f["rows"][1] for f in manifest["files"].values())
    return {"files_missing_or_stale": sum(files.get(rel) != digest for rel, digest in hashes.items()),
            "files_gone": len(set(files) - set(hashes)), "rows_unaccounted": len(ids) - rows,
            "rows_of_no_file": sum(p not in files for p in paths), "duplicated": len(ids) - len(set(ids))}


def check_cli(index: Path, cwd: Path) -> list[str]:
    """`ragkit status` and `ragkit search` as child processes: problems found (none expected)."""
    problems = []
    state = live(index)
    code, out, err = run_cli(["status", "--index", str(index), "--json"], cwd)
    if code != 0 or "Traceback" in err:
        problems.append(f"status failed ({code}): {err[-400:]}")
    elif state is None or json.loads(out)["generation"] != state[0]:
        problems.append(f"status names {json.loads(out)['generation']}, live is {state}")
    code, out, err = run_cli(["search", QUERY, "--index", str(index), "--json", "-k", "5"], cwd)
    if code != 0 or "Traceback" in err:
        problems.append(f"search failed ({code}): {err[-400:]}")
    else:
        problems += _hit_problems([h["chunk_id"] for h in json.loads(out)["hits"]], index)
    return problems


def check_library(index: Path, settings) -> list[str]:
    """`Index.status` and `Index.search` in this process: problems found (none expected)."""
    from ragkit.api import Index

    try:
        idx = Index(index, settings)
        status = idx.status()
        hits = idx.search(QUERY, k=5, mode="hybrid")
    except Exception as e:  # any error at all is what the soak looks for
        return [f"library check failed: {e!r}"]
    problems = [] if status["generation"] == live(index)[0] else [f"status names {status['generation']}"]
    return problems + _hit_problems([h.chunk_id for h in hits], index)


def _hit_problems(ids: list[str], index: Path) -> list[str]:
    if not ids:
        return ["search found nothing"]
    foreign = set(ids) - set(chunk_ids(index))
    return [f"{len(foreign)} hits not in the live generation"] if foreign else []


def compare_indexes(recovered: Path, fresh: Path) -> dict[str, Any]:
    """Chunk ids, rows, dense vectors and late token vectors of two indexes of the same folder."""
    from ragkit.indexes.faiss_index import load_vectors
    from ragkit.indexes.late import LateIndex

    a, b = store.current_generation(recovered), store.current_generation(fresh)
    ta, tb = store.load_chunks(a), store.load_chunks(b)
    ids_a, ids_b = ta.column("chunk_id").to_pylist(), tb.column("chunk_id").to_pylist()
    same_ids = ids_a == ids_b
    dense = float(np.abs(np.asarray(load_vectors(a / "dense")) - np.asarray(load_vectors(b / "dense"))).max()) \
        if same_ids and ids_a else None
    late = _late_difference(LateIndex.load(a / "late"), LateIndex.load(b / "late"), len(ids_a)) if same_ids else None
    return {"chunks": len(ids_b), "lost": len(set(ids_b) - set(ids_a)), "stale": len(set(ids_a) - set(ids_b)),
            "duplicated": len(ids_a) - len(set(ids_a)), "same_ids_in_order": same_ids, "same_rows": ta.equals(tb),
            "dense_max_abs_diff": dense, "late_max_abs_diff": late["vectors"] if late else None,
            "late_same_spans": late["spans"] if late else None,
            "vectors_match": same_ids and dense is not None and dense <= DENSE_ATOL
            and late is not None and late["spans"] and late["vectors"] <= LATE_ATOL}


def _late_difference(a, b, rows: int) -> dict[str, Any]:
    worst, spans = 0.0, True
    for row in range(rows):
        (va, sa), (vb, sb) = a.stored(row), b.stored(row)
        if va.shape != vb.shape:
            return {"vectors": float("inf"), "spans": False}
        worst = max(worst, float(np.abs(va.astype(np.float32) - vb.astype(np.float32)).max(initial=0.0)))
        spans = spans and np.array_equal(sa, sb)
    return {"vectors": worst, "spans": spans}


# ------------------------------------------------------------------------------------------------ the soak

@dataclass
class Trial:
    target: str
    delay: float
    phase: str  # observed; "completed" when the run ended before the kill
    live_before: str | None
    live_after: str | None
    leftovers: dict[str, list[str]]  # right after the kill
    problems: list[str] = field(default_factory=list)


def kill_in_phase(folder: Path, index: Path, setup: Setup, target: str, delay: float) -> tuple[str, Child]:
    """Start `ragkit index`, wait for `target` to begin, `delay` seconds more, SIGKILL it; (observed phase, child)."""
    pause = setup.commit_pause if target in ("rename→switch", "after switch") else None
    child = Child(index_command(folder, index, setup.models), child_env(pause), setup.cwd)
    if target == "startup" or child.read_until(PHASE_LINE[target], time.monotonic() + 600):
        child.read_until(None, time.monotonic() + delay)  # keep reading while we wait
    killed = child.kill()
    return (observed_phase(child.text) if killed else "completed"), child


def trial_problems(trial: Trial, child: Child, index: Path, corpus: Corpus, before: tuple[str, str] | None,
                   ) -> list[str]:
    """What the state after a killed run must be: the old generation untouched, or the killed run's own."""
    problems = [line for line in child.text if "Traceback" in line or line.startswith("Error")]
    after = live(index)
    if trial.phase in ("after switch", "completed"):
        if after is None or (before is not None and after[0] == before[0]):
            problems.append(f"the switch was seen but {after} is live")
        elif bad := {key: n for key, n in consistency(index, corpus).items() if n}:
            problems.append(f"the killed run's generation does not hold the folder: {bad}")
    elif after != before:
        problems.append(f"killed before its switch, yet {after} replaced {before}")
    if before is not None and not (index / before[0]).is_dir():
        problems.append(f"{before[0]}, live when the run started, is gone: a reader that opened it just before the "
                        "switch would fail")
    if trial.phase == "rename→switch" and not _renamed_above(after, trial.leftovers):
        problems.append(f"killed between rename and switch, yet no generation above the live one: {trial.leftovers}")
    return problems


def _renamed_above(state: tuple[str, str] | None, left: dict[str, list[str]]) -> bool:
    """Whether a generation numbered above the live one is present: renamed into place, never switched to."""
    return state is not None and any(name > state[0] for name in left["generations"])


def run_trial(corpus: Corpus, index: Path, setup: Setup, target: str, delay: float) -> tuple[Trial, Child]:
    """Change the folder, kill a run in `target`, check what it left."""
    corpus.mutate()
    before = live(index)
    phase, child = kill_in_phase(corpus.folder, index, setup, target, delay)
    after = live(index)
    trial = Trial(target, round(delay, 3), phase, before and before[0], after and after[0], leftovers(index))
    trial.problems = trial_problems(trial, child, index, corpus, before) + setup.check(index)
    return trial, child


def draw_delay(rng: random.Random, target: str, durations: dict[str, float], pause: float) -> float:
    """A moment within `target`, from its start: uniform over its length in the last run that went through it."""
    if target == "rename→switch":
        return rng.uniform(0, 0.6 * pause)  # well inside the pause, before the switch
    if target == "after switch":
        return rng.uniform(0, pause + 0.5)  # before and after the old generations are removed
    return rng.uniform(0, durations.get(target, 0.5))


def soak(workdir: Path, setup: Setup, trials: int, seed: int, targets: list[str] | None = None, files: int = 40,
         log=print) -> dict[str, Any]:
    """The kill -9 soak over a folder that starts with `files` files; returns per-trial records and the totals.
    `targets`: the phases to aim at, one per trial (default: every phase equally often, in a seeded order)."""
    rng = random.Random(seed)
    corpus = Corpus(workdir / "docs", seed)
    corpus.add(files)
    index = workdir / "index"
    durations = setup.complete(corpus.folder, index)
    targets = list(targets or [PHASES[i % len(PHASES)] for i in range(trials)])
    rng.shuffle(targets)
    records, started = [], time.monotonic()
    for i, target in enumerate(targets):
        delay = draw_delay(rng, target, durations, setup.commit_pause)
        trial, child = run_trial(corpus, index, setup, target, delay)
        durations.update(stage_durations(child.lines))
        records.append(trial)
        log(f"trial {i + 1}/{len(targets)}: aimed at {target} (+{delay:.3f} s), hit {trial.phase}, "
            f"live {trial.live_after}" + (f", PROBLEMS: {trial.problems}" if trial.problems else ""))
    soak_seconds = time.monotonic() - started
    return {"trials": [asdict(t) for t in records], "soak_seconds": soak_seconds,
            **recover_and_compare(corpus, index, setup, workdir), **soak_totals(records)}


def recover_and_compare(corpus: Corpus, index: Path, setup: Setup, workdir: Path) -> dict[str, Any]:
    """One more complete run, then a fresh index of the same folder elsewhere; compare the two. "previous" is the
    generation live before that run, which it must keep."""
    previous = live(index)
    setup.complete(corpus.folder, index)
    fresh = workdir / "fresh-index"
    setup.complete(corpus.folder, fresh)
    return {"after_recovery": {**compare_indexes(index, fresh), "leftovers": leftovers(index),
                               "previous": previous and previous[0], "consistency": consistency(index, corpus),
                               "files": len(corpus.files())}}


def soak_totals(records: list[Trial]) -> dict[str, Any]:
    return {"phases_hit": {phase: sum(t.phase == phase for t in records) for phase in (*PHASES, "completed")},
            "trials_with_problems": sum(bool(t.problems) for t in records),
            "most_generations_not_live_after_a_kill": max((len(t.leftovers["generations"]) for t in records),
                                                          default=0),
            "most_tmp_after_a_kill": max((len(t.leftovers["tmp"]) for t in records), default=0)}


# ------------------------------------------------------------------------------------------------ readers

def reader_loop(index: Path, out: Path, stop: Path, models: dict[str, str]) -> None:
    """Search in a loop until `stop` exists, one JSON line per answer: its markers and chunk ids, or the error."""
    from ragkit.api import Index
    from ragkit.config import Settings

    idx = Index(index, Settings(dense_model=models["dense"], late_model=models["late"]))
    modes = ("hybrid", "bm25", "dense", "late")
    with out.open("w") as f:
        n = 0
        while not stop.exists():
            mode = modes[n % len(modes)]
            n += 1
            try:
                hits = idx.search("zeppelin", k=8, mode=mode)
                record = {"mode": mode, "ids": [h.chunk_id for h in hits],
                          "markers": sorted({int(m) for h in hits for m in MARKER.findall(h.chunk.text)}),
                          "unmarked": sum(not MARKER.search(h.chunk.text) for h in hits)}
            except Exception as e:  # what this loop is looking for
                record = {"mode": mode, "error": repr(e)}
            f.write(json.dumps(record) + "\n")
            f.flush()


def readers_during_writes(workdir: Path, setup: Setup, runs: int, seed: int, log=print) -> dict[str, Any]:
    """Complete `ragkit index` runs (every file rewritten, some added and deleted) while a reader searches."""
    corpus = MarkedCorpus(workdir / "docs", seed)
    index, out, stop = workdir / "index", workdir / "answers.jsonl", workdir / "stop"
    corpus.rewrite(0, add=30, delete=0)
    setup.complete(corpus.folder, index)
    tables = {0: set(chunk_ids(index))}
    reader = subprocess.Popen([sys.executable, __file__, "reader", "--index", str(index), "--out", str(out),
                               "--stop", str(stop), "--dense-model", setup.models["dense"],
                               "--late-model", setup.models["late"]], env=child_env(), cwd=workdir)
    try:
        _wait_for_answers(out, reader)
        started = time.monotonic()
        for run in range(1, runs + 1):
            corpus.rewrite(run, add=corpus.rng.randint(1, 4), delete=corpus.rng.randint(1, 3))
            complete_run(corpus.folder, index, setup.models, setup.cwd)
            tables[run] = set(chunk_ids(index))
            _wait_for_answers(out, reader)
            log(f"writer run {run}/{runs} done")
        seconds = time.monotonic() - started
    finally:
        stop.touch()
        reader.wait(timeout=600)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    return {"writer_runs": runs, "seconds": seconds, **judge_answers(answers, tables)}


def _wait_for_answers(out: Path, reader: subprocess.Popen, timeout: float = 600) -> None:
    """Until the reader has answered twice more: the second answer was asked after the last switch."""
    count = _answers(out) + 2
    deadline = time.monotonic() + timeout
    while _answers(out) < count:
        if reader.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the reader process stopped answering")
        time.sleep(0.05)


def _answers(out: Path) -> int:
    return out.read_text().count("\n") if out.is_file() else 0


def judge_answers(answers: list[dict[str, Any]], tables: dict[int, set[str]]) -> dict[str, Any]:
    """Count answers, errors, empty answers, and answers mixing generations (by marker or by chunk table)."""
    ok = [a for a in answers if "error" not in a]
    mixed_markers = [a for a in ok if len(a["markers"]) > 1]
    outside = [a for a in ok if a["markers"] and not set(a["ids"]) <= tables.get(a["markers"][0], set())]
    return {"queries": len(answers), "errors": len(answers) - len(ok), "error_samples": [a["error"] for a in
            answers if "error" in a][:5], "empty": sum(not a["ids"] for a in ok),
            "mixed_markers": len(mixed_markers), "ids_outside_the_generation": len(outside),
            "unmarked_hits": sum(a["unmarked"] for a in ok),
            "generations_seen": len({a["markers"][0] for a in ok if a["markers"]})}


# ------------------------------------------------------------------------------------------------ reporting

def tiny_models(folder: Path) -> dict[str, str]:
    """The tests' tiny ModernBERT encoder and ColBERT (tests/models.py), built into `folder`."""
    sys.path.insert(0, str(REPO / "tests"))
    from models import build_colbert, build_modernbert_encoder

    encoder = build_modernbert_encoder(folder)
    return {"dense": str(encoder), "late": str(build_colbert(folder / "colbert", folder / "backbone"))}


def report_table(result: dict[str, Any]) -> str:
    soak_part, readers = result["soak"], result["readers"]
    after = soak_part["after_recovery"]
    hits = " · ".join(f"{phase} {n}" for phase, n in soak_part["phases_hit"].items())
    rows = [
        ("trials, each killed with SIGKILL", f"{len(soak_part['trials'])} in {soak_part['soak_seconds'] / 60:.1f} min"),
        ("phase hit (observed on the child's stderr)", hits),
        ("trials with a problem (status or search failed, wrong live generation)", soak_part["trials_with_problems"]),
        ("most generations not live · most `*.tmp` right after a kill",
         f"{soak_part['most_generations_not_live_after_a_kill']} · {soak_part['most_tmp_after_a_kill']}"),
        ("after recovery: chunks · lost · duplicated · stale",
         f"{after['chunks']:,} · {after['lost']} · {after['duplicated']} · {after['stale']}"),
        ("after recovery: generations not live · `*.tmp`",
         f"{len(after['leftovers']['generations'])} ({', '.join(after['leftovers']['generations'])}, the one before: "
         f"{after['previous']}) · {len(after['leftovers']['tmp'])}"),
        ("after recovery vs a fresh index: same ids, rows · dense max abs diff · late max abs diff",
         f"{after['same_ids_in_order'] and after['same_rows']} · {after['dense_max_abs_diff']:.1e} · "
         f"{after['late_max_abs_diff']:.1e}"),
        ("readers during writes: writer runs · queries · errors",
         f"{readers['writer_runs']} · {readers['queries']:,} · {readers['errors']}"),
        ("readers: answers mixing generations (by marker · by chunk table) · empty · generations seen",
         f"{readers['mixed_markers']} · {readers['ids_outside_the_generation']} · {readers['empty']} · "
         f"{readers['generations_seen']}"),
    ]
    return "\n".join(["| measurement | value |", "|---|---|"] + [f"| {what} | {value} |" for what, value in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    reader = sub.add_parser("reader", help="(internal) the search loop of the readers part")
    for name in ("--index", "--out", "--stop", "--dense-model", "--late-model"):
        reader.add_argument(name, required=True)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--writer-runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", choices=["cli", "library"], default="cli",
                        help="status and search after each trial as child processes (cli) or in this process")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--commit", default=None, help="commit to record (default: this checkout's)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.command == "reader":
        reader_loop(Path(args.index), Path(args.out), Path(args.stop),
                    {"dense": args.dense_model, "late": args.late_model})
        return
    run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> None:
    from benchmarks.common import commit, machine, record

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ragkit-soak-"))
    models = tiny_models(workdir / "models")
    setup = (Setup.cli if args.check == "cli" else Setup.library)(models, workdir)
    started = time.monotonic()
    result = {"soak": soak(workdir / "soak", setup, args.trials, args.seed),
              "readers": readers_during_writes(workdir / "readers", setup, args.writer_runs, args.seed)}
    result["wall_seconds"] = time.monotonic() - started
    table = report_table(result)
    if args.no_record:
        print(json.dumps(result, indent=1, default=str))
        print(table)
        return
    command = f"python benchmarks/soak_index.py --trials {args.trials} --writer-runs {args.writer_runs} " \
              f"--seed {args.seed} --check {args.check}"
    record("soak_index", f"kill -9 soak of `ragkit index` and readers during writes ({args.trials} trials)",
           result, table, command=command,
           header={"machine": f"{machine()}, nproc {os.cpu_count()}, run on {len(os.sched_getaffinity(0))} of them",
                   "commit": args.commit or commit()})


if __name__ == "__main__":
    main()
