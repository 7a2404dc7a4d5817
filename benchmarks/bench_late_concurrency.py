"""Memory and time of concurrent exhaustive late searches: one block's products at a time against overlapping ones.

    python benchmarks/bench_late_concurrency.py [--tokens 1200000] [--threads 1 4] [--queries 16]

A late folder of `--tokens` random unit token vectors (128-d, float16, chunks of 64-256 tokens; the work of exact
MaxSim does not depend on the values) is written once. Then, per setting, a fresh process warms up with one query
and runs `--threads` threads at once, each scoring the same `--queries` queries of 32 tokens against every chunk
(`maxsim_all_many`, as a batch of evaluation questions does). Reported: wall seconds, and the process's peak
resident memory above what it held after the warm-up (the token matrix is memory-mapped and counted in both).
"serial" is ragkit's scoring (one block's products at a time per process); "overlapping" lets threads run their
products at the same time, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record  # noqa: E402

DIM = 128


def write_folder(folder: Path, tokens: int, seed: int = 0) -> None:
    """A late folder (no candidate stage) of about `tokens` random unit vectors."""
    import numpy as np

    from ragkit.indexes.late import write_late_index

    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < tokens:
        length = int(rng.integers(64, 257))
        vectors = rng.standard_normal((length, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        parts.append((vectors.astype(np.float16), np.full((length, 2), -1, dtype=np.int32)))
        total += length
    write_late_index(folder, parts, [f"c{i}" for i in range(len(parts))], {"model": "random", "dim": DIM},
                     None, None, plaid=False, centroids=False)


def memory_kib(field: str) -> int:
    """A line of /proc/self/status in KiB (VmRSS now, VmHWM the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(folder: Path, mode: str, threads: int, n_queries: int) -> dict:
    """One setting, in this (fresh) process."""
    import numpy as np

    from ragkit.indexes import token_products
    from ragkit.indexes.late import LateIndex

    if mode == "overlapping":
        token_products._SCORING = contextlib.nullcontext()
    late = LateIndex.load(folder)
    rng = np.random.default_rng(1)
    queries = [q / np.linalg.norm(q, axis=1, keepdims=True)
               for q in rng.standard_normal((n_queries, 32, DIM)).astype(np.float32)]
    late.maxsim_all_many(queries[:1])
    base = memory_kib("VmRSS")
    workers = [threading.Thread(target=late.maxsim_all_many, args=(queries,)) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"seconds": time.perf_counter() - started, "base_mib": base / 1024,
            "peak_above_base_mib": (memory_kib("VmHWM") - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_200_000)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "MODE", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], int(args.child[2]), args.queries)))
        return
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-late-concurrency-"))) / "late"
    if not (folder / "params.json").is_file():
        write_folder(folder, args.tokens)
    tokens = json.loads((folder / "params.json").read_text())["tokens"]
    raw: dict = {"tokens": tokens, "queries": args.queries, "runs": {}}
    for threads in args.threads:
        for mode in ("serial", "overlapping"):
            done = subprocess.run([sys.executable, __file__, "--queries", str(args.queries), "--child", str(folder),
                                   mode, str(threads)], capture_output=True, text=True, check=True)
            raw["runs"][f"{mode}-{threads}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(mode, threads, raw["runs"][f"{mode}-{threads}"], flush=True)
    lines = ["| threads | serial: seconds | serial: peak MiB above warm | overlapping: seconds | "
             "overlapping: peak MiB above warm | overlapping ÷ serial, seconds |", "|---|---|---|---|---|---|"]
    for threads in args.threads:
        s, o = raw["runs"][f"serial-{threads}"], raw["runs"][f"overlapping-{threads}"]
        lines.append(f"| {threads} | {s['seconds']:.2f} | {s['peak_above_base_mib']:.0f} | {o['seconds']:.2f} | "
                     f"{o['peak_above_base_mib']:.0f} | {o['seconds'] / s['seconds']:.2f} |")
    if not args.no_record:
        record("bench_late_concurrency", "Concurrent exhaustive late searches: memory and time", raw,
               "\n".join(lines), command=" ".join(["python benchmarks/bench_late_concurrency.py", *sys.argv[1:]]))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
