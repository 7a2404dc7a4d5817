"""Memory readers on disk, and the migrations that keep older files loading.

An adapter is a folder with the reader's own tensors (safetensors) and its metadata (JSON), apart from the backbone,
which stays any Hugging Face causal LM id or local path. A checkpoint, written by training, is an adapter folder with
`train.json` (what made it) and, when the backbone's weights were trained too, the backbone itself
(config.json + model.safetensors, loadable by transformers).

Formats are numbered. Each migration takes the metadata of version n to n + 1; a file is read by applying those
from its version on, in memory (the file is left as it is), so a file of any earlier version loads and one of a
later version is refused with a clear message. Add a format: bump the version, append its migration, never edit
an old one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ragkit.errors import ModelLoadError

if TYPE_CHECKING:
    from torch import Tensor

    from ragkit.memory.base import MemoryLM

TRAIN_META = "train.json"
BACKBONE_WEIGHTS = "model.safetensors"
Migration = Callable[[dict[str, Any]], dict[str, Any]]


def _adapter_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the config under the reader's name ("infini" or "hmt") and did not name the reader."""
    kind = "hmt" if "hmt" in meta else "infini"
    rest = {k: v for k, v in meta.items() if k != kind}
    return {**rest, "reader": kind, "config": meta.get(kind)}


def _checkpoint_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """Format 1 had no recipe: its runs were made from command-line flags, recorded under "train"."""
    return {**meta, "recipe": None}


ADAPTER_MIGRATIONS: list[Migration] = [_adapter_1_to_2]  # the i-th takes version i + 1 to i + 2
CHECKPOINT_MIGRATIONS: list[Migration] = [_checkpoint_1_to_2]
ADAPTER_VERSION = len(ADAPTER_MIGRATIONS) + 1
CHECKPOINT_VERSION = len(CHECKPOINT_MIGRATIONS) + 1


def migrate(meta: dict[str, Any], migrations: list[Migration], what: str) -> dict[str, Any]:
    """`meta` brought to the newest format by applying the migrations from its version on.

    >>> migrate({"version": 1, "hmt": {"cache_size": 4}}, ADAPTER_MIGRATIONS, "an adapter")
    {'version': 2, 'reader': 'hmt', 'config': {'cache_size': 4}}
    """
    version, newest = meta.get("version"), len(migrations) + 1
    if not isinstance(version, int) or not 1 <= version <= newest:
        raise ModelLoadError(f"{what} holds format version {version}; this ragkit reads versions 1 to {newest}")
    for step in migrations[version - 1 :]:
        meta = {**step(meta), "version": meta["version"] + 1}
    return meta


def write_adapter(folder: str | Path, weights_name: str, config_name: str, tensors: dict[str, Tensor],
                  meta: dict[str, Any]) -> Path:
    """Write `tensors` (copied to CPU) and `meta` (JSON) into `folder`, created if needed; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / weights_name),
              metadata={"format": "pt"})
    (folder / config_name).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_adapter_meta(folder: str | Path, kind: str, config_name: str, label: str) -> dict[str, Any]:
    """The metadata, in the newest format, of the `kind` adapter in `folder` (its tensors left unread); a clear
    ModelLoadError naming `label` when it is missing, unreadable, of an unknown version or of another reader."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / config_name).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not read the {label} adapter in {folder}: {e}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"Could not read the {label} adapter in {folder}: its metadata is not an object")
    meta = migrate(meta, ADAPTER_MIGRATIONS, f"the {label} adapter in {folder}")
    if meta.get("reader") != kind:
        raise ModelLoadError(f"{folder} holds an adapter of the {meta.get('reader')} reader, not {label}")
    return meta


def read_adapter(folder: str | Path, kind: str, weights_name: str, config_name: str,
                 label: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta in the newest format, tensors) of the `kind` adapter in `folder`, with `read_adapter_meta`'s
    messages, and one when the tensors cannot be read."""
    from safetensors.torch import load_file

    meta = read_adapter_meta(folder, kind, config_name, label)
    try:
        tensors = load_file(str(Path(folder) / weights_name))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not read the {label} adapter in {folder}: {e}") from None
    return meta, tensors


def save_checkpoint(model: MemoryLM, folder: str | Path, full: bool, meta: dict[str, Any] | None = None) -> Path:
    """Write the reader's adapter to `folder`, the backbone too if `full` (config.json + model.safetensors, without
    the reader's own parameters), and train.json with `meta`. Files are written beside and moved in, so a killed
    run leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".writing"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_adapter(staging)
    backbone = model.model
    if full:
        own = {id(p) for p in model.adapter_parameters()}
        tensors, seen = {}, set()
        for name, tensor in backbone.state_dict(keep_vars=True).items():
            if id(tensor) in own:  # the reader's own parameters live in the adapter
                continue
            if tensor.data_ptr() in seen:  # a tied weight (lm_head = embeddings): transformers ties it on load
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().cpu().contiguous()
        save_file(tensors, str(staging / BACKBONE_WEIGHTS), metadata={"format": "pt"})
        backbone.config.save_pretrained(staging)
    name = getattr(backbone.config, "_name_or_path", "") or ""
    record = {"recipe": None, **(meta or {}), "version": CHECKPOINT_VERSION, "reader": model.kind, "full": full,
              "backbone": "." if full else name}
    (staging / TRAIN_META).write_text(json.dumps(record, indent=2, default=str) + "\n")
    for path in staging.iterdir():
        os.replace(path, folder / path.name)
    staging.rmdir()
    if not full:
        (folder / BACKBONE_WEIGHTS).unlink(missing_ok=True)  # a stale backbone from an earlier full run
    return folder


def read_checkpoint_meta(folder: str | Path) -> dict[str, Any]:
    """train.json of the checkpoint in `folder`, in the newest format."""
    folder = Path(folder)
    try:
        record = json.loads((folder / TRAIN_META).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder} does not hold a reader checkpoint ({TRAIN_META}): {e}") from None
    if not isinstance(record, dict):
        raise ModelLoadError(f"{folder}/{TRAIN_META} is not a reader checkpoint's record")
    return migrate(record, CHECKPOINT_MIGRATIONS, f"the checkpoint in {folder}")


def load_checkpoint(folder: str | Path, device: str = "cpu") -> MemoryLM:
    """The reader saved by `save_checkpoint` (or by `ragkit reader train`), in eval mode on `device`."""
    from ragkit.errors import ConfigError
    from ragkit.memory.base import reader_class

    folder = Path(folder)
    record = read_checkpoint_meta(folder)
    try:
        cls = reader_class(record.get("reader"))
    except ConfigError:
        raise ModelLoadError(f"{folder} holds a checkpoint of an unknown reader: {record.get('reader')}") from None
    backbone = str(folder) if record.get("full") else record.get("backbone")
    if not backbone:
        raise ModelLoadError(f"the checkpoint in {folder} does not name its backbone")
    return cls.from_pretrained(backbone, adapter=folder).to(device).eval()
