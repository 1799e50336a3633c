"""Run configuration: documented dataclasses, YAML files and ``key=value`` overrides.

A YAML file mirrors :class:`RunConfig`; every field carries its help text in
``metadata["help"]``, which is what ``forgetless config`` prints and what ``docs/CONFIG.md`` is
generated from. Validation happens while the YAML is turned into dataclasses, so an error names
the file, the line and the field (``train.lr``) and says what is expected.

Relative paths in a YAML file are resolved against that file's folder (so a config and its data
can move together); paths given as command-line overrides are resolved against the working
directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from forgetless.errors import ConfigError
from forgetless.registry import REGISTRY, check_combination


def option(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:
    """A dataclass field with a help text."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny Llama model (``model.name_or_path: tiny``)."""

    hidden_size: int = option(128, "Width of the residual stream.")
    num_layers: int = option(4, "Number of transformer blocks.")
    num_heads: int = option(4, "Attention heads per block.")
    num_kv_heads: int = option(2, "Key/value heads (grouped-query attention when fewer than heads).")
    intermediate_size: int = option(352, "Width of the MLP's hidden layer.")
    max_position_embeddings: int = option(512, "Longest sequence the model accepts.")

    def validate(self, where: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name_or_path: str = option(
        "tiny",
        "A local model directory, a Hugging Face hub id, or 'tiny' for the built-in tiny random-init "
        "Llama with its own tokenizer (offline).",
    )
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = option(False, "Allow the model's own Python code from the hub. Off unless you set it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32",
        "Dtype the weights are loaded and trained in; 'auto' keeps the checkpoint's. float32 with "
        "train.mixed_precision=bf16 is the usual mixed-precision setup; bfloat16 trains in pure bf16.",
    )
    tiny: TinyModelConfig = option(factory=TinyModelConfig, help="Shape of the built-in tiny model.")


@dataclass
class DatasetSpec:
    """One dataset: a file, a hub id, or a shipped demo set."""

    path: str = option(
        "",
        "A .jsonl/.json/.csv/.parquet/.txt file, a Hugging Face datasets hub id, or 'demo:NAME' for a "
        "dataset shipped with forgetless (capitals, elements, currencies, general).",
    )
    split: str = option("train", "Split to read from a hub dataset.")
    subset: Optional[str] = option(None, "Configuration name of a hub dataset.")
    format: Literal["auto", "text", "prompt_completion", "messages", "multiple_choice"] = option(
        "auto",
        "Record format; 'auto' detects it from the fields of each record. multiple_choice records are "
        "{question (or prompt), choices, answer (index or text)}.",
    )
    limit: Optional[int] = option(None, "Use only the first N records.")
    metric: Optional[str] = option(
        None,
        "The set's headline 'score': exact_match, token_accuracy, loss, perplexity (lower is better), "
        "multiple_choice (accuracy of the most likely choice, lm-eval acc), multiple_choice_norm (per-character "
        "log-likelihood, lm-eval acc_norm), or a scoring function path/to/file.py:function (relative to the YAML) or "
        "package.module:function, called as fn(predictions, references, records) -> float or dict with 'score'. "
        "null = multiple_choice for multiple-choice data, else exact_match when eval.generation is on and the "
        "records have prompts, else token_accuracy.",
    )

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is empty: give a data file, a hub dataset id or demo:NAME")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"{where}.limit must be a positive number of records, got {self.limit}")
        if self.metric is not None:
            from forgetless.eval.headline import check_metric

            check_metric(self.metric, f"{where}.metric")


@dataclass
class DataConfig:
    """What to train on and what to measure."""

    train: list[DatasetSpec] = option(
        factory=list, help="Training data: one dataset or a list of them (concatenated)."
    )
    eval: dict[str, DatasetSpec] = option(
        factory=dict,
        help="Evaluation sets of the new task, by name. Scored before training, periodically, and at the end.",
    )
    keep: dict[str, DatasetSpec] = option(
        factory=dict,
        help="Sets the model must not forget (old tasks, general text), by name. Scored like eval sets; "
        "the summary shows how much each one changed.",
    )
    eval_holdout: int = option(
        0,
        "When no eval set is given, hold out this many training records as the 'task' eval set "
        "(0 = evaluate on the first records of the training data instead).",
    )
    max_length: int = option(512, "Longest tokenized sequence, prompt included.")
    truncation: Literal["truncate", "drop"] = option(
        "truncate", "What to do with longer sequences: cut them at max_length, or drop them. Both are counted."
    )
    completion_only_loss: bool = option(
        True, "Train only on completion / assistant tokens. Off: train on the prompt too."
    )
    chat_template: Optional[str] = option(
        None,
        "Jinja chat template for 'messages' data when the tokenizer has none, or 'chatml' for the "
        "ChatML template.",
    )

    def validate(self, where: str) -> None:
        for i, spec in enumerate(self.train):
            spec.validate(f"{where}.train[{i}]")
        for group in ("eval", "keep"):
            for name, spec in getattr(self, group).items():
                spec.validate(f"{where}.{group}.{name}")
        overlap = set(self.eval) & set(self.keep)
        if overlap:
            raise ConfigError(f"{where}: the name {sorted(overlap)[0]!r} is used in both data.eval and data.keep; rename one")
        if self.max_length < 2:
            raise ConfigError(f"{where}.max_length must be at least 2, got {self.max_length}")
        if self.eval_holdout < 0:
            raise ConfigError(f"{where}.eval_holdout must be >= 0, got {self.eval_holdout}")


@dataclass
class TrainConfig:
    """The optimisation: batch, optimiser, schedule, precision."""

    seed: int = option(42, "Seed of everything: model init, data order, dropout. Same seed, same run.")
    epochs: float = option(1.0, "Passes over the training data (fractions allowed). Ignored when max_steps is set.")
    max_steps: Optional[int] = option(None, "Stop after this many optimiser steps.")
    micro_batch_size: int = option(8, "Sequences per forward pass on each process.")
    grad_accum_steps: int = option(
        1,
        "Micro-batches accumulated per optimiser step. Global batch = micro_batch_size x grad_accum_steps "
        "x processes. The loss is normalised by the target tokens of the whole global batch.",
    )
    lr: float = option(2e-5, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Learning-rate decay after warmup."
    )
    warmup_ratio: float = option(0.03, "Share of the steps spent warming up linearly from 0.")
    warmup_steps: Optional[int] = option(None, "Warmup steps; overrides warmup_ratio.")
    max_grad_norm: Optional[float] = option(1.0, "Clip the global gradient norm to this; null disables clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "'auto' uses bf16 where the hardware supports it (a recent GPU) and full precision on CPU."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    max_nonfinite_steps: Optional[int] = option(
        10,
        "A step whose loss or gradient is NaN/inf is skipped (no update; the schedule and the data still move on) "
        "and logged; after this many such steps in a row the run stops with a checkpoint of its last finite state. "
        "null = never stop.",
    )

    def validate(self, where: str) -> None:
        if self.max_nonfinite_steps is not None and self.max_nonfinite_steps < 1:
            raise ConfigError(f"{where}.max_nonfinite_steps must be at least 1 or null, got {self.max_nonfinite_steps}")
        for name in ("micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"{where}.epochs must be positive, got {self.epochs}")
        if self.lr < 0:
            raise ConfigError(f"{where}.lr must be >= 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"{where}.max_grad_norm must be positive or null, got {self.max_grad_norm}")


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks, scored on the in-memory model as sets named ``harness/<task>``."""

    tasks: list[str] = option(
        factory=list,
        help="Task names of lm-evaluation-harness (built-in ones such as arc_easy need their data from the hub, "
        "or its cache, and looking them up indexes lm-eval's whole task list, about half a minute), or of task "
        "YAMLs under include_path. Empty = no harness evaluation.",
    )
    include_path: Optional[str] = option(
        None, "A folder (or one file) of your own lm-eval task YAMLs (relative to this YAML), e.g. with dataset_path: json."
    )
    limit: Optional[int] = option(None, "Score at most this many documents per task (null = eval.max_examples).")
    num_fewshot: Optional[int] = option(None, "Few-shot examples in every prompt (null = each task's own default, else 0).")
    batch_size: Optional[int] = option(None, "Requests per forward pass (null = eval.batch_size).")
    metric: Optional[str] = option(
        None, "The lm-eval metric taken as each task's 'score' (e.g. acc_norm); null = the task's first metric."
    )

    def validate(self, where: str) -> None:
        if not self.tasks:
            return
        for i, task in enumerate(self.tasks):
            if not task.strip():
                raise ConfigError(f"{where}.tasks[{i}] is empty; give an lm-eval task name")
        if self.include_path is not None and not os.path.exists(self.include_path):
            raise ConfigError(f"{where}.include_path {self.include_path}: not found; give a folder of task YAMLs")
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{name} must be at least 1 or null, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"{where}.num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(f"{where}.tasks needs lm-evaluation-harness, which is not installed: pip install 'forgetless[harness]'")


@dataclass
class EvalConfig:
    """How evaluation sets are scored."""

    before: bool = option(True, "Score every eval and keep set before the first step (the 'before' column).")
    every_steps: int = option(0, "Also evaluate every N optimiser steps (0 = only before and after).")
    batch_size: int = option(16, "Sequences per evaluation forward pass.")
    max_examples: Optional[int] = option(256, "Score at most this many records per set (null = all).")
    generation: bool = option(
        True,
        "Also greedy-decode prompt/completion and chat records and report normalised exact match. Sets whose "
        "metric needs generations (exact_match, a scoring function) are decoded regardless, multiple-choice "
        "records included.",
    )
    max_new_tokens: int = option(32, "Longest generation, in tokens.")
    harness: HarnessConfig = option(
        factory=HarnessConfig,
        help="lm-evaluation-harness tasks scored before and after like keep sets (needs pip install 'forgetless[harness]').",
    )

    def validate(self, where: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"{where}.every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be at least 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"{where}.max_examples must be positive or null, got {self.max_examples}")
        self.harness.validate(f"{where}.harness")


@dataclass
class OutputConfig:
    """Where the run directory goes and what is logged."""

    dir: str = option("runs/forgetless", "Run directory (created; refused if it holds a run, unless overwrite).")
    overwrite: bool = option(False, "Replace an existing run directory.")
    save_model: bool = option(True, "Save the final weights and tokenizer under DIR/model.")
    log_every: int = option(10, "Write a metrics.jsonl record every N optimiser steps.")
    progress: bool = option(True, "Show a progress bar.")
    tensorboard: bool = option(False, "Also log to TensorBoard under DIR/tensorboard (needs tensorboard).")
    wandb: bool = option(False, "Also log to Weights & Biases (needs wandb and a login).")
    wandb_project: str = option("forgetless", "Weights & Biases project.")
    resume: bool = option(
        False,
        "Continue the run in dir from its latest checkpoint (--resume), to the same final weights and metrics as "
        "an uninterrupted run; the config must be the run's own. No checkpoint yet: start from the beginning; a "
        "finished run is left as it is. Takes precedence over overwrite.",
    )
    checkpoint_every: int = option(
        500,
        "Write a checkpoint (weights, optimiser, schedule, RNG, data position, method state) every N optimiser "
        "steps, and one after the last step, before the final evaluation. 0 = never (a crash restarts the run).",
    )
    keep_last: int = option(2, "Checkpoints kept while training; older ones are deleted.")
    keep_checkpoints: bool = option(
        False, "Keep the checkpoints once the run has finished (by default they are deleted: the run has its model/)."
    )

    def validate(self, where: str) -> None:
        if self.log_every < 1:
            raise ConfigError(f"{where}.log_every must be at least 1, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"{where}.checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ConfigError(f"{where}.keep_last must be at least 1, got {self.keep_last}")


@dataclass
class TaskConfig:
    """One task of a sequence (``tasks:``), trained in the order given."""

    name: str = option("", "Short name of the task, used in tables, plots and folder names.")
    train: list[DatasetSpec] = option(factory=list, help="Training data of the task: one dataset or a list (concatenated).")
    eval: Optional[DatasetSpec] = option(
        None, "Evaluation data of the task, scored after every task of the sequence; null = score the training data."
    )
    metric: Optional[str] = option(
        None,
        "Headline score of the task in the accuracy matrix (exact_match, token_accuracy, multiple_choice, a "
        "user function ...; see DatasetSpec.metric); null = the eval data's own metric or its natural default.",
    )
    epochs: Optional[float] = option(None, "Passes over this task's data; null = train.epochs.")
    max_steps: Optional[int] = option(None, "Optimiser steps on this task; null = train.max_steps.")

    def validate(self, where: str) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{where}.name must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")
        if not self.train:
            raise ConfigError(f"{where}.train is missing: give the task's training data")
        for i, spec in enumerate(self.train):
            spec.validate(f"{where}.train[{i}]")
        if self.eval is not None:
            self.eval.validate(f"{where}.eval")
        elif len(self.train) > 1:
            raise ConfigError(f"{where}.eval: the task trains on several datasets; say which one to score (eval: ...)")
        if self.metric is not None:
            from forgetless.eval.headline import check_metric

            check_metric(self.metric, f"{where}.metric")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}.epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps must be at least 1, got {self.max_steps}")


@dataclass
class ContinualConfig:
    """How ``forgetless continual`` / ``compare`` run a task sequence."""

    strategies: dict[str, Any] = option(
        factory=dict,
        help="For `compare`: strategies to run on the same tasks, data and seed, by name; each is a mapping of "
        "config sections that override this file's (e.g. `ewc: {methods: {ewc: {weight: 100}}}`, "
        "`plain: {methods: {}}`). A strategy's `methods` replaces the file's methods; other sections merge key "
        "by key. Empty = one strategy: this file's own methods.",
    )
    baselines: list[Literal["sequential", "joint"]] = option(
        factory=list,
        help="Reference runs on the same data and budget: 'sequential' (plain full fine-tuning task after task, the "
        "lower bound) and 'joint' (one run on all tasks' data at once, the usual upper bound).",
    )
    isolate: bool = option(
        True,
        "Run each strategy in its own process, so its peak memory and any failure are its own.",
    )


class MethodConfigs(dict):
    """``methods:`` maps a method name to its config dataclass (see forgetless/methods)."""


@dataclass
class RunConfig:
    """One fine-tuning run."""

    model: ModelConfig = option(factory=ModelConfig, help="The model to fine-tune.")
    data: DataConfig = option(factory=DataConfig, help="Training and evaluation data.")
    train: TrainConfig = option(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = option(factory=EvalConfig, help="Evaluation.")
    output: OutputConfig = option(factory=OutputConfig, help="Run directory and logging.")
    methods: MethodConfigs = option(
        factory=MethodConfigs,
        help="Anti-forgetting methods to combine, by name, each with its options (see the methods "
        "reference below); e.g. `methods: {lora: {r: 8}, kl: {weight: 1.0}}`. Empty = plain fine-tuning.",
    )
    tasks: list[TaskConfig] = option(
        factory=list,
        help="A sequence of tasks for `forgetless continual` / `compare` (each: name, train, eval, metric). The "
        "model is trained on them in order; after each task every task and every data.keep set is scored. "
        "Leave data.train empty when tasks are given.",
    )
    continual: ContinualConfig = option(factory=ContinualConfig, help="Task sequences: strategies and baselines.")

    def validate(self) -> None:
        self.model.tiny.validate("model.tiny")
        self.data.validate("data")
        self.train.validate("train")
        self.eval.validate("eval")
        self.output.validate("output")
        if self.tasks:
            if self.data.train:
                raise ConfigError("data.train and tasks are both set: a task sequence takes its training data from tasks[].train; remove data.train")
            names = [t.name for t in self.tasks]
            for i, task in enumerate(self.tasks):
                task.validate(f"tasks[{i}]")
                if names.count(task.name) > 1:
                    raise ConfigError(f"tasks[{i}].name: {task.name!r} is used twice; give every task its own name")
                if task.name in self.data.keep:
                    raise ConfigError(f"tasks[{i}].name: {task.name!r} is also a data.keep set; rename one")
        elif not self.data.train:
            raise ConfigError("data.train is missing: give the training data, e.g. data.train=path/to/train.jsonl")
        elif self.continual.strategies or self.continual.baselines:
            raise ConfigError("continual.strategies / continual.baselines need a task sequence: add tasks: [...]")
        for name, mcfg in self.methods.items():
            if self.tasks and hasattr(mcfg, "validate_in_sequence"):
                mcfg.validate_in_sequence(f"methods.{name}")  # parts a task sequence fills in (e.g. replay's memory)
            elif hasattr(mcfg, "validate"):
                mcfg.validate(f"methods.{name}")
        check_combination(self.methods)


# --------------------------------------------------------------------------------------------
# Turning YAML into dataclasses, with line numbers in the errors
# --------------------------------------------------------------------------------------------


class _Source:
    """Where a value came from, for error messages."""

    def __init__(self, file: Optional[str], lines: dict[str, int]):
        self.file = file
        self.lines = lines

    def where(self, key: str) -> str:
        if key in self.lines:
            return f"{self.file}:{self.lines[key]}: {key}" if self.file else key
        if key.startswith("<override>"):
            return key
        return f"{self.file}: {key}" if self.file else key


def _compose_with_lines(text: str, file: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and record the line of every mapping key, by dotted path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}{line}: invalid YAML ({problem}); check the indentation and quoting there") from None
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                key = f"{prefix}[{i}]"
                lines[key] = v.start_mark.line + 1
                walk(v, key)

    if node is not None:
        walk(node, "")
    return data, lines


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, src: _Source, base_dir: Path) -> Any:
    """Convert a YAML value to type ``tp``, raising ConfigError with the key's location."""
    origin = typing.get_origin(tp)
    bad = lambda: ConfigError(  # noqa: E731
        f"{src.where(key)}: expected {_type_name(tp)}, got {value!r}; fix the value"
    )
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, src, base_dir)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{src.where(key)}: must be {_type_name(tp)}, got {value!r}")
        return value
    if tp is MethodConfigs:
        return _convert_methods(value, key, src, base_dir)
    if tp is DatasetSpec:
        if isinstance(value, str):
            value = {"path": value}
        spec = _build(DatasetSpec, value, key, src, base_dir)
        spec.path = _resolve_data_path(spec.path, base_dir)
        spec.metric = _resolve_metric_path(spec.metric, base_dir)
        return spec
    if tp is HarnessConfig:
        harness = _build(HarnessConfig, value, key, src, base_dir)
        if harness.include_path and not os.path.isabs(harness.include_path):
            harness.include_path = str((base_dir / harness.include_path).resolve())
        return harness
    if tp is TaskConfig:
        task = _build(TaskConfig, value, key, src, base_dir)
        task.metric = _resolve_metric_path(task.metric, base_dir)
        return task
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src, base_dir)
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]  # a single dataset where a list is allowed
        return [_convert(v, item, f"{key}[{i}]", src, base_dir) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _convert(v, item, f"{key}.{k}", src, base_dir) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            as_float = float(value)
        except ValueError:
            raise bad() from None
        if as_float != int(as_float):
            raise bad()
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad()
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _convert_methods(value: Any, key: str, src: _Source, base_dir: Path) -> MethodConfigs:
    """``{name: options}`` (or a list of names) -> {name: the method's config dataclass}."""
    if value is None:
        return MethodConfigs()
    if isinstance(value, list):
        value = {str(v): {} for v in value}
    if not isinstance(value, dict):
        raise ConfigError(f"{src.where(key)}: expected a mapping of method names to options, e.g. {{lora: {{r: 8}}}}")
    out = MethodConfigs()
    for name, options in value.items():
        sub = f"{key}.{name}"
        if name not in REGISTRY:
            close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{src.where(sub)}: unknown method {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
        if options is False:
            continue
        if options is True:
            options = {}
        out[name] = _build(REGISTRY[name].config, options, sub, src, base_dir)
    return out


def _build(cls: type, value: Any, key: str, src: _Source, base_dir: Path) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src.where(key) if key else src.file}: expected a mapping of {cls.__name__} fields, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in value.items():
        sub = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{src.where(sub)}: unknown key {k!r}{hint}")
        kwargs[k] = _convert(v, hints[k], sub, src, base_dir)
    return cls(**kwargs)


def _resolve_data_path(path: str, base_dir: Path) -> str:
    """Make a relative file path absolute against ``base_dir``; leave hub ids and demo: names."""
    if not path or path.startswith("demo:") or os.path.isabs(path):
        return path
    candidate = base_dir / path
    looks_like_file = path.startswith(".") or Path(path).suffix.lower() in DATA_SUFFIXES or candidate.exists()
    return str(candidate.resolve()) if looks_like_file else path


DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}


def _resolve_metric_path(metric: Optional[str], base_dir: Path) -> Optional[str]:
    """``file.py:function`` with a relative file -> the file made absolute against ``base_dir``."""
    if not metric or ":" not in metric:
        return metric
    source, _, function = metric.rpartition(":")
    if not source.endswith(".py") or os.path.isabs(source):
        return metric
    return f"{(base_dir / source).resolve()}:{function}"


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML (``true``, ``3``, ``[a, b]``)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: the key is empty; write key=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML config (optional), apply ``key=value`` overrides, validate, return a RunConfig."""
    data: dict = {}
    lines: dict[str, int] = {}
    file = None
    base_dir = Path.cwd()
    if path is not None:
        file = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{file}: config file not found; check the path")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: not a UTF-8 text file; save the config as UTF-8 YAML") from None
        loaded, lines = _compose_with_lines(text, file)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping (model:, data:, train:, ...)")
        data = loaded
        base_dir = p.resolve().parent
    src = _Source(file, lines)
    cfg = _build(RunConfig, data, "", src, base_dir)
    if overrides:
        for key, value in parse_overrides(overrides):
            cfg = _apply_override(cfg, key, value)
    cfg.validate()
    for name in list(cfg.continual.strategies):
        cfg.continual.strategies[name] = _resolve_strategy(cfg, name, src, base_dir)
    return cfg


class _PrefixedSource(_Source):
    """Locations of keys that sit under ``prefix`` in the file (a strategy's overrides)."""

    def __init__(self, src: _Source, prefix: str):
        super().__init__(src.file, src.lines)
        self.prefix = prefix

    def where(self, key: str) -> str:
        return super().where(self.prefix + key)


STRATEGY_SECTIONS = ("model", "data", "train", "eval", "output", "methods")


def _resolve_strategy(cfg: RunConfig, name: str, src: _Source, base_dir: Path) -> dict:
    """A strategy's overrides merged into the file's config, validated; returns the merged sections.

    ``methods`` replaces the file's methods (a strategy is a set of methods); every other section
    merges key by key. The result holds resolved paths, so it rebuilds identically anywhere.
    """
    where = f"continual.strategies.{name}"
    if not name or not all(c.isalnum() or c in "-_.+" for c in name):
        raise ConfigError(f"{src.where(where)}: a strategy name must be letters, digits, '-', '_', '.' or '+', got {name!r}")
    over = cfg.continual.strategies[name]
    if over is None:
        over = {}
    if not isinstance(over, dict):
        raise ConfigError(f"{src.where(where)}: expected a mapping of config sections (e.g. methods: {{ewc: {{}}}}), got {over!r}")
    unknown = [k for k in over if k not in STRATEGY_SECTIONS]
    if unknown:
        raise ConfigError(f"{src.where(f'{where}.{unknown[0]}')}: a strategy may set {', '.join(STRATEGY_SECTIONS)}; not {unknown[0]!r}")
    raw = {k: v for k, v in to_dict(cfg).items() if k in STRATEGY_SECTIONS}
    merged = _deep_merge(raw, {k: v for k, v in over.items() if k != "methods"})
    if "methods" in over:
        merged["methods"] = over["methods"] if over["methods"] is not None else {}
    built = _build(RunConfig, merged, "", _PrefixedSource(src, where + "."), base_dir)
    built.tasks = cfg.tasks
    try:
        built.validate()
    except ConfigError as e:
        raise ConfigError(f"{src.where(where)}: {e}") from None
    return {k: v for k, v in to_dict(built).items() if k in STRATEGY_SECTIONS}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> RunConfig:
    """A validated RunConfig from a plain dict such as ``to_dict`` gives (paths already resolved)."""
    cfg = _build(RunConfig, data, "", _Source(None, {}), Path.cwd())
    cfg.validate()
    return cfg


def strategy_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """Every strategy of a task-sequence config as its own RunConfig (the file's methods if none)."""
    if not cfg.continual.strategies:
        return {default_strategy_name(cfg): cfg}
    out = {}
    for name, sections in cfg.continual.strategies.items():
        built = _build(RunConfig, dict(sections), "", _Source(None, {}), Path.cwd())
        built.tasks = cfg.tasks
        out[name] = built
    return out


def default_strategy_name(cfg: RunConfig) -> str:
    return "+".join(cfg.methods) if cfg.methods else "full-ft"


def _apply_override(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """Set one dotted key on an existing config, converting and validating it like YAML."""
    raw = to_dict(cfg)
    # Paths already resolved stay absolute; a new path on the command line is relative to cwd.
    _check_key(key)
    _set_dotted(raw, key, value)
    return _build(RunConfig, raw, "", _Source(None, {}), Path.cwd())


def _check_key(key: str) -> None:
    """Raise a helpful error for an override key that names no field."""
    cls: Any = RunConfig
    walked = []
    for part in key.split("."):
        walked.append(part)
        if cls is None:
            return
        if cls is MethodConfigs:
            if part not in REGISTRY:
                close = difflib.get_close_matches(part, list(REGISTRY), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"override {'.'.join(walked)}: unknown method {part!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
            cls = REGISTRY[part].config
            continue
        if not dataclasses.is_dataclass(cls):
            origin = typing.get_origin(cls)
            if origin is dict:  # free-form names (data.eval.NAME)
                cls = typing.get_args(cls)[1]
                continue
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            names = list(hints)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"override {'.'.join(walked)}: unknown key {part!r}{hint}")
        cls = hints[part]
        origin = typing.get_origin(cls)
        if origin in (Union, types.UnionType):
            cls = next(a for a in typing.get_args(cls) if a is not type(None))
        if typing.get_origin(cls) is list and typing.get_args(cls)[0] is DatasetSpec:
            cls = None


def to_dict(cfg: Any) -> Any:
    """A plain dict (YAML-ready) of a config dataclass."""
    return _plain(dataclasses.asdict(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (it loads back to the same RunConfig, unless a value held
    a secret: see :func:`redact_secrets`)."""
    Path(path).write_text(yaml.safe_dump(redact_secrets(to_dict(cfg)), sort_keys=False), encoding="utf-8")


# Access tokens must never reach a run directory (which gets shared, uploaded, committed).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"
_TOKEN_PATTERN = re.compile(
    r"(?:hf_|api_org_)[A-Za-z0-9]{30,}"  # Hugging Face user / organisation tokens
    r"|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|sk-[A-Za-z0-9_-]{20,}"  # API secret keys in the sk- style
)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)")  # scheme://user:password@host


def redact_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with access tokens replaced by ``<redacted>``: the
    values of SECRET_ENV_VARS, strings shaped like known token formats, and passwords in URLs."""
    if isinstance(obj, dict):
        return {k: redact_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            obj = obj.replace(secret, REDACTED)
    obj = _TOKEN_PATTERN.sub(REDACTED, obj)
    return _URL_CREDENTIALS.sub(REDACTED, obj)


# --------------------------------------------------------------------------------------------
# Reference documentation, generated from the dataclasses
# --------------------------------------------------------------------------------------------


def reference(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, help) for every field, depth first."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", f.metadata.get("help", "")))
            rows.extend(reference(tp, key + "."))
            continue
        if tp is MethodConfigs:
            rows.append((key, "section", "", f.metadata.get("help", "")))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        rows.append((key, _type_name(tp), yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("..."), f.metadata.get("help", "")))
    return rows


def reference_markdown() -> str:
    """docs/CONFIG.md: every config key with its type, default and meaning."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `forgetless/config.py` (`forgetless config --markdown`). A YAML config mirrors",
        "these sections; any key can be overridden on the command line as `section.key=value`.",
        "Datasets (`data.train`, `data.eval.NAME`, `data.keep.NAME`) are either a path string or a",
        "mapping with the fields of `DatasetSpec` below.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, tp, default, help_ in reference():
        if tp == "section":
            out.append(f"| **{key}** | | | {help_} |")
        else:
            out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
    out += ["", "## DatasetSpec", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, help_ in reference(DatasetSpec):
        out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
    out += ["", "## Methods", "", "Enable a method with `methods.NAME=true` (defaults) or set its options, e.g.",
            "`methods.lora.r=16`. Methods combine; each is one file under `forgetless/methods/`.", ""]
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        out += [f"### `{name}`", "", spec.summary, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, help_ in reference(spec.config, f"methods.{name}."):
            out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
