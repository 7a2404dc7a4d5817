"""Dense encoding through ONNX Runtime, without torch: an export of the sentence-transformers model made here.

Exports live in ragkit's cache (`cache_dir("onnx")`), one folder per kind (dense, or late-query: the query side of
a ColBERT model, ragkit.encoders.late_onnx), model and revision. A dense export holds:
    model.onnx       the whole sentence-transformers pipeline (transformer, pooling, normalisation), float32,
                     inputs input_ids and attention_mask (batch, tokens), output embedding (batch, dim)
    model.int8.onnx  the same with 8-bit weights (dynamic quantisation per channel of a graph whose attention is
                     fused; ragkit.encoders.int8 keeps the few input channels that carry outliers in float32), when
                     it checks out
    tokenizer.json   the model's fast tokenizer
    encoder.json     what the runtime needs (maximum tokens, prompts, lower-casing), the check made at export
                     and how the int8 graph was made (int8_fused, int8_outlier_channels)

An export is used only after its vectors were compared with torch's on probe texts at export time: float32 must
agree to within FLOAT32_TOLERANCE (the same vectors, so an index encoded by torch is searched through it), int8
within INT8_MIN_COSINE. A model the exporter cannot handle gets `failed.json` with the reason, and torch serves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ragkit.encoders.int8 import backend_fingerprint
from ragkit.errors import warn
from ragkit.models import cache_dir

EXPORT_VERSION = 6  # 3: int8 outlier channels in float32; 4: eager attention; 5: unsigned int8; 6: fused int8
MAX_TOKENS = 1024  # longest chunk the ONNX backends encode: their attention holds tokens² scores per head at once
FLOAT32_TOLERANCE = 1e-4  # largest difference in any coordinate of a unit vector, ONNX float32 against torch
INT8_MIN_COSINE = 0.95  # least cosine of an int8 vector with torch's, on every probe
MODEL, MODEL_INT8, TOKENIZER, META, FAILED = (
    "model.onnx", "model.int8.onnx", "tokenizer.json", "encoder.json", "failed.json")
PROBES = (
    "What is the capital of France?",
    "Revenue grew 12% year over year, driven by services; operating margin was 31.4%.",
    "def encode(texts): return model(texts)  # a line of code",
)


class ExportError(Exception):
    """The model cannot be exported to ONNX, or its export disagrees with torch."""


def export_folder(model: str, revision: str, kind: str = "dense") -> Path:
    """The cache folder of the export of `model` at `revision`; `kind`: dense, or late-query (a ColBERT model's
    query side, ragkit.encoders.late_onnx)."""
    key = hashlib.blake2b(f"{EXPORT_VERSION}\0{kind}\0{model}\0{revision}".encode(), digest_size=8).hexdigest()
    return cache_dir("onnx") / f"{Path(model).name or 'model'}-{key}"


def ready_export(model: str, revision: str, int8: bool = False, kind: str = "dense") -> Path | None:
    """The checked export of `model` at `revision` (with its int8 model when `int8`), or None."""
    folder = export_folder(model, revision, kind)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != EXPORT_VERSION or (int8 and not meta.get("int8")):
        return None
    return folder


def export_failure(model: str, revision: str, kind: str = "dense") -> str | None:
    """Why an earlier export of `model` at `revision` failed, or None."""
    try:
        return json.loads((export_folder(model, revision, kind) / FAILED).read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return None


def export(source: Any, model: str, revision: str, kind: str = "dense",
           build: Callable[[Any, Path], dict[str, Any]] | None = None) -> Path:
    """Export a loaded model to the cache, check it against torch, and return its folder. `build(source, folder)`
    writes the files and returns encoder.json's fields (default: `export_dense` of a SentenceTransformer).

    Written in a temporary folder and moved into place whole, so that a reader never sees half an export.
    Raises ExportError when it fails, and records why when the model is at fault, so that the next run does not
    try again."""
    folder = export_folder(model, revision, kind)
    if ready_export(model, revision, kind=kind):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise ExportError(f"the cache folder {folder.parent} cannot be written ({e.strerror or e})") from e
    try:
        with _quiet():
            meta = (build or export_dense)(source, work)
        meta.update(model=model, revision=revision)
        (work / META).write_text(json.dumps(meta, indent=2))
        if ready_export(model, revision, kind=kind):  # another thread or worker finished first: keep theirs
            shutil.rmtree(work, ignore_errors=True)
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # a failure recorded before, or an export of an older version
        try:
            os.replace(work, folder)
        except OSError:
            if ready_export(model, revision, kind=kind) is None:
                raise
            shutil.rmtree(work, ignore_errors=True)  # another process (a worker of the same run) made it first
    except Exception as e:
        shutil.rmtree(work, ignore_errors=True)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if isinstance(e, ExportError) or not isinstance(e, (OSError, MemoryError)):  # the model's own failure:
            with contextlib.suppress(OSError):  # recorded, so that the next run does not try again
                folder.mkdir(parents=True, exist_ok=True)
                (folder / FAILED).write_text(json.dumps({"version": EXPORT_VERSION, "reason": reason}))
        raise ExportError(reason) from e
    return folder


def ensure_export(source: Any, model: str, revision: str, kind: str = "dense",
                  build: Callable[[Any, Path], dict[str, Any]] | None = None, device: str = "cpu") -> str | None:
    """Make the export of `model` unless it is cached (see `export`); returns why it cannot be made, or None.
    Exports are made from a model on the CPU, where they run and where their check is exact."""
    if ready_export(model, revision, kind=kind):
        return None
    if device != "cpu":
        return f"the model is on {device}; its export is made by a run on the CPU"
    if export_failure(model, revision, kind):
        return export_failure(model, revision, kind)
    try:
        export(source, model, revision, kind, build)
    except ExportError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantiser's advice (warnings, and root-logger lines from onnxruntime)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_dense(st_model: Any, work: Path) -> dict[str, Any]:
    """Write model.onnx, model.int8.onnx and tokenizer.json of `st_model` into `work`; returns encoder.json's
    fields. Only the usual pipeline is exported: a transformer whose fast tokenizer makes every input, then
    modules that read its output (pooling, dense layers, normalisation)."""
    from ragkit.encoders.int8 import fusion_shape, quantize_int8

    first = st_model[0]
    tokenizer = getattr(first, "tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(first, "max_seq_length"):
        raise ExportError("the first module is not a transformer with a fast tokenizer")
    if any(getattr(module, "include_prompt", True) is False for module in st_model):
        raise ExportError("its pooling leaves the prompt out, which the export does not reproduce")
    meta = {
        "version": EXPORT_VERSION,
        "dim": int(st_model.get_sentence_embedding_dimension()),
        "max_tokens": int(st_model.max_seq_length),
        "lower_case": bool(getattr(first, "do_lower_case", False)),
        "query_prompt": _prompt(st_model, "query"),
        "document_prompt": _prompt(st_model, "document"),
    }
    tokenizer.backend_tokenizer.save(str(work / TOKENIZER))
    device = next(st_model.parameters()).device
    sample = tokenizer(list(PROBES), padding=True, return_tensors="pt")
    export_graph(st_model, {name: tensor.to(device) for name, tensor in sample.items()}, work / MODEL)
    long = min(meta["max_tokens"] + 16, MAX_TOKENS)  # past the model's limit when that is short: truncation
    probes = [*PROBES, " ".join(["evidence"] * long)]
    reference = _torch_vectors(st_model, probes)
    exported = OnnxEncoder(work, meta, int8=False)
    float32 = exported.encode_texts(probes)
    for ours, theirs in ((float32, reference),
                         (exported.encode_queries(probes), _torch_vectors(st_model, probes, "encode_query")),
                         (exported.encode_documents(probes), _torch_vectors(st_model, probes, "encode_document"))):
        if float(np.abs(ours - theirs).max()) > FLOAT32_TOLERANCE:
            raise ExportError("the exported model's vectors (or its prompts) differ from torch's")
    feeds = {name: sample[name].numpy().astype(np.int64) for name in ("input_ids", "attention_mask")}
    heads, width = fusion_shape(getattr(getattr(first, "auto_model", None), "config", None))
    meta["int8_outlier_channels"], meta["int8_fused"] = quantize_int8(work / MODEL, work / MODEL_INT8, feeds, heads,
                                                                      width)
    int8 = OnnxEncoder(work, meta, int8=True).encode_texts(probes)
    meta["int8_min_cosine"] = round(float((int8 * reference).sum(axis=1).min()), 6)
    meta["int8"] = meta["int8_min_cosine"] >= INT8_MIN_COSINE
    if not meta["int8"]:
        (work / MODEL_INT8).unlink()
    return meta


def _pipeline(st_model: Any, output: str = "sentence_embedding"):
    """The SentenceTransformer as a module of two tensors for the exporter to trace: (batch, tokens) ids and mask →
    (batch, dim) sentence vectors, or with output="token_embeddings" (batch, tokens, dim) unit token vectors."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st_model

        def forward(self, input_ids, attention_mask):
            out = self.st({"input_ids": input_ids, "attention_mask": attention_mask})[output]
            return out if output == "sentence_embedding" else torch.nn.functional.normalize(out, p=2, dim=-1)

    return Pipeline().eval()


def export_graph(st_model: Any, sample: dict, path: Path, output: str = "sentence_embedding") -> None:
    """Trace `st_model` on the tokenized `sample` into an ONNX graph at `path` (batch and tokens dynamic)."""
    import torch

    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch", 1: "tokens"} if output != "sentence_embedding" else {0: "batch"}}
    with torch.no_grad(), eager_attention(st_model):
        torch.onnx.export(_pipeline(st_model, output), (sample["input_ids"], sample["attention_mask"]), str(path),
                          dynamo=False, input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          opset_version=17, dynamic_axes=axes)


@contextlib.contextmanager
def eager_attention(st_model: Any) -> Iterator[None]:
    """The transformer's eager attention while it is traced: it adds the padding mask to the scores once, where
    the traced SDPA path guards every score tensor with elementwise IsNaN and Where (a fifth of an int8 graph's
    time). The implementation it had is restored after; the export's check against torch covers the switch."""
    model = getattr(st_model[0], "auto_model", None)
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except (ValueError, ImportError, AttributeError):  # a model without an eager path keeps its own
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime session of the graph at `path` on the CPU (`threads`: 0 or None, one per core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    # no busy-waiting between runs: the MaxSim product that follows a query's encoding needs those cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompt(st_model: Any, kind: str) -> str:
    """The prompt sentence-transformers puts before a query or document (encode_query / encode_document look for
    these names in turn; the export's check confirms it)."""
    prompts = getattr(st_model, "prompts", None) or {}
    names = ("query",) if kind == "query" else ("document", "passage", "corpus")
    found = next((prompts[name] for name in names if name in prompts), None)
    if found is None and getattr(st_model, "default_prompt_name", None):
        found = prompts.get(st_model.default_prompt_name)
    return found or ""


def _torch_vectors(st_model: Any, texts: list[str], method: str = "encode") -> np.ndarray:
    """`texts` as sentence-transformers encodes them, unit length: with no prompt (encode), or as queries or
    documents (encode_query, encode_document: their prompts)."""
    vectors = getattr(st_model, method)(texts, normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


class OnnxEncoder:
    """Encodes with an export through ONNX Runtime and `tokenizers`: the dense encoder of a query, with no torch."""

    def __init__(self, folder: Path, meta: dict[str, Any] | None = None, int8: bool = False,
                 threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.meta = meta or json.loads((folder / META).read_text())
        self.name = self.meta.get("model", "")
        self.int8 = int8
        self.dim = int(self.meta["dim"])
        self.max_tokens = int(self.meta["max_tokens"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        self.session = session(folder / (MODEL_INT8 if int8 else MODEL), threads)

    @classmethod
    def cached(cls, model: str, revision: str, int8: bool) -> "OnnxEncoder | None":
        """The encoder of the checked export of `model` at `revision`, or None when there is none."""
        folder = ready_export(model, revision, int8)
        try:
            return cls(folder, int8=int8) if folder else None
        except Exception:  # a damaged cache (a file removed by hand, a half-copied folder): the model serves
            return None

    @property
    def backend(self) -> str:
        return "onnx-int8" if self.int8 else "onnx"

    def matches(self, info: dict) -> bool:
        """Whether this encoder makes the query vectors of an index whose dense stage is `info`."""
        return (info["model"], info.get("revision")) == (self.name, self.meta.get("revision")) and \
            same_vectors(self.backend, info.get("backend", "torch"))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Unit vectors (n, dim) float32 for queries, the model's query prompt before each."""
        return self.encode_texts([self.meta["query_prompt"] + q for q in queries])

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (n, dim) float32 for documents, the model's document prompt before each."""
        return self.encode_texts([self.meta["document_prompt"] + t for t in texts])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (n, dim) float32 of `texts` as one batch, read as sentence-transformers reads them."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cleaned = [str(t).strip() for t in texts]
        if self.meta["lower_case"]:
            cleaned = [t.lower() for t in cleaned]
        encodings = self.tokenizer.encode_batch(cleaned)
        ids, mask = padded([(e.ids, [1] * len(e.ids)) for e in encodings], pad_id=0)  # padding is masked out
        (vectors,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})  # (batch, dim)
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def padded(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) of a batch, each (batch, tokens) int64, from each row's (ids, mask), padded at the end."""
    width = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, : len(row_ids)], mask[i, : len(row_mask)] = row_ids, row_mask
    return ids, mask


def same_vectors(backend: str, other: str) -> bool:
    """Whether two backends make the same vectors: torch and onnx (float32) do, int8 only its own."""
    return (backend == "onnx-int8") == (other == "onnx-int8")


def query_encoder(info: dict, device: str | None, onnx_queries: bool = True):
    """The encoder of queries to an index whose dense stage is `info`: the model's cached ONNX export on a CPU
    (ONNX Runtime starts in a fraction of the time torch takes to import), else the model itself, which then
    makes the export for the next query."""
    backend = info.get("backend", "torch")
    if any(info.get(key) != value for key, value in backend_fingerprint(backend).items()):
        warn("this index's int8 vectors were made by an earlier quantisation recipe than its queries will be (the "
             "two differ slightly); run `ragkit index` on its folders again to re-encode them")
    usable = onnx_queries and device in (None, "cpu") and info.get("revision", "unknown") != "unknown"
    if usable:
        found = OnnxEncoder.cached(info["model"], info["revision"], int8=backend == "onnx-int8")
        if found is not None:
            return found
    from ragkit.encoders.dense import DenseEncoder

    encoder = DenseEncoder(info["model"], device=device, backend=backend)
    if usable and encoder.revision == info["revision"]:
        encoder.export_for_queries()
    return encoder
