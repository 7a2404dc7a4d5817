"""`ragkit reader …`: train memory readers and check their recall. Thin: parses flags, calls ragkit.readers.train,
renders progress and results with Rich. Nothing heavy at import."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ragkit.cli.common import err, out, user_errors

if TYPE_CHECKING:
    from rich.progress import Progress

    from ragkit.progress import ProgressEvent
    from ragkit.readers.train import TrainEvent

reader_app = typer.Typer(help="Train memory readers (Infini-attention, HMT) and measure their recall.",
                         no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False)

@reader_app.callback()
def _readers() -> None:
    """Train memory readers (Infini-attention, HMT) and measure their recall."""


@reader_app.command()
def train(
    reader: Annotated[str, typer.Option("--reader", help="Which reader to train: infini | hmt.")] = "infini",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Backbone: a Hugging Face causal LM id or local path (only the gates, or HMT's parameters, "
                        "are trained).")] = None,
    tiny: Annotated[bool, typer.Option(
        "--tiny", help="A tiny Llama trained from scratch, all weights, on the synthetic recall task.")] = False,
    objective: Annotated[str, typer.Option("--objective", help="recall (synthetic keys) | lm (documents).")] = "recall",
    data: Annotated[Optional[Path], typer.Option("--data", help="Folder of long documents (--objective lm).")] = None,
    keys: Annotated[int, typer.Option("--keys", help="Facts per sequence (1: passkey; more: associative recall, the question's segment opening "
                  "with its cue).", min=1)] = 1,
    segment_length: Annotated[Optional[int], typer.Option(
        "--segment-length", help="Tokens per segment [default: 32 with --tiny, else 2048].", min=8)] = None,
    segments: Annotated[str, typer.Option(
        "--segments", help="Segments per sequence: N, or A-B to draw each batch's length from A..B.")] = "4",
    curriculum: Annotated[float, typer.Option(
        "--curriculum", help="Share of the run over which the longest length rises from A to B.", min=0, max=1)] = 0.0,
    keys_curriculum: Annotated[float, typer.Option(
        "--keys-curriculum", help="recall: share of the run (of stage 2 for hmt) trained on 1, 2, 4, … facts before "
                                  "--keys.", min=0, max=1)] = 0.0,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (for hmt: both stages together).", min=1)]
    = 1000,
    stage1_steps: Annotated[Optional[int], typer.Option(
        "--stage1-steps", help="hmt: steps of stage 1 (no memory search, --stage1-segments segments) [default: 2/7 of "
                               "--steps, the paper's 200 of 700].", min=0)] = None,
    stage2_steps: Annotated[Optional[int], typer.Option(
        "--stage2-steps", help="hmt: steps of stage 2 (memory search, --segments) [default: --steps minus stage 1].",
        min=1)] = None,
    stage1_segments: Annotated[int, typer.Option(
        "--stage1-segments", help="hmt: segments per sequence in stage 1.", min=1)] = 2,
    sensory_tokens: Annotated[Optional[int], typer.Option(
        "--sensory-tokens", help="hmt: k, token embeddings carried over from the previous segment [default: 8 with "
                                 "--tiny, else 32].", min=0)] = None,
    cache_size: Annotated[Optional[int], typer.Option(
        "--cache-size", help="hmt: N, memories kept for the search [default: 64 with --tiny, else 300].", min=1)]
    = None,
    memory_tokens: Annotated[Optional[int], typer.Option(
        "--memory-tokens", help="hmt: r, memories written per segment, all searched (the paper: 1), so that facts of "
                                "one segment need not share one memory [default: 1].", min=1)] = None,
    search_loss: Annotated[Optional[float], typer.Option(
        "--search-loss", help="hmt, recall: weight of a loss on the search weight of the asked fact's memory "
                              "[default: 0].", min=0)] = None,
    search_teacher: Annotated[Optional[float], typer.Option(
        "--search-teacher", help="hmt, recall: longest share of stage 2 in which the question reads the asked "
                                 "fact's memory itself; it ends once the search finds it for 90% of questions "
                                 "[default: 0].", min=0, max=1)] = None,
    memory_id_loss: Annotated[Optional[float], typer.Option(
        "--memory-id-loss", help="hmt, recall: weight of a loss making each segment's memory name the ids of its "
                                 "facts (a linear probe, trained alongside and not saved), in both stages; with "
                                 "--search-loss it lets the search find the asked fact [default: 0].", min=0)]
    = None,
    memory_value_loss: Annotated[Optional[float], typer.Option(
        "--memory-value-loss", help="recall: weight of a loss making the memory hold each fact's digits, read by a "
                                    "probe trained alongside and not saved (hmt: each memory given one fact, in both "
                                    "stages; infini: each layer's memory read with a query per id and digit) "
                                    "[default: 0].", min=0)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.", min=1)] = 16,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Learning rate of the trained weights [default: 1e-3 with --tiny, else 1e-4].")] = None,
    min_lr_ratio: Annotated[float, typer.Option(
        "--min-lr-ratio", help="Where the cosine decay ends, as a share of --lr (1: no decay).", min=0, max=1)] = 0.1,
    gate_lr: Annotated[Optional[float], typer.Option(
        "--gate-lr", help="Learning rate of the gates [default: 10 × --lr; 1e-2 when only gates train].")] = None,
    gate_warmup: Annotated[Optional[float], typer.Option(
        "--gate-warmup", help="Share of the run with the gates held at 0.5 [default: 0.4 when all weights train, "
                              "else 0].", min=0, max=1)] = None,
    train_all: Annotated[bool, typer.Option("--train-all", help="Train every weight of --model, not only the gates.")]
    = False,
    update: Annotated[str, typer.Option("--update", help="Memory update rule: linear | delta.")] = "linear",
    d_model: Annotated[int, typer.Option("--d-model", help="Width of the --tiny model.", min=8)] = 64,
    layers: Annotated[int, typer.Option("--layers", help="Layers of the --tiny model.", min=1)] = 2,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads of the --tiny model.", min=1)] = 2,
    max_seconds: Annotated[Optional[float], typer.Option(
        "--max-seconds", help="Stop after this much wall time (the schedule follows time).", min=1)] = None,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="Steps between checkpoints (0: only at the end).", min=0)] = 0,
    eval_sequences: Annotated[int, typer.Option(
        "--eval-sequences", help="Recall sequences scored at the end (memory on / gates shut / another sequence's "
                                 "memory); 0: none.", min=0)] = 64,
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint folder.")] = Path("reader-checkpoint"),
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 … [default: cuda if "
                                                                   "available, else cpu].")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the data.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Train a memory reader and write its checkpoint to --out.

    --tiny trains a small Llama from scratch (all weights) on synthetic key recall; --model wraps a pretrained
    causal LM and trains only its memory gates or HMT parameters (or everything, with --train-all). --reader hmt
    trains in the paper's two stages: --stage1-steps on --stage1-segments segments without memory search, then
    --stage2-steps on --segments with it.
    """
    opts = dict(locals())

    with user_errors(as_json):
        try:
            _train(opts)
        except KeyboardInterrupt:
            err.print(f"[yellow]Interrupted.[/] The last checkpoint written to {escape(str(out_dir))}, if any, "
                      "is whole.")
            raise typer.Exit(130) from None


def _train(opts: dict[str, Any]) -> None:
    import torch

    from ragkit.errors import ConfigError
    from ragkit.readers.tasks import RecallTask
    from ragkit.readers.train import (DocumentBatches, RecallBatches, TrainConfig, build_reader, evaluate_recall,
                                      stage1_recall_batches, train, train_two_stage)

    tiny, model_name, objective = opts["tiny"], opts["model"], opts["objective"]
    if tiny == (model_name is not None):
        raise ConfigError("choose the backbone: --model ID|PATH (a pretrained causal LM) or --tiny (from scratch)")
    if objective not in ("recall", "lm"):
        raise ConfigError(f"--objective must be recall or lm, got {objective!r}")
    if objective == "lm" and tiny:
        raise ConfigError("--objective lm needs a backbone with a tokenizer: use --model, or --objective recall")
    if objective == "lm" and opts["data"] is None:
        raise ConfigError("--objective lm needs --data FOLDER (long documents to model)")
    hmt = opts["reader"] == "hmt"
    if opts["reader"] not in ("infini", "hmt"):
        raise ConfigError(f"--reader must be infini or hmt, got {opts['reader']!r}")
    if not hmt and any(opts[k] is not None for k in ("stage1_steps", "stage2_steps", "sensory_tokens", "cache_size",
                                                     "memory_tokens", "search_loss", "search_teacher",
                                                     "memory_id_loss")):
        raise ConfigError("--stage1-steps, --stage2-steps, --sensory-tokens, --cache-size, --memory-tokens, "
                          "--search-loss, --search-teacher and --memory-id-loss are for --reader hmt")
    if objective != "recall" and any(opts[k] for k in ("search_loss", "search_teacher", "memory_id_loss",
                                                       "memory_value_loss")):
        raise ConfigError("--search-loss, --search-teacher, --memory-id-loss and --memory-value-loss need "
                          "--objective recall (where the facts are known)")
    if objective != "recall" and opts["keys_curriculum"]:
        raise ConfigError("--keys-curriculum needs --objective recall (it varies the facts per sequence)")
    if opts["update"] not in ("linear", "delta"):
        raise ConfigError(f"--update must be linear or delta, got {opts['update']!r}")
    lo, hi = parse_segments(opts["segments"])
    train_all = tiny or opts["train_all"]
    if not hmt and opts["memory_value_loss"] and not train_all:
        raise ConfigError("--memory-value-loss shapes what Infini-attention writes, which its gates alone cannot "
                          "change: add --train-all")
    segment_length = opts["segment_length"] or (32 if tiny else 2048)
    lr = opts["lr"] or (1e-3 if tiny else 1e-4)
    gate_lr = opts["gate_lr"] or (None if train_all else 1e-2)
    gate_warmup = opts["gate_warmup"] if opts["gate_warmup"] is not None else (0.4 if train_all else 0.0)
    device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available; use --device cpu")
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])

    model, tokenizer = build_reader(opts["reader"], model=model_name, tiny=tiny, segment_length=segment_length,
                                    update=opts["update"], d_model=opts["d_model"], layers=opts["layers"],
                                    heads=opts["heads"], seed=opts["seed"], sensory_tokens=opts["sensory_tokens"],
                                    cache_size=opts["cache_size"], memory_tokens=opts["memory_tokens"] or 1)
    protect = None
    if hmt:  # keep the facts out of the question's segment and out of the sensory tokens before it
        protect = RecallTask.protect_with_sensory(segment_length, model.config.sensory_tokens)
        stage1 = opts["stage1_steps"] if opts["stage1_steps"] is not None else round(opts["steps"] * 2 / 7)
        stage2 = opts["stage2_steps"] or opts["steps"] - stage1
        if stage2 < 1:
            raise ConfigError(f"--stage1-steps {stage1} leaves no step for stage 2 of --steps {opts['steps']}: "
                              "give --stage2-steps")
    else:
        stage1, stage2 = 0, opts["steps"]
    task = (RecallTask(segment_length=segment_length, keys=opts["keys"], protect=protect, cue=opts["keys"] > 1)
            if objective == "recall" else None)
    search_loss, search_teacher = opts["search_loss"] or 0.0, opts["search_teacher"] or 0.0
    memory_id_loss, memory_value_loss = opts["memory_id_loss"] or 0.0, opts["memory_value_loss"] or 0.0
    config = TrainConfig(steps=stage2, batch_size=opts["batch_size"], segments=(lo, hi), lr=lr,
                         search_loss=search_loss, search_teacher=search_teacher, memory_id_loss=memory_id_loss,
                         memory_value_loss=memory_value_loss,
                         hmt_lr=10 * lr if search_loss or memory_id_loss or memory_value_loss else None,
                         gate_lr=gate_lr, gate_warmup=gate_warmup, gate_hold=0.0 if tiny else None,
                         train_all=train_all, length_curriculum=opts["curriculum"],
                         keys_curriculum=opts["keys_curriculum"], min_lr_ratio=opts["min_lr_ratio"],
                         max_seconds=opts["max_seconds"],
                         log_every=max(1, min(10, (stage1 + stage2) // 100 or 1)),
                         checkpoint_every=opts["checkpoint_every"], seed=opts["seed"], device=device)
    meta = {"objective": objective, "task": asdict(task) if task else None, "data": str(opts["data"] or "")}
    with _Bar(enabled=not opts["as_json"], steps=stage1 + stage2) as bar:
        if task is not None:
            batches = RecallBatches(task)
            stage1_batches = stage1_recall_batches(task) if hmt else None
        else:
            batches = DocumentBatches(opts["data"], tokenizer, segment_length, progress=bar.on_tokenize)
            stage1_batches = None
        if hmt:
            result = train_two_stage(model, batches, config, stage1_steps=stage1,
                                     stage1_segments=opts["stage1_segments"], progress=bar.on_event,
                                     out=opts["out_dir"], meta=meta, stage1_batches=stage1_batches)
        else:
            result = train(model, batches, config, progress=bar.on_event, out=opts["out_dir"], meta=meta)
    cells = []
    if task is not None and opts["eval_sequences"]:
        cells = evaluate_recall(model, task, [hi], sequences=opts["eval_sequences"], device=device)
    summary = {**result.to_json(), "device": device, "eval": [c.to_json() for c in cells]}
    if opts["as_json"]:
        print(json.dumps(summary))
        return
    _render(summary, cells)


def parse_segments(text: str) -> tuple[int, int]:
    """'4' → (4, 4); '4-16' → (4, 16).

    >>> parse_segments("4"), parse_segments("4-16")
    ((4, 4), (4, 16))
    """
    from ragkit.errors import ConfigError

    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--segments must be N or A-B with 1 ≤ A ≤ B, got {text!r}")
    return parts[0], parts[1]


class _Bar:
    """A Rich progress bar on stderr fed by the training callback (or nothing, for --json)."""

    def __init__(self, enabled: bool, steps: int) -> None:
        self.progress: Progress | None = None
        self.steps = steps
        self.train_task: Any = None
        self.tokenize_task: Any = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=err)

    def __enter__(self) -> _Bar:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def on_event(self, event: TrainEvent) -> None:
        """Render a TrainEvent: step, loss and the mean gate value of each layer."""
        if self.progress is None:
            return
        if self.train_task is None:
            self.train_task = self.progress.add_task("train", total=self.steps, info="")
        info = f"loss {event.loss:.4f}"
        if event.gates:
            info += "  gates " + " ".join(f"{sum(layer) / len(layer):.2f}" for layer in event.gates)
            info += " (held)" if event.gates_frozen else ""
        if event.search_hit is not None:
            info += f"  search hit {event.search_hit:.2f}"
        if event.memory_id_hit is not None:
            info += f"  memory id hit {event.memory_id_hit:.2f}"
        if event.memory_value_hit is not None:
            info += f"  memory value hit {event.memory_value_hit:.2f}"
        self.progress.update(self.train_task, completed=event.step, info=info)

    def on_tokenize(self, event: ProgressEvent) -> None:
        """Render the tokenization of the --data documents."""
        if self.progress is None:
            return
        if self.tokenize_task is None:
            self.tokenize_task = self.progress.add_task("tokenize", total=event.total, info="")
        self.progress.update(self.tokenize_task, completed=event.done, info=f"{event.tokens:,} tokens")


def _render(summary: dict[str, Any], cells: list[Any]) -> None:
    from ragkit.readers.train import hit_text

    table = Table(show_header=False, box=None)
    table.add_row("steps", f"{summary['steps']:,} in {summary['seconds']:.0f} s ({summary['device']})")
    table.add_row("tokens", f"{summary['tokens']:,}")
    table.add_row("final loss", f"{summary['loss']:.4f}")
    if summary["gates"]:
        for i, layer in enumerate(summary["gates"]):
            table.add_row(f"gates, layer {i}", " ".join(f"{g:.3f}" for g in layer))
    table.add_row("checkpoint", escape(str(summary["checkpoint"])))
    out.print(table)
    if cells:
        recall = Table("mode", "segments", "digits right", "whole values right", "search hit",
                       title="Recall at the longest length")
        for c in cells:
            recall.add_row(c.mode, str(c.segments), f"{c.digit:.3f}", f"{c.value:.3f}",
                           hit_text(c.search_hit, c.search_segment_hit))
        out.print(recall)
