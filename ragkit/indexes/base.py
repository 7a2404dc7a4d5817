"""The small contract every search structure follows."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

# One result list per query: (row in the chunk table, score), best first.
SearchResults = list[list[tuple[int, float]]]


class SearchIndex(Protocol):
    """A search structure over rows 0..n-1 of a chunk table, saved to and loaded from its own folder."""

    def search(self, queries: Sequence, k: int) -> SearchResults:
        """Top `k` rows for each query."""
        ...

    def save(self, folder: Path) -> None:
        """Write the index as plain files into `folder`."""
        ...
