"""Passkey recall of a tiny Infini-attention model trained from scratch: memory on, gates shut, and the memory of
another sequence, from the trained length to 64× it.

    python benchmarks/bench_passkey.py                  # the CPU ablation, one thread, ~11 min
    python benchmarks/bench_passkey.py --preset gpu     # a larger model, mixed lengths, up to 1M tokens (CUDA)

Training: 2 layers, d_model 64, 2 heads, 32-token segments, 5-digit passkey (K = 1) at a random depth in the first
3 of 4 segments, loss on the answer digits only, gradients through the memory across all 4 segments, the gates held
at sigmoid 0.5 for the first 40% of steps and then trained at 10× the base learning rate without weight decay.
Evaluation: 256 sequences per length (the same sequences in every mode); chance is 0.10 per digit, 1e-5 per key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import apply_preset, preset_parser, recall_cell_text, record  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # the CPU ablation's sizes; ~0.07 s/step at batch 16 on one shared Xeon core
    "cpu": dict(d_model=64, layers=2, heads=2, segment_length=32, segments="4-4", curriculum=0.0, steps=7000,
                batch_size=16, lr=1e-3, max_seconds=None, lengths="4,16,64,256", sequences=256, eval_batch=64,
                device="cpu", eval_budget=None, name="bench_passkey"),
    # one H200, time-boxed: mixed lengths of 4-16 segments (the longest rising over the first half), then
    # evaluated up to 4,096 segments (131k tokens) within the evaluation budget
    "gpu": dict(d_model=128, layers=2, heads=4, segment_length=32, segments="4-16", curriculum=0.5, steps=100_000,
                batch_size=128, lr=2e-3, max_seconds=150.0, lengths="4,16,64,256,1024,4096", sequences=256,
                eval_batch=256, device="cuda", eval_budget=70.0, name="bench_passkey_gpu"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preset_parser(__doc__, PRESETS, floats=('lr', 'max_seconds', 'eval_budget', 'curriculum'))
    parser.add_argument("--seed", type=int, default=0)
    return apply_preset(parser.parse_args(argv), PRESETS)


def tables(raw: dict[str, Any]) -> str:
    """The recall table (digit / whole-key accuracy per mode and length) and the depth table (memory on)."""
    trained = raw["config"]["segments"]
    seg = raw["config"]["segment_length"]
    cells = {(c["keys"], c["segments"], c["mode"]): c for c in raw["cells"]}
    lo = int(trained.split("-")[0])
    hi = int(trained.split("-")[1])
    lines = ["| keys | segments (tokens) | vs trained | memory on | gate shut | memory of another sequence | "
             "on ÷ shut (digits) |", "|---|---|---|---|---|---|---|"]
    for keys, segments in sorted({(k, s) for k, s, _ in cells}):
        on, shut, other = (cells.get((keys, segments, m)) for m in ("on", "shut", "other"))
        rel = "trained" if lo <= segments <= hi else f"{segments / hi:g}×"
        ratio = f"{on['digit'] / shut['digit']:.1f}×" if on and shut and shut["digit"] > 0 else ""
        lines.append(f"| {keys} | {segments} ({segments * seg:,}) | {rel} | {recall_cell_text(on)} | {recall_cell_text(shut)} | "
                     f"{recall_cell_text(other)} | {ratio} |")
    for skipped in raw.get("skipped", []):
        lines.append(f"| {skipped['keys']} | {skipped['segments']} ({skipped['segments'] * seg:,}) | | "
                     f"not run: {skipped['reason']} | | | |")
    lines += ["", "Memory on, K = 1, digit accuracy by depth of the key (share of the room keys may use):", "",
              "| segments | 0–25% | 25–50% | 50–75% | 75–100% |", "|---|---|---|---|---|"]
    for (keys, segments, mode), c in sorted(cells.items()):
        if keys == 1 and mode == "on":
            lines.append(f"| {segments} | " + " | ".join(f"{d['digit']:.3f} (n={d['n']})" for d in c["by_depth"])
                         + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from ragkit.readers.tasks import RecallTask
    from ragkit.readers.train import RecallBatches, TrainConfig, TrainEvent, build_reader, evaluate_recall, train

    lo, hi = (int(x) for x in args.segments.split("-"))
    model, _ = build_reader(tiny=True, segment_length=args.segment_length, d_model=args.d_model, layers=args.layers,
                            heads=args.heads, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    task = RecallTask(segment_length=args.segment_length, keys=1)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, segments=(lo, hi), lr=args.lr,
                         length_curriculum=args.curriculum,
                         max_seconds=args.max_seconds, log_every=100, seed=args.seed, device=args.device)

    def log(e: TrainEvent) -> None:
        gates = [[round(g, 3) for g in layer] for layer in e.gates]
        print(f"step {e.step:>6}  loss {e.loss:.4f}  gates {gates}{'  (held)' if e.gates_frozen else ''}  "
              f"{e.seconds:.0f}s", file=sys.stderr, flush=True)

    result = train(model, RecallBatches(task), config, progress=log)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s, loss {result.loss:.4f}", file=sys.stderr)

    started = time.perf_counter()
    cells, skipped = [], []
    lengths = [int(x) for x in args.lengths.split(",")]
    last: tuple[int, float] | None = None  # (segments, seconds) of the last length evaluated
    for segments in lengths:
        spent = time.perf_counter() - started
        if args.eval_budget and last and spent + last[1] * segments / last[0] > args.eval_budget:
            skipped.append({"keys": 1, "segments": segments, "reason": f"over the {args.eval_budget:.0f}s budget"})
            continue
        t0 = time.perf_counter()
        cells += evaluate_recall(model, task, [segments], sequences=args.sequences, batch_size=args.eval_batch,
                                 device=args.device)
        last = (segments, time.perf_counter() - t0)
        print(f"evaluated {segments} segments in {last[1]:.0f}s", file=sys.stderr, flush=True)
    four = RecallTask(segment_length=args.segment_length, keys=4)  # K = 4 facts, the trained length (out of task)
    cells += evaluate_recall(model, four, [hi], sequences=args.sequences, batch_size=args.eval_batch,
                             device=args.device)
    eval_seconds = time.perf_counter() - started

    raw = {
        "config": {**vars(args), "parameters": params, "train": result.steps},
        "train": {"steps": result.steps, "seconds": result.seconds, "tokens": result.tokens, "loss": result.loss,
                  "history": result.history, "gates": result.gates},
        "eval_seconds": eval_seconds,
        "cells": [c.to_json() for c in cells],
        "skipped": skipped,
    }
    table = tables(raw)
    trained = f"{lo}" if lo == hi else f"{lo}-{hi}"
    title = (f"Infini-attention passkey, {args.layers} layers × d_model {args.d_model}, trained on {trained} "
             f"segments of {args.segment_length} tokens ({args.device})")
    notes = (f"{params:,} parameters; {result.steps:,} steps of batch {args.batch_size} in {result.seconds:.0f} s "
             f"(final loss {result.loss:.4f}); evaluation {eval_seconds:.0f} s, {args.sequences} sequences per length. "
             f"Final gates sigmoid(β) per layer: {[[round(g, 3) for g in layer] for layer in result.gates]}. "
             "Cells: digit accuracy / whole-key accuracy; chance is 0.10 / 0.00001.")
    if args.no_record:
        print(json.dumps(raw))
        print(table)
    else:
        record(args.name, title, raw, table, notes)
    return raw


if __name__ == "__main__":
    main()
