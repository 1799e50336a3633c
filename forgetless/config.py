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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from forgetless.errors import ConfigError


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
    format: Literal["auto", "text", "prompt_completion", "messages"] = option(
        "auto", "Record format; 'auto' detects it from the fields of each record."
    )
    limit: Optional[int] = option(None, "Use only the first N records.")

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path is empty: give a data file, a hub dataset id or demo:NAME")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"{where}.limit must be a positive number of records, got {self.limit}")


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

    def validate(self, where: str) -> None:
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
class EvalConfig:
    """How evaluation sets are scored."""

    before: bool = option(True, "Score every eval and keep set before the first step (the 'before' column).")
    every_steps: int = option(0, "Also evaluate every N optimiser steps (0 = only before and after).")
    batch_size: int = option(16, "Sequences per evaluation forward pass.")
    max_examples: Optional[int] = option(256, "Score at most this many records per set (null = all).")
    generation: bool = option(
        True,
        "Also greedy-decode prompt/completion and chat records and report normalised exact match.",
    )
    max_new_tokens: int = option(32, "Longest generation, in tokens.")

    def validate(self, where: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"{where}.every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be at least 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"{where}.max_examples must be positive or null, got {self.max_examples}")


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

    def validate(self, where: str) -> None:
        if self.log_every < 1:
            raise ConfigError(f"{where}.log_every must be at least 1, got {self.log_every}")


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

    def validate(self) -> None:
        self.model.tiny.validate("model.tiny")
        self.data.validate("data")
        self.train.validate("train")
        self.eval.validate("eval")
        self.output.validate("output")
        if not self.data.train:
            raise ConfigError("data.train is missing: give the training data, e.g. data.train=path/to/train.jsonl")
        from forgetless.methods import check_combination

        for name, mcfg in self.methods.items():
            if hasattr(mcfg, "validate"):
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
        return spec
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
    from forgetless.methods import REGISTRY

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
            raise ConfigError(f"override {item!r}: the key is empty")
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
    return cfg


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
        if not dataclasses.is_dataclass(cls):
            origin = typing.get_origin(cls)
            if origin is dict:  # free-form names (data.eval.NAME)
                cls = typing.get_args(cls)[1]
                continue
            return
        if cls is MethodConfigs:
            from forgetless.methods import REGISTRY

            if part not in REGISTRY:
                close = difflib.get_close_matches(part, list(REGISTRY), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"override {'.'.join(walked)}: unknown method {part!r}{hint}; available: {', '.join(sorted(REGISTRY))}")
            cls = REGISTRY[part].config
            continue
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
    """Write the resolved config as YAML (it loads back to the same RunConfig)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


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
    from forgetless.methods import REGISTRY

    out += ["", "## Methods", "", "Enable a method with `methods.NAME=true` (defaults) or set its options, e.g.",
            "`methods.lora.r=16`. Methods combine; each is one file under `forgetless/methods/`.", ""]
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        out += [f"### `{name}`", "", spec.summary, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, tp, default, help_ in reference(spec.config, f"methods.{name}."):
            out.append(f"| `{key}` | {tp} | `{default.strip()}` | {help_} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
