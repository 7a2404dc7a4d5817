"""The quickstart notebook runs from top to bottom, offline, and its outputs show each step worked."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
QUICKSTART = NOTEBOOKS / "quickstart.ipynb"
SQUAD_DOCS = NOTEBOOKS.parents[1] / "shared" / "data" / "squad-v1.1-dev" / "docs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_quickstart():
    import nbformat

    return nbformat.read(QUICKSTART, as_version=4)


def cell(nb, tag: str):
    found = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def text_of(c) -> str:
    """Everything a code cell printed (streams and plain-text results)."""
    parts = []
    for out in c.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def html_of(c) -> str:
    return "".join(out.data.get("text/html", "") for out in c.outputs
                   if out.output_type in ("execute_result", "display_data"))


def first_json_object(text: str) -> dict:
    start = text.index("{")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def test_quickstart_is_stored_without_outputs():
    nb = read_quickstart()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells
    for c in code_cells:
        assert c.outputs == [] and c.execution_count is None, f"stored outputs in cell {c.get('id')}"


@pytest.fixture(scope="module")
def executed(tmp_path_factory, _reader_cache):
    """The quickstart executed by a kernel of this interpreter, from the notebooks folder."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    import nbformat

    # A kernelspec of our own, so that a python3 kernel installed elsewhere on the machine cannot be picked up.
    specs = tmp_path_factory.mktemp("kernels")
    (specs / "ragkit-test").mkdir()
    (specs / "ragkit-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ragkit test", "language": "python",
    }))
    km = KernelManager(kernel_name="ragkit-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))

    nb = read_quickstart()
    probe = nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ['HF_HUB_OFFLINE'])")
    probe.metadata["tags"] = ["probe"]
    nb.cells.insert(0, probe)

    # The kernel inherits this environment: conftest.py sets HF_HUB_OFFLINE=1; temp folders and caches go under
    # pytest's.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("notebook-tmp")))
        mp.setenv("MPLBACKEND", "Agg")
        for key in [k for k in os.environ if k.startswith("RAGKIT_")]:
            mp.delenv(key)
        mp.setenv("RAGKIT_CACHE_DIR", str(_reader_cache))  # the notebook's ONNX exports stay out of the user's cache
        NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def test_kernel_is_this_interpreter_and_offline(executed):
    printed = text_of(cell(executed, "probe")).split()
    assert printed == [sys.executable, "1"]


def test_every_cell_ran_without_errors(executed):
    for c in executed.cells:
        if c.cell_type == "code":
            assert c.execution_count is not None
            assert not [o for o in c.outputs if o.output_type == "error"]


def test_late_model_is_the_offline_stand_in(executed):
    # RAGKIT_NOTEBOOK_LATE_MODEL is unset in the kernel, so the notebook builds its MiniLM ColBERT.
    assert "late-interaction model: stand-in (MiniLM, identity projection)" in text_of(cell(executed, "late-model"))


def test_index_report(executed):
    report = first_json_object(text_of(cell(executed, "index")))
    assert report["added"] == 8 and report["skipped"] == []
    assert report["chunks"] == report["encoded_chunks"] == report["late_encoded_chunks"] > 8


def search_table(html: str, mode: str) -> str:
    return html.split(f"<h4>{mode}</h4>")[1].split("</table>")[0]


def test_search_tables(executed):
    html = html_of(cell(executed, "search"))
    for mode in ("bm25", "dense", "late", "hybrid"):
        assert f"<h4>{mode}</h4>" in html
    assert html.count("<table>") == 4 and html.count("<tr><td>") == 12
    assert "Packet_switching.txt:" in search_table(html, "dense")
    assert "Packet_switching.txt:" in search_table(html, "late")
    # Evidence comes from the late stage: marked in late and hybrid hits, absent from BM25 and dense ones.
    for mode in ("late", "hybrid"):
        rows = search_table(html, mode).split("<tr><td>")[1:]
        assert len(rows) == 3 and all(re.search(r"<mark>[^<]+</mark>", row) for row in rows), mode
    for mode in ("bm25", "dense"):
        assert "<mark>" not in search_table(html, mode), mode


def test_evidence_spans_point_into_the_hit(executed):
    printed = text_of(cell(executed, "evidence"))
    location = re.search(r"^top hit: (\S+?):(\d+)(?:-(\d+))?  score", printed, re.M)
    assert location, printed
    first, last = int(location[2]), int(location[3] or location[2])
    hit_lines = "\n".join((SQUAD_DOCS / location[1]).read_text(encoding="utf-8").split("\n")[first - 1 : last])
    spans = [(float(score), ast.literal_eval(text))
             for score, text in re.findall(r"^\s+(-?[\d.]+)  chars\s+\d+-\d+\s+(.+)$", printed, re.M)]
    assert spans, printed
    assert all(text.strip() and text in hit_lines for _, text in spans), (spans, hit_lines)
    scores = [score for score, _ in spans]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # The question's own content words are among what the hit matched.
    assert any(word in text.lower() for _, text in spans for word in ("oil", "embargo", "price")), spans


def test_answer_cites_the_right_lines(executed):
    printed = text_of(cell(executed, "ask"))
    assert "October 1973" in printed
    assert re.search(r"^\[1\] 1973_oil_crisis\.txt:\d+", printed, re.M), printed
    checked = text_of(cell(executed, "citations"))
    assert "cited sentence found in these lines: True" in checked
    assert "found in these lines: False" not in checked


def test_incremental_update_reencodes_one_file(executed):
    printed = text_of(cell(executed, "incremental"))
    report = first_json_object(printed)
    assert (report["added"], report["updated"], report["removed"], report["unchanged"]) == (0, 1, 0, 7)
    assert 0 < report["encoded_chunks"] < report["chunks"] / 4
    assert 0 < report["late_encoded_chunks"] < report["chunks"] / 4
    assert f"re-encoded {report['encoded_chunks']} of {report['chunks']} chunks" in printed
    assert "Packet_switching.txt:" in text_of(cell(executed, "updated-search"))


def test_recall_plot_is_drawn(executed):
    c = cell(executed, "recall-plot")
    images = [o.data["image/png"] for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1
    assert base64.b64decode(images[0]).startswith(PNG_SIGNATURE)
    recall = dict(re.findall(r"^\s*(\w+)\s+article recall@1 ([\d.]+)", text_of(c), re.M))
    assert set(recall) == {"bm25", "dense", "late", "hybrid"}
    assert all(float(value) >= 0.6 for value in recall.values()), recall


def test_evaluation_summary(executed):
    summary = first_json_object(text_of(cell(executed, "evaluate")))
    assert summary["mode"] == "hybrid" and summary["questions"] == 60
    assert summary["recall@5"] >= 0.9 and summary["evidence_hit@5"] >= 0.8
    reader = first_json_object(text_of(cell(executed, "evaluate-reader")))
    assert reader["questions"] == 10 and reader["answer_in_citations"] >= 0.3
