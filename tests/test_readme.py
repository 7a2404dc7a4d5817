"""The README's notebook example runs as written (with a local model in place of MODEL)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


ARTICLES = ["1973_oil_crisis.txt", "Apollo_program.txt", "Amazon_rainforest.txt", "Oxygen.txt"]


def test_readme_library_example_runs(minilm, shared_data, tmp_path, capsys):
    from models import build_colbert

    block = re.search(r"## In a notebook\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ARTICLES:
        shutil.copy(shared_data / "squad-v1.1-dev" / "docs" / name, docs / name)
    late_model = build_colbert(tmp_path / "colbert", minilm, document_length=256, identity=True)
    code = block.replace("/tmp/ragkit-demo", str(tmp_path / "demo"))
    exec(compile(code, "README.md", "exec"), {"MODEL": str(minilm), "LATE_MODEL": str(late_model), "DOCS": docs})
    printed = capsys.readouterr().out
    assert "4 added, 0 unchanged" in printed
    assert "1973_oil_crisis.txt:" in printed.split("\n")[1]  # the best hit for "oil embargo"
    assert "[1] 1973_oil_crisis.txt:" in printed
