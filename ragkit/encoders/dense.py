"""Single-vector encoder: a sentence-transformers model, with its own tokenizer for chunk sizes."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ragkit.models import load_model, model_revision, resolve_model_name
from ragkit.tokens import quiet_transformers, token_batches, token_starts

# (chunks done, chunks total, tokens done)
EncodeProgress = Callable[[int, int, int], None]


class DenseEncoder:
    """Loads a sentence-transformers model by hub id or local path and encodes text to unit vectors."""

    def __init__(self, name: str, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        quiet_transformers()
        self.name = resolve_model_name(name)
        self.model = load_model("dense", name, lambda n: SentenceTransformer(n, device=device))
        self.tokenizer = self.model.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            from ragkit.errors import ModelLoadError

            raise ModelLoadError(f"the dense model '{name}' has no fast tokenizer; ragkit needs one to size chunks")
        self.tokenizer.model_max_length = 10**9  # we count whole documents; never truncate or warn here
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.revision = model_revision(self.name)

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included, the model reads without truncation."""
        return int(self.model.max_seq_length)

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
        return {"model": self.name, "revision": self.revision, "dim": self.dim, "max_tokens": self.max_tokens}

    def encode_documents(
        self,
        texts: Sequence[str],
        n_tokens: Sequence[int],
        batch_tokens: int = 16384,
        progress: EncodeProgress | None = None,
    ) -> np.ndarray:
        """Unit vectors (n, dim) float32; batches are length-sorted and bounded by padded tokens."""
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
        encode = self.model.encode_query if is_query else self.model.encode_document
        vectors = encode(
            texts,
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
