"""What every memory reader shares: a Hugging Face causal LM streamed segment by segment with a state that does not
grow with the length read, its loading, greedy generation with a final window, and its adapter (the reader's own
parameters and config, saved apart from the backbone). A registry maps a reader's name to its class.

A subclass sets the class attributes below and implements `forward`, `read`, `reset`, `detach_state`,
`state_bytes`, `shut_gates`, `adapter_parameters` and the few hooks marked "subclass"."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ragkit.errors import ConfigError, ModelLoadError

READERS = {"infini": "ragkit.memory.infini:InfiniLM", "hmt": "ragkit.memory.hmt:HMTLM"}  # name → module:class


def reader_class(kind: str) -> type[MemoryLM]:
    """The memory reader class registered under `kind` ("infini" or "hmt")."""
    if kind not in READERS:
        raise ConfigError(f"unknown memory reader {kind!r}: use {' or '.join(READERS)}")
    module, name = READERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


class MemoryLM(nn.Module):
    """A causal LM `model` read segment by segment through a memory; `config` is the reader's config dataclass."""

    kind: ClassVar[str]  # the registry name, "infini" or "hmt"
    label: ClassVar[str]  # the name shown to people, "Infini-attention" or "HMT"
    config_class: ClassVar[type]  # the config dataclass
    adapter_weights: ClassVar[str]  # file name of the adapter tensors (safetensors)
    adapter_config: ClassVar[str]  # file name of the adapter metadata (JSON)
    tiny_defaults: ClassVar[dict[str, Any]] = {}  # config of a tiny model trained from scratch, where it differs

    config: Any
    model: nn.Module

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Any = None, adapter: str | Path | None = None,
                        **model_kwargs: Any) -> MemoryLM:
        """Load the backbone by HF id, local path or GGUF file (`model_kwargs` go to AutoModelForCausalLM), then the
        adapter folder if given. The adapter's config replaces `config`, and is read first, so that the backbone is
        wrapped with the positions it was trained with."""
        from ragkit.models import load_causal_lm

        backbone = load_causal_lm(name_or_path, **model_kwargs)
        backbone.config._name_or_path = str(name_or_path)  # as named ("embedded", an id): what adapters record
        return cls.wrap(backbone, config, adapter)

    @classmethod
    def wrap(cls, backbone: nn.Module, config: Any = None, adapter: str | Path | None = None) -> MemoryLM:
        """`backbone` with this memory around it; with an adapter, its saved config (which replaces `config`, so
        that the backbone is wrapped with the positions it was trained with) and its tensors."""
        if adapter is not None:
            config = cls.saved_config(adapter)
        reader = cls(backbone, config)
        if adapter is not None:
            reader.load_adapter(adapter)
        return reader

    # --- reading -----------------------------------------------------------------------------------------------

    def segments(self, n: int) -> list[slice]:
        """The segments of a sequence of n tokens: `segment_length` each, the last one possibly shorter."""
        step = self.config.segment_length
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def window_overhead(self) -> int:
        """Positions a final window shares with the reader's own tokens (subclass: HMT's memory and sensory)."""
        return 0

    def max_window(self, new_tokens: int) -> int:
        """The longest final window `generate` can read with `new_tokens` after it: the backbone's positions less
        the reader's own."""
        from ragkit.readers.lm import context_length

        return context_length(self.model) - new_tokens - self.window_overhead()

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 window: int | None = None, on_token: Callable[[Tensor], None] | None = None,
                 halt: Callable[[], bool] | None = None) -> Tensor:
        """Greedy answer to prompt_ids (b, n). Everything before the last `window` tokens (default:
        `segment_length`) is streamed into memory, segment by segment; the window (put the question and the
        passages there), however long, is read in one pass with exact causal attention and a read of the memory,
        and the answer follows with a KV cache; neither is written into memory. eos_token_id: the id, or ids, that
        end a row; `on_token` gets each step's tokens (b,); decoding ends early once `halt()` is true. Returns the
        new ids, (b, ≤ max_new_tokens); a row that has ended is padded with the id that ended it."""
        from transformers import DynamicCache

        from ragkit.readers.generate import decode_greedy

        self.reset()
        n = prompt_ids.shape[1]
        window = min(n, window or self.config.segment_length)
        if n > window:
            self.read(prompt_ids[:, : n - window])
        cache = DynamicCache(config=self.model.config)
        with self.answering():
            logits = self.open_window(prompt_ids[:, n - window :], cache)  # (b, V) after the window's last token
            return decode_greedy(logits, lambda token: self.model(input_ids=token[:, None], past_key_values=cache,
                                                                  use_cache=True).logits[:, -1],
                                 max_new_tokens, eos_token_id, on_token, halt)

    @contextlib.contextmanager
    def memory_off(self) -> Iterator[None]:
        """The memory shut (`shut_gates`) while inside, open again after."""
        self.shut_gates(True)
        try:
            yield
        finally:
            self.shut_gates(False)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """While a window is read and answered (subclass: Infini-attention stops writing its memory)."""
        yield

    def open_window(self, window_ids: Tensor, cache: Any) -> Tensor:
        """Read the final window (b, w) into the KV `cache`; the logits after its last token, (b, V). Subclass."""
        raise NotImplementedError

    # --- the adapter: the reader's own parameters and config, apart from the backbone ------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The reader's own parameters, in the order `adapter_names` names them. Subclass."""
        raise NotImplementedError

    def adapter_names(self) -> list[str]:
        """The tensor names of `adapter_parameters` in the adapter file. Subclass."""
        raise NotImplementedError

    def adapter_shape(self) -> dict[str, Any]:
        """What a backbone must match to take this adapter, saved with it and checked on load. Subclass."""
        return {}

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the reader's own parameters (safetensors) and config (JSON) to `folder`; not the backbone."""
        from ragkit.memory.checkpoints import ADAPTER_VERSION, write_adapter

        meta = {"version": ADAPTER_VERSION, "reader": self.kind,
                "backbone": getattr(self.model.config, "_name_or_path", ""), **self.adapter_shape(),
                "config": asdict(self.config)}
        tensors = dict(zip(self.adapter_names(), self.adapter_parameters()))
        return write_adapter(folder, self.adapter_weights, self.adapter_config, tensors, meta)

    def load_adapter(self, folder: str | Path) -> None:
        """Restore the parameters and the config saved by `save_adapter` (in any format version)."""
        from ragkit.memory.checkpoints import read_adapter

        meta, tensors = read_adapter(folder, self.kind, self.adapter_weights, self.adapter_config, self.label)
        shape = self.adapter_shape()
        saved = {k: meta.get(k) for k in shape}
        if saved != shape:
            raise ModelLoadError(f"the {self.label} adapter in {folder} was made for a backbone with "
                                 f"{_pairs(saved)}; this one has {_pairs(shape)}")
        self.restore(self.config_of(meta, folder), tensors, folder)

    def restore(self, config: Any, tensors: dict[str, Tensor], folder: str | Path) -> None:
        """Take `config` and copy the adapter `tensors` into the reader's parameters."""
        if set(tensors) != set(self.adapter_names()):
            raise ModelLoadError(f"the {self.label} adapter in {folder} holds {', '.join(sorted(tensors))}; its "
                                 f"config needs {', '.join(sorted(self.adapter_names()))}")
        self.config = config
        with torch.no_grad():
            for p, name in zip(self.adapter_parameters(), self.adapter_names()):
                p.copy_(tensors[name])

    @classmethod
    def saved_config(cls, folder: str | Path) -> Any:
        """The config saved with the adapter in `folder`."""
        from ragkit.memory.checkpoints import read_adapter_meta

        meta = read_adapter_meta(folder, cls.kind, cls.adapter_config, cls.label)
        return cls.config_of(meta, folder)

    @classmethod
    def saved_backbone(cls, folder: str | Path) -> str:
        """The backbone the adapter in `folder` was made for, as it was named ("" when it was built in memory)."""
        from ragkit.memory.checkpoints import read_adapter_meta

        meta = read_adapter_meta(folder, cls.kind, cls.adapter_config, cls.label)
        return str(meta.get("backbone") or "")

    @classmethod
    def config_of(cls, meta: dict[str, Any], folder: str | Path) -> Any:
        """The config in an adapter's metadata, ignoring fields this version does not know."""
        if not isinstance(meta.get("config"), dict):
            raise ModelLoadError(f"Could not read the {cls.label} adapter in {folder}: it holds no config")
        known = {f.name for f in fields(cls.config_class)}
        return cls.config_class(**{k: v for k, v in meta["config"].items() if k in known})

    # --- training ------------------------------------------------------------------------------------------------

    def optimizer_groups(self, lr: float, gate_lr: float, adapter_lr: float | None) -> list[dict[str, Any]]:
        """AdamW groups of the reader's own parameters that train (no weight decay), with their peak learning
        rates: gates at `gate_lr`, other adapter parameters at `adapter_lr` (None: `lr`). Subclass if it has
        gates."""
        own = [p for p in self.adapter_parameters() if p.requires_grad]
        return [{"params": own, "weight_decay": 0.0, "base_lr": adapter_lr or lr, "name": self.kind}] if own else []

    def gate_parameters(self) -> list[nn.Parameter]:
        """Gates that training may hold fixed for a warm-up; none unless a subclass has them."""
        return []

    def gate_values(self) -> Tensor | None:
        """sigmoid(β) of every gate, (layers, H), or None for a reader without gates."""
        return None

    def search_hits(self, key_segment: Tensor, prefix_segments: int, key_slot: Tensor | None = None) -> Tensor | None:
        """(b,) bool: whether the latest memory search weighed the asked fact's memory highest; None for a reader
        without a search (subclass: HMT)."""
        return None


def _pairs(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shape.items())
