"""The schema: documented dataclasses that a YAML config mirrors.

Every field is made with :func:`option`, which keeps its help text (and whether it is a path) in
the field's metadata; ``docs/CONFIG.md`` is generated from it (:mod:`forgetless.config.reference`).
The ``validate`` methods check what a single field's type cannot say (``metric`` names with
:func:`check_metric`, which forgetless.eval.headline mirrors: the config may not import eval);
turning YAML into these classes, with file:line errors, is :mod:`forgetless.config.loader`'s job.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from forgetless.errors import ConfigError
from forgetless.registry import REGISTRY, STRENGTH, check_combination

PATH_NOTE = "(path: relative to the YAML file)"


def option(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, path: Union[bool, str] = False) -> Any:
    """A dataclass field with a help text.

    ``path=True`` marks a file or folder path (a string, or a list of them): the loader makes a
    relative one absolute against the YAML file's folder, like a data path, and the reference
    notes it with :data:`PATH_NOTE`. ``path="template"``: the same, only for a value that names a
    .jinja file (a chat template may be given as text too).
    """
    metadata = {"help": help, "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# The built-in headline metrics a set's ``metric`` may name (forgetless.eval.headline maps each to
# the result key that holds its value). Anything with a ':' is a user's scoring function.
METRICS = ("exact_match", "contains", "token_accuracy", "loss", "perplexity", "multiple_choice", "multiple_choice_norm")


def check_metric(metric: str, where: str) -> None:
    """Raise a ConfigError naming ``where`` unless ``metric`` is a built-in name or ``X:function``."""
    if metric in METRICS:
        return
    if ":" in metric:
        source, _, function = metric.rpartition(":")
        example = "e.g. metrics/score.py:accuracy or mypackage.metrics:accuracy"
        if not source or not function.isidentifier():
            raise ConfigError(f"{where}: {metric!r} is not FILE.py:FUNCTION or MODULE:FUNCTION ({example})")
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise ConfigError(f"{where}: scoring file {source} not found; check the path (relative to the YAML file, or to the working directory in a key=value override)")
        elif not all(part.isidentifier() for part in source.split(".")):
            raise ConfigError(f"{where}: {source!r} is neither a .py file nor a module name ({example})")
        return
    close = difflib.get_close_matches(metric, list(METRICS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{where}: unknown metric {metric!r}{hint}; use one of {', '.join(METRICS)}, "
        f"or a scoring function as FILE.py:FUNCTION or MODULE:FUNCTION"
    )


def type_name(tp: Any) -> str:
    """A field's type in words, for error messages and the reference."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


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
        "A local model directory, a Hugging Face hub id, a .gguf file (loaded through transformers' GGUF "
        "support, dequantized into model.dtype; needs `pip install 'forgetless[gguf]'`; "
        "`forgetless fetch smollm2` gets one), or 'tiny' for the built-in tiny random-init Llama with its "
        "own tokenizer (offline).",
    )
    gguf_file: Optional[str] = option(
        None,
        "The .gguf file to load from the folder or hub repo model.name_or_path names (its file name there, "
        "e.g. model-Q4_K_M.gguf): the weights are dequantized into model.dtype, the tokenizer and chat "
        "template come from the file. Not needed when model.name_or_path is the .gguf file itself; ignored "
        "when it is a run directory (the next task of a sequence).",
    )
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = option(False, "Allow the model's own Python code from the hub. Off unless you set it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32",
        "Dtype the weights are loaded and trained in; 'auto' keeps the checkpoint's. float32 with "
        "train.mixed_precision=bf16 is the usual mixed-precision setup; bfloat16 trains in pure bf16.",
    )
    attn_implementation: Optional[str] = option(
        None,
        "Attention kernel transformers uses: eager, sdpa, flash_attention_2, flex_attention, ... (null = "
        "transformers' choice for the model, usually sdpa).",
    )
    device_map: Optional[str] = option(
        None,
        "Where transformers places the weights while loading: auto (spread over the GPUs, then CPU), cpu, "
        "cuda:0, ... (single process only; null = load, then move to this process's device). transformers 5 "
        "always loads without building a random-init copy first (what low_cpu_mem_usage did).",
    )
    tiny: TinyModelConfig = option(factory=TinyModelConfig, help="Shape of the built-in tiny model.")
    load_in_4bit: bool = option(
        False,
        "QLoRA: load the base in 4 bits (bitsandbytes NF4, double quantisation, compute in bfloat16) and prepare it "
        "for training with PEFT's prepare_model_for_kbit_training; only adapters train (needs methods.lora), with the "
        "methods the README's support table marks for QLoRA. Needs a CUDA GPU and pip install bitsandbytes.",
    )


def names_template_file(value) -> bool:
    """Whether a data.chat_template value names a .jinja file (rather than being the template's text)."""
    return isinstance(value, str) and value.endswith((".jinja", ".j2", ".jinja2")) and "{" not in value


def check_repo_id(repo_id: str, where: str) -> None:
    """A hub repo id is ``name`` or ``owner/name`` of letters, digits, '-', '_', '.'."""
    import re

    if not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", repo_id or "") or ".." in repo_id or repo_id.endswith(".git"):
        raise ConfigError(f"{where}: {repo_id!r} is not a hub repo id; give owner/name, e.g. me/smollm2-esperanto")


# the experiment trackers accelerate knows (accelerate.utils.LoggerType), with the module each needs
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


# the record fields forgetless reads (forgetless/data/formats.py, chat.py, conversions.py): what
# DatasetSpec.columns may map a dataset's columns onto
RECORD_FIELDS = (
    "text", "prompt", "completion", "messages", "conversations", "question", "choices", "answer",
    "instruction", "input", "output", "system", "history", "tools", "chat_template_kwargs",
)


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
    columns: dict[str, str] = option(
        factory=dict,
        help="Rename the dataset's columns to forgetless's fields, {field: column}, e.g. {prompt: question, "
        "completion: answer} or {messages: dialog}. ShareGPT (conversations with from/value) and alpaca "
        "(instruction/input/output) records are converted without it; preference (chosen/rejected) and KTO "
        "(label) records are refused.",
    )
    metric: Optional[str] = option(
        None,
        "The set's headline 'score': exact_match, contains (the reference appears in the answer as whole words, "
        "after the same normalisation: 'The capital is Nairobi.' for 'Nairobi'; chat answers), token_accuracy, loss, perplexity (lower is better), "
        "multiple_choice (accuracy of the most likely choice, lm-eval acc), multiple_choice_norm (per-character "
        "log-likelihood, lm-eval acc_norm), or a scoring function path/to/file.py:function (relative to the YAML) or "
        "package.module:function, called as fn(predictions, references, records) -> float or dict with 'score'. "
        "null = multiple_choice for multiple-choice data, else exact_match when eval.generation is on and the "
        "records have prompts, else token_accuracy.",
    )
    max_drop: Optional[float] = option(
        None,
        "A keep set's forgetting budget: the most its score may fall over the run, in the score's own units for "
        "higher-is-better metrics (0.02 = 2 points of exact match) and as a share of the before value for loss / "
        "perplexity (0.05 = 5% higher). Checked online on a sample (budget.keep_sample) and at the end on the "
        "whole set; the budget section says what is done about it. Only data.keep sets take it.",
    )

    def validate(self, where: str) -> None:
        if self.max_drop is not None:
            if not where.startswith("data.keep."):
                raise ConfigError(f"{where}.max_drop: a forgetting budget belongs to a data.keep set; move it there or remove it")
            if not self.max_drop >= 0:
                raise ConfigError(f"{where}.max_drop must be >= 0 (the largest allowed fall of the set's score), got {self.max_drop}")
        if not self.path:
            raise ConfigError(f"{where}.path is empty: give a data file, a hub dataset id or demo:NAME")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"{where}.limit must be a positive number of records, got {self.limit}")
        for name, column in self.columns.items():
            if name not in RECORD_FIELDS:
                close = difflib.get_close_matches(name, RECORD_FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; fields: {', '.join(RECORD_FIELDS)}"
                raise ConfigError(f"{where}.columns: {name!r} is not a field forgetless reads{hint}")
            if not column:
                raise ConfigError(f"{where}.columns.{name} is empty; give the dataset's column name")
        if len(set(self.columns.values())) != len(self.columns):
            raise ConfigError(f"{where}.columns maps one column to several fields; give each field its own column")
        if self.metric is not None:
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
    num_proc: int = option(
        1,
        "Processes that tokenize the training data. Above 1 (or with training files of arrow_min_mb and more) the "
        "data is tokenized through datasets into a memory-mapped Arrow cache ($FORGETLESS_CACHE/tokenized, keyed by "
        "the data, the tokenizer and these options) instead of a Python list: data bigger than memory trains in "
        "bounded memory, and a second run loads the cache at once. The workers are spawned, not forked: a script "
        "that calls forgetless.train with num_proc > 1 needs the usual `if __name__ == \"__main__\":` guard.",
    )
    streaming: bool = option(
        False,
        "Read data.train as a stream (datasets' IterableDataset: local files one record at a time, hub datasets "
        "with streaming=True), shuffled in a seeded buffer and tokenized as drawn: nothing is held or cached. Needs "
        "train.max_steps. Exact on --resume (the stream is read again and skipped to the step's position).",
    )
    stream_buffer: int = option(10000, "Records in the shuffle buffer of a stream (data.streaming): more mixes better, costs memory.")
    arrow_min_mb: float = option(64.0, "Training files of this many MB and more (together) go the Arrow way even with num_proc=1.")
    packing: bool = option(
        False,
        "Pack each step's training examples into rows of up to max_length tokens (best-fit decreasing), each "
        "example attending only to itself (its position ids restart; transformers builds the block-diagonal mask, "
        "or runs padding-free with flash attention). Same examples, loss and gradients as unpacked; short "
        "examples stop paying for padding.",
    )
    completion_only_loss: bool = option(
        True, "Train only on completion / assistant tokens. Off: train on the prompt too."
    )
    chat_template: Optional[str] = option(
        None,
        "Chat template for 'messages' data instead of the tokenizer's: a Jinja template, a .jinja file, "
        "or 'chatml' for the ChatML template.",
        path="template",
    )
    chat_template_kwargs: dict[str, Any] = option(
        factory=dict,
        help="Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3; a record's own "
        "chat_template_kwargs override them.",
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
        if self.stream_buffer < 1:
            raise ConfigError(f"{where}.stream_buffer must be at least 1, got {self.stream_buffer}")
        if self.num_proc < 1:
            raise ConfigError(f"{where}.num_proc must be at least 1, got {self.num_proc}")
        if self.arrow_min_mb < 0:
            raise ConfigError(f"{where}.arrow_min_mb must be >= 0, got {self.arrow_min_mb}")
        template = self.chat_template
        if names_template_file(template) and not os.path.isfile(os.path.expanduser(template)):
            raise ConfigError(f"{where}.chat_template: file {template} not found; give a .jinja file, a Jinja template or 'chatml'")


@dataclass
class TrainConfig:
    """The optimisation: batch, optimiser, schedule, precision."""

    seed: int = option(42, "Seed of everything: model init, data order, dropout. Same seed, same run.")
    epochs: float = option(1.0, "Passes over the training data (fractions allowed). Ignored when max_steps is set.")
    max_steps: Optional[int] = option(None, "Stop after this many optimiser steps.")
    micro_batch_size: int = option(8, "Sequences per forward pass on each process (packed rows with data.packing).")
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
    dist_timeout_s: int = option(
        1800,
        "With several processes: how long a collective (an all-reduce, a barrier) may wait for the others before the "
        "run fails instead of hanging (the process group's timeout; torch's default is 10 minutes on NCCL, 30 on gloo).",
    )

    def validate(self, where: str) -> None:
        if self.dist_timeout_s < 1:
            raise ConfigError(f"{where}.dist_timeout_s must be at least 1 second, got {self.dist_timeout_s}")
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
        None, "A folder (or one file) of your own lm-eval task YAMLs, e.g. with dataset_path: json.", path=True
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
        "Headline prompt/completion and chat sets that name no metric by normalised exact match of greedy "
        "generations (off: by token accuracy). Only sets whose metric needs generations (exact_match, a "
        "scoring function) are decoded, multiple-choice records included when it asks.",
    )
    max_new_tokens: Optional[int] = option(
        None,
        "Longest generation, in tokens; null = each set's longest reference in tokens + 4 (at most 256). "
        "Generation stops earlier at the end-of-text / end-of-turn token, and at the end of the first line "
        "when every reference of the set is one line.",
    )
    score_eos: bool = option(
        False,
        "Also score the end-of-text token appended to text and prompt/completion records in loss, perplexity "
        "and token accuracy (off: lm-evaluation-harness' loglikelihood convention; training learns it either way).",
    )
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
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens must be at least 1 or null (automatic), got {self.max_new_tokens}")
        self.harness.validate(f"{where}.harness")


@dataclass
class BudgetConfig:
    """A forgetting budget and its online signal (forgetless/recipes/budget.py).

    The budget itself is ``max_drop`` on data.keep sets and/or ``kl_max`` here. Every
    ``every_steps`` the run measures the forward KL(start || model) on a fixed sample of the task
    and scores a fixed sample of every keep set; both go to metrics.jsonl ("budget" records) and
    the report. With a budget, a controller scales the strength of the run's protective methods
    (the weight of kl, l2sp, ewc; the batch share of mix, replay, synthetic_replay) up while the
    signal is over budget and down while it is inside, remembers the
    weights of the last check inside the budget, and goes back to them at the end if the final
    scores exceed it.
    """

    every_steps: Optional[int] = option(
        None, "Measure the signal every N optimiser steps (not at the last: the final evaluation is there); null = every "
        "tenth of the run when a budget is set (else never); 0 = never."
    )
    kl_max: Optional[float] = option(
        None,
        "A budget on the online KL(start || model) per target token, in nats, on the task sample: the model may "
        "move this far from where it started on the new task's own inputs (forgetting tracks it; arXiv 2509.04259).",
    )
    kl_sample: int = option(16, "Task examples the online KL is measured on (a fixed, seeded sample).")
    kl_top_k: int = option(
        256,
        "The starting model's top-k tokens per position kept for the KL (the rest pooled in one bucket): a lower "
        "bound of the full KL, exact when the pooled mass is zero; memory sample x positions x k.",
    )
    keep_sample: Optional[int] = option(32, "Examples of each keep set scored at each check (a fixed, seeded sample; null = the whole set).")
    control: bool = option(
        True,
        "Adjust the strength of the run's protective methods to stay inside the budget: the loss terms of kl, l2sp "
        "and ewc and the batch shares of mix, replay and synthetic_replay are scaled by s (mixed-in data at most 90% "
        "of a batch), and at every check log s moves by step_size x the worst relative violation v (up to 2 steps "
        "over budget; relax x step_size x v, at most one, inside it): dual ascent in log space. Off: only measure, "
        "stop early and restore.",
    )
    step_size: float = option(0.7, "The controller's step in log strength per check at a violation of 1 (0.7: x2; over budget up to 2 steps, x4).")
    relax: float = option(
        0.25,
        "Inside the budget the strength falls by relax x step_size x the unused share of the budget per check: slower "
        "than it rises, because forgetting comes faster than a penalty undoes it (1 = symmetric dual ascent).",
    )
    aim: float = option(
        1.0,
        "The controller steers each limited signal to aim x its limit: below 1, a margin for the noise of a small keep "
        "sample (at 1, a run held at the limit by its sample ends over it about half the time; 0.9 on the real-model "
        "benchmark, whose sample is 16 examples). Inside or over is still judged against the limit itself.",
    )
    min_scale: float = option(0.01, "The smallest strength multiplier the controller may set.")
    max_scale: float = option(100.0, "The largest strength multiplier the controller may set.")
    patience: int = option(
        2, "Checks in a row over budget at max_scale (or with nothing to control) before the run stops early; 0 = never stop early."
    )
    restore: bool = option(
        True,
        "At the end, when a keep set's whole-set score exceeds its max_drop, go back to the weights of the last check "
        "that was inside the budget (kept in memory, on the CPU) and score again; the summary says so.",
    )

    def validate(self, where: str) -> None:
        if self.every_steps is not None and self.every_steps < 0:
            raise ConfigError(f"{where}.every_steps must be >= 0 or null, got {self.every_steps}")
        if self.kl_max is not None and not self.kl_max > 0:
            raise ConfigError(f"{where}.kl_max must be positive (nats per token), got {self.kl_max}")
        for key in ("kl_sample", "kl_top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        if self.keep_sample is not None and self.keep_sample < 1:
            raise ConfigError(f"{where}.keep_sample must be at least 1 or null (the whole set), got {self.keep_sample}")
        if not self.step_size > 0:
            raise ConfigError(f"{where}.step_size must be positive, got {self.step_size}")
        if not 0 < self.aim <= 1:
            raise ConfigError(f"{where}.aim must be in (0, 1] (the share of each limit the controller steers to), got {self.aim}")
        if not 0 <= self.relax <= 1:
            raise ConfigError(f"{where}.relax must be in [0, 1] (0: never lower the strength), got {self.relax}")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise ConfigError(f"{where}: give 0 < min_scale <= 1 <= max_scale (the strength multipliers), got {self.min_scale} and {self.max_scale}")
        if self.patience < 0:
            raise ConfigError(f"{where}.patience must be >= 0, got {self.patience}")


@dataclass
class OutputConfig:
    """Where the run directory goes and what is logged."""

    dir: str = option("runs/forgetless", "Run directory (created; refused if it holds a run, unless overwrite).")
    overwrite: bool = option(False, "Replace an existing run directory.")
    save_model: bool = option(True, "Save the final weights and tokenizer under DIR/model.")
    log_every: int = option(10, "Write a metrics.jsonl record every N optimiser steps.")
    progress: bool = option(True, "Show a progress bar.")
    report_to: list[str] = option(
        factory=list,
        help="Experiment trackers that also get every metrics record and the config, by accelerate's names: "
        f"{', '.join(TRACKERS)} (each needs its package; TensorBoard writes under DIR/tensorboard).",
    )
    project: str = option("forgetless", "Project (or experiment) name the trackers file the run under: W&B project, MLflow experiment, ...")
    tensorboard: bool = option(False, "Shortcut for report_to: [tensorboard].")
    wandb: bool = option(False, "Shortcut for report_to: [wandb] (needs wandb and a login).")
    wandb_project: Optional[str] = option(None, "Old name of output.project (still read when project is not set).")
    push_to_hub: Optional[str] = option(
        None,
        "Upload the finished run's model/ (with its model card) and summary to this hub repo, e.g. me/my-model "
        "(needs a login: huggingface-cli login or HF_TOKEN). Later: forgetless push DIR REPO.",
    )
    hub_private: bool = option(False, "Create the push_to_hub repo as private.")
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
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, f"{where}.push_to_hub")
            if not self.save_model:
                raise ConfigError(f"{where}.push_to_hub needs output.save_model=true: there is no model to push otherwise")
        for i, name in enumerate(self.report_to):
            if name not in TRACKERS:
                close = difflib.get_close_matches(str(name).lower(), TRACKERS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}.report_to[{i}]: unknown tracker {name!r}{hint}; known: {', '.join(TRACKERS)}")
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


TUNE_STRATEGIES = ("lora", "full", "kl", "l2sp", "ewc", "mix", "replay")


@dataclass
class TuneConfig:
    """`forgetless tune`: a search over strategies and strengths (forgetless/recipes/tune.py)."""

    trials: int = option(12, "Training runs to try (each a full run of this config with the trial's strategy, in its own process).")
    strategies: list[str] = option(
        factory=lambda: ["auto"],
        help="What to search: any of lora, full, kl, l2sp, ewc, mix, replay; 'auto' = what the field advises for what "
        "you have: lora, full fine-tuning with kl and with l2sp always; mix when general_data is given; replay and ewc "
        "when old_data is given.",
    )
    old_data: Optional[DatasetSpec] = option(
        None, "Examples of what the model must keep (earlier tasks): the replay memory and EWC's Fisher data. Not a keep set."
    )
    general_data: Optional[DatasetSpec] = option(None, "General / pre-training-like text to mix in (mix).")
    lr_range: float = option(
        3.0, "The learning rate is searched in [train.lr / lr_range, train.lr x lr_range] (LoRA: 10x that, adapters take higher rates)."
    )
    seed: int = option(0, "Seed of the sampler (the trials' own training seed is train.seed).")

    def validate(self, where: str) -> None:
        if self.trials < 1:
            raise ConfigError(f"{where}.trials must be at least 1, got {self.trials}")
        if not self.strategies:
            raise ConfigError(f"{where}.strategies is empty; give 'auto' or some of {', '.join(TUNE_STRATEGIES)}")
        for s in self.strategies:
            if s != "auto" and s not in TUNE_STRATEGIES:
                raise ConfigError(f"{where}.strategies: {s!r} is not searchable; use 'auto' or some of {', '.join(TUNE_STRATEGIES)}")
        if not self.lr_range >= 1:
            raise ConfigError(f"{where}.lr_range must be >= 1, got {self.lr_range}")
        for name in ("old_data", "general_data"):
            spec = getattr(self, name)
            if spec is not None:
                spec.validate(f"{where}.{name}")
        needs = {"ewc": "old_data", "replay": "old_data", "mix": "general_data"}
        for s in self.strategies:
            if s in needs and getattr(self, needs[s]) is None:
                raise ConfigError(f"{where}.strategies: {s} needs {where}.{needs[s]} (the data it draws on)")


def _strength_methods() -> list[str]:
    return sorted(n for n, spec in REGISTRY.items() if spec.has(STRENGTH))


class MethodConfigs(dict):
    """``methods:`` maps a method name to its config dataclass (see forgetless/methods)."""


@dataclass
class RunConfig:
    """One fine-tuning run."""

    plugins: list[str] = option(
        factory=list,
        help="Your own methods: Python files (`my_methods.py`, relative to the YAML file) or module names "
        "(`mypkg.methods`) imported before `methods:` is read; each registers its methods when imported "
        "(forgetless.registry.register, see docs/ARCHITECTURE.md). Their code runs like any Python import.",
    )
    model: ModelConfig = option(factory=ModelConfig, help="The model to fine-tune.")
    data: DataConfig = option(factory=DataConfig, help="Training and evaluation data.")
    train: TrainConfig = option(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = option(factory=EvalConfig, help="Evaluation.")
    output: OutputConfig = option(factory=OutputConfig, help="Run directory and logging.")
    budget: BudgetConfig = option(
        factory=BudgetConfig,
        help="A forgetting budget (with data.keep.NAME.max_drop): the online signal, and the controller that keeps the run inside it.",
    )
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
    tune: TuneConfig = option(factory=TuneConfig, help="`forgetless tune`: the strategies and strengths to search, and the data they may use.")

    def validate(self) -> None:
        self.model.tiny.validate("model.tiny")
        self.data.validate("data")
        self.train.validate("train")
        self.eval.validate("eval")
        self.output.validate("output")
        self.budget.validate("budget")
        self.tune.validate("tune")
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
        if self.data.streaming:
            if self.tasks:
                raise ConfigError("data.streaming reads data.train as a stream; a task sequence (tasks:) is read in memory, turn it off")
            if self.train.max_steps is None:
                raise ConfigError("data.streaming: a stream has no known length, so train.epochs cannot be counted; set train.max_steps")
            if self.data.eval_holdout:
                raise ConfigError("data.streaming: a stream cannot hold records out; give data.eval sets instead of data.eval_holdout")
        self._check_budget()
        for name, mcfg in self.methods.items():
            if self.tasks and hasattr(mcfg, "validate_in_sequence"):
                mcfg.validate_in_sequence(f"methods.{name}")  # parts a task sequence fills in (e.g. replay's memory)
            elif hasattr(mcfg, "validate"):
                mcfg.validate(f"methods.{name}")
        check_combination(self.methods)

    def _check_budget(self) -> None:
        """One-line ConfigErrors for a forgetting budget the run could not keep (forgetless/recipes/budget.py)."""
        b = self.budget
        drops = [name for name, spec in self.data.keep.items() if spec.max_drop is not None]
        if "online_kl" in self.data.keep and b.kl_max is not None:
            raise ConfigError("data.keep.online_kl: the name is the budget's KL limit (budget.kl_max); rename the keep set")
        if not drops and b.kl_max is None:
            return
        if b.every_steps == 0 and b.control:
            raise ConfigError("budget.every_steps is 0 but a budget is set: the controller needs checks; give every_steps (or null) or set budget.control=false")
        if drops and not self.eval.before:
            raise ConfigError(f"data.keep.{drops[0]}.max_drop needs the scores before training: set eval.before=true")
        strength = _strength_methods()
        if b.control and not [n for n in self.methods if n in strength]:
            raise ConfigError(f"budget: no method whose strength the controller can adjust; add one ({', '.join(strength)}), or set "
                              f"budget.control=false to only measure, stop early and restore")
