"""Token helpers shared by the search side and the readers: word tokens for BM25 and sentence matching, a model
tokenizer's ids of a whole document, length-bounded batches, and quieting the model libraries.

Nothing heavy is imported here at module level: each helper imports what it needs when called."""

from __future__ import annotations

from typing import Any, Sequence

STEMMER_LANGUAGE = "english"


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased, stop-worded, stemmed word tokens of each text."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)
    return bm25s.tokenize(list(texts), stemmer=stemmer.stemWords, return_ids=False, show_progress=False)


def token_starts(tokenizer: Any, text: str) -> list[int]:
    """Char offset where each token of `text` starts, as `tokenizer` (a fast tokenizer) cuts it; special tokens
    excluded."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [start for start, end in offsets if end > start]


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole document, without special tokens or the length warning of `tokenizer.encode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def token_batches(order: list[int], n_tokens: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Split length-sorted (longest first) indices so that longest × count ≤ batch_tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = n_tokens[current[0]] if current else n_tokens[i]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def quiet_transformers() -> None:
    """Silence load reports, download bars and the model libraries' own notes (such as sentence-transformers'
    "creating a new one with mean pooling" before a load fails): ragkit reports what matters itself."""
    import logging as std_logging

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    for library in ("sentence_transformers", "pylate"):
        std_logging.getLogger(library).setLevel(std_logging.ERROR)
