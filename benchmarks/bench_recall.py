"""Multi-key associative recall under compression: Infini-attention and HMT side by side, same backbone, same
training budget (the task of `ragkit.memory.tasks`).

    python benchmarks/bench_recall.py                   # CPU, one thread: 6 runs of ~5 min training + evaluation
    python benchmarks/bench_recall.py --preset gpu      # 4 layers × d_model 256, batch 128, inputs to 64× (CUDA)
    python benchmarks/bench_recall.py --readers hmt --keys 4
    python benchmarks/bench_recall.py --readers full,infini --keys 4 --keys-curriculum 0.67
    python benchmarks/bench_recall.py --preset gpu --keys 1 --segments-max 64 --save ck     # mixed lengths 8-64
    python benchmarks/bench_recall.py --checkpoint ck/hmt-k1 --modes on --caches trained --multiples 4096  # 1M tokens
    python benchmarks/bench_recall.py --combine a.json b.json       # one entry for runs made at once with --out
    python benchmarks/bench_recall.py --recipe recipes/passkey-infini-tiny.toml    # one recipe (here: passkey, K = 1)
    python benchmarks/bench_recall.py --recipe recipes/recall-hmt-tiny.toml --seed 1

Every memory reader trains through `ragkit.memory.recipes.run`, the code path of `ragkit reader train --recipe`:
a `--recipe` file as it is, or the grid below as the recipe its preset and flags make (`recipe_of`).

For each reader and each K (facts per sequence): a Llama of `layers` × `d_model` from scratch, trained for the same
wall-clock budget on sequences of `segments` segments holding K facts "KEY <id> = <5 digits>" and a question naming
one id at the end; loss on the answer digits only. The question's segment opens with the question's cue
(QUERY <id> =, no answer) and no fact lies in that segment or in the 8 tokens before it (HMT's sensory window), so
the answer can only come through memory, looked up by its id.
- Infini-attention: one run, the gates held at sigmoid 0.5 for the first 40% of the budget, then trained at 10×
  the learning rate without decay. `--memory-value-loss 1` adds a loss making each layer's memory, as the question's
  segment reads it, give every fact's digits to a probe that queries it once per (id, digit) (`ragkit.memory.probes`).
- HMT: the paper's two stages: stage 1 (`stage1_steps`, 2 segments, no search) on the one-key task with the sensory
  window open (`stage1_recall_batches`), then stage 2 with the search on the K-key task for the rest of the budget.
  For K > 1 the search can be taught where it must choose (off by default; `--search-loss 0.3`: a loss on the weight
  it gives the asked fact's memory, at `hmt_lr`; `--search-teacher 0.7`: the question reads that memory itself until
  the search finds it for 90% of questions, for at most that share of stage 2; `--memory-id-loss 1`: a loss, in
  both stages (`--memory-id-stages 2`: stage 2 only), making each segment's memory name the ids of its facts
  through a linear probe, so that the memory holds what the search must match; `--memory-tokens 2`: two memories
  written per segment, the i-th fact of a segment named by its i-th memory; `--memory-value-loss 1`: a loss, in both
  stages, making each memory given one fact hold its digits, through another probe). Its cache holds the memories of
  N = `cache` segments: at the trained length every segment's memory fits; from 4× on, the cache is smaller than
  the number of segments (compression is forced) and it is also evaluated with a cache wide enough for every
  segment (lookup, no compression) to separate eviction from failure to read.
- full (`--readers full`, the baseline): the same Llama with positions for the whole sequence and no memory,
  attending to every token at once; evaluated at its trained length only (memory on = the whole sequence, and
  another sequence's prefix). It tells what the backbone can learn of the task within the budget at all.
`--keys-curriculum S` trains every reader on 1, 2, 4, … facts for the first share S of its run (of stage 2 for
HMT) before K; `--update delta` gives Infini-attention the delta rule.
Evaluation at 1×, 4×, 16× (64× on the GPU preset) the trained length, 128 sequences each, memory on / off (gates
shut, or HMT's memory disabled) / taken from another sequence; digit and whole-value accuracy; chance 0.10 and
1e-5. HMT's search hit: the share of questions whose search weighs the queried fact's memory highest; with r > 1
memories per segment, where any of the fact's segment's memories counts for more, that share follows in brackets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks.common import (apply_preset, commit, machine, preset_parser, recall_cell_text,  # noqa: E402
                               record)

PRESETS: dict[str, dict[str, Any]] = {
    # the CPU ablation's sizes; one thread of a shared 2-core Xeon
    "cpu": dict(d_model=64, layers=2, heads=2, segment_length=32, segments=8, segments_max=8, sensory=8, cache=8,
                memory_tokens=1, keys="1,4,16",
                readers="infini,hmt", budget=300.0, stage1_steps=800, batch_size=32, lr=1e-3,
                search_loss=0.0, search_teacher=0.0, memory_id_loss=0.0, memory_id_stages="1,2", hmt_lr=1e-2,
                memory_value_loss=0.0, probe_lr=None,
                keys_curriculum=0.0, min_lr_ratio=0.1, update="linear",
                multiples="1,4,16", sequences=128, eval_batch=64, device="cpu", name="bench_recall"),
    # one GPU: issue-sized model (d_model 256, 4 layers), longer inputs
    "gpu": dict(d_model=256, layers=4, heads=4, segment_length=32, segments=8, segments_max=8, sensory=8, cache=8,
                memory_tokens=1, keys="1,4,16",
                readers="infini,hmt", budget=240.0, stage1_steps=1500, batch_size=128, lr=1e-3,
                search_loss=0.0, search_teacher=0.0, memory_id_loss=0.0, memory_id_stages="1,2", hmt_lr=1e-2,
                memory_value_loss=0.0, probe_lr=None,
                keys_curriculum=0.0, min_lr_ratio=0.1, update="linear",
                multiples="1,4,16,64", sequences=256, eval_batch=256, device="cuda", name="bench_recall_gpu"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = preset_parser(__doc__, PRESETS, floats=("probe_lr",))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="on,shut,other", help="memory on, off (shut) and another sequence's")
    parser.add_argument("--save", type=Path, help="save each trained reader to SAVE/<reader>-k<K> (a checkpoint)")
    parser.add_argument("--recipe", type=Path, action="append",
                        help="train and evaluate the reader of this recipe file (recipes/*.toml) instead of the grid; "
                        "--keys (one value) and --seed override it")
    parser.add_argument("--checkpoint", type=Path, action="append",
                        help="evaluate this saved reader (its task from its train.json) instead of training one")
    parser.add_argument("--caches", choices=("both", "trained", "wide"), default="both",
                        help="HMT beyond its cache: evaluate with the trained cache, one holding every segment, "
                        "or both")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds: leave out a length whose evaluation would end later than this after the start")
    parser.add_argument("--out", type=Path, help="write the raw run to OUT (JSON), no RESULTS.md entry: for runs "
                        "in parallel, put together with --combine")
    parser.add_argument("--combine", type=Path, nargs="+", help="record the runs of these --out files as one entry")
    parser.add_argument("--at-once", type=int, default=None,
                        help="with --combine: how many of the commands ran at a time (default: all of them)")
    given = set(argv if argv is not None else sys.argv[1:])
    args = apply_preset(parser.parse_args(argv), PRESETS)
    args.keys_given, args.seed_given = "--keys" in given, "--seed" in given
    return args


def recipe_of(reader: str, keys: int, args: argparse.Namespace) -> Any:
    """The recipe of one memory reader's run of the grid: the preset and flags, as `ragkit reader train --recipe`
    would run them (`recipes/recall-*-tiny.toml` are two of them)."""
    from ragkit.memory.recipes import Recipe
    from ragkit.memory.tasks import RecallTask

    hmt = reader == "hmt"
    supervise = hmt and keys > 1 and (args.search_loss > 0 or args.search_teacher > 0)  # K = 1: nothing to choose
    stages = {int(s) for s in str(args.memory_id_stages).split(",")}
    if stages not in ({1, 2}, {2}):
        raise SystemExit(f"--memory-id-stages takes 2 or 1,2, got {args.memory_id_stages!r}")
    schedule: dict[str, Any] = dict(steps=10**6, max_seconds=args.budget, batch_size=args.batch_size,
                                    segments=[args.segments, max(args.segments, args.segments_max)], lr=args.lr,
                                    min_lr_ratio=args.min_lr_ratio, keys_curriculum=args.keys_curriculum,
                                    probe_lr=args.probe_lr, log_every=100, seed=args.seed)
    if hmt:
        settings = {"sensory_tokens": args.sensory, "cache_size": args.cache, "memory_tokens": args.memory_tokens}
        losses = {"search_loss": args.search_loss if supervise else 0.0,
                  "search_teacher": args.search_teacher if supervise else 0.0,
                  "memory_id_loss": args.memory_id_loss, "memory_value_loss": args.memory_value_loss}
        if any(losses.values()):
            schedule["hmt_lr"] = args.hmt_lr
        stage1 = {"stage1_steps": args.stage1_steps, "stage1_seconds": 0.4 * args.budget}
    else:
        settings = {"update": args.update}
        losses = {"memory_value_loss": args.memory_value_loss}
        stage1 = {}
    protect = RecallTask.protect_with_sensory(args.segment_length, args.sensory)
    return Recipe(f"{args.name}-{reader}-k{keys}", reader, args.segment_length, None,
                  {"d_model": args.d_model, "layers": args.layers, "heads": args.heads}, settings, "recall",
                  {"keys": keys, "cue": True, "protect": protect}, {**schedule, **losses}, stage1, 1 in stages,
                  {"sequences": 0})


def run_one(reader: str, keys: int, args: argparse.Namespace, deadline: float | None,
            recipe: Any = None) -> dict[str, Any]:
    """Train one reader (from `recipe`, or the grid's recipe for `reader` and `keys`) within its budget, save it if
    asked, evaluate it; the raw record."""
    from ragkit.memory.recipes import recall_task, run
    from ragkit.memory.train import TrainConfig, TrainEvent, train

    gates: list[Any] = []

    def log(e: TrainEvent) -> None:
        if e.gates is not None:
            gates.append((e.step, [[round(g, 3) for g in layer] for layer in e.gates]))
        hit = "" if e.search_hit is None else f"  search hit {e.search_hit:.3f}"
        hit += "" if e.memory_id_hit is None else f"  memory id hit {e.memory_id_hit:.3f}"
        hit += "" if e.memory_value_hit is None else f"  memory value hit {e.memory_value_hit:.3f}"
        print(f"{reader} K={keys} step {e.step:>6}  loss {e.loss:.4f}{hit}  {e.seconds:.0f}s", file=sys.stderr,
              flush=True)

    if reader == "full":
        from ragkit.memory.tasks import RecallBatches, RecallTask

        lengths = (args.segments, max(args.segments, args.segments_max))
        model = full_attention(args, lengths[1])
        protect = RecallTask.protect_with_sensory(args.segment_length, args.sensory)
        task = RecallTask(segment_length=args.segment_length, keys=keys, protect=protect, cue=True)
        config = TrainConfig(steps=10**6, batch_size=args.batch_size, segments=lengths, lr=args.lr,
                             max_seconds=args.budget, log_every=100, seed=args.seed, device=args.device,
                             keys_curriculum=args.keys_curriculum, min_lr_ratio=args.min_lr_ratio)
        result = train(model, RecallBatches(task), config, progress=log)
    else:
        recipe = recipe or recipe_of(reader, keys, args)
        lengths = tuple(recipe.schedule["segments"])
        done = run(recipe, out=args.save / f"{reader}-k{keys}" if args.save else None, device=args.device,
                   progress=log)
        model, result = done.model, done.result
        task = recall_task(recipe, model)
    hmt = reader == "hmt"
    return {"reader": reader, "keys": keys, "seed": args.seed, "recipe": recipe.to_json() if recipe else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_segments": list(lengths), "keys_curriculum": args.keys_curriculum,
            "min_lr_ratio": args.min_lr_ratio,
            "update": args.update if reader == "infini" else None,
            "search_supervision": [args.search_loss, args.search_teacher] if reader == "hmt" and keys > 1 else None,
            "memory_id_loss": args.memory_id_loss if hmt else None,
            "memory_tokens": args.memory_tokens if hmt else None,
            "memory_value_loss": args.memory_value_loss if reader != "full" else None,
            "probe_lr": args.probe_lr if reader != "full" and (args.memory_value_loss or args.memory_id_loss) else None,
            "memory_id_stages": args.memory_id_stages if hmt and args.memory_id_loss else None,
            "train": {"steps": result.steps, "seconds": result.seconds, "loss": result.loss,
                      "history": result.history, "gates": result.gates, "gate_history": gates[::5],
                      "search_hits": result.search_hits, "memory_id_hits": result.memory_id_hits,
                      "memory_value_hits": result.memory_value_hits},
            **evaluate_one(model, task, reader, args, deadline)}


def from_recipe(path: Path, args: argparse.Namespace, deadline: float | None) -> dict[str, Any]:
    """Train and evaluate the reader of a recipe file; the grid's settings that describe the run (sizes, budget,
    losses, lengths, sequences) are taken from it, so that tables and notes say what ran."""
    from ragkit.memory.recipes import apply_overrides, load_recipe

    written = load_recipe(path)
    recipe = apply_overrides(written, seed=args.seed if args.seed_given else None, eval_sequences=0)
    s, reader = recipe.schedule, recipe.reader
    keys = int(args.keys) if args.keys_given else recipe.task.get("keys", 1)
    recipe.task["keys"] = keys
    args.__dict__.update(recipe.tiny)
    args.__dict__.update(segment_length=recipe.segment_length, segments=s["segments"][0], segments_max=s["segments"][1],
                         budget=s.get("max_seconds"), steps=s.get("steps"), batch_size=s.get("batch_size", 16),
                         lr=s.get("lr", 1e-3), min_lr_ratio=s.get("min_lr_ratio", 0.1),
                         keys_curriculum=s.get("keys_curriculum", 0.0), seed=s.get("seed", 0),
                         update=recipe.settings.get("update", "linear"),
                         search_loss=s.get("search_loss", 0.0), search_teacher=s.get("search_teacher", 0.0),
                         memory_id_loss=s.get("memory_id_loss", 0.0), memory_value_loss=s.get("memory_value_loss", 0.0),
                         memory_tokens=recipe.settings.get("memory_tokens", 1), probe_lr=s.get("probe_lr"),
                         memory_id_stages="1,2" if recipe.memory_id_in_stage1 else "2",
                         stage1_steps=recipe.stage1.get("stage1_steps", 0), hmt_lr=s.get("hmt_lr") or 0.0,
                         sensory=recipe.settings.get("sensory_tokens", args.sensory),
                         cache=recipe.settings.get("cache_size", args.cache))
    args.sequences = written.evaluation.get("sequences", args.sequences)
    if "lengths" in written.evaluation:  # in segments: as multiples of the shortest trained length
        args.multiples = ",".join(str(max(1, n // args.segments)) for n in written.evaluation["lengths"])
    return run_one(reader, keys, args, deadline, recipe)


def full_attention_class() -> type:
    """FullAttention, defined once torch is imported."""
    from ragkit.memory.base import MemoryLM

    class FullAttention(MemoryLM):
        """The baseline without a memory: the backbone attends to the whole sequence at once, so its state (the
        prefix, or its KV cache) grows with what was read. `read` and `forward(reset=False)` follow the readers'
        protocol, so `evaluate_recall` scores it and `train` trains it as them; it has no parameters of its own."""

        kind = "full"
        label = "full attention"

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model
            self.config = None
            self.prefix: Tensor | None = None  # (b, n) every id read so far

        def adapter_parameters(self) -> list[nn.Parameter]:
            return []

        def reset(self) -> None:
            self.prefix = None

        def read(self, input_ids: Tensor) -> None:
            self.prefix = input_ids if self.prefix is None else torch.cat([self.prefix, input_ids], dim=1)

        def forward(self, input_ids: Tensor, reset: bool = True) -> Tensor:
            """Logits (b, n, V) of input_ids (b, n), attending to everything read before them unless `reset`."""
            if reset:
                self.reset()
            self.read(input_ids)
            return self.model(input_ids=self.prefix, use_cache=False).logits[:, -input_ids.shape[1]:]

    return FullAttention


def full_attention(args: argparse.Namespace, segments: int) -> Any:
    """A Llama of the readers' size whose positions cover `segments` segments: full attention, no memory."""
    from transformers import LlamaForCausalLM

    from ragkit.memory.tasks import tiny_llama_config

    torch.manual_seed(args.seed)
    config = tiny_llama_config(d_model=args.d_model, layers=args.layers, heads=args.heads,
                               segment_length=segments * args.segment_length)
    return full_attention_class()(LlamaForCausalLM(config))


def load_one(folder: Path, args: argparse.Namespace, deadline: float | None) -> dict[str, Any]:
    """Evaluate a reader saved by --save (or `ragkit reader train`) on the task it was trained on; the raw record."""
    from ragkit.memory.checkpoints import load_checkpoint, read_checkpoint_meta
    from ragkit.memory.recipes import Recipe, recall_task
    from ragkit.memory.tasks import RecallTask

    meta = read_checkpoint_meta(folder)
    model = load_checkpoint(folder, device=args.device)
    if meta["recipe"]:  # format 2: the recipe that made it
        recipe = Recipe(**meta["recipe"])
        task, segments = recall_task(recipe, model), recipe.schedule.get("segments")
    else:  # format 1: the task itself
        task, segments = RecallTask(**meta["task"]), meta.get("segments")
    return {"reader": meta["reader"], "keys": task.keys, "parameters": sum(p.numel() for p in model.parameters()),
            "train_segments": segments, "checkpoint": str(folder),
            **evaluate_one(model, task, meta["reader"], args, deadline)}


def evaluate_one(model: Any, task: Any, reader: str, args: argparse.Namespace,
                 deadline: float | None) -> dict[str, Any]:
    """Cells for every length of `args.multiples` (× `args.segments`) and mode; a length predicted to end after
    `deadline` (perf_counter seconds) is left out, the prediction scaling the last length's time by segments."""
    from ragkit.memory.recall_eval import evaluate_recall

    hmt = reader == "hmt"
    trained_cache = model.config.cache_size if hmt else None
    modes = args.modes.split(",")
    if reader == "full":  # nothing to shut, and no positions beyond the trained length
        modes = [m for m in modes if m != "shut"]
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    left_out: list[int] = []
    last: tuple[int, float] | None = None  # (segments, seconds) of the last length evaluated
    for multiple in (int(x) for x in args.multiples.split(",")):
        segments = args.segments * multiple
        if reader == "full" and segments > max(args.segments, args.segments_max):
            left_out.append(multiple)
            continue
        if deadline is not None and last is not None:
            if time.perf_counter() + last[1] * segments / last[0] > deadline:
                left_out.append(multiple)
                continue
        began = time.perf_counter()
        # HMT: the trained cache, and one that holds every segment once the trained one cannot
        caches: list[int | None] = [None]
        if hmt:
            caches = [trained_cache] if segments <= trained_cache + 1 else \
                {"both": [trained_cache, segments], "trained": [trained_cache], "wide": [segments]}[args.caches]
        for cache in caches:
            if hmt:
                model.config.cache_size = cache
            for c in evaluate_recall(model, task, [segments], sequences=args.sequences, batch_size=args.eval_batch,
                                     modes=modes, device=args.device):
                cells.append({**c.to_json(), "cache": cache, "multiple": multiple})
        if hmt:
            model.config.cache_size = trained_cache
        last = (segments, time.perf_counter() - began)
        print(f"{reader} K={task.keys}: evaluated {segments} segments in {last[1]:.0f} s", file=sys.stderr,
              flush=True)
    return {"eval_seconds": time.perf_counter() - started, "cells": cells, "left_out_multiples": left_out}


def tables(raw: dict[str, Any]) -> str:
    """One row per reader, K, length and cache: memory on (and its digits where the asked fact is alone in its
    segment, and where it shares it) / off / another sequence's, and the search hit."""
    seg = raw["config"]["segment_length"]
    lines = ["| reader | K | trained on (segments) | segments (tokens) | × shortest trained | cache N | memory on | "
             "on, fact alone in its segment | on, fact sharing it | memory off | memory of another sequence | "
             "search hit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in raw["runs"]:
        lo, hi = run.get("train_segments") or (raw["config"]["segments"],) * 2
        trained = f"{lo}" if lo == hi else f"{lo}-{hi}"
        by = {}
        for c in run["cells"]:
            by.setdefault((c["segments"], c["cache"], c["multiple"]), {})[c["mode"]] = c
        for (segments, cache, multiple), modes in sorted(by.items(), key=lambda x: (x[0][0], x[0][1] or 0)):
            on = modes.get("on")
            hit = search_hit_text(on)
            alone = f"{on['digit_alone']:.3f}" if on and on.get("digit_alone") is not None else ""
            shared = f"{on['digit_shared']:.3f}" if on and on.get("digit_shared") is not None else ""
            n = "" if cache is None else (f"{cache}" + (" (all)" if cache >= segments - 1 else " (compressed)"))
            lines.append(f"| {run_label(run)} | {run['keys']} | {trained} | {segments} ({segments * seg:,}) | "
                         f"{multiple}× | {n} | "
                         f"{recall_cell_text(on)} | {alone} | {shared} | {recall_cell_text(modes.get('shut'))} | "
                         f"{recall_cell_text(modes.get('other'))} | {hit} |")
    return "\n".join(lines)


def search_hit_text(on: dict[str, Any] | None) -> str:
    """The search hit of a memory-on cell (`hit_text`), or nothing."""
    from ragkit.memory.recall_eval import hit_text

    return hit_text(on.get("search_hit"), on.get("search_segment_hit")) if on else ""


def run_label(run: dict[str, Any]) -> str:
    """The reader, with the recipe options that differ from the defaults (Infini's delta rule, key curriculum, HMT's
    memories per segment, search supervision and memory id loss, the learning-rate floor, a seed other than 0)."""
    label = run["reader"]
    if run.get("update") == "delta":
        label += ", delta rule"
    if run.get("keys_curriculum"):
        label += f", key curriculum {run['keys_curriculum']:g}"
    if any(run.get("search_supervision") or []):
        label += ", search loss {:g}, teacher {:g}".format(*run["search_supervision"])
    if (run.get("memory_tokens") or 1) > 1:
        label += f", {run['memory_tokens']} memories per segment"
    if run.get("memory_id_loss"):
        label += f", memory id loss {run['memory_id_loss']:g}"
        if run.get("memory_id_stages", "1,2") != "1,2":
            label += f" (stage {run['memory_id_stages']})"
    if run.get("memory_value_loss"):
        label += f", memory value loss {run['memory_value_loss']:g}"
    if run.get("probe_lr"):
        label += f", probe lr {run['probe_lr']:g}"
    if run.get("min_lr_ratio", 0.1) != 0.1:
        label += f", lr floor {run['min_lr_ratio']:g}"
    if run.get("seed"):
        label += f", seed {run['seed']}"
    return label


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, args.name, args.at_once)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    deadline = started + args.deadline if args.deadline else None
    if args.recipe:
        runs = [from_recipe(path, args, deadline) for path in args.recipe]
    elif args.checkpoint:
        runs = [load_one(folder, args, deadline) for folder in args.checkpoint]
    else:
        runs = [run_one(reader, int(k), args, deadline) for reader in args.readers.split(",")
                for k in args.keys.split(",")]
    command = " ".join(["python benchmarks/bench_recall.py", *(argv if argv is not None else sys.argv[1:])])
    raw = {"config": vars(args), "runs": runs, "seconds": time.perf_counter() - started, "command": command}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "commit": commit(), **raw}, default=str) + "\n")
    elif args.no_record:
        print(json.dumps(raw, default=str))
        print(tables(raw))
    else:
        record(args.name, title(args, runs), raw, tables(raw), notes(args, runs, raw["seconds"]), command=command)
    return raw


def title(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    """The RESULTS.md heading: backbone, training lengths, budget, device."""
    lengths = {tuple(r["train_segments"]) for r in runs if r.get("train_segments")}
    trained = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in sorted(lengths)) or "?"
    names = {"infini": "Infini-attention", "hmt": "HMT", "full": "full attention"}
    readers = list(dict.fromkeys(names.get(r["reader"], r["reader"]) for r in runs))
    which = " and ".join([", ".join(readers[:-1]), readers[-1]] if len(readers) > 1 else readers)
    taught = [what for what, on in (("search supervision", any(any(r.get("search_supervision") or []) for r in runs)),
                                    ("memory id loss", any(r.get("memory_id_loss") for r in runs)),
                                    ("memory value loss", any(r.get("memory_value_loss") for r in runs))) if on]
    supervised = f" with {' and '.join(taught)}" if taught else ""
    task = "Passkey recall" if all(r["keys"] == 1 for r in runs) else "Associative recall"
    budget = f"{args.budget:.0f} s" if args.budget else f"{args.steps:,} steps"
    return (f"{task}{supervised}, {which}, {args.layers} layers × d_model {args.d_model}, "
            f"trained on {trained} segments of {args.segment_length} tokens, {budget} each ({args.device})")


def notes(args: argparse.Namespace, runs: list[dict[str, Any]], seconds: float) -> str:
    """What each run was (parameters, steps, loss, lengths left out) and the recipe, under the table."""
    def left_out(run: dict[str, Any]) -> str:
        if not run.get("left_out_multiples"):
            return ""
        why = "no positions beyond its trained length" if run["reader"] == "full" else "past the deadline"
        return f" (left out: {', '.join(f'{m}×' for m in run['left_out_multiples'])}, {why})"

    text = "; ".join(f"{run_label(r)} K={r['keys']}: {r['parameters']:,} parameters" + (
        f", {r['train']['steps']:,} steps in {r['train']['seconds']:.0f} s, final loss {r['train']['loss']:.3f}"
        if "train" in r else f", saved reader {r['checkpoint']}") + left_out(r) for r in runs)
    hmt = (f"; HMT k = {args.sensory}, stage 1 {args.stage1_steps} steps; search loss, teacher-forced search (it "
           f"ends once the search finds the asked memory for 90% of questions) and memory id loss as each row's "
           f"label says (none where it says nothing), HMT's own parameters at lr {args.hmt_lr:g} where one is on"
           if any(r["reader"] == "hmt" for r in runs) else "")
    return text + (f". Batch {args.batch_size}, lr {args.lr:g}{hmt}. "
                   f"Cells: digit accuracy / whole-value accuracy; chance 0.10 / 0.00001; fact alone: the digits of "
                   f"the questions whose fact shares its segment with no other fact; sharing it: the others. "
                   f"Whole command {seconds:.0f} s.")


def combine(files: list[Path], name: str, at_once: int | None = None) -> dict[str, Any]:
    """One RESULTS.md entry for runs made in parallel (--out), `at_once` at a time (None: all), with the machine and
    commit they ran on."""
    parts = [json.loads(f.read_text()) for f in files]
    first = parts[0]
    args = argparse.Namespace(**first["config"])
    runs = [{"seed": part["config"].get("seed", 0), **run} for part in parts for run in part["runs"]]
    seconds = max(part["seconds"] for part in parts)
    raw = {"config": first["config"], "runs": runs, "seconds": seconds,
           "commands": [part["command"] for part in parts]}
    commands = "; ".join(f"`{part['command']}`" for part in parts)
    if len(parts) == 1:
        ran, command = f"The command: {commands}.", "1 command, listed below"
    else:
        together = "at once" if at_once is None or at_once >= len(parts) else \
            f"{at_once} at a time, in the order listed,"
        ran = f"The {len(parts)} commands ran {together} on one machine: {commands}."
        command = f"{len(parts)} commands, listed below"
    record(name, title(args, runs), raw, tables(raw), f"{notes(args, runs, seconds)} {ran}", command=command,
           header={"machine": first["machine"], "commit": first["commit"]})
    return raw


if __name__ == "__main__":
    main()
