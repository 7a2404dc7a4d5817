"""Contextual chunks: what the dense encoder and BM25 read for a chunk is its document's name and heading path
followed by its own text, so that a table of figures from "3M_2018_10K.txt" is found by "3M's 2018 capital
expenditure". The displayed text, citations and evidence spans stay the chunk's own: the context is never stored,
it is rebuilt from the chunk's path and heading whenever the index is encoded.

The context takes at most `context_tokens` tokens of the encoder (its tail is cut when longer); chunks are cut that
much shorter, so that context and chunk together still fit the encoder whole.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Callable, Sequence

CountTokens = Callable[[str], int]
SEPARATOR = "\n"  # between the context and the chunk's text
_NAME_JOINERS = re.compile(r"[_\s]+")


def document_name(path: str) -> str:
    """A file's relative path as words: folders and the file name without its extension, underscores as spaces.

    >>> document_name("filings/3M_2018_10K.txt")
    'filings / 3M 2018 10K'
    """
    parts = list(PurePosixPath(path).parts)
    parts[-1] = PurePosixPath(parts[-1]).stem if "." in parts[-1][1:] else parts[-1]
    return " / ".join(_NAME_JOINERS.sub(" ", part).strip() for part in parts if part.strip("_ "))


def chunk_context(path: str, heading: str) -> str:
    """The document's name, then the chunk's heading path when it has one.

    >>> chunk_context("3M_2018_10K.txt", "Item 8 > Cash Flows")
    '3M 2018 10K > Item 8 > Cash Flows'
    """
    name = document_name(path)
    return f"{name} > {heading}" if heading else name


def fit_context(context: str, limit: int, count_tokens: CountTokens) -> str:
    """`context` and its separator cut to at most `limit` tokens (words dropped from the end); "" when none fit.

    >>> fit_context("one two three four", 3, lambda text: len(text.split()))
    'one two three\\n'
    """
    if limit <= 0 or not context:
        return ""
    words = context.split(" ")
    prefix = context + SEPARATOR
    while words and count_tokens(prefix) > limit:
        words = words[: max(0, min(len(words) - 1, len(words) * limit // max(1, count_tokens(prefix))))]
        prefix = " ".join(words) + SEPARATOR
    return prefix if words else ""


def contextual_texts(paths: Sequence[str], headings: Sequence[str], texts: Sequence[str], limit: int,
                     count_tokens: CountTokens) -> tuple[list[str], list[int]]:
    """What the encoders read for each chunk, and how many tokens its context adds (0 when `limit` is 0).

    Chunks of one document under one heading share their context, which is fitted once."""
    fitted: dict[tuple[str, str], tuple[str, int]] = {}
    out, extra = [], []
    for path, heading, text in zip(paths, headings, texts):
        key = (path, heading)
        if key not in fitted:
            prefix = fit_context(chunk_context(path, heading), limit, count_tokens)
            fitted[key] = (prefix, count_tokens(prefix) if prefix else 0)
        prefix, n = fitted[key]
        out.append(prefix + text)
        extra.append(n)
    return out, extra
