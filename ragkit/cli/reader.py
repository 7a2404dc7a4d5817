"""`ragkit reader …`: train memory readers from a recipe and show their recall. Thin: reads the options, calls
ragkit.memory.recipes, renders progress and results with Rich. Nothing heavy at import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ragkit.cli.common import err, out, user_errors

if TYPE_CHECKING:
    from rich.progress import Progress

    from ragkit.progress import ProgressEvent
    from ragkit.memory.train import TrainEvent

reader_app = typer.Typer(help="Train memory readers (Infini-attention, HMT) and measure their recall.",
                         no_args_is_help=True,
                         add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

@reader_app.callback()
def _readers() -> None:
    """Train memory readers (Infini-attention, HMT) and measure their recall."""


@reader_app.command()
def train(
    recipe: Annotated[Path, typer.Option("--recipe", help="The run: a recipe file (recipes/*.toml): backbone, task, "
                                                          "schedule, losses, evaluation.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint folder.")] = Path("reader-checkpoint"),
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Optimizer steps instead of the recipe's (for hmt: both stages, stage 1 scaled).", min=1)]
    = None,
    max_seconds: Annotated[Optional[float], typer.Option(
        "--max-seconds", help="Stop after this much wall time (the schedule follows time).", min=1)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if "
                                                                   "available, else cpu).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the weights and the data, instead of the "
                                                               "recipe's.")] = None,
    eval_sequences: Annotated[Optional[int], typer.Option(
        "--eval-sequences", help="Recall sequences scored per length at the end, instead of the recipe's; 0: "
                                 "none.", min=0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Train a memory reader as a recipe says and write its checkpoint to --out.

    A recipe names the reader (infini or hmt) and its backbone (a pretrained causal LM, whose memory parameters
    alone train, or a tiny Llama trained from scratch), the task (synthetic recall or the next tokens of long
    documents), the schedule, the auxiliary losses and the evaluation. The recipes behind the published numbers
    are in recipes/; docs/memory-readers.md explains them.
    """
    with user_errors(as_json):
        try:
            _train(recipe, out_dir, steps, max_seconds, device, threads, seed, eval_sequences, as_json)
        except KeyboardInterrupt:
            err.print(f"[yellow]Interrupted.[/] The last checkpoint written to {escape(str(out_dir))}, if any, "
                      "is whole.")
            raise typer.Exit(130) from None


def _train(path: Path, out_dir: Path, steps: int | None, max_seconds: float | None, device: str | None,
           threads: int | None, seed: int | None, eval_sequences: int | None, as_json: bool) -> None:
    import torch

    from ragkit.errors import ConfigError
    from ragkit.memory.recipes import load_recipe, run

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available; use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    recipe = load_recipe(path, steps=steps, max_seconds=max_seconds, seed=seed, eval_sequences=eval_sequences)
    planned = recipe.schedule.get("steps", 1000)
    with _Bar(enabled=not as_json, steps=planned) as bar:
        done = run(recipe, out=out_dir, device=device, progress=bar.on_event, on_tokenize=bar.on_tokenize)
    summary = {**done.summary(), "recipe": str(path)}
    if as_json:
        print(json.dumps(summary))
        return
    _render(summary, done.cells)


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
    from ragkit.memory.recall_eval import hit_text

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
        recall = Table("mode", "segments", "digits right", "whole values right", "search hit", title="Recall")
        for c in cells:
            recall.add_row(c.mode, str(c.segments), f"{c.digit:.3f}", f"{c.value:.3f}",
                           hit_text(c.search_hit, c.search_segment_hit))
        out.print(recall)
