"""Late-interaction (ColBERT) encoder through PyLate: one vector per token, with each token's char span."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ragkit.errors import ModelLoadError
from ragkit.models import check_device, load_model, model_revision, resolve_model_name
from ragkit.tokens import quiet_transformers, token_batches, token_starts

NO_SPAN = -1  # span of a token that stands for no text (CLS, SEP, the [D] prefix)


@dataclass
class TokenEmbeddings:
    """The token vectors of one text and the char span [start, end) of each token in that text."""

    vectors: np.ndarray  # (tokens, dim) float16, unit length
    spans: np.ndarray  # (tokens, 2) int32; NO_SPAN where a token covers no text


class LateEncoder:
    """A PyLate ColBERT model read by hub id or local path; documents up to `document_length` tokens.

    A model without a ColBERT head (a plain encoder such as a sentence-transformers folder) is read through an
    identity projection: MaxSim then compares the backbone's own token vectors. PyLate would otherwise add a
    projection and prefix tokens drawn at random at every load, so that every load ranked differently.
    """

    # most tokens PyLate adds around a document: CLS, the document prefix ([D]) and SEP
    SPECIAL_TOKENS = 3

    def __init__(self, name: str, document_length: int, device: str | None = None) -> None:
        quiet_transformers()
        check_device(device)
        self.name = resolve_model_name(name)
        self.projection = "trained" if load_model("late", name, has_colbert_head) else "identity"
        self.model = load_model("late", name, lambda n: _load_colbert(n, document_length, device, self.projection))
        self.tokenizer = self.model.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelLoadError(f"the late model '{name}' has no fast tokenizer; ragkit needs one for evidence")
        self.tokenizer.model_max_length = 10**9
        self._prefix = int(self.model.document_prefix_id is not None)  # 1 when PyLate inserts [D] / [Q]
        self.special_tokens = 2 + self._prefix
        self.document_length = min(document_length, self.max_positions)  # set to the chunk length, not 300
        self.model.document_length = self.document_length
        self.dim = int(self.model.encode(["x"], is_query=True, show_progress_bar=False)[0].shape[-1])
        self.revision = model_revision(self.name)

    @property
    def projection_note(self) -> str:
        """What a user should know about how this model scores (one sentence)."""
        if self.projection == "identity":
            return (f"the late model {self.name} has no ColBERT head: late interaction compares its own token "
                    "vectors (identity projection), which no retrieval training has shaped")
        return f"the late model {self.name} is a ColBERT model"

    @property
    def max_positions(self) -> int:
        """The longest input the backbone can read at all."""
        config = self.model[0].auto_model.config
        return int(getattr(config, "max_position_embeddings", None) or self.model.document_length)

    def fit_to_chunks(self, chunk_tokens: int) -> None:
        """Read documents of up to `chunk_tokens` tokens (plus the special ones) whole, and no longer."""
        self.document_length = min(chunk_tokens + self.special_tokens, self.max_positions)
        self.model.document_length = self.document_length

    def token_starts(self, text: str) -> list[int]:
        """Char offset where each token of `text` starts, as this model's tokenizer cuts it."""
        return token_starts(self.tokenizer, text)

    def fingerprint(self) -> dict[str, object]:
        return {"model": self.name, "revision": self.revision, "dim": self.dim,
                "document_length": self.document_length, "projection": self.projection}

    def export_for_queries(self) -> str | None:
        """Make (once per model) the ONNX export that encodes a query without torch (ragkit.encoders.late_onnx);
        returns why it cannot be made, or None when it is there."""
        from ragkit.encoders.late_onnx import KIND, export_late_query
        from ragkit.encoders.onnx import ensure_export

        return ensure_export(self, self.name, self.revision, KIND, export_late_query, device=str(self.model.device))

    def encode_queries(self, queries: Sequence[str]) -> list[np.ndarray]:
        """(query tokens, dim) float32 per query, unit rows. Through an identity projection only the query's
        words are kept: an untrained model's [CLS] and [SEP] vectors resemble every text alike."""
        vectors = self.model.encode(list(queries), is_query=True, show_progress_bar=False,
                                    batch_size=max(1, len(queries)))
        out = [np.asarray(v, dtype=np.float32) for v in vectors]
        if self.projection == "identity":
            out = [v[1 : 1 + self._words(q)] if self._words(q) else v for v, q in zip(out, queries)]
        return out

    def word_positions(self, query: str) -> np.ndarray:
        """Positions of the query's own tokens in `encode_queries`' output ([CLS] [Q] words… [SEP] [MASK]…; the
        words alone through an identity projection): evidence follows these, not the expansion tokens, which
        align to whatever is generic in a chunk."""
        if self.projection == "identity":
            return np.arange(self._words(query) or len(self.tokenizer(query)["input_ids"]))
        return np.arange(2, 2 + self._words(query))

    def _words(self, query: str) -> int:
        """Tokens of the query itself within the query length (special tokens excluded)."""
        ids = self.tokenizer(query, truncation=True, max_length=self.model.query_length - self._prefix)["input_ids"]
        return len(ids) - 2

    def encode_documents(
        self,
        texts: Sequence[str],
        n_tokens: Sequence[int],
        batch_tokens: int = 16384,
        pool_factor: int = 1,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> list[TokenEmbeddings]:
        """Token vectors and spans per text; a pooled vector (pool_factor > 1) carries its most central token's span."""
        out: list[TokenEmbeddings | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: n_tokens[i], reverse=True)
        done = tokens = 0
        for batch in token_batches(order, n_tokens, batch_tokens):
            batch_texts = [texts[i] for i in batch]
            encoded = self._encode_pooled(batch_texts, pool_factor) if pool_factor > 1 else \
                self._encode_with_spans(batch_texts)
            for i, item in zip(batch, encoded):
                out[i] = item
            done += len(batch)
            tokens += sum(n_tokens[i] for i in batch)
            if progress:
                progress(done, len(texts), tokens)
        return out  # type: ignore[return-value]

    def _encode_with_spans(self, texts: list[str]) -> list[TokenEmbeddings]:
        """Encode unpooled, keeping the tokens PyLate keeps (its skiplist drops punctuation) with their spans."""
        result = self.model.encode(texts, is_query=False, output_value=None, show_progress_bar=False,
                                   batch_size=len(texts))
        out = []
        for text, vectors, ids, mask in zip(texts, result["token_embeddings"], result["input_ids"], result["masks"]):
            spans = self._spans(text, _numpy(ids))
            keep = _numpy(mask).astype(bool)
            out.append(TokenEmbeddings(_numpy(vectors)[keep].astype(np.float16), spans[keep]))
        return out

    def _spans(self, text: str, input_ids: np.ndarray) -> np.ndarray:
        """Char span of each position of PyLate's sequence: [CLS] [D] tokens… [SEP] (padding has none; no [D]
        without a ColBERT head)."""
        encoded = self.tokenizer(text, truncation=True, max_length=self.document_length - self._prefix,
                                 return_offsets_mapping=True)
        spans = np.full((len(input_ids), 2), NO_SPAN, dtype=np.int32)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        prefixed = ids[:1] + [int(input_ids[1])] + ids[1:] if self._prefix and len(input_ids) > 1 else ids
        if list(input_ids[: len(prefixed)]) != prefixed:
            return spans  # a tokenizer we cannot align: no evidence rather than wrong evidence
        for position, (start, end) in enumerate(offsets[1:], start=1 + self._prefix):
            if end > start:
                spans[position] = (start, end)
        return spans

    def _encode_pooled(self, texts: list[str], pool_factor: int) -> list[TokenEmbeddings]:
        return [pool_tokens(t.vectors, t.spans, pool_factor) for t in self._encode_with_spans(texts)]


def has_colbert_head(name: str) -> bool:
    """Whether the model `name` (resolved hub id or folder) carries a trained projection for late interaction:
    a Dense module in its sentence-transformers layout, or a Stanford ColBERT checkpoint."""
    modules = _model_json(name, "modules.json") or []
    if any("Dense" in str(module.get("type", "")) for module in modules):
        return True
    config = _model_json(name, "config.json")
    if config is None:
        raise OSError("no config.json in that folder" if Path(name).is_dir() else
                      "not in the local Hugging Face cache, and it could not be downloaded")
    return "HF_ColBERT" in (config.get("architectures") or [])


def _model_json(name: str, file_name: str):
    """A JSON file of a model folder or hub repository (downloaded if needed), or None when it has none."""
    import json

    from transformers.utils import cached_file

    path = cached_file(name, file_name, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(path).read_text()) if path else None


def _load_colbert(name: str, document_length: int, device: str | None, projection: str):
    """PyLate's ColBERT; with `projection="identity"`, no prefix tokens, no query expansion and an identity
    projection on the backbone's hidden size, so that nothing random is added."""
    from pylate import models

    if projection != "identity":
        return models.ColBERT(name, device=device, document_length=document_length)
    import torch

    model = models.ColBERT(name, device=device, document_length=document_length, query_prefix="",
                           document_prefix="", do_query_expansion=False)
    hidden = model[0].get_word_embedding_dimension()
    identity = models.Dense(in_features=hidden, out_features=hidden, bias=False)
    with torch.no_grad():
        identity.linear.weight.copy_(torch.eye(hidden))
    model[1] = identity.to(next(model[0].parameters()).device)
    return model


def pool_tokens(vectors: np.ndarray, spans: np.ndarray, factor: int, protected: int = 1) -> TokenEmbeddings:
    """Hierarchical token pooling (as PyLate's pool_factor): Ward clustering of the token vectors on cosine
    distance into len / factor clusters, each replaced by its normalised mean. The first `protected` tokens
    (CLS) stay as they are. Each pooled vector keeps the span of its most central member, so evidence still
    points at text.

    >>> v = np.array([[1, 0], [1, 0], [0.99, 0.14], [0, 1], [0.1, 0.99]], dtype=np.float16)
    >>> pooled = pool_tokens(v, np.arange(10, dtype=np.int32).reshape(5, 2), 2)
    >>> len(pooled.vectors), pooled.spans[0].tolist(), pooled.vectors[1:].astype(float).round(1).tolist()
    (3, [0, 1], [[1.0, 0.1], [0.1, 1.0]])
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    head, rest = vectors[:protected], np.asarray(vectors[protected:], dtype=np.float32)
    clusters = max(1, len(rest) // factor)
    if len(rest) < 2 or clusters >= len(rest):
        return TokenEmbeddings(np.asarray(vectors, dtype=np.float16), np.asarray(spans))
    distances = np.clip(1.0 - rest @ rest.T, 0.0, None)  # rounding can make 1 - cos(x, x) slightly negative
    np.fill_diagonal(distances, 0.0)
    labels = fcluster(linkage(squareform(distances, checks=False), method="ward"), t=clusters, criterion="maxclust")
    pooled_vectors, pooled_spans = [np.asarray(head, dtype=np.float32)], [np.asarray(spans[:protected])]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mean = rest[members].mean(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        central = members[int(np.argmax(rest[members] @ mean))]
        pooled_vectors.append(mean[None, :])
        pooled_spans.append(np.asarray(spans[protected + central])[None, :])
    return TokenEmbeddings(np.concatenate(pooled_vectors).astype(np.float16), np.concatenate(pooled_spans))


def _numpy(x) -> np.ndarray:
    """A numpy array from a torch tensor (any device or dtype) or an array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)
