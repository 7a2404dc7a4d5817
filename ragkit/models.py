"""Naming and loading models: Hugging Face ids or local folders, with one clear message on failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from ragkit.errors import ModelLoadError

T = TypeVar("T")


def resolve_model_name(name: str) -> str:
    """An existing local path becomes absolute (a relative one would be taken for a hub id)."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def load_model(kind: str, name: str, loader: Callable[[str], T]) -> T:
    """Call `loader` on the resolved name; turn any failure into a ModelLoadError that says what to do."""
    resolved = resolve_model_name(name)
    try:
        return loader(resolved)
    except Exception as e:  # loaders raise OSError, ValueError, HF errors, …: all mean "cannot load"
        raise ModelLoadError(_load_failure_message(kind, name, e)) from None


def _load_failure_message(kind: str, name: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    local = Path(name).expanduser().exists()
    lines = [f"Could not load the {kind} model '{name}': {reason[:300]}"]
    if local:
        lines.append("The folder exists but does not hold a model that loads; check that it is complete.")
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else (
            "it could not be found locally or downloaded")
        lines.append(f"'{name}' is not a local folder and {where}.")
        lines.append(
            f"Point ragkit at a local copy: --{kind}-model /path/to/model "
            f"(or RAGKIT_{kind.upper()}_MODEL, or {kind}_model in ragkit.toml).")
    return "\n".join(lines)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_fingerprint(name: str) -> str:
    """A hash of a model's tokenizer files (local folder or hub cache), so that two models that cut text the
    same way share it; falls back to the model's revision when no tokenizer file is found."""
    digest = hashlib.blake2b(digest_size=8)
    found = False
    for file_name in TOKENIZER_FILES:
        path = _model_file(name, file_name)
        if path is not None:
            digest.update(file_name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest() if found else model_revision(name)


def _model_file(name: str, file_name: str) -> Path | None:
    """A file of a model, from its local folder or its cached hub snapshot."""
    local = Path(name) / file_name
    if Path(name).is_dir():
        return local if local.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, file_name)
    except Exception:  # an id the hub client rejects has no cached files either
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_revision(name: str) -> str:
    """A short id of the weights behind `name`: the hub snapshot it resolves to, or a hash of the local folder."""
    path = Path(name)
    if path.is_dir():
        digest = hashlib.blake2b(digest_size=8)
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub client rejects has no cached snapshot either
        return "unknown"
    return Path(cached).parent.name if isinstance(cached, str) else "unknown"


def load_causal_lm(name: str, **model_kwargs: Any):
    """A Hugging Face causal LM (the backbone of a memory reader) by id or local path; one clear message when it
    cannot be loaded. `model_kwargs` go to AutoModelForCausalLM.from_pretrained."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_name(name), **model_kwargs)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load"
        raise ModelLoadError(f"Could not load the reader model '{name}': {str(e).strip()[:300]}\n"
                             "Point ragkit at a local folder that holds a Hugging Face causal LM "
                             "(config.json and weights).") from None
