"""Single-vector encoder: a sentence-transformers model, with its own tokenizer for chunk sizes."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ragkit.encoders.int8 import backend_fingerprint
from ragkit.encoders.onnx import MAX_TOKENS as ONNX_MAX_TOKENS
from ragkit.models import check_device, load_model, model_revision, resolve_model_name
from ragkit.tokens import quiet_transformers, token_batches, token_starts

# (chunks done, chunks total, tokens done)
EncodeProgress = Callable[[int, int, int], None]


class DenseEncoder:
    """Loads a sentence-transformers model by hub id or local path and encodes text to unit vectors.

    backend: torch runs the model as loaded; onnx and onnx-int8 run its ONNX export (`ragkit.encoders.onnx`, made
    on first use) through ONNX Runtime, float32 (torch's vectors) or with int8 weights (faster, close to them).
    """

    def __init__(self, name: str, device: str | None = None, backend: str = "torch") -> None:
        from sentence_transformers import SentenceTransformer

        quiet_transformers()
        check_device(device)
        self.name = resolve_model_name(name)
        self.model = load_model("dense", name, lambda n: SentenceTransformer(n, device=device))
        self.tokenizer = self.model.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            from ragkit.errors import ModelLoadError

            raise ModelLoadError(f"the dense model '{name}' has no fast tokenizer; ragkit needs one to size chunks")
        self.tokenizer.model_max_length = 10**9  # we count whole documents; never truncate or warn here
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.revision = model_revision(self.name)
        self.backend = backend
        self._onnx = self._open_export(backend) if backend != "torch" else None

    def _open_export(self, backend: str):
        """The ONNX encoder of this model for `backend`, exported now if it is not in the cache."""
        from ragkit.encoders.onnx import OnnxEncoder
        from ragkit.errors import ModelLoadError

        int8 = backend == "onnx-int8"
        failure = self.export_for_queries()
        if failure:
            raise ModelLoadError(f"the dense model '{self.name}' cannot run on the {backend} backend ({failure}); "
                                 "use dense_backend=torch", settings=("dense_backend",))
        encoder = OnnxEncoder.cached(self.name, self.revision, int8)
        if encoder is None:
            raise ModelLoadError(f"the int8 export of the dense model '{self.name}' strays too far from its "
                                 "vectors; use dense_backend=onnx or torch", settings=("dense_backend",))
        return encoder

    def export_for_queries(self) -> str | None:
        """Make (once per model) the ONNX export that encodes a query without torch; returns why it cannot be
        made, or None when it is there."""
        from ragkit.encoders.onnx import ensure_export

        return ensure_export(self.model, self.name, self.revision, device=str(self.model.device))

    def matches(self, info: dict) -> bool:
        """Whether this encoder makes the query vectors of an index whose dense stage is `info`."""
        from ragkit.encoders.onnx import same_vectors

        return (info["model"], info.get("revision")) == (self.name, self.revision) and \
            same_vectors(self.backend, info.get("backend", "torch"))

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included, the model reads without truncation (on the ONNX backends at
        most ONNX_MAX_TOKENS, so that chunks are cut to fit them)."""
        limit = int(self.model.max_seq_length)
        return min(limit, ONNX_MAX_TOKENS) if self.backend != "torch" else limit

    @property
    def special_tokens(self) -> int:
        """How many special tokens the tokenizer adds around every input."""
        return len(self.tokenizer("")["input_ids"])

    def token_starts(self, text: str) -> list[int]:
        """Char offset where each token of `text` starts (special tokens excluded)."""
        return token_starts(self.tokenizer, text)

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`, special tokens excluded."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fingerprint(self) -> dict[str, object]:
        """What identifies the vectors this encoder makes."""
        return {"model": self.name, "revision": self.revision, "dim": self.dim, "max_tokens": self.max_tokens,
                **backend_fingerprint(self.backend)}

    def encode_documents(
        self,
        texts: Sequence[str],
        n_tokens: Sequence[int],
        batch_tokens: int = 16384,
        progress: EncodeProgress | None = None,
    ) -> np.ndarray:
        """Unit vectors (n, dim) float32; batches are length-sorted and bounded by padded tokens."""
        if self._onnx is not None and max(n_tokens, default=0) > ONNX_MAX_TOKENS:
            from ragkit.errors import RagkitError

            raise RagkitError(f"the {self.backend} backend encodes chunks of at most {ONNX_MAX_TOKENS:,} tokens "
                              f"(this run has chunks of {max(n_tokens):,}; ONNX Runtime's attention would hold "
                              f"tokens² scores per head); index with chunk_tokens={ONNX_MAX_TOKENS} or "
                              "dense_backend=torch", settings=("chunk_tokens", "dense_backend"))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: n_tokens[i], reverse=True)
        done = tokens = 0
        for batch in token_batches(order, n_tokens, batch_tokens):
            vectors = self._encode([texts[i] for i in batch], is_query=False)
            out[batch] = vectors
            done += len(batch)
            tokens += sum(n_tokens[i] for i in batch)
            if progress:
                progress(done, len(texts), tokens)
        return out

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Unit vectors (n, dim) float32 for queries (the model's query prompt applies, if it has one)."""
        return self._encode(list(queries), is_query=True)

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if self._onnx is not None:
            return self._onnx.encode_queries(texts) if is_query else self._onnx.encode_documents(texts)
        encode = self.model.encode_query if is_query else self.model.encode_document
        vectors = encode(
            texts,
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
