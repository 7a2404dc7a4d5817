"""The `ragkit` command as a user meets it: JSON shapes, clear errors, configuration, fast start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit import store
from ragkit.cli import app

runner = CliRunner()
HIT_KEYS = {"path", "start_line", "end_line", "page", "heading", "score", "text"}


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def run_json(*args: str) -> dict:
    code, stdout, stderr = run(*args, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "oil.txt").write_text("The oil crisis began in October 1973.\nPrices rose fourfold.\n")
    (folder / "fox.md").write_text("# Animals\n\nThe quick brown fox jumps over the lazy dog.\n")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


@pytest.fixture
def indexed(tmp_path, docs, tiny_encoder, tiny_colbert) -> Path:
    index = tmp_path / "index"
    run_json("index", str(docs), "--index", str(index), "--dense-model", str(tiny_encoder), "--late-model", str(tiny_colbert))
    return index


def test_index_json_shape(tmp_path, docs, tiny_encoder, tiny_colbert):
    data = run_json("index", str(docs), "--index", str(tmp_path / "i"), "--dense-model", str(tiny_encoder), "--late-model", str(tiny_colbert))
    assert {"added", "updated", "removed", "unchanged", "skipped", "chunks"} <= set(data)
    assert data["added"] == 2 and data["chunks"] >= 2
    assert data["skipped"] == [{"path": "photo.jpg", "reason": "unsupported file type .jpg"}]


def test_search_json_shape(indexed):
    data = run_json("search", "oil crisis", "--index", str(indexed), "-k", "2", "--mode", "bm25")
    assert len(data["hits"]) == 1
    hit = data["hits"][0]
    assert HIT_KEYS <= set(hit)
    assert hit["path"] == "oil.txt" and hit["start_line"] == 1 and hit["end_line"] == 2 and hit["page"] is None


def test_ask_json_cites_lines(indexed):
    data = run_json("ask", "When did the oil crisis begin?", "--index", str(indexed), "--mode", "bm25",
                    "--reader", "extractive")
    assert "October 1973" in data["answer"] and "[1]" in data["answer"]
    assert (data["reader"], data["model"], data["citations"][0]["n"]) == ("extractive", None, 1)
    first = data["citations"][0]
    assert HIT_KEYS <= set(first)
    assert (first["path"], first["start_line"], first["end_line"]) == ("oil.txt", 1, 1)


def test_ask_renders_citations(indexed):
    code, stdout, _ = run("ask", "When did the oil crisis begin?", "--index", str(indexed))
    assert code == 0
    assert "[1] oil.txt:1" in stdout


def test_status_json(indexed, tiny_encoder, tiny_colbert):
    data = run_json("status", "--index", str(indexed))
    assert data["files"] == 2 and data["chunks"] >= 2
    assert data["models"]["dense"]["model"] == str(tiny_encoder.resolve())
    assert data["size_bytes"] > 0 and data["skipped"][0]["path"] == "photo.jpg"


def test_search_table(indexed):
    code, stdout, _ = run("search", "fox", "--index", str(indexed), "--mode", "bm25")
    assert code == 0 and "fox.md" in stdout and "Animals" in stdout


def test_missing_index_is_a_clear_error(tmp_path):
    code, stdout, stderr = run("search", "x", "--index", str(tmp_path / "none"))
    assert code == 1
    assert "no index at" in stderr and "Traceback" not in stderr + stdout
    code, stdout, _ = run("search", "x", "--index", str(tmp_path / "none"), "--json")
    assert code == 1 and "no index at" in json.loads(stdout)["error"]


def test_bad_model_is_a_clear_error(tmp_path, docs):
    code, stdout, stderr = run("index", str(docs), "--index", str(tmp_path / "i"), "--dense-model", "typo/nope")
    assert code == 1
    assert "typo/nope" in stderr and "--dense-model /path/to/model" in stderr
    assert "Traceback" not in stderr + stdout
    code, stdout, _ = run("index", str(docs), "--index", str(tmp_path / "i"), "--dense-model", "typo/nope", "--json")
    error = json.loads(stdout)["error"]
    assert code == 1 and "--dense-model /path/to/model" in error and "dense_model=" not in error


def test_bad_mode_is_a_clear_error(indexed):
    code, _, stderr = run("search", "x", "--index", str(indexed), "--mode", "fuzzy")
    assert code == 1 and "mode must be one of" in stderr


def test_locked_index_is_a_clear_error(indexed, docs):
    with store.write_lock(indexed):
        code, _, stderr = run("index", str(docs), "--index", str(indexed))
    assert code == 1 and "being written" in stderr


def test_settings_from_ragkit_toml_and_environment(tmp_path, docs, tiny_encoder, tiny_colbert, monkeypatch):
    (tmp_path / "ragkit.toml").write_text(f'index = "from-toml"\ndense_model = "{tiny_encoder}"\nlate_model = "{tiny_colbert}"\n')
    run_json("index", str(docs))
    assert (tmp_path / "from-toml" / store.CURRENT).is_file()
    monkeypatch.setenv("RAGKIT_INDEX", str(tmp_path / "from-env"))
    run_json("index", str(docs))
    assert (tmp_path / "from-env" / store.CURRENT).is_file()
    run_json("index", str(docs), "--index", str(tmp_path / "from-flag"))  # flags beat both
    assert (tmp_path / "from-flag" / store.CURRENT).is_file()


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, ragkit.cli; heavy = {'torch', 'transformers', 'sentence_transformers', 'faiss', "
            "'bm25s', 'pyarrow', 'numpy', 'pylate'}; print(sorted(heavy & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ragkit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "index" in result.stdout and "ask" in result.stdout
    assert time.perf_counter() - started < 3.0  # well under a second on an idle machine; CI is shared


def test_status_table_names_both_models(indexed, tiny_encoder, tiny_colbert):
    code, stdout, _ = run("status", "--index", str(indexed))
    flat = " ".join(stdout.split())
    assert code == 0 and "dense model" in flat and "late model" in flat and "chunks" in flat


def test_progress_is_a_line_per_stage_when_stderr_is_not_a_terminal(tmp_path, docs, tiny_encoder, tiny_colbert):
    code, _, stderr = run("index", str(docs), "--index", str(tmp_path / "i"), "--dense-model", str(tiny_encoder),
                          "--late-model", str(tiny_colbert))
    assert code == 0, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("ragkit: ")]
    stages = [line.split()[1] for line in lines]
    assert stages == ["scan", "scan", "parse", "parse", "encode", "encode", "late", "late", "write", "switch", "switch",
                      "write"]
    assert lines[3] == "ragkit: parse 2/2" and lines[-1] == "ragkit: write 2/2"


def test_a_chunk_across_pdf_pages_cites_both_pages(tmp_path, tiny_encoder, tiny_colbert):
    from test_pdf import make_pdf

    docs = tmp_path / "pdfs"
    docs.mkdir()
    (docs / "report.pdf").write_bytes(make_pdf([["Oil prices rose.", "The embargo began.", "Markets fell."],
                                                 ["Rationing followed.", "Prices stayed high."]]))
    index = str(tmp_path / "index")
    # no context: the tiny encoder's 62 tokens then hold both pages in one chunk
    run_json("index", str(docs), "--index", index, "--dense-model", str(tiny_encoder), "--late-model",
             str(tiny_colbert), "--context-tokens", "0")
    hit = run_json("search", "rationing", "--index", index, "--mode", "bm25")["hits"][0]
    assert (hit["page"], hit["start_line"], hit["end_page"], hit["end_line"]) == (1, 1, 2, 2)
    code, stdout, _ = run("search", "rationing", "--index", index, "--mode", "bm25")
    assert code == 0 and "report.pdf p.1:1–p.2:2" in stdout
    citation = run_json("ask", "What followed?", "--index", index, "--mode", "bm25",
                        "--reader", "extractive")["citations"][0]
    assert citation["page"] == citation["end_page"] == 2 and citation["text"] == "Rationing followed."


@pytest.mark.parametrize("files", [{}, {"photo.jpg": b"\xff\xd8\xff", "empty.txt": b""}])
def test_a_folder_with_nothing_to_index_gives_an_empty_index_and_says_so(tmp_path, tiny_encoder, files):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    index = str(tmp_path / "index")
    code, stdout, stderr = run("index", str(folder), "--index", index, "--dense-model", str(tiny_encoder), "--no-late")
    assert code == 0, stderr
    assert "no documents to index" in stderr and "Traceback" not in stderr
    assert ("2 skipped" in " ".join(stdout.split())) == bool(files)
    data = run_json("index", str(folder), "--index", index)
    assert (data["chunks"], len(data["skipped"])) == (0, len(files))
    assert run_json("status", "--index", index)["files"] == 0
    assert run_json("search", "anything", "--index", index)["hits"] == []


def test_a_file_name_that_is_not_utf8_is_reported_and_the_run_goes_on(tmp_path, tiny_encoder):
    import os

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xff.txt")).write_text("A name in Latin-1.\n")
    (folder / "good.txt").write_text("The oil crisis began in October 1973.\n")
    index = str(tmp_path / "index")
    data = run_json("index", str(folder), "--index", index, "--dense-model", str(tiny_encoder), "--no-late")
    assert data["added"] == 1
    assert data["skipped"] == [{"path": "caf\\xff.txt", "reason": "file name is not valid UTF-8 (rename it to index it)"}]
    (folder / "good.txt").write_text("Prices rose fourfold.\n")
    code, stdout, stderr = run("index", str(folder), "--index", index)
    printed = " ".join(stdout.split())  # Rich wraps lines at the terminal width
    assert code == 0 and "caf\\xff.txt" in printed and "1 updated" in printed, stderr


def test_version_and_help_show_defaults():
    import typer

    code, stdout, _ = run("--version")
    assert code == 0 and stdout.strip() == "ragkit 0.1.0"
    group = typer.main.get_command(app)
    for name in ("index", "search", "ask", "status", "eval", "summarize"):
        for param in group.commands[name].params:
            if param.param_type_name == "option" and param.default is None:
                assert "[default:" in (param.help or ""), (name, param.name)  # help says what None means
        assert run(name, "--help")[0] == 0
    summarize_help = " ".join(run("summarize", "--help")[1].split())
    assert "extractive" not in summarize_help and "infini | hmt" in summarize_help


def test_symlinks_out_of_the_folder_are_skipped_unless_followed(tmp_path, tiny_encoder):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "own.txt").write_text("Our own notes on the oil crisis.\n")
    (tmp_path / "private.txt").write_text("A private file elsewhere on the disk.\n")
    (folder / "elsewhere.txt").symlink_to(tmp_path / "private.txt")
    index = str(tmp_path / "index")
    data = run_json("index", str(folder), "--index", index, "--dense-model", str(tiny_encoder), "--no-late")
    assert data["added"] == 1 and [s["path"] for s in data["skipped"]] == ["elsewhere.txt"]
    assert "outside the indexed folder" in data["skipped"][0]["reason"]
    assert "--follow-links" in data["skipped"][0]["reason"]
    assert run_json("status", "--index", index)["last_run"]["seconds"] > 0
    data = run_json("index", str(folder), "--index", index, "--follow-links")
    assert data["added"] == 1 and data["skipped"] == []
    (folder / "own.txt").write_text("Our own notes, edited.\n")
    data = run_json("index", str(folder), "--index", index)  # the index keeps following them
    assert (data["updated"], data["unchanged"], data["skipped"]) == (1, 1, [])
    hits = run_json("search", "private file", "--index", index, "--mode", "bm25")["hits"]
    assert hits[0]["path"] == "elsewhere.txt"


def test_a_damaged_pdf_is_indexed_with_a_warning_that_names_it(tmp_path, tiny_encoder):
    from test_pdf import make_pdf

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "damaged.pdf").write_bytes(make_pdf([["The embargo began in October."]]).replace(b"%%EOF\n", b""))
    code, stdout, stderr = run("index", str(folder), "--index", str(tmp_path / "index"), "--dense-model",
                               str(tiny_encoder), "--no-late")
    assert code == 0 and "1 added" in " ".join(stdout.split())
    warnings = [line for line in " ".join(stderr.split()).split("Warning:")[1:]]
    assert any(w.strip().startswith("damaged.pdf: ") and "EOF marker not found" in w for w in warnings), stderr


def test_an_index_folder_that_is_a_file_or_holds_the_user_s_files_is_refused_with_a_message(tmp_path, docs,
                                                                                           tiny_encoder):
    (tmp_path / "a-file").write_text("")
    for command in (["status"], ["search", "oil"], ["ask", "oil"]):
        code, stdout, stderr = run(*command, "--index", str(tmp_path / "a-file"), "--json")
        assert code == 1 and "is a file, not an index folder" in json.loads(stdout)["error"], (command, stderr)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "draft.tmp").write_text("keep")
    code, _, stderr = run("index", str(docs), "--index", str(mine), "--dense-model", str(tiny_encoder), "--no-late")
    assert code == 1 and "holds other files (draft.tmp)" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in mine.iterdir()) == ["draft.tmp"]  # nothing written, nothing removed
    code, _, stderr = run("index", str(docs), "--index", str(docs), "--dense-model", str(tiny_encoder), "--no-late")
    assert code == 1 and "cannot be the folder it indexes" in stderr
    code, _, stderr = run("index", str(docs), "--index", str(tmp_path / "a-file"), "--no-late")
    assert code == 1 and "is a file, not an index folder" in stderr and "Traceback" not in stderr


def test_an_empty_query_is_refused(indexed):
    for command in ("search", "ask"):
        code, stdout, _ = run(command, "  ", "--index", str(indexed), "--json")
        assert code == 1 and "the query is empty" in json.loads(stdout)["error"]


def test_eval_checks_its_output_file_before_any_work(tmp_path, monkeypatch):
    dataset = tmp_path / "set"
    (dataset / "docs").mkdir(parents=True)
    (dataset / "docs" / "a.txt").write_text("Alpha.\n")
    (dataset / "questions.jsonl").write_text(json.dumps({"id": "1", "question": "alpha?", "doc": "a.txt"}) + "\n")
    monkeypatch.setattr("ragkit.evaluate.run_dataset", lambda *args, **kwargs: pytest.fail("the evaluation ran"))
    for out_file, message in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.jsonl", "does not exist")):
        code, stdout, _ = run("eval", str(dataset), "--out", str(out_file), "--json")
        assert code == 1 and message in json.loads(stdout)["error"]


def test_with_json_a_usage_error_is_a_json_error_too():
    for args in (["search", "oil", "-k", "0"], ["ask", "oil", "--no-such-option"]):
        result = subprocess.run([sys.executable, "-m", "ragkit.cli", *args, "--json"], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        error = json.loads(result.stdout)["error"]
        assert ("-k" in error) if "-k" in args else ("--no-such-option" in error)


def test_a_damaged_index_says_so_and_rebuilds(tmp_path, docs, tiny_encoder):
    index = tmp_path / "index"
    run_json("index", str(docs), "--index", str(index), "--dense-model", str(tiny_encoder), "--no-late")
    generation = store.current_generation(index)
    chunks = generation / store.CHUNKS
    chunks.write_bytes(chunks.read_bytes()[:100])  # cut short, as a full disk or a bad copy leaves it
    (generation / "dense" / "vectors.npy").unlink()
    for command in (["search", "oil"], ["ask", "oil", "--reader", "extractive"]):
        code, stdout, stderr = run(*command, "--index", str(index), "--json")
        assert code == 1 and "Traceback" not in stderr
        assert "is damaged" in json.loads(stdout)["error"] and "--rebuild" in json.loads(stdout)["error"]
    run_json("index", str(docs), "--index", str(index), "--rebuild")
    assert run_json("search", "oil crisis", "--index", str(index), "--mode", "dense")["hits"]
    (store.current_generation(index) / store.MANIFEST).write_text("{ not json")
    code, stdout, _ = run("status", "--index", str(index), "--json")
    assert code == 1 and "is damaged" in json.loads(stdout)["error"]


def test_a_device_that_is_not_there_is_named_not_the_model(tmp_path, docs, tiny_encoder):
    import torch

    cases = [("foo", "--device foo is not a device torch knows")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "this machine has no CUDA device; use --device cpu"))
    for device, message in cases:
        code, stdout, _ = run("index", str(docs), "--index", str(tmp_path / device), "--dense-model",
                              str(tiny_encoder), "--no-late", "--device", device, "--json")
        error = json.loads(stdout)["error"]
        assert code == 1 and message in error and "dense model" not in error


def test_ctrl_c_exits_130_and_speaks_of_the_index_only_where_it_was_being_written(tmp_path, indexed, docs,
                                                                                  monkeypatch):
    from ragkit.api import Index

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Index, "search", interrupted)
    monkeypatch.setattr(Index, "add", interrupted)
    code, stdout, stderr = run("search", "oil", "--index", str(indexed), "--json")
    assert code == 130 and json.loads(stdout) == {"error": "interrupted"} and "index is as it was" not in stderr
    code, stdout, stderr = run("index", str(docs), "--index", str(indexed))
    assert code == 130 and "Interrupted; the index is as it was before this run." in " ".join(stderr.split())


def test_a_file_named_as_a_model_is_said_to_be_a_file(indexed, docs, tmp_path):
    code, stdout, _ = run("ask", "oil", "--index", str(indexed), "--reader-model", str(docs / "oil.txt"), "--json")
    assert code == 1 and "It is a file, not a model: name the model's folder or a .gguf file." \
        in json.loads(stdout)["error"]
    code, stdout, _ = run("index", str(docs), "--index", str(tmp_path / "i"), "--dense-model", str(docs / "oil.txt"),
                          "--no-late", "--json")
    assert code == 1 and "It is a file, not a model: name the model's folder." in json.loads(stdout)["error"]
