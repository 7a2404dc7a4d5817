"""What shapes each stage of an index (its fingerprint), and the index-shaping settings an index records."""

from __future__ import annotations

from typing import Any

from ragkit.config import Settings
from ragkit.encoders.int8 import backend_fingerprint
from ragkit.models import model_revision, resolve_model_name, tokenizer_fingerprint

CHUNKER_VERSION = 2  # bump when chunk boundaries change for the same input


def fingerprints(settings: Settings) -> dict[str, Any]:
    """Per stage, everything that shapes its output (see ragkit.indexer); `settings` are resolved
    (`Settings.for_index`). A hub model not downloaded yet has revision "unknown" until it is loaded."""
    dense_name = resolve_model_name(settings.dense_model)
    dense = {"model": dense_name, "revision": model_revision(dense_name), **backend_fingerprint(settings.dense_backend)}
    late = None
    if settings.late:
        late_name = resolve_model_name(settings.late_model)
        late = {"model": late_name, "revision": model_revision(late_name), "pool_factor": settings.pool_factor}
    chunks = {
        "chunk_tokens": settings.chunk_tokens,
        "context_tokens": settings.context_tokens,
        "chunker_version": CHUNKER_VERSION,
        "dense_tokenizer": tokenizer_fingerprint(dense_name),
        "late_tokenizer": tokenizer_fingerprint(late["model"]) if late else None,
    }
    return {"chunks": chunks, "dense": dense, "late": late}


def unresolved(fingerprint: dict[str, Any]) -> bool:
    """Whether a model of this fingerprint is not on disk yet, so its revision is still unknown."""
    stages = [fingerprint["dense"], fingerprint["late"] or {}]
    return any(stage.get("revision") == "unknown" for stage in stages) or "unknown" in (
        fingerprint["chunks"]["dense_tokenizer"], fingerprint["chunks"]["late_tokenizer"])


def recorded_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The index-shaping settings an index was built with (older manifests: read from its models)."""
    settings = manifest.get("settings", {})
    models = manifest.get("models", {})
    return {
        "dense_model": settings.get("dense_model") or models.get("dense", {}).get("model"),
        "dense_backend": settings.get("dense_backend") or models.get("dense", {}).get("backend", "torch"),
        "chunk_tokens": settings.get("chunk_tokens"),
        # indexes made before contextual chunks read no context
        "context_tokens": settings.get("context_tokens", 0 if settings else None),
        "late": settings.get("late"),
        "late_model": settings.get("late_model") or (models.get("late") or {}).get("model"),
        "pool_factor": settings.get("pool_factor"),
        # indexes made before the centroid stage built PLAID
        "late_candidates": settings.get("late_candidates") or ("plaid" if models.get("late") else None),
        "follow_links": settings.get("follow_links"),
    }
