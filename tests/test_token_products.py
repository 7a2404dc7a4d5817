"""Similarity products of query tokens with stored token vectors, and MaxSim per chunk from them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ragkit.indexes import token_products as token_products_module
from ragkit.indexes.token_products import chunk_maxima, chunk_maxsim, token_products


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_products_equal_the_float64_reference_for_stored_float16_and_float32(dtype, monkeypatch):
    monkeypatch.setattr(token_products_module, "_SESSION", None)  # made again only if this call needs it
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(7, 128)).astype(np.float32)
    tokens = rng.normal(size=(1000, 128)).astype(dtype)
    products = token_products(queries, tokens)
    assert products.shape == (7, 1000) and products.dtype == np.float32
    assert (token_products_module._SESSION is not None) == (dtype == np.float16)  # float16 goes through the graph
    reference = queries.astype(np.float64) @ tokens.astype(np.float64).T
    assert np.abs(products - reference).max() < 1e-3


def test_products_with_no_tokens_or_no_queries_are_empty():
    queries = np.ones((3, 16), dtype=np.float32)
    assert token_products(queries, np.zeros((0, 16), dtype=np.float16)).shape == (3, 0)
    assert token_products(queries[:0], np.ones((5, 16), dtype=np.float16)).shape == (0, 5)


def test_threads_share_the_half_precision_session(monkeypatch):
    from ragkit.encoders import onnx
    from ragkit.indexes import token_products as module

    opened = []

    def counted(path, threads=None):
        opened.append(path)
        return session(path, threads)

    session = onnx.session
    monkeypatch.setattr(module, "_SESSION", None)  # as in a fresh process
    monkeypatch.setattr(onnx, "session", counted)
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(500, 32)).astype(np.float16)
    queries = [rng.normal(size=(4, 32)).astype(np.float32) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: token_products(q, tokens), queries))
    assert len(opened) == 1
    for query, products in zip(queries, results):
        assert np.allclose(products, query @ tokens.astype(np.float32).T, atol=1e-4)


def test_chunk_maxsim_sums_each_query_token_maximum_within_each_chunk():
    rng = np.random.default_rng(2)
    lengths = [3, 1, 5, 2]
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    tokens = rng.normal(size=(sum(lengths), 16)).astype(np.float16)
    products = queries.astype(np.float64) @ tokens.astype(np.float64).T
    starts = np.cumsum(lengths) - lengths
    maxima = [[products[i, a : a + n].max() for a, n in zip(starts, lengths)] for i in range(4)]
    assert np.allclose(chunk_maxima(queries, tokens, starts), maxima, atol=1e-4)
    assert np.allclose(chunk_maxsim(queries, tokens, starts), np.sum(maxima, axis=0), atol=1e-4)


def test_concurrent_searches_score_one_block_at_a_time(monkeypatch):
    """Each call holds a block's products; threads take turns, so memory does not grow with concurrent searches."""
    import threading
    import time

    from ragkit.indexes import token_products as module

    inside, most, guard = [0], [0], threading.Lock()

    def slow_products(queries, tokens):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        with guard:
            inside[0] -= 1
        return queries @ tokens.astype(np.float32).T

    monkeypatch.setattr(module, "token_products", slow_products)
    tokens = np.ones((6, 8), dtype=np.float16)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: module.chunk_maxima(np.ones((2, 8), np.float32), tokens, np.array([0, 3])),
                                range(8)))
    assert most[0] == 1 and all(np.allclose(r, 8.0) for r in results)


def test_the_shipped_graph_is_the_one_products_model_writes():
    from ragkit.indexes.token_products import MODEL, products_model

    assert MODEL.read_bytes() == products_model()


def test_a_query_path_that_scores_products_does_not_import_onnx():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from ragkit.indexes.token_products import token_products; "
            "token_products(np.ones((2, 8), np.float32), np.ones((3, 8), np.float16)); print('onnx' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
