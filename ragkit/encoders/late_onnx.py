"""Late-interaction queries through ONNX Runtime, without torch: the query side of a PyLate ColBERT model, exported
into ragkit's cache as the dense model is (`ragkit.encoders.onnx`, kind "late-query").

PyLate reads a query as [CLS] [Q] words… [SEP], padded with [MASK] to its query length when it expands queries (the
expansion tokens are kept, and attended to when the model says so); the exported graph maps those ids and the
attention mask to unit token vectors (batch, tokens, dim). The export is used only after its vectors matched
PyLate's on probe queries, token for token, at export time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.encoders.onnx import (EXPORT_VERSION, FLOAT32_TOLERANCE, META, MODEL, TOKENIZER, ExportError, export_graph,
                                  padded, ready_export, session)

KIND = "late-query"
PROBES = ("What is the capital of France?", "revenue growth in fiscal 2023, by segment",
          "How does the encode function treat padding tokens when a batch mixes long and short texts?")


def export_late_query(encoder: Any, work: Path) -> dict[str, Any]:
    """Write the query side of a LateEncoder's model into `work`; returns encoder.json's fields."""
    colbert = encoder.model
    first = colbert[0]
    if not getattr(encoder.tokenizer, "is_fast", False):
        raise ExportError("the late model has no fast tokenizer")
    meta = {
        "version": EXPORT_VERSION,
        "model": encoder.name,
        "projection": encoder.projection,
        "dim": encoder.dim,
        "query_length": int(colbert.query_length),
        "prefix_id": None if colbert.query_prefix_id is None else int(colbert.query_prefix_id),
        "pad_id": int(encoder.tokenizer.pad_token_id),
        "expansion": bool(colbert.do_query_expansion),
        "attend_to_expansion": bool(colbert.attend_to_expansion_tokens),
        "lower_case": bool(getattr(first, "do_lower_case", False)),
    }
    encoder.tokenizer.backend_tokenizer.save(str(work / TOKENIZER))
    sample = colbert.tokenize(list(PROBES), is_query=True)
    device = next(colbert.parameters()).device
    export_graph(colbert, {k: v.to(device) for k, v in sample.items()}, work / MODEL, output="token_embeddings")
    probes = [*PROBES, " ".join(["long"] * (meta["query_length"] + 8))]  # the last one is truncated
    exported = OnnxLateQueryEncoder(work, meta)
    for query, reference, ours in zip(probes, encoder.encode_queries(probes), exported.encode_queries(probes)):
        if reference.shape != ours.shape or float(np.abs(reference - ours).max()) > FLOAT32_TOLERANCE:
            raise ExportError("the exported query vectors differ from PyLate's")
        if not np.array_equal(encoder.word_positions(query), exported.word_positions(query)):
            raise ExportError("the exported tokenizer places the query's words elsewhere")
    return meta


class OnnxLateQueryEncoder:
    """Encodes queries as LateEncoder.encode_queries does, through an export: no torch, no PyLate."""

    def __init__(self, folder: Path, meta: dict[str, Any] | None = None, threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.meta = meta or json.loads((folder / META).read_text())
        self.name = self.meta["model"]
        self.revision = self.meta.get("revision")
        self.projection = self.meta["projection"]
        self.dim = int(self.meta["dim"])
        self._prefix = int(self.meta["prefix_id"] is not None)
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.meta["query_length"] - self._prefix)
        self.session = session(folder / MODEL, threads)

    @classmethod
    def cached(cls, model: str, revision: str) -> "OnnxLateQueryEncoder | None":
        folder = ready_export(model, revision, kind=KIND)
        try:
            return cls(folder) if folder else None
        except Exception:  # a damaged cache: the model serves
            return None

    def encode_queries(self, queries: Sequence[str]) -> list[np.ndarray]:
        """(query tokens, dim) float32 per query, unit rows, as LateEncoder.encode_queries gives them."""
        if not queries:
            return []
        rows = [self._ids(q) for q in queries]
        ids, mask = padded(rows, self.meta["pad_id"])  # (batch, tokens)
        (vectors,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})  # (batch, tokens, dim)
        out = []
        for q, (row_ids, _), v in zip(queries, rows, np.asarray(vectors, dtype=np.float32)):
            kept = v if self.meta["expansion"] else v[: len(row_ids)]  # padding of a batch is dropped
            if self.projection == "identity":
                words = self._words(q)
                kept = kept[1 : 1 + words] if words else kept
            out.append(kept)
        return out

    def word_positions(self, query: str) -> np.ndarray:
        """Positions of the query's own tokens in `encode_queries`' output (see LateEncoder.word_positions)."""
        if self.projection == "identity":
            return np.arange(self._words(query) or len(self.tokenizer.encode(query).ids))
        return np.arange(2, 2 + self._words(query))

    def _ids(self, query: str) -> tuple[list[int], list[int]]:
        """A query's ids and attention mask as PyLate makes them: [CLS] [Q] words… [SEP] [MASK]…"""
        text = query.strip().lower() if self.meta["lower_case"] else query.strip()
        ids = list(self.tokenizer.encode(text).ids)
        mask = [1] * len(ids)
        if self.meta["expansion"]:
            missing = self.meta["query_length"] - self._prefix - len(ids)
            ids, mask = ids + [self.meta["pad_id"]] * missing, mask + [0] * missing
        if self._prefix:
            ids, mask = ids[:1] + [self.meta["prefix_id"]] + ids[1:], [1] + mask
        if self.meta["attend_to_expansion"]:
            mask = [1] * len(ids)
        return ids, mask

    def _words(self, query: str) -> int:
        """Tokens of the query itself within the query length (special tokens excluded)."""
        return len(self.tokenizer.encode(query).ids) - 2


def late_query_encoder(info: dict, device: str | None, onnx_queries: bool = True):
    """The encoder of late-interaction queries to an index whose late stage is `info`: the cached export on a CPU,
    else the model itself (LateEncoder), which then makes the export for the next query."""
    usable = onnx_queries and device in (None, "cpu") and info.get("revision", "unknown") != "unknown"
    if usable:
        found = OnnxLateQueryEncoder.cached(info["model"], info["revision"])
        if found is not None:
            return found
    from ragkit.encoders.late import LateEncoder

    encoder = LateEncoder(info["model"], info["document_length"], device=device)
    if usable and encoder.revision == info["revision"]:
        encoder.export_for_queries()
    return encoder
