"""The README's notebook example runs as written (with a local model in place of MODEL)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(minilm, squad_index, tmp_path, monkeypatch, capsys):
    block = re.search(r"## In a notebook\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example's data path is relative to the repo
    shutil.copytree(squad_index.path, tmp_path / "demo")  # already built: the example's run is incremental
    code = block.replace("/tmp/ragkit-demo", str(tmp_path / "demo"))
    exec(compile(code, "README.md", "exec"), {"MODEL": str(minilm)})
    printed = capsys.readouterr().out
    assert "0 added, 48 unchanged" in printed
    assert "[1] 1973_oil_crisis.txt:" in printed
