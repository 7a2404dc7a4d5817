"""A memory reader's adapter on disk: its new tensors as safetensors and its config as JSON, next to each other,
apart from the backbone (which stays any Hugging Face causal LM id or local path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ragkit.errors import ModelLoadError


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


def read_adapter(folder: str | Path, weights_name: str, config_name: str, version: int,
                 what: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(meta, tensors) written by `write_adapter`; a clear ModelLoadError naming `what` when the files are missing,
    unreadable or of another format `version`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / config_name).read_text())
        tensors = load_file(str(folder / weights_name))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not read the {what} adapter in {folder}: {e}") from None
    if meta.get("version") != version:
        raise ModelLoadError(f"{folder} holds adapter version {meta.get('version')}, expected {version}")
    return meta, tensors
