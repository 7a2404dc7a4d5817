"""`ragkit serve`'s JSON API and pages through the framework's test client: the shapes of `--json`, documents only
from the index, limits, concurrent answers, the index run, and errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from test_pdf import make_pdf
from typer.testing import CliRunner

from ragkit.api import Index
from ragkit.cli import app
from ragkit.config import Settings
from ragkit.service import MAX_K, MAX_QUERY_CHARS, Service
from ragkit.web.app import create_app

runner = CliRunner()
LONG_LINES = 300
NEEDLE_LINE = 200


def write_docs(docs: Path) -> None:
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.txt").write_text("The oil crisis began in October 1973.\nPrices rose fourfold within months.\n")
    (docs / "sub" / "report.md").write_text("# Harvest\n\n## Wheat\n\nThe wheat harvest doubled after the rains.\n")
    lines = [f"Line {n} of the ledger records an ordinary entry." for n in range(1, LONG_LINES + 1)]
    lines[NEEDLE_LINE - 1] = "The vault combination was changed by the night porter."
    (docs / "long.txt").write_text("\n".join(lines) + "\n")
    (docs / "paper.pdf").write_bytes(make_pdf([["Introduction to glaciers."],
                                               ["Glaciers retreat when summers warm.", "Ice cores keep old air."]]))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_encoder, tiny_colbert):
    """An index over a small folder (late stage included, extractive answers) and a client of its web app."""
    root = tmp_path_factory.mktemp("web")
    write_docs(root / "docs")
    (root / "secret.txt").write_text("outside the indexed folder: the secret is 4242\n")
    settings = Settings(dense_model=str(tiny_encoder), late_model=str(tiny_colbert), reader="extractive")
    index = Index(root / "index", settings)
    index.add(root / "docs")
    service = Service(index)
    with TestClient(create_app(service), base_url="http://localhost") as client:
        yield root, service, client


def cli_json(*args: str) -> dict:
    result = runner.invoke(app, list(args), env={"RAGKIT_READER": "extractive"})  # as the server's settings
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_search_ask_and_status_have_the_shapes_of_the_cli_json(served):
    root, service, client = served
    index = str(root / "index")
    query = "when did the oil crisis begin"
    api = client.get("/api/search", params={"q": query, "mode": "bm25", "k": 3}).json()
    assert api == cli_json("search", query, "--index", index, "--mode", "bm25", "-k", "3", "--json")
    assert api["hits"][0]["path"] == "notes.txt"
    posted = client.post("/api/search", json={"q": query, "mode": "bm25", "k": 3}).json()
    assert posted == api
    answer = client.get("/api/ask", params={"q": query, "mode": "bm25"}).json()
    assert answer == cli_json("ask", query, "--index", index, "--mode", "bm25", "--json")
    assert answer["citations"][0]["path"] == "notes.txt" and "1973" in answer["answer"]
    status = client.get("/api/status").json()
    expected = cli_json("status", "--index", index, "--json")
    assert status == expected and status["files"] == 4  # broken.pdf is skipped, with its reason
    assert [s["path"] for s in status["skipped"]] == ["broken.pdf"]


def test_every_mode_searches_and_the_path_filter_holds(served):
    _, service, client = served
    for mode in ("hybrid", "dense", "bm25", "late"):
        hits = client.get("/api/search", params={"q": "wheat harvest", "mode": mode}).json()["hits"]
        assert hits == [h.to_json() for h in service.index.search("wheat harvest", mode=mode)]
        assert hits, mode
    only = client.get("/api/search", params=[("q", "harvest"), ("path", "sub/*")]).json()["hits"]
    assert only and {h["path"] for h in only} == {"sub/report.md"}


def test_the_document_view_sends_the_neighbourhood_of_the_cited_lines_with_the_evidence(served):
    _, service, client = served
    hits = client.get("/api/search", params={"q": "vault combination night porter", "mode": "late",
                                             "path": "long.txt", "k": 1}).json()["hits"]
    (hit,) = hits
    assert hit["start_line"] <= NEEDLE_LINE <= hit["end_line"] and hit["evidence"]
    ev = ",".join(f"{e['start']}-{e['end']}" for e in hit["evidence"])
    doc = client.get("/api/document", params={"path": "long.txt", "line": hit["start_line"],
                                              "end": hit["end_line"], "chunk": hit["chunk_id"], "ev": ev}).json()
    assert doc["total_lines"] == LONG_LINES and not doc["changed"]
    assert doc["first_line"] == max(1, hit["start_line"] - 40) and doc["last_line"] == min(LONG_LINES,
                                                                                          hit["end_line"] + 40)
    assert len(doc["lines"]) < LONG_LINES  # only the neighbourhood
    by_number = {line["n"]: line for line in doc["lines"]}
    assert all(by_number[n]["cited"] for n in range(hit["start_line"], hit["end_line"] + 1))
    marked = [line["text"][a:b] for line in doc["lines"] for a, b in line["marks"]]
    expected = [hit["text"][e["start"]:e["end"]] for e in hit["evidence"]]
    assert sorted(marked) == sorted(piece for text in expected for piece in text.split("\n") if piece)
    page = client.get("/document", params={"path": "long.txt", "line": NEEDLE_LINE, "chunk": hit["chunk_id"],
                                           "ev": ev})
    assert page.status_code == 200 and f'id="L{NEEDLE_LINE}"' in page.text and "<mark>" in page.text
    assert "Line 1 of the ledger" not in page.text  # far lines are not sent


def test_a_pdf_page_is_shown_with_its_own_line_numbers_and_a_link_to_the_file(served):
    _, _, client = served
    doc = client.get("/api/document", params={"path": "paper.pdf", "page": 2, "line": 1}).json()
    assert (doc["page"], doc["pages"]) == (2, 2)
    assert doc["lines"][0]["n"] == 1 and "Glaciers retreat" in doc["lines"][0]["text"]
    first = client.get("/api/document", params={"path": "paper.pdf", "page": 1, "line": 1, "end": -1}).json()
    assert first["total_lines"] == 1 and first["lines"][-1]["text"].strip()  # no blank line between pages
    crossing = {"path": "paper.pdf", "start_line": 2, "end_line": 1, "page": 1, "end_page": 2, "chunk_id": "c"}
    from ragkit.web.render import citation_link

    assert "end=-1" in citation_link(crossing)  # a passage running onto the next page: cited to its page's end
    both = client.get("/api/document", params={"path": "paper.pdf", "page": 2, "line": 1, "end": -1}).json()
    assert [line["cited"] for line in both["lines"]] == [True, True]
    page = client.get("/document", params={"path": "paper.pdf", "page": 2})
    assert 'href="/raw/paper.pdf#page=2"' in page.text
    raw = client.get("/raw/paper.pdf")
    assert raw.status_code == 200 and raw.content.startswith(b"%PDF") and raw.headers["content-type"] == \
        "application/pdf"


TRAVERSALS = ["../secret.txt", "%2e%2e/secret.txt", "..%2fsecret.txt", "/etc/passwd", "sub/../../secret.txt",
              "notes.txt/../../secret.txt", str(Path("/etc/passwd")), "", "sub", "unindexed.txt"]


def test_only_documents_the_index_records_are_served(served):
    root, _, client = served
    (root / "docs" / "unindexed.txt").write_text("not indexed")
    for attempt in TRAVERSALS:
        for response in (client.get("/api/document", params={"path": attempt}),
                         client.get("/document", params={"path": attempt}),
                         client.get(f"/raw/{attempt}")):
            assert response.status_code == 404, (attempt, response.url)
            assert "4242" not in response.text and "not indexed" not in response.text
            assert "Traceback" not in response.text
    assert client.get("/api/document", params={"path": "sub/report.md"}).status_code == 200


def test_an_indexed_file_swapped_for_a_symlink_leading_out_is_refused(tmp_path, tiny_encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("alpha beta gamma\n")
    (tmp_path / "secret.txt").write_text("the secret is 4242\n")
    index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False, reader="extractive"))
    index.add(docs)
    (docs / "a.txt").unlink()
    (docs / "a.txt").symlink_to(tmp_path / "secret.txt")
    client = TestClient(create_app(Service(index)), base_url="http://localhost")
    for response in (client.get("/api/document", params={"path": "a.txt"}), client.get("/raw/a.txt"),
                     client.get("/document", params={"path": "a.txt"})):
        assert response.status_code == 404 and "4242" not in response.text


def test_limits_and_bad_values_are_refused_with_a_message(served):
    _, _, client = served
    refused = [
        client.get("/api/search", params={"q": "x" * (MAX_QUERY_CHARS + 1)}),
        client.get("/api/search", params={"q": "oil", "k": 0}),
        client.get("/api/search", params={"q": "oil", "k": MAX_K + 1}),
        client.get("/api/search", params={"q": "oil", "k": "many"}),
        client.get("/api/search", params={"q": "oil", "mode": "psychic"}),
        client.get("/api/search", params={"q": "  "}),
        client.post("/api/search", content="q=oil", headers={"content-type": "application/x-www-form-urlencoded"}),
        client.post("/api/search", content="{not json", headers={"content-type": "application/json"}),
        client.post("/api/search", json={"q": "oil " * 20_000}),
        client.get("/api/ask", params={"q": "x" * (MAX_QUERY_CHARS + 1)}),
        client.post("/api/search", json={"q": 5}),
        client.post("/api/search", json={"q": "oil", "path": [3]}),
        client.post("/api/search", json={"q": "oil", "k": [1]}),
        client.post("/api/search", json=["q", "oil"]),
    ]
    for response in refused:
        assert response.status_code == 400, response.request.url
        assert response.json()["error"] and "Traceback" not in response.text
    page = client.get("/", params={"q": "oil", "k": 0})
    assert page.status_code == 400 and "k must be between 1 and" in page.text
    odd = client.get("/api/document", params={"path": "notes.txt", "ev": "²-5,x-y,9-3"})  # spans that are not
    assert odd.status_code == 200 and all(not line["marks"] for line in odd.json()["lines"])


def test_a_request_naming_another_host_is_refused(served):
    import socket

    _, service, client = served
    assert client.get("/api/status", headers={"host": "attacker.example"}).status_code == 400
    assert client.get("/api/status", headers={"host": "127.0.0.1:8000"}).status_code == 200
    everywhere = TestClient(create_app(service, "0.0.0.0", allow_hosts=["docs.example"]), base_url="http://localhost")
    assert everywhere.get("/api/status", headers={"host": "attacker.example"}).status_code == 400
    assert everywhere.get("/api/status", headers={"host": f"{socket.gethostname()}:8000"}).status_code == 200
    assert everywhere.get("/api/status", headers={"host": "docs.example"}).status_code == 200


def test_a_get_cannot_start_an_index_run_whatever_its_parameters_say(served):
    _, service, client = served
    response = client.get("/api/index", params={"_method": "POST"})
    assert response.status_code == 200 and response.json()["state"] == "idle" and service.job.state == "idle"


def test_answers_beyond_the_limit_are_refused_while_others_run(served, monkeypatch):
    _, service, client = served
    started, release = threading.Event(), threading.Event()
    answer = Index.answer_from_hits

    def slow(self, *args, **kwargs):
        started.set()
        release.wait(10)
        return answer(self, *args, **kwargs)

    monkeypatch.setattr(Index, "answer_from_hits", slow)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(client.get("/api/ask", params={"q": "oil crisis"})))
               for _ in range(service.max_answers)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    for _ in range(50):  # until both are inside
        if service._answer_slots._value == 0:
            break
        threading.Event().wait(0.05)
    refused = client.get("/api/ask", params={"q": "oil crisis"})
    assert refused.status_code == 429 and "answers are being written" in refused.json()["error"]
    release.set()
    for thread in threads:
        thread.join(20)
    assert [r.status_code for r in results] == [200] * service.max_answers
    assert client.get("/api/ask", params={"q": "oil crisis"}).status_code == 200  # the slots are free again


def test_the_answer_streams_as_server_sent_events(tmp_path, tiny_encoder, tiny_llama, monkeypatch):
    from ragkit.readers import generate

    monkeypatch.setattr(generate, "stop_token_ids", lambda tokenizer, model=None: set())
    monkeypatch.setattr(generate, "answer_end", lambda question: generate.paragraph_end)
    monkeypatch.setattr(generate, "loop_hold", len)
    docs = tmp_path / "docs"
    write_docs(docs)
    index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False, reader="generate",
                                               reader_model=str(tiny_llama), answer_tokens=24))
    index.add(docs)
    client = TestClient(create_app(Service(index)), base_url="http://localhost")
    with client.stream("GET", "/api/ask/stream", params={"q": "when did the oil crisis begin"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1][6:]))
                  for block in response.read().decode().strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names[0] == "hits" and names[-1] == "answer" and names.count("token") > 1
    tokens = "".join(data for name, data in events if name == "token")
    final = events[-1][1]
    assert tokens.strip() == final["answer"].strip() and final["reader"] == "generate"
    assert {c["chunk_id"] for c in final["citations"]} <= {h["chunk_id"] for h in events[0][1]}
    failing = client.get("/api/ask/stream", params={"q": "oil", "k": 0})  # refused before the stream starts
    assert failing.status_code == 400 and "k must be between" in failing.json()["error"]


def test_the_index_button_runs_one_incremental_run_at_a_time(tmp_path, tiny_encoder, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("alpha beta gamma\n")
    index = Index(tmp_path / "index", Settings(dense_model=str(tiny_encoder), late=False, reader="extractive"))
    index.add(docs)
    (docs / "b.txt").write_text("delta epsilon zeta\n")
    gate = threading.Event()
    add = Index.add

    def held(self, folder, progress=None, rebuild=False):
        gate.wait(10)
        return add(self, folder, progress=progress, rebuild=rebuild)

    monkeypatch.setattr(Index, "add", held)
    service = Service(index)
    client = TestClient(create_app(service), base_url="http://localhost")
    assert client.get("/api/index").json()["state"] == "idle"
    first = client.post("/api/index", json={})
    assert first.status_code == 200 and first.json()["state"] == "running"
    second = client.post("/api/index", json={})
    assert second.status_code == 429 and "in progress" in second.json()["error"]
    assert client.post("/api/index").status_code == 400  # not JSON: a form on another site cannot start a run
    gate.set()
    for _ in range(200):
        job = client.get("/api/index").json()
        if job["state"] != "running":
            break
        threading.Event().wait(0.1)
    assert job["state"] == "done" and job["report"]["added"] == 1 and job["report"]["unchanged"] == 1
    assert job["stages"]["encode"][0] == job["stages"]["encode"][1] == 1
    assert client.get("/api/status").json()["files"] == 2
    assert "b.txt" in {h["path"] for h in client.get("/api/search", params={"q": "delta epsilon",
                                                                              "mode": "bm25"}).json()["hits"]}


def test_pages_render_hits_answers_and_status_and_fail_without_tracebacks(served, monkeypatch):
    _, service, client = served
    page = client.get("/", params={"q": "wheat harvest", "mode": "late"})
    assert page.status_code == 200 and "sub/report.md" in page.text and "<mark>" in page.text
    asked = client.get("/", params={"q": "when did the oil crisis begin", "do": "ask", "mode": "bm25"})
    assert 'id="cite-1"' in asked.text and "/document?path=notes.txt" in asked.text
    status = client.get("/status")
    assert "broken.pdf" in status.text and 'id="index-button"' in status.text
    assert client.get("/static/app.js").status_code == 200
    text = client.get("/document", params={"path": "notes.txt"}).text
    assert 'id="pdf-link"' not in text  # only PDFs have a file to open at a page
    paged = client.get("/document", params={"path": "long.txt", "line": NEEDLE_LINE, "from": 1}).text
    assert 'id="L1"' in paged and f'id="L{NEEDLE_LINE}"' not in paged and "↓ lines 82–162" in paged
    assert client.get("/api/openapi.json").json()["paths"]["/api/search"]["get"]["parameters"][0]["name"] == "q"

    def broken(*args, **kwargs):
        raise ValueError("internal detail /secret/path")

    monkeypatch.setattr(Service, "search", broken)
    failed = TestClient(create_app(service), base_url="http://localhost", raise_server_exceptions=False)
    for response in (failed.get("/api/search", params={"q": "oil"}), failed.get("/", params={"q": "oil"})):
        assert response.status_code == 500 and "Traceback" not in response.text
        assert "/secret/path" not in response.text


def test_serve_warns_off_loopback_and_says_when_it_cannot_start(served, monkeypatch, tmp_path):
    import socket

    import uvicorn

    root, _, _ = served
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    result = runner.invoke(app, ["serve", "--index", str(root / "index"), "--port", "0"])
    assert result.exit_code == 2  # the port must be 1-65535
    local = runner.invoke(app, ["serve", "--index", str(root / "index"), "--port", "8765"])
    assert local.exit_code == 0 and "Warning" not in local.stderr and calls[-1]["host"] == "127.0.0.1"
    wide = runner.invoke(app, ["serve", "--index", str(root / "index"), "--host", "0.0.0.0", "--port", "8765"])
    assert wide.exit_code == 0 and "Warning: listening on 0.0.0.0" in wide.stderr
    assert calls[-1] == {"host": "0.0.0.0", "port": 8765, "log_level": "warning"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["serve", "--index", str(root / "index"), "--port", str(port)])
    assert busy.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    missing = runner.invoke(app, ["serve", "--index", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "there is no index at" in missing.stderr and len(calls) == 2


def test_paths_a_forged_or_swapped_index_might_hold_are_still_refused(tmp_path):
    from ragkit.documents import DocumentNotFound, indexed_file

    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "a.txt").write_text("inside\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.txt").write_text("outside\n")
    (tmp_path / "secret.txt").write_text("secret\n")
    forged = ("sub/a.txt", "../secret.txt", "/etc/passwd", "sub/../../secret.txt")
    files = {rel: {"hash": "x", "size": 1} for rel in forged}
    manifest = {"root": str(tmp_path / "docs"), "files": files, "settings": {}}
    assert indexed_file(manifest, "sub/a.txt") == tmp_path / "docs" / "sub" / "a.txt"
    for rel in ("../secret.txt", "/etc/passwd", "sub/../../secret.txt"):  # recorded, yet outside: refused
        with pytest.raises(DocumentNotFound):
            indexed_file(manifest, rel)
    shutil.rmtree(tmp_path / "docs" / "sub")
    (tmp_path / "docs" / "sub").symlink_to(tmp_path / "outside")  # a recorded folder swapped for a link out
    with pytest.raises(DocumentNotFound, match="leads outside"):
        indexed_file(manifest, "sub/a.txt")


def test_raw_files_refuse_encoded_traversal_that_reaches_the_route(served):
    _, _, client = served
    for attempt in ("%2e%2e/secret.txt", "..%2fsecret.txt", "%2e%2e%2fsecret.txt", "sub%2f..%2f..%2fsecret.txt",
                    "%2fetc%2fpasswd"):
        response = client.get(f"/raw/{attempt}")
        assert response.status_code == 404 and "4242" not in response.text, attempt


def test_closing_an_answer_stream_stops_the_answer_and_frees_its_slot(served, monkeypatch):
    import socket
    import time
    import urllib.request

    import uvicorn

    _, service, _ = served
    written: list[int] = []

    def slow(self, question, hits, mode=None, reader=None, on_token=None):
        for n in range(1000):  # ten seconds of answer unless the stream is closed
            on_token(f"piece {n} ")
            written.append(n)
            time.sleep(0.01)
        raise AssertionError("the answer ran to its end")

    monkeypatch.setattr(Index, "answer_from_hits", slow)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        response = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ask/stream?q=oil", timeout=10)
        while b"event: token" not in response.readline():
            pass
        response.close()  # the page goes away
        for _ in range(100):
            if service._answer_slots._value == service.max_answers:
                break
            time.sleep(0.05)
        assert service._answer_slots._value == service.max_answers  # the slot is free again
        assert len(written) < 500
    finally:
        server.should_exit = True
        thread.join(10)
