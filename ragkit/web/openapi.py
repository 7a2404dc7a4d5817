"""The JSON API's OpenAPI description, served at /api/openapi.json (the shapes are those of the CLI's --json)."""

from __future__ import annotations

from typing import Any

from ragkit import __version__


def _param(name: str, description: str, kind: str = "string", required: bool = False,
           many: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind}
    if many:
        schema = {"type": "array", "items": schema}
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_QUERY = [
    _param("q", "The query or question (at most 2,000 characters).", required=True),
    _param("k", "Number of hits (1-50) [search: 10; ask: 5].", "integer"),
    _param("mode", "dense | bm25 | late | hybrid [default: the index's, hybrid]."),
    _param("path", "Only files with this relative path or glob (repeatable).", many=True),
]
_ERROR = {"description": "A bad request (400), a path the index does not hold (404), too many answers at once "
                         "(429); body: {\"error\": message}.",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_EVIDENCE = {"type": "object", "properties": {"start": {"type": "integer"}, "end": {"type": "integer"},
                                              "score": {"type": "number"}}}
_PLACE = {"path": {"type": "string"}, "start_line": {"type": "integer"}, "end_line": {"type": "integer"},
          "page": {"type": ["integer", "null"]}, "end_page": {"type": ["integer", "null"]},
          "heading": {"type": "string"}, "score": {"type": "number"}, "text": {"type": "string"},
          "chunk_id": {"type": "string"}}


def _get(summary: str, params: list[dict[str, Any]], schema: str, post: bool = False) -> dict[str, Any]:
    operation = {"summary": summary, "parameters": params,
                 "responses": {"200": {"description": "OK", "content": {"application/json": {
                     "schema": {"$ref": f"#/components/schemas/{schema}"}}}}, "4XX": _ERROR}}
    item: dict[str, Any] = {"get": operation}
    if post:
        item["post"] = {**operation, "parameters": [],
                        "requestBody": {"description": "The same parameters as a JSON object.",
                                        "content": {"application/json": {"schema": {"type": "object"}}}}}
    return item


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "ragkit", "version": __version__,
             "description": "Search and answers over one local index; the shapes of `ragkit search|ask|status "
                            "--json`."},
    "paths": {
        "/api/search": _get("Search the index (as `ragkit search --json`).", _QUERY, "Search", post=True),
        "/api/ask": _get("Answer a question with numbered citations (as `ragkit ask --json`).", _QUERY, "Answer",
                         post=True),
        "/api/ask/stream": {"get": {
            "summary": "The same answer as server-sent events: `hits` (the hits read), `token` (each piece of the "
                       "answer as it is written, a JSON string), then `answer` (as /api/ask) or `failure` "
                       "({error, status}).",
            "parameters": _QUERY,
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}}},
        "/api/status": _get("What the index holds (as `ragkit status --json`).", [], "Status"),
        "/api/document": _get("The lines of an indexed document around the lines asked for.", [
            _param("path", "A path the index records, relative to the indexed folder.", required=True),
            _param("line", "First line asked for (from the page's top for PDFs).", "integer"),
            _param("end", "Last line asked for.", "integer"),
            _param("page", "Page (PDFs).", "integer"),
            _param("chunk", "Chunk id whose evidence spans `ev` are."),
            _param("ev", "Evidence spans of the chunk: start-end,start-end (chars of its text)."),
        ], "Document"),
        "/api/index": {**_get("The state of the last index run started from the page.", [], "Job"),
                       "post": {"summary": "Start an incremental index run of the indexed folder (one at a time).",
                                "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                                "responses": {"200": {"description": "The run's state", "content": {
                                    "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                                              "429": _ERROR}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
        "Hit": {"type": "object", "properties": {**_PLACE, "evidence": {"type": "array", "items": _EVIDENCE},
                                                 "ranks": {"type": "object"}}},
        "Search": {"type": "object", "properties": {"hits": {"type": "array",
                                                             "items": {"$ref": "#/components/schemas/Hit"}}}},
        "Answer": {"type": "object", "properties": {
            "answer": {"type": "string"},
            "citations": {"type": "array", "items": {"type": "object", "properties": {
                "n": {"type": "integer"}, **_PLACE, "chunk_lines": {"type": "array"}}}},
            "reader": {"type": "string"}, "model": {"type": ["string", "null"]},
            "prompt_tokens": {"type": ["integer", "null"]}, "generated_tokens": {"type": ["integer", "null"]}}},
        "Status": {"type": "object", "description": "index, root, generation, created, files, chunks, tokens, "
                                                    "models, settings, skipped, size_bytes, last_run, reader"},
        "Document": {"type": "object", "description": "path, page, pages, start_line, end_line, first_line, "
                                                      "last_line, total_lines, changed, lines: [{n, text, cited, "
                                                      "marks}]"},
        "Job": {"type": "object", "description": "state (idle|running|done|failed), stage, done, total, stages, "
                                                 "seconds, message, report (as `ragkit index --json`)"},
    }},
}
