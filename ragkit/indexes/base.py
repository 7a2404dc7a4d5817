"""What every search structure returns (the dense, BM25 and late indexes each search rows 0..n-1 of the chunk
table and load from their own folder of the generation)."""

from __future__ import annotations

# One result list per query: (row in the chunk table, score), best first.
SearchResults = list[list[tuple[int, float]]]
