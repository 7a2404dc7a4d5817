"""A training run as a TOML file (`recipes/*.toml`), and the one code path that runs it: `ragkit reader train
--recipe` and the benchmarks both call `run`.

    [reader]                  # which memory, around which backbone
    kind = "infini"           # infini | hmt
    segment_length = 32
    update = "delta"          # any other field of the reader's config (InfiniConfig, HMTConfig)
    model = "embedded"        # a pretrained backbone (HF id, folder, GGUF file, "embedded": SmolLM2), or
    [reader.tiny]             # a small Llama trained from scratch on the synthetic tasks
    d_model = 64
    layers = 2
    heads = 2

    [task]                    # what it learns from
    kind = "recall"           # recall (synthetic facts) | lm (next tokens of long documents) | facts (a fact
                              # planted in a long document, asked at the end: loss on the answer)
    keys = 4                  # recall: facts per sequence (1: passkey); also digits, protect, cue
    data = ["docs/"]          # lm: folders, relative to the recipe file
    holdout = 0.1             # lm: the share of documents (by a hash of their names) kept out for evaluation

    [schedule]                # any field of TrainConfig, and HMT's stage 1
    steps = 4000
    segments = [8, 8]
    stage1_steps = 800        # hmt: steps (of `steps`) in stage 1; stage1_segments, stage1_seconds

    [losses]                  # auxiliary memory losses (recall tasks; see ragkit.memory.probes)
    search = 0.3
    search_teacher = 0.7
    memory_id = 1.0
    memory_id_in_stage1 = true
    memory_value = 1.0

    [eval]                    # recall after training
    sequences = 256
    lengths = [8, 32, 128]    # in segments; default: the longest trained
    modes = ["on", "shut", "other"]

Defaults that depend on the backbone are decided here, once: a tiny model trains all its weights at lr 1e-3 with
its gates held at 0.5 for the first 40% of the run; a pretrained one trains only the reader's own parameters at
lr 1e-4, its gates from the start at 1e-2. HMT's recall tasks keep facts out of the sensory window.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from ragkit.errors import ConfigError

SECTIONS = ("reader", "task", "schedule", "losses", "eval")
TINY_KEYS = ("d_model", "layers", "heads", "vocab_size")
TASK_KEYS = ("kind", "keys", "digits", "protect", "cue", "data", "max_tokens", "holdout")
STAGE1_KEYS = ("stage1_steps", "stage1_segments", "stage1_seconds")
LOSS_KEYS = {"search": "search_loss", "search_teacher": "search_teacher", "memory_id": "memory_id_loss",
             "memory_value": "memory_value_loss", "memory_id_in_stage1": None}
EVAL_KEYS = ("sequences", "lengths", "modes", "batch_size")


@dataclass
class Recipe:
    """One training run, read from a recipe file (see the module docstring)."""

    name: str  # the file's stem
    reader: str  # "infini" | "hmt"
    segment_length: int
    backbone: str | None  # a pretrained causal LM, or None for a tiny model
    tiny: dict[str, int] = field(default_factory=dict)  # d_model, layers, heads (, vocab_size) of a tiny model
    settings: dict[str, Any] = field(default_factory=dict)  # the reader's config fields besides segment_length
    objective: str = "recall"  # "recall" | "lm" | "facts"
    task: dict[str, Any] = field(default_factory=dict)  # RecallTask fields; for lm: data, max_tokens
    schedule: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (without defaults applied)
    stage1: dict[str, Any] = field(default_factory=dict)  # HMT: stage1_steps, stage1_segments, stage1_seconds
    memory_id_in_stage1: bool = True
    evaluation: dict[str, Any] = field(default_factory=dict)  # sequences, lengths, modes, batch_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(path: str | Path, **overrides: Any) -> Recipe:
    """The recipe in `path`; `overrides` (steps, max_seconds, device, seed, eval_sequences; None: keep) replace
    what it says. Unknown sections or keys are errors that name them."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the recipe {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the recipe {path} is not valid TOML: {e}") from None
    _only(raw, SECTIONS, f"{path}")
    reader = dict(raw.get("reader", {}))
    kind = reader.pop("kind", None)
    if kind not in ("infini", "hmt"):
        raise ConfigError(f"{path}: [reader] kind must be \"infini\" or \"hmt\", got {kind!r}")
    tiny = reader.pop("tiny", None)
    backbone = reader.pop("model", None)
    if (tiny is None) == (backbone is None):
        raise ConfigError(f"{path}: [reader] names a backbone (model = \"…\") or a [reader.tiny] table, one of them")
    if tiny is not None:
        _only(tiny, TINY_KEYS, f"{path} [reader.tiny]")
    segment_length = reader.pop("segment_length", 32 if tiny is not None else 2048)
    _only(reader, _config_fields(kind), f"{path} [reader]")

    task = dict(raw.get("task", {}))
    _only(task, TASK_KEYS, f"{path} [task]")
    objective = task.pop("kind", "recall")
    if objective not in ("recall", "lm", "facts"):
        raise ConfigError(f"{path}: [task] kind must be \"recall\", \"lm\" or \"facts\", got {objective!r}")
    if objective in ("lm", "facts"):
        if tiny is not None:
            raise ConfigError(f"{path}: a language-model task needs a backbone with a tokenizer: name a model")
        if "data" not in task:
            raise ConfigError(f"{path}: [task] kind = \"{objective}\" needs data = \"FOLDER\" (long documents)")
        data = [task["data"]] if isinstance(task["data"], str) else list(task["data"])
        task["data"] = [str((path.parent / folder).resolve()) for folder in data]

    schedule = dict(raw.get("schedule", {}))
    stage1 = {k: schedule.pop(k) for k in STAGE1_KEYS if k in schedule}
    if stage1 and kind != "hmt":
        raise ConfigError(f"{path}: {', '.join(stage1)} are for the HMT reader's two stages")
    _only(schedule, _train_fields() - {"device"}, f"{path} [schedule]")
    losses = dict(raw.get("losses", {}))
    _only(losses, LOSS_KEYS, f"{path} [losses]")
    in_stage1 = bool(losses.pop("memory_id_in_stage1", True))
    for key, value in losses.items():
        schedule[LOSS_KEYS[key]] = value
    evaluation = dict(raw.get("eval", {}))
    _only(evaluation, EVAL_KEYS, f"{path} [eval]")

    recipe = Recipe(path.stem, kind, segment_length, backbone, tiny or {}, reader, objective, task, schedule,
                    stage1, in_stage1, evaluation)
    return apply_overrides(recipe, **overrides)


def apply_overrides(recipe: Recipe, steps: int | None = None, max_seconds: float | None = None,
                    device: str | None = None, seed: int | None = None,
                    eval_sequences: int | None = None) -> Recipe:
    """The recipe with these replaced; `steps` scales HMT's stage 1 with the run."""
    schedule, stage1, evaluation = dict(recipe.schedule), dict(recipe.stage1), dict(recipe.evaluation)
    if steps is not None:
        if "stage1_steps" in stage1:
            scaled = round(stage1["stage1_steps"] * steps / schedule.get("steps", 1000))
            stage1["stage1_steps"] = min(max(scaled, 1 if stage1["stage1_steps"] else 0), steps - 1)
        schedule["steps"] = steps
    if max_seconds is not None and "stage1_seconds" in stage1 and schedule.get("max_seconds"):
        stage1["stage1_seconds"] *= max_seconds / schedule["max_seconds"]
    for key, value in (("max_seconds", max_seconds), ("device", device), ("seed", seed)):
        if value is not None:
            schedule[key] = value
    if eval_sequences is not None:
        evaluation["sequences"] = eval_sequences
    return replace(recipe, schedule=schedule, stage1=stage1, evaluation=evaluation)


def train_config(recipe: Recipe, device: str = "cpu") -> Any:
    """The TrainConfig of the whole run (for HMT, of both stages: `steps` counts them together), with the
    defaults that depend on the backbone."""
    from ragkit.memory.train import TrainConfig

    tiny = bool(recipe.tiny)
    s = dict(recipe.schedule)
    train_all = s.setdefault("train_all", tiny)
    s.setdefault("lr", 1e-3 if tiny else 1e-4)
    s.setdefault("gate_warmup", 0.4 if train_all else 0.0)
    if not train_all:
        s.setdefault("gate_lr", 1e-2)
    if not tiny:
        s.setdefault("gate_hold", None)
    if recipe.reader == "hmt" and any(s.get(k) for k in ("search_loss", "memory_id_loss", "memory_value_loss")):
        s.setdefault("hmt_lr", 10 * s["lr"])  # the search and the probes needed 10× the base rate
    s.setdefault("device", device)
    s.setdefault("log_every", max(1, min(10, s.get("steps", 1000) // 100 or 1)))
    if "segments" in s:
        s["segments"] = tuple(s["segments"])
    if "betas" in s:
        s["betas"] = tuple(s["betas"])
    return TrainConfig(**s)


def build_reader(reader: str = "infini", model: str | None = None, tiny: bool = False, segment_length: int = 32,
                 d_model: int = 64, layers: int = 2, heads: int = 2, vocab_size: int | None = None, seed: int = 0,
                 **settings: Any) -> tuple[Any, Any]:
    """A reader to train and the backbone's tokenizer (None for a tiny model, which reads task token ids).

    tiny: a Llama of `layers` × `d_model` with `heads` heads, randomly initialised (seeded), whose positions cover
    one backbone pass of the reader; Infini's gates start at β = 0 (sigmoid 0.5), HMT keeps k = 8 sensory tokens
    and N = 64 memories unless told. Otherwise `model` names a causal LM (HF id, folder or GGUF file), wrapped with
    the config's defaults (Infini's gates almost shut, so that step 0 is the pretrained model). `settings` are
    fields of the reader's config (None: its default)."""
    import torch

    from ragkit.memory.base import reader_class

    cls = reader_class(reader)
    if tiny == (model is not None):
        raise ConfigError("name a backbone (a Hugging Face id or local path) or ask for a tiny model, not both")
    settings = {k: v for k, v in settings.items() if v is not None}
    _only(settings, _config_fields(reader) - {"segment_length"}, f"the {cls.label} reader's settings")
    if not tiny:
        from ragkit.readers.lm import load_reader_tokenizer

        config = cls.config_class(segment_length=segment_length, **settings)
        return cls.from_pretrained(model, config), load_reader_tokenizer(model)
    from transformers import LlamaForCausalLM

    from ragkit.memory.tasks import VOCAB_SIZE, tiny_llama_config

    config = cls.config_class(segment_length=segment_length, **{**cls.tiny_defaults, **settings})
    torch.manual_seed(seed)
    backbone = LlamaForCausalLM(tiny_llama_config(vocab_size or VOCAB_SIZE, d_model, layers, heads,
                                                  segment_length=config.positions))
    return cls(backbone, config), None


@dataclass
class Run:
    """What `run` did: the trained reader, the training result and the recall cells (recall tasks)."""

    model: Any
    result: Any  # TrainResult
    cells: list[Any]  # RecallCell
    device: str

    def summary(self) -> dict[str, Any]:
        return {**self.result.to_json(), "device": self.device, "eval": [c.to_json() for c in self.cells]}


def recall_task(recipe: Recipe, model: Any) -> Any:
    """The RecallTask of a recall recipe; HMT's keeps facts out of the sensory window unless `protect` is given."""
    from ragkit.memory.tasks import RecallTask

    task = {k: v for k, v in recipe.task.items() if k not in ("data", "max_tokens", "holdout")}
    keys = task.setdefault("keys", 1)
    task.setdefault("cue", keys > 1)
    if recipe.reader == "hmt" and "protect" not in task:
        task["protect"] = RecallTask.protect_with_sensory(recipe.segment_length, model.config.sensory_tokens,
                                                          task.get("digits", 5))
    return RecallTask(segment_length=recipe.segment_length, **task)


def run(recipe: Recipe, out: str | Path | None = None, device: str = "cpu",
        progress: Callable[[Any], None] | None = None, on_tokenize: Callable[[Any], None] | None = None) -> Run:
    """Build the recipe's reader, train it (HMT in two stages), write its checkpoint to `out` and, for a recall
    task, evaluate its recall. `progress` gets each TrainEvent, `on_tokenize` the tokenizing of an lm task's
    documents."""
    from ragkit.memory.recall_eval import MODES, evaluate_recall
    from ragkit.memory.tasks import DocumentBatches, FactBatches, RecallBatches, stage1_recall_batches
    from ragkit.memory.train import train, train_two_stage

    config = train_config(recipe, device)
    model, tokenizer = build_reader(recipe.reader, model=recipe.backbone, tiny=bool(recipe.tiny),
                                    segment_length=recipe.segment_length, seed=config.seed,
                                    **recipe.tiny, **recipe.settings)
    meta = {"recipe": recipe.to_json()}
    task = None
    if recipe.objective == "recall":
        task = recall_task(recipe, model)
        batches = RecallBatches(task)
    else:
        source = FactBatches if recipe.objective == "facts" else DocumentBatches
        batches = source(recipe.task["data"], tokenizer, recipe.segment_length,
                                  max_tokens=recipe.task.get("max_tokens", 50_000_000), progress=on_tokenize,
                                  holdout=recipe.task.get("holdout", 0.0))
    if recipe.reader == "hmt":
        stage1 = recipe.stage1.get("stage1_steps", round(config.steps * 2 / 7))  # the paper's 200 of 700
        if stage1 >= config.steps:
            raise ConfigError(f"stage1_steps {stage1} leaves no step for stage 2 of {config.steps} steps")
        result = train_two_stage(model, batches, replace(config, steps=config.steps - stage1), stage1_steps=stage1,
                                 stage1_segments=recipe.stage1.get("stage1_segments", 2), progress=progress, out=out,
                                 meta=meta, stage1_batches=stage1_recall_batches(task) if task else None,
                                 stage1_seconds=recipe.stage1.get("stage1_seconds"),
                                 stage1_memory_id_loss=None if recipe.memory_id_in_stage1 else 0.0)
    else:
        result = train(model, batches, config, progress=progress, out=out, meta=meta)
    cells = []
    sequences = recipe.evaluation.get("sequences", 64)
    if task is not None and sequences:
        lengths = recipe.evaluation.get("lengths", [config.segments[1]])
        cells = evaluate_recall(model, task, lengths, sequences=sequences,
                                batch_size=recipe.evaluation.get("batch_size", 64),
                                modes=recipe.evaluation.get("modes", MODES), device=config.device)
    return Run(model, result, cells, config.device)


def _config_fields(kind: str) -> set[str]:
    from ragkit.memory.base import reader_class

    return {f.name for f in fields(reader_class(kind).config_class)}


def _train_fields() -> set[str]:
    from ragkit.memory.train import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def _only(table: dict[str, Any], allowed: Any, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(allowed))})")
