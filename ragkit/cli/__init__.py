"""The `ragkit` command: parses flags, calls the library, renders results with Rich. Nothing heavy at import.

Commands of the library's search side are here; `reader` holds `ragkit reader …`, `common` what both share
(consoles, user errors, --json)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ragkit.cli.common import CollectionOpt, IndexOpt, JsonOpt, err, out
from ragkit.cli.common import print_json as _print_json
from ragkit.cli.common import user_errors as _user_errors

app = typer.Typer(
    help="Local-first search and question answering over folders of long documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold "[default: …]", which is not Rich markup
)
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="dense | bm25 | late | hybrid [default: hybrid].")]
FusionOpt = Annotated[Optional[str], typer.Option(
    "--fusion", help="How hybrid fuses its retrievers: rrf | convex [default: rrf].")]
KOpt = Annotated[Optional[int], typer.Option("-k", "--top-k", help="Number of hits [default: 10; ask: 5].", min=1)]
ReaderOpt = Annotated[Optional[str], typer.Option(
    "--reader", help="generate (a language model writes the answer, citing passages as [n]) | extractive (cited "
                     "sentences) | infini | hmt (a language model with memory reads the whole documents) "
                     "[default: generate; extractive when no reader model can be loaded].")]
SummaryReaderOpt = Annotated[Optional[str], typer.Option(
    "--reader", help="generate (sections, then their summaries) | infini | hmt (the document streams through "
                     "memory) [default: generate].")]
ReaderModelOpt = Annotated[Optional[str], typer.Option(
    "--reader-model", help="Reader language model: HF causal LM id, local folder, .gguf file, or 'embedded' (the "
                           "embedded SmolLM2-135M-Instruct) [default: Qwen/Qwen2.5-0.5B-Instruct; the embedded model "
                           "when that cannot be loaded].")]
ReaderWindowOpt = Annotated[Optional[int], typer.Option(
    "--reader-window", help="Most tokens of the prompt the reader model reads (question and passages) [default: "
                            "what fits the model with the answer].", min=1)]
AdapterOpt = Annotated[Optional[str], typer.Option(
    "--adapter", help="Folder of a trained memory adapter; without --reader-model it reads with the backbone it "
                      "was trained on [default: none: the untrained memory].")]
PathsOpt = Annotated[Optional[list[str]], typer.Option(
    "--path", help="Only search files with this relative path or glob (repeatable) [default: every file].")]
DenseModelOpt = Annotated[Optional[str], typer.Option(
    "--dense-model", help="sentence-transformers model id or local path [default: the index's model; for a new "
                          "index Alibaba-NLP/gte-modernbert-base].")]
DenseBackendOpt = Annotated[Optional[str], typer.Option(
    "--dense-backend", help="How the dense model runs: torch | onnx (ONNX Runtime, the same vectors) | onnx-int8 "
                            "(int8 weights: faster, vectors close to torch's) [default: the index's; torch].")]
LateModelOpt = Annotated[Optional[str], typer.Option(
    "--late-model", help="PyLate ColBERT model id or local path; a model without a ColBERT head compares its own "
                         "token vectors [default: the index's model; for a new index "
                         "lightonai/GTE-ModernColBERT-v1].")]
LateOpt = Annotated[Optional[bool], typer.Option(
    "--late/--no-late", help="Build the late-interaction (ColBERT + PLAID) stage [default: as the index was built; "
                             "on for a new index].")]


def main() -> int | None:
    """Console-script entry point. With --json, a usage error (an unknown option, a value out of range) is also
    printed as a JSON error object on stdout; it exits 2, as usage errors do."""
    if "--json" not in sys.argv[1:]:
        return app()
    from typer.main import get_command

    # click's ClickException, or that of the copy of click a newer typer carries
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        return get_command(app).main(standalone_mode=False)
    except click_exception as e:
        print(json.dumps({"error": e.format_message()}))
        e.show()
        return e.exit_code
    except typer.Abort:
        err.print("[yellow]Aborted.[/]")
        return 1


def _show_version(value: bool) -> None:
    if value:
        from ragkit import __version__

        print(f"ragkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print ragkit's version and exit.")] = False) -> None:
    """Local-first search and question answering over folders of long documents."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # a name that is not UTF-8 (a folder, a model path) prints escaped, not as a crash
        reconfigure(errors="backslashreplace")


def _open(index: Optional[Path], **overrides: Any):
    from ragkit.api import Index
    from ragkit.config import load_settings

    settings = load_settings(index=str(index) if index else None, **overrides)
    return Index(settings.index, settings)


@app.command()
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of documents to index.")],
    index: IndexOpt = None,
    dense_model: DenseModelOpt = None,
    dense_backend: DenseBackendOpt = None,
    late_model: LateModelOpt = None,
    late: LateOpt = None,
    pool_factor: Annotated[Optional[int], typer.Option(
        help="Pool document token vectors by this factor (2 halves the late index) [default: the index's; 1].",
        min=1)] = None,
    late_candidates: Annotated[Optional[str], typer.Option(
        help="Candidate stage of late search over collections above late_exact_max_tokens (1M tokens), re-ranked "
             "by exact MaxSim: centroids (centroid interaction) | plaid (fast-plaid) [default: the index's; "
             "centroids].")] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option(
        help="Largest chunk in tokens, bounded by the models [default: the index's; 8192].")] = None,
    context_tokens: Annotated[Optional[int], typer.Option(
        help="Tokens of the file name and heading path the dense encoder and BM25 read before each chunk "
             "(0: none) [default: the index's; 32].", min=0)] = None,
    follow_links: Annotated[Optional[bool], typer.Option(
        "--follow-links/--no-follow-links",
        help="Follow symlinks that lead outside the folder [default: no: they are listed as skipped].")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, … [default: chosen by torch].")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-encode everything from scratch.")] = False,
    shards: Annotated[Optional[int], typer.Option(
        help="Make a new index of N shards, each the index of the files whose path hashes to it; search merges "
             "them as one [default: one unsharded index; a sharded index keeps its number].", min=1)] = None,
    engine: Annotated[str, typer.Option(
        help="Where files are parsed and chunks encoded: local (this process) | ray (a Ray cluster through Ray "
             "Data; pip install 'ragkit[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to connect to, for --engine ray [default: a local Ray instance for this run].")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Encoding actors for --engine ray, and the CPUs of its local Ray instance [default: the cluster's "
             "GPUs, else its CPUs].", min=1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Index a folder (incremental: only new and changed files are encoded)."""
    with _user_errors(as_json, writes_index=True):
        from ragkit.engines import open_engine

        idx = _open(index, dense_model=dense_model, dense_backend=dense_backend, late_model=late_model, late=late,
                    pool_factor=pool_factor, late_candidates=late_candidates,
                    chunk_tokens=chunk_tokens, context_tokens=context_tokens, follow_links=follow_links,
                    device=device)
        with open_engine(engine, address, workers) as runner, _progress_bar(enabled=not as_json) as progress:
            report = idx.add(folder, progress=progress, rebuild=rebuild, shards=shards, engine=runner)
        if as_json:
            _print_json(report.to_json())
        else:
            _render_index_report(report, idx.path)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    index: IndexOpt = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    fusion: FusionOpt = None,
    paths: PathsOpt = None,
    backend: Annotated[Optional[str], typer.Option(
        "--backend", help="Where dense and late candidates come from: local | qdrant (the collection `ragkit export "
                          "qdrant` wrote) [default: local].")] = None,
    qdrant_path: Annotated[Optional[Path], typer.Option(
        "--qdrant-path", help="Folder of the Qdrant collection in local mode [default: the qdrant_path "
                              "setting].")] = None,
    qdrant_url: Annotated[Optional[str], typer.Option(
        "--qdrant-url", help="URL of a Qdrant server [default: the qdrant_url setting].")] = None,
    collection: CollectionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the index and list the best chunks (evidence highlighted)."""
    with _user_errors(as_json):
        idx = _open(index, mode=mode, k=k, fusion=fusion, backend=backend,
                    qdrant_path=str(qdrant_path) if qdrant_path else None, qdrant_url=qdrant_url,
                    qdrant_collection=collection)
        hits = idx.search(query, paths=paths)
        if as_json:
            _print_json({"hits": [h.to_json() for h in hits]})
            return
        table = Table("#", "score", "where", "snippet", show_lines=True)
        for rank, hit in enumerate(hits, start=1):
            table.add_row(str(rank), f"{hit.score:.4f}", escape(_where(hit.chunk)), _snippet(hit))
        out.print(table if hits else "[yellow]No hits.[/]")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="A question about the indexed documents.")],
    index: IndexOpt = None,
    k: KOpt = None,
    mode: ModeOpt = None,
    fusion: FusionOpt = None,
    paths: PathsOpt = None,
    reader: ReaderOpt = None,
    reader_model: ReaderModelOpt = None,
    reader_window: ReaderWindowOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer a question from the indexed documents, with citations (a generated answer appears as it is
    written)."""
    with _user_errors(as_json):
        idx = _open(index, mode=mode, fusion=fusion, reader=reader, reader_model=reader_model,
                    reader_window=reader_window, adapter=adapter)
        stream = None if as_json else _Stream()
        answer = idx.ask(question, k=k, paths=paths, on_token=stream)
        if as_json:
            _print_json(answer.to_json())
            return
        if not stream.finish():
            out.print(escape(answer.answer), soft_wrap=True)
        if answer.citations:
            out.print()
        from ragkit.cite import location

        for n, c in answer.numbered():
            where = location(c.hit.chunk.path, c.start_line, c.end_line, c.page, c.end_page)
            out.print(f"[bold][{n}][/] [cyan]{escape(where)}[/]"
                      + (f"  [dim]{escape(c.hit.chunk.heading)}[/]" if c.hit.chunk.heading else ""))


def _check_output_file(path: Path, option: str) -> None:
    """Stop before any work when `path` cannot be written as a file."""
    import os

    from ragkit.errors import RagkitError

    if path.is_dir():
        raise RagkitError(f"{option} {path} is a folder; give the name of a file")
    if not path.parent.is_dir():
        raise RagkitError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise RagkitError(f"{option} {path} cannot be written (permission denied)")


class _Stream:
    """Prints a generated answer's pieces on stdout as they come."""

    def __init__(self) -> None:
        self.printed = False

    def __call__(self, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
        self.printed = True

    def finish(self) -> bool:
        """End the streamed line; whether anything was streamed."""
        if self.printed:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return self.printed


@app.command()
def summarize(
    path: Annotated[Path, typer.Argument(help="The document to summarize (any format ragkit reads).")],
    reader: SummaryReaderOpt = None,
    reader_model: ReaderModelOpt = None,
    reader_window: ReaderWindowOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarize a whole document with the reader model (documents longer than its window are summarized section
    by section, then from those summaries; a memory reader streams the document through its memory instead)."""
    with _user_errors(as_json):
        from ragkit.api import summarize_file
        from ragkit.config import load_settings

        settings = load_settings(reader=reader, reader_model=reader_model, reader_window=reader_window,
                                 adapter=adapter)
        stream = None if as_json else _Stream()
        result = summarize_file(path, settings, reader=reader, on_token=stream)
        if as_json:
            _print_json(result)
        elif not stream.finish():
            out.print(escape(result["summary"]), soft_wrap=True)


@app.command()
def status(index: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the index holds."""
    with _user_errors(as_json):
        info = _open(index).status()
        if as_json:
            _print_json(info)
            return
        table = Table(show_header=False, box=None)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # long paths wrap rather than end in "…"
        dense = info["models"]["dense"]
        rows = [
            ("index", info["index"]),
            ("folder", info["root"]),
            ("files", f"{info['files']:,}"),
            ("chunks", f"{info['chunks']:,}"),
            ("tokens", f"{info['tokens']:,}"),
            ("dense model", f"{dense['model']} ({dense['dim']}-d, ≤{dense['max_tokens']} tokens, "
                            f"{dense.get('backend', 'torch')})" + (
                f"; the embedded model, as the default could not be loaded: {info['settings']['dense_fallback']}"
                if info["settings"].get("dense_fallback") else "")),
            ("late model", _late_summary(info["models"].get("late"), info["settings"])),
            ("reader", _reader_summary(info["reader"])),
            ("skipped files", str(len(info["skipped"]))),
            ("size on disk", _human_bytes(info["size_bytes"])),
            ("last run", f"{info['created']} ({_run_summary(info['last_run'])})"),
        ]
        for key, value in rows:
            table.add_row(f"[bold]{key}[/]", escape(value))
        out.print(table)


@app.command(name="eval")
def eval_(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder: docs/ and questions.jsonl.")],
    questions: Annotated[Optional[Path], typer.Option(help="Another questions file of the same format [default: DATASET/questions.jsonl].")] = None,
    index: Annotated[Optional[Path], typer.Option(
        "--index", help="Index folder, built or brought up to date here [default: a cache folder per dataset and "
                        "dense model].")] = None,
    mode: ModeOpt = None,
    k: Annotated[int, typer.Option("-k", help="Depth of the ranking metrics.", min=1)] = 10,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N questions [default: all].", min=1)] = None,
    dense_model: DenseModelOpt = None,
    dense_backend: DenseBackendOpt = None,
    late_model: LateModelOpt = None,
    late: LateOpt = None,
    fusion: FusionOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-encode the dataset's index from scratch.")] = False,
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="Write per-question results (JSONL) to this file [default: none].")] = None,
    answers: Annotated[bool, typer.Option(help="Also run the reader and score its answers.")] = True,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also rank with each single retriever (dense, BM25, late) and show them beside hybrid "
                          "search.")] = False,
    reader: ReaderOpt = None,
    reader_model: ReaderModelOpt = None,
    reader_window: ReaderWindowOpt = None,
    adapter: AdapterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure retrieval and answers on a dataset with gold documents and answers."""
    with _user_errors(as_json, writes_index=True):
        from ragkit.config import load_settings
        from ragkit.evaluate import run_dataset

        if out_file is not None:
            _check_output_file(out_file, "--out")
        settings = load_settings(dense_model=dense_model, dense_backend=dense_backend, late_model=late_model,
                                 late=late, mode=mode, fusion=fusion,
                                 reader=reader, reader_model=reader_model, reader_window=reader_window,
                                 adapter=adapter)
        with _progress_bar(enabled=not as_json) as progress:
            report, _ = run_dataset(dataset, settings, index_dir=index, questions_file=questions, k=k,
                                    limit=limit, answer=answers, progress=progress, rebuild=rebuild,
                                    compare=compare)
        summary = report.summary
        if out_file:
            with open(out_file, "w", encoding="utf-8") as f:
                for record in report.per_question:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if as_json:
            _print_json(summary)
            return
        reader_name = f" · {summary['reader']}" + (f" ({summary['model']})" if summary.get("model") else "") \
            if summary.get("reader") else ""
        table = Table("metric", "value", title=f"{summary['dataset']} · {summary['mode']}{reader_name} · "
                      f"{summary['questions']} questions", title_justify="left")
        for key, value in summary.items():
            if key not in ("dataset", "mode", "index", "questions", "reader", "model", "modes"):
                table.add_row(key, _number(value))
        out.print(table)
        if summary.get("modes"):
            modes = summary["modes"]
            side = Table("metric", *modes, title="Each retriever beside hybrid search", title_justify="left")
            for key in next(iter(modes.values())):
                side.add_row(key, *(_number(modes[mode][key]) for mode in modes))
            out.print(side)
        if out_file:
            out.print(f"Per-question results: {escape(str(out_file))}")


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _reader_summary(plan: dict[str, Any]) -> str:
    if plan["model"] is None:
        return plan["reader"] + (f" ({plan['reason']})" if plan.get("reason") else "")
    embedded = f"; the embedded model, as {plan['reason']}" if plan.get("embedded") else ""
    return f"{plan['reader']}, {plan['model']}{embedded}"


def _late_summary(late: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    if not late:
        skipped = settings.get("late_skipped")
        return f"none (skipped: {skipped})" if skipped else "none (built with --no-late)"
    details = f", pool factor {settings['pool_factor']}" if (settings.get("pool_factor") or 1) > 1 else ""
    details += f", {settings.get('late_candidates') or 'plaid'} candidates for large collections"
    identity = ", no ColBERT head: its own token vectors (identity projection)" \
        if late.get("projection") == "identity" else ""
    return f"{late['model']} ({late['dim']}-d per token, ≤{late['document_length']} tokens{details}{identity})"


def _render_index_report(report, index_path: Path) -> None:
    for warning in report.warnings:
        err.print(f"[yellow]Warning:[/] {escape(warning)}", soft_wrap=True)
    if report.rebuilt:
        err.print(f"[yellow]Rebuilt every file:[/] {escape(report.rebuilt)}")
    out.print(f"[bold green]Indexed[/] into {escape(str(index_path))}: {_run_summary(report.to_json())}, "
              f"{report.chunks:,} chunks in total ({report.seconds:.1f} s)")
    if report.encoded_tokens and report.seconds:
        out.print(f"Encoded {report.encoded_chunks:,} chunks, {report.encoded_tokens:,} tokens.")
    if report.skipped:
        table = Table("skipped file", "reason", title=f"{len(report.skipped)} skipped", title_justify="left")
        for s in report.skipped:
            table.add_row(escape(s.path), escape(s.reason))
        out.print(table)


def _run_summary(run: dict[str, Any]) -> str:
    return ", ".join(f"{run.get(key, 0)} {key}" for key in ("added", "updated", "removed", "unchanged"))


@contextmanager
def _progress_bar(enabled: bool):
    """A Rich progress bar on stderr fed by the library's progress events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda event: None
        return
    if not err.is_terminal:
        yield _progress_lines()
        return
    columns = [TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(event) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total, rate="")
            task_id = tasks[event.stage]
            elapsed = bar.tasks[task_id].elapsed or 0.0
            rate = f"{event.done / elapsed:,.1f} chunks/s" if event.stage == "encode" and elapsed > 0 else ""
            bar.update(task_id, completed=event.done, total=event.total, rate=rate)

        yield update


def _progress_lines():
    """Progress as plain lines on stderr (logs, pipes, CI): one when a stage starts and one when it ends."""
    started: set[str] = set()
    finished: set[str] = set()

    def update(event) -> None:
        first = event.stage not in started
        last = event.done >= event.total and event.stage not in finished
        if not (first or last):
            return
        started.add(event.stage)
        if last:
            finished.add(event.stage)
        tokens = f", {event.tokens:,} tokens" if event.tokens else ""
        print(f"ragkit: {event.stage} {event.done}/{event.total}{tokens}", file=sys.stderr, flush=True)

    return update


def _where(chunk) -> str:
    from ragkit.cite import location

    where = location(chunk.path, chunk.start_line, chunk.end_line, chunk.page, chunk.end_page)
    return where + (f"\n{chunk.heading}" if chunk.heading else "")


def _snippet(hit, limit: int = 240):
    """A window of the hit's text around its best evidence, evidence spans highlighted."""
    from rich.text import Text

    from ragkit.evidence import snippet_bounds

    text = hit.chunk.text
    start, end = snippet_bounds(len(text), hit.evidence[0].start if hit.evidence else 0, limit)
    window = Text(("…" if start else "") + text[start:end] + ("…" if end < len(text) else ""))
    shift = 1 if start else 0
    for e in hit.evidence:
        a, b = max(e.start, start), min(e.end, end)
        if a < b:
            window.stylize("bold yellow", a - start + shift, b - start + shift)
    return _fold(window)


def _fold(text):
    """Collapse runs of whitespace in a Rich Text, keeping its styles."""
    import re

    from rich.text import Text

    out = Text()
    for match in re.finditer(r"\S+|\s+", text.plain):
        piece = text[match.start() : match.end()]
        out.append(" " if match.group().isspace() else piece)
    return out


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


from ragkit.cli.reader import reader_app  # noqa: E402  (after `app`: the sub-app imports nothing heavy)

app.add_typer(reader_app, name="reader")

from ragkit.cli.export import export_app  # noqa: E402
from ragkit.cli.serve import mcp, serve  # noqa: E402

app.add_typer(export_app, name="export")

app.command()(serve)
app.command()(mcp)

if __name__ == "__main__":
    sys.exit(main())
