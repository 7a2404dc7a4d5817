"""The MCP server over a real index, through an in-memory MCP client: tools search, ask and status, the indexed
documents as resources ragkit://<path>, and errors as plain messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from ragkit.api import Index
from ragkit.config import Settings
from ragkit.mcp_server import build_server
from ragkit.service import Service

DOCS = {
    "oil.md": "# Oil crisis\n\nOil prices rose sharply in October 1973.\nThe embargo lasted until March 1974.\n",
    "fox.txt": "The quick brown fox jumps over the lazy dog.\nThe dog did not mind.\n",
    "sub/notes.md": "# Notes\n\nRetrieval augmented generation cites the lines and pages it used.\n",
    "sub/deep/code.txt": "def function(argument): return value\n",
}
SECRET = "the outside secret: 42\n"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_encoder) -> tuple[Path, Service]:
    """The folder `docs` (with `secret.txt` beside it, outside) and a Service over its index."""
    base = tmp_path_factory.mktemp("mcp")
    for rel, text in DOCS.items():
        (base / "docs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "docs" / rel).write_text(text)
    (base / "secret.txt").write_text(SECRET)
    index = Index(base / "index", Settings(dense_model=str(tiny_encoder), late=False, reader="extractive"))
    index.add(base / "docs")
    return base / "docs", Service(index)


def run(service: Service, session: Callable[[Client], Awaitable[Any]]) -> Any:
    """`session(client)` with a client connected in process to the MCP server of `service`; "legacy": by the
    initialize handshake and JSON-RPC messages over memory streams, as over stdio."""
    async def main() -> Any:
        async with Client(build_server(service), mode="legacy") as client:
            return await session(client)

    return anyio.run(main)


def structured(result) -> dict[str, Any]:
    assert not result.is_error, result.content
    data = json.loads(result.content[0].text)
    assert result.structured_content == data
    return data


def test_the_tools_are_search_ask_and_status_all_read_only(indexed):
    _, service = indexed

    async def session(client: Client):
        return client.server_info.name, client.instructions, (await client.list_tools()).tools

    name, instructions, tools = run(service, session)
    assert name == "ragkit" and "read-only" in instructions and "indexed documents" in instructions
    assert sorted(t.name for t in tools) == ["ask", "search", "status"]
    for tool in tools:
        assert tool.annotations.read_only_hint is True and tool.annotations.destructive_hint is False
    search = next(t for t in tools if t.name == "search")
    assert all(mode in search.description for mode in ("dense", "bm25", "late", "hybrid"))
    assert set(search.input_schema["properties"]) == {"query", "k", "mode", "path"}


def test_search_returns_the_services_hits(indexed):
    _, service = indexed

    async def session(client: Client):
        return [await client.call_tool("search", args) for args in (
            {"query": "oil prices 1973", "k": 3, "mode": "bm25"},
            {"query": "oil prices 1973"},
            {"query": "lines and pages", "mode": "bm25", "path": "sub/*.md"},
        )]

    bm25, hybrid, only_sub = (structured(r) for r in run(service, session))
    assert bm25 == service.search("oil prices 1973", 3, "bm25")
    assert bm25["hits"][0]["path"] == "oil.md" and bm25["hits"][0]["start_line"] >= 1
    assert hybrid == service.search("oil prices 1973", 10, "hybrid")
    assert [(h["path"], h["start_line"], h["end_line"], h["score"]) for h in hybrid["hits"]] == \
        [(h["path"], h["start_line"], h["end_line"], h["score"]) for h in service.search("oil prices 1973")["hits"]]
    assert only_sub["hits"] and {h["path"] for h in only_sub["hits"]} == {"sub/notes.md"}


def test_bad_arguments_come_back_as_tool_errors_with_plain_messages(indexed):
    _, service = indexed

    async def session(client: Client):
        return [await client.call_tool(name, args) for name, args in (
            ("search", {"query": "oil", "mode": "nope"}),
            ("search", {"query": "oil", "k": 0}),
            ("search", {"query": "   "}),
            ("ask", {"question": "oil?", "k": 51}),
        )]

    messages = []
    for result in run(service, session):
        assert result.is_error
        messages.append(result.content[0].text)
        assert "Traceback" not in messages[-1]
    assert messages == [f"Error executing tool {tool}: {message}" for tool, message in (
        ("search", "mode must be one of dense, bm25, late, hybrid, got 'nope'"),
        ("search", "k must be between 1 and 50, got 0"), ("search", "the query is empty"),
        ("ask", "k must be between 1 and 50, got 51"))]


def test_ask_answers_with_citations_of_the_indexed_file(indexed):
    _, service = indexed

    async def session(client: Client):
        return await client.call_tool("ask", {"question": "When did oil prices rise?", "k": 2, "mode": "bm25"})

    answer = structured(run(service, session))
    assert answer["reader"] == "extractive" and "1973" in answer["answer"]
    assert answer["citations"] and answer["citations"][0]["path"] == "oil.md"
    assert {"n", "path", "start_line", "end_line", "page"} <= set(answer["citations"][0])


def test_status_counts_the_indexed_files_and_chunks(indexed):
    _, service = indexed

    async def session(client: Client):
        return await client.call_tool("status", {})

    status = structured(run(service, session))
    info = service.index.status()
    assert (status["files"], status["chunks"]) == (info["files"], info["chunks"])
    assert status["files"] == len(DOCS) and status["chunks"] >= len(DOCS)


def test_each_indexed_document_is_a_resource_that_reads_as_its_text(indexed):
    _, service = indexed

    async def session(client: Client):
        listed = (await client.list_resources()).resources
        templates = (await client.list_resource_templates()).resource_templates
        texts = {r.uri: (await client.read_resource(r.uri)).contents for r in listed}
        return listed, templates, texts

    listed, templates, texts = run(service, session)
    assert sorted(r.uri for r in listed) == sorted(f"ragkit://{rel}" for rel in DOCS)
    assert all(r.mime_type == "text/plain" for r in listed)
    assert [t.uri_template for t in templates] == ["ragkit://{+path}"]
    for rel, text in DOCS.items():
        (content,) = texts[f"ragkit://{rel}"]
        assert content.mime_type == "text/plain" and content.text.strip() == text.strip()


def test_documents_outside_the_index_cannot_be_read(indexed, tmp_path):
    docs, service = indexed
    uris = ["ragkit://../secret.txt", "ragkit://sub/../../secret.txt", "ragkit://%2E%2E/secret.txt",
            "ragkit:///etc/passwd", "ragkit://" + str(docs.parent / "secret.txt"), "ragkit://missing.md",
            "ragkit://", "ragkit://fox.txt/../../secret.txt"]

    async def session(client: Client):
        errors = []
        for uri in uris:
            with pytest.raises(MCPError) as caught:
                await client.read_resource(uri)
            errors.append(caught.value)
        return errors

    errors = run(service, session)
    for uri, error in zip(uris, errors):
        assert SECRET.strip() not in str(error) and "Traceback" not in str(error), uri
    assert str(errors[5]) == "'missing.md' is not a document of this index"


def test_an_indexed_file_replaced_by_a_symlink_to_outside_is_refused(indexed):
    docs, service = indexed
    fox = docs / "fox.txt"
    saved = fox.read_text()
    fox.unlink()
    fox.symlink_to(docs.parent / "secret.txt")
    try:
        async def session(client: Client):
            with pytest.raises(MCPError) as caught:
                await client.read_resource("ragkit://fox.txt")
            return caught.value

        error = run(service, session)
    finally:
        fox.unlink()
        fox.write_text(saved)
    assert "leads outside the indexed folder" in str(error) and SECRET.strip() not in str(error)


def test_ragkit_mcp_serves_an_index_over_stdio(indexed):
    """The command an assistant runs: `ragkit mcp --index DIR`, spoken to over its stdin and stdout."""
    import sys

    from mcp.client.stdio import StdioServerParameters, stdio_client

    docs, service = indexed
    ragkit = str(Path(sys.executable).parent / "ragkit")  # the console script an assistant's settings name
    command = StdioServerParameters(command=ragkit, args=["mcp", "--index", str(service.index.path),
                                                          "--reader", "extractive"],
                                    env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

    async def session() -> tuple[list[str], dict[str, Any], str]:
        async with Client(stdio_client(command), mode="legacy") as client:
            tools = sorted(tool.name for tool in (await client.list_tools()).tools)
            found = await client.call_tool("search", {"query": "oil prices 1973", "k": 2, "mode": "bm25"})
            text = (await client.read_resource("ragkit://sub/notes.md")).contents[0].text
            return tools, json.loads(found.content[0].text), text

    tools, found, text = anyio.run(session)
    assert tools == ["ask", "search", "status"]
    assert found == service.search("oil prices 1973", 2, "bm25")
    assert text == DOCS["sub/notes.md"]


def test_ragkit_mcp_without_an_index_says_so(tmp_path):
    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, ["mcp", "--index", str(tmp_path / "none")])
    assert result.exit_code == 1 and "there is no index at" in result.stderr and "Traceback" not in result.output
