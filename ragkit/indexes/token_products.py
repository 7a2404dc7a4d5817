"""Query-token × document-token similarity products for exact MaxSim, with float16 token matrices read as stored.

numpy's float16 → float32 conversion costs more than the product itself; ONNX Runtime's Cast uses the CPU's
half-precision instructions, so a float16 block goes through a two-node graph (Cast, then Gemm) instead. The graph
ships as token_products.onnx (written by `products_model`, which the tests compare with it), so that a query does not
import the onnx package. The products come out query-token-major, (q_tokens, tokens), so that each chunk's maximum
is a reduction over contiguous memory (np.maximum.reduceat along axis 1).

One block is scored at a time per process (`chunk_maxima`): a product already runs on every core (ONNX Runtime's
threads), so concurrent searches gained no speed from overlapping theirs (measured on two cores), and each held a
block's float32 cast and products at once (bounded by BLOCK_TOKENS and MAX_BLOCK_SCORES of ragkit.indexes.late).
A search's re-ranking of its candidates may so wait for other searches' blocks, a block at a time. ONNX Runtime's
memory arena stays on: it keeps what one block needed, where without it every block's buffers would be allocated
and paged in afresh.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

MODEL = Path(__file__).with_name("token_products.onnx")
_SESSION = None
_SESSION_LOCK = threading.Lock()
_SCORING = threading.Lock()  # one block's products at a time (see above)


def token_products(queries: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """queries (m, dim) · tokensᵀ for tokens (n, dim) float16 or float32: (m, n) float32."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if tokens.dtype != np.float16 or len(tokens) == 0 or len(queries) == 0:
        return queries @ np.asarray(tokens, dtype=np.float32).T
    return _half_session().run(None, {"queries": queries, "tokens": np.ascontiguousarray(tokens)})[0]


def chunk_maxima(queries: np.ndarray, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each query token's best product in each chunk, (m, chunks) float32, for queries (m, dim) and the tokens
    (n, dim) of chunks beginning at rows `starts` (each non-empty). One call at a time per process."""
    with _SCORING:
        return np.maximum.reduceat(token_products(queries, tokens), starts, axis=1)


def chunk_maxsim(queries: np.ndarray, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """MaxSim per chunk of one query (q_tokens, dim) against chunks as in `chunk_maxima`: (chunks,) float32."""
    return chunk_maxima(queries, tokens, starts).sum(axis=0)


def products_model() -> bytes:
    """The serialized graph: float32 (m, dim) queries, float16 (n, dim) tokens → (m, n) float32 products."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["tokens32"], to=TensorProto.FLOAT),
         helper.make_node("Gemm", ["queries", "tokens32"], ["products"], transB=1)],
        "token_products",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["m", "dim"]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT16, ["n", "dim"])],
        [helper.make_tensor_value_info("products", TensorProto.FLOAT, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ragkit")
    model.ir_version = 8  # readable by every onnxruntime the project allows
    return model.SerializeToString()


def _half_session():
    """One ONNX Runtime session of the shipped graph per process."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            from ragkit.encoders.onnx import session

            _SESSION = session(MODEL)
        return _SESSION
