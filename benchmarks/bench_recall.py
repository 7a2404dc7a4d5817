"""Multi-key associative recall under compression: Infini-attention and HMT side by side, same backbone, same
training budget (readers.md §7-§8; the task of `ragkit.readers.tasks`).

    python benchmarks/bench_recall.py                   # CPU, one thread: 6 runs of ~5 min training + evaluation
    python benchmarks/bench_recall.py --preset gpu      # larger model, mixed lengths, longer inputs (CUDA)
    python benchmarks/bench_recall.py --readers hmt --keys 4

For each reader and each K (facts per sequence): a Llama of `layers` × `d_model` from scratch, trained for the same
wall-clock budget on sequences of `segments` segments holding K facts "KEY <id> = <5 digits>" and a question naming
one id at the end; loss on the answer digits only. The question's segment opens with the question's cue
(QUERY <id> =, no answer) and no fact lies in that segment or in the 8 tokens before it (HMT's sensory window), so
the answer can only come through memory, looked up by its id.
- Infini-attention: one run, the gates held at sigmoid 0.5 for the first 40% of the budget, then trained at 10×
  the learning rate without decay.
- HMT: the paper's two stages: stage 1 (`stage1_steps`, 2 segments, no search) on the one-key task with the
  sensory window open (`stage1_recall_batches`), then stage 2 with the search on the K-key task for the rest of
  the budget. For K > 1 the search can be taught where it must choose (off by default; `--search-loss 0.3`: a
  loss on the weight it gives the asked fact's memory, at `hmt_lr`; `--search-teacher 0.7`: the question reads that
  memory itself until the search finds it for 90% of questions, for at most that share of stage 2). Its cache holds N = `cache` memories: at the trained length every segment's memory fits; from 4×
  on, the cache is smaller than the number of segments (compression is forced) and it is also evaluated with a
  cache wide enough for every segment (lookup, no compression) to separate eviction from failure to read.
Evaluation at 1×, 4×, 16× (64× on the GPU preset) the trained length, 128 sequences each, memory on / off (gates
shut, or HMT's memory disabled) / taken from another sequence; digit and whole-value accuracy; chance 0.10 and
1e-5. HMT's search hit: the share of questions whose search weighs the queried fact's segment highest.
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
    # readers.md §7-§8 sizes; one thread of a shared 2-core Xeon
    "cpu": dict(d_model=64, layers=2, heads=2, segment_length=32, segments=8, sensory=8, cache=8, keys="1,4,16",
                readers="infini,hmt", budget=300.0, stage1_steps=800, batch_size=32, lr=1e-3,
                search_loss=0.0, search_teacher=0.0, hmt_lr=1e-2,
                multiples="1,4,16", sequences=128, eval_batch=64, device="cpu", name="bench_recall"),
    # one GPU: issue-sized model (d_model 256, 4 layers), longer inputs
    "gpu": dict(d_model=256, layers=4, heads=4, segment_length=32, segments=8, sensory=8, cache=8, keys="1,4,16",
                readers="infini,hmt", budget=240.0, stage1_steps=1500, batch_size=128, lr=1e-3,
                search_loss=0.0, search_teacher=0.0, hmt_lr=1e-2,
                multiples="1,4,16,64", sequences=256, eval_batch=256, device="cuda", name="bench_recall_gpu"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preset_parser(__doc__, PRESETS)
    parser.add_argument("--seed", type=int, default=0)
    return apply_preset(parser.parse_args(argv), PRESETS)


def run_one(reader: str, keys: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one reader on K-key recall within the budget, then evaluate it; the raw record of the run."""
    from ragkit.readers.tasks import RecallTask
    from ragkit.readers.train import (RecallBatches, TrainConfig, TrainEvent, build_reader, evaluate_recall,
                                      stage1_recall_batches, train, train_two_stage)

    hmt = reader == "hmt"
    model, _ = build_reader(reader, tiny=True, segment_length=args.segment_length, d_model=args.d_model,
                            layers=args.layers, heads=args.heads, seed=args.seed,
                            **({"sensory_tokens": args.sensory, "cache_size": args.cache} if hmt else {}))
    protect = RecallTask.protect_with_sensory(args.segment_length, args.sensory)
    task = RecallTask(segment_length=args.segment_length, keys=keys, protect=protect, cue=True)
    gates: list[Any] = []

    def log(e: TrainEvent) -> None:
        if e.gates is not None:
            gates.append((e.step, [[round(g, 3) for g in layer] for layer in e.gates]))
        hit = "" if e.search_hit is None else f"  search hit {e.search_hit:.3f}"
        print(f"{reader} K={keys} step {e.step:>6}  loss {e.loss:.4f}{hit}  {e.seconds:.0f}s", file=sys.stderr,
              flush=True)

    if hmt:
        # stage 1 runs its steps within 40% of the budget at most; stage 2 runs until the budget is spent
        supervise = keys > 1 and (args.search_loss > 0 or args.search_teacher > 0)  # K = 1: nothing to choose
        config = TrainConfig(steps=10**6, batch_size=args.batch_size,
                             segments=(args.segments, args.segments), lr=args.lr, max_seconds=args.budget,
                             log_every=100, seed=args.seed, device=args.device,
                             search_loss=args.search_loss if supervise else 0.0,
                             search_teacher=args.search_teacher if supervise else 0.0,
                             hmt_lr=args.hmt_lr if supervise else None)
        result = train_two_stage(model, RecallBatches(task), config, stage1_steps=args.stage1_steps, progress=log,
                                 stage1_batches=stage1_recall_batches(task), stage1_seconds=0.4 * args.budget)
    else:
        config = TrainConfig(steps=10**6, batch_size=args.batch_size, segments=(args.segments, args.segments),
                             lr=args.lr, max_seconds=args.budget, log_every=100, seed=args.seed, device=args.device)
        result = train(model, RecallBatches(task), config, progress=log)

    started = time.perf_counter()
    cells = []
    for multiple in (int(x) for x in args.multiples.split(",")):
        segments = args.segments * multiple
        # HMT: the trained cache, and one that holds every segment once the trained one cannot
        caches = ([args.cache] if segments <= args.cache + 1 else [args.cache, segments]) if hmt else [None]
        for cache in caches:
            if hmt:
                model.config.cache_size = cache
            for c in evaluate_recall(model, task, [segments], sequences=args.sequences, batch_size=args.eval_batch,
                                     device=args.device):
                cells.append({**c.to_json(), "cache": cache, "multiple": multiple})
        if hmt:
            model.config.cache_size = args.cache
        print(f"{reader} K={keys}: evaluated {segments} segments", file=sys.stderr, flush=True)
    return {"reader": reader, "keys": keys, "parameters": sum(p.numel() for p in model.parameters()),
            "train": {"steps": result.steps, "seconds": result.seconds, "loss": result.loss,
                      "history": result.history, "gates": result.gates, "gate_history": gates[::5],
                      "search_hits": result.search_hits},
            "eval_seconds": time.perf_counter() - started, "cells": cells}


def tables(raw: dict[str, Any]) -> str:
    """One row per reader, K, length and cache: memory on / off / another sequence's, and the search hit."""
    seg = raw["config"]["segment_length"]
    lines = ["| reader | K | segments (tokens) | vs trained | cache N | memory on | memory off | memory of another "
             "sequence | search hit |", "|---|---|---|---|---|---|---|---|---|"]
    for run in raw["runs"]:
        by = {}
        for c in run["cells"]:
            by.setdefault((c["segments"], c["cache"], c["multiple"]), {})[c["mode"]] = c
        for (segments, cache, multiple), modes in sorted(by.items(), key=lambda x: (x[0][0], x[0][1] or 0)):
            on = modes.get("on")
            hit = f"{on['search_hit']:.3f}" if on and on.get("search_hit") is not None else ""
            n = "" if cache is None else (f"{cache}" + (" (all)" if cache >= segments - 1 else " (compressed)"))
            rel = "trained" if multiple == 1 else f"{multiple}×"
            lines.append(f"| {run['reader']} | {run['keys']} | {segments} ({segments * seg:,}) | {rel} | {n} | "
                         f"{recall_cell_text(on)} | {recall_cell_text(modes.get('shut'))} | "
                         f"{recall_cell_text(modes.get('other'))} | {hit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = [run_one(reader, int(k), args) for reader in args.readers.split(",") for k in args.keys.split(",")]
    raw = {"config": vars(args), "runs": runs, "seconds": time.perf_counter() - started}
    table = tables(raw)
    title = (f"Associative recall, Infini-attention and HMT, {args.layers} layers × d_model {args.d_model}, "
             f"trained on {args.segments} segments of {args.segment_length} tokens, {args.budget:.0f} s each "
             f"({args.device})")
    notes = "; ".join(f"{r['reader']} K={r['keys']}: {r['parameters']:,} parameters, {r['train']['steps']:,} steps "
                      f"in {r['train']['seconds']:.0f} s, final loss {r['train']['loss']:.3f}" for r in runs)
    notes += (f". Batch {args.batch_size}, lr {args.lr:g}; HMT k = {args.sensory}, stage 1 {args.stage1_steps} "
              f"steps; for K > 1 search loss {args.search_loss:g} (HMT lr {args.hmt_lr:g} when on), teacher-forced "
              f"search until its hit rate reaches 0.9, for at most {args.search_teacher:g} of stage 2. Cells: digit accuracy / whole-value accuracy; chance 0.10 / 0.00001. "
              f"Whole command {raw['seconds']:.0f} s.")
    if args.no_record:
        print(json.dumps(raw))
        print(table)
    else:
        record(args.name, title, raw, table, notes,
               command=" ".join(["python benchmarks/bench_recall.py", *(argv if argv is not None else sys.argv[1:])]))
    return raw


if __name__ == "__main__":
    main()
