"""The fine-tuning recipe: one readable loop on HF accelerate.

    setup()   -> model, tokenizer, data, optimiser, schedule, run directory
    evaluate  -> every eval and keep set, before the first step
    train     -> steps of gradient accumulation with token-level loss normalisation; a step whose
                 loss or gradient is NaN/inf is skipped; a checkpoint every output.checkpoint_every
                 steps and after the last (forgetless/checkpoint.py; output.resume continues from it)
    evaluate  -> every set again; the summary says what was learned and what was forgotten
    save      -> weights (safetensors), tokenizer, config, metrics, summary

Loss normalisation: the loss of an optimiser step is the sum of the token losses of the whole
global batch (all micro-batches on all processes) divided by its number of target tokens. Each
micro-batch therefore contributes ``sum_of_its_token_losses * world_size / global_targets``
(DDP averages gradients over processes, hence the ``world_size``). A mean of micro-batch means
would weight short sequences more than long ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from forgetless.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    ResumePoint,
    TrainerState,
    data_fingerprint,
    fault,
    find_resume_point,
    remove_checkpoints,
    remove_leftovers,
    restore_model,
    restore_optimizer,
    restore_rng,
    restore_scheduler,
)
from forgetless.config import RunConfig, redact_secrets, save_config, to_dict
from forgetless.data.batching import MixedBatches, Source, count_targets, micro_batches, packed_micro_batches, shard
from forgetless.data.arrow import ExampleTable, encode_to_table, wants_arrow
from forgetless.data.encoding import encode_dataset
from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.errors import ConfigError, ForgetlessWarning, UserError
from forgetless.files import CONFIG_FILE, FLIPS_FILE, METRICS_FILE, MODEL_DIR, flatten, write_atomic, write_text_atomic
from forgetless.eval.flips import counts, flips_of_run
from forgetless.eval.sets import EvalSet, evaluate_sets, harness_sets, make_eval_set
from forgetless.loss import check_packing, forward as lm_forward, use_full_logits
from forgetless.methods import Context, Method, build_methods
from forgetless.models import load_model, load_tokenizer
from forgetless.models.card import serving_notes, write_model_card
from forgetless.models.saving import save_model
from forgetless.progress import TrainProgress, console
from forgetless.recipes.budget import Budget
from forgetless import zero
from forgetless.sharding import enable_on_cpu, full, is_sharded, most_over_processes, unsharded
from forgetless.support import check_backend, requested_backends
from forgetless.registry import REGISTRY, TASK_STREAM
from forgetless.rundir import check_run_dir, prepare_run_dir, write_summary

__all__ = ["RunResult", "train", "encode_dataset", "prepare_data", "forward_backward"]


@dataclass
class RunResult:
    """What a run returns to Python callers (the CLI prints and saves the same)."""

    run_dir: Path
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    roles: dict[str, str]
    train: dict[str, Any]
    data: dict[str, Any]
    flips: dict[str, dict] = field(default_factory=dict)  # per set: judged, right_before, right_after, lost, gained
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[list[Example], EncodeStats, list[EvalSet]]:
    """Training examples and the named evaluation sets, each capped at eval.max_examples.

    Each set's headline metric is resolved here (``metric`` of its DatasetSpec, or the data's
    natural one); the 'task' set drawn from the training data takes the training data's metric.
    """
    encoder = Encoder(tokenizer, cfg.data)
    if cfg.data.streaming:  # read as drawn, never all at once (forgetless/data/stream.py)
        from forgetless.data.stream import ExampleStream

        train = ExampleStream(encoder, cfg.data.train, cfg.train.seed, cfg.data.stream_buffer)
        train_stats = train.stats
    elif wants_arrow(cfg.data.train, cfg.data):  # big data: a memory-mapped, cached Arrow table, not a list
        train, train_stats = encode_to_table(encoder, cfg.data.train, cfg.data.num_proc)
    else:
        train, train_stats = encode_dataset(encoder, cfg.data.train)
    cap = cfg.eval.max_examples
    generation = cfg.eval.generation
    eval_sets: list[EvalSet] = []
    if not cfg.data.eval:
        metric = next((s.metric for s in cfg.data.train if s.metric), None)
        if cfg.data.eval_holdout:
            if cfg.data.eval_holdout >= len(train):
                raise ConfigError(f"data.eval_holdout ({cfg.data.eval_holdout}) must be smaller than the training set ({len(train)} examples)")
            g = torch.Generator().manual_seed(cfg.train.seed)
            order = torch.randperm(len(train), generator=g).tolist()
            held = set(order[: cfg.data.eval_holdout])
            task = [train[i] for i in sorted(held)][:cap]
            train = train.without(held) if isinstance(train, ExampleTable) else [e for i, e in enumerate(train) if i not in held]
        else:
            task = train.head(cap or 256) if cfg.data.streaming else train[:cap]
        eval_sets.append(make_eval_set("task", "new", task, EncodeStats(), metric, generation, "data.train (the 'task' set)"))
    for role, group in (("new", cfg.data.eval), ("keep", cfg.data.keep)):
        for name, spec in group.items():
            exs, stats = encode_dataset(encoder, [spec])
            where = f"data.{'eval' if role == 'new' else 'keep'}.{name}"
            eval_sets.append(make_eval_set(name, role, exs[:cap], stats, spec.metric, generation, where))
    eval_sets += harness_sets(cfg, {s.name for s in eval_sets})
    return train, train_stats, eval_sets


def build_optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms and embeddings' 1-d params."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    params = decay + no_decay
    # the fused kernel (HF Trainer's default, adamw_torch_fused): one kernel for all tensors instead
    # of a loop over them, several times faster on CPU as on GPU; same update to float rounding
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=fused or None)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trackers(cfg: RunConfig) -> list[str]:
    """The trackers of ``output.report_to`` (and its shortcuts), each checked to be installed."""
    from importlib.util import find_spec

    out = cfg.output
    wanted = list(dict.fromkeys([*out.report_to, *(["tensorboard"] if out.tensorboard else []), *(["wandb"] if out.wandb else [])]))
    for name in wanted:
        modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
        if not any(find_spec(m) for m in modules):
            raise UserError(f"output.report_to: {name} needs its package, which is not installed: pip install {modules[0].replace('_', '-')}")
    return wanted


def _project(cfg: RunConfig) -> str:
    out = cfg.output
    return out.wandb_project if out.wandb_project and out.project == "forgetless" else out.project


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train(cfg: RunConfig) -> RunResult:
    """Fine-tune per ``cfg``; returns before/after scores and writes the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    cfg.validate()
    check_backend(cfg)  # FSDP, DeepSpeed, a 4-bit base: refused where a part is not known to be right, before anything loads
    trackers = _trackers(cfg)
    if os.environ.get("RANK", "0") == "0":  # the process that will create the run directory says, before minutes of loading
        check_run_dir(Path(cfg.output.dir), cfg.output.overwrite, resume=cfg.output.resume)
    # accelerate forms a CPU process group (gloo) only when told to run on CPU; without a GPU, a
    # multi-process launch would otherwise give N independent single-process runs.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    placement = requested_backends(os.environ)[0]
    if multi_process and cfg.model.device_map is not None:
        raise UserError("model.device_map places one model over several devices in one process; with several processes leave it null")
    # accelerate keeps one AcceleratorState per process and refuses a second run of the same
    # process with another mixed precision (the API, a task sequence run in one process): forget
    # the last run's (its process group, in PartialState, stays)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
        cpu=multi_process and not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(cfg.train.mixed_precision),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=cfg.output.dir, logging_dir=str(Path(cfg.output.dir) / "tensorboard")),
    )
    try:
        if multi_process and accelerator.num_processes == 1:
            raise UserError("launched as several processes, but they did not form a process group; check the launcher (use --nproc or torchrun)")
        if multi_process and placement == "fsdp2":
            enable_on_cpu(accelerator)  # accelerate forms FSDP on accelerators only; a no-op where it did
        if placement in ("zero2", "zero3"):
            if not multi_process and not torch.cuda.is_available():
                raise UserError("DeepSpeed on the CPU runs over several processes: add --nproc 2 (or more)")
            zero.enable_on_cpu(accelerator, _mixed_precision(cfg.train.mixed_precision))  # likewise for DeepSpeed
            zero.configure(accelerator, cfg)
            if f"zero{zero.stage(accelerator)}" != placement:  # the table's check was made for the launch's stage
                raise UserError(f"the DeepSpeed config runs ZeRO stage {zero.stage(accelerator)}, the launch asked for {placement[-1]}; make them agree")

        return _run(cfg, accelerator, trackers, set_seed)
    finally:
        accelerator.end_training()  # also destroys the process group, so multi-process runs exit cleanly


def _run(cfg: RunConfig, accelerator, trackers: list[str], set_seed) -> RunResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars replace the per-shard ones of save/load
    set_seed(cfg.train.seed)
    # A resumed run first reads where it stands, so a finished run or a changed config costs nothing.
    point = find_resume_point(Path(cfg.output.dir), cfg, accelerator.num_processes) if cfg.output.resume else ResumePoint()
    if point.message and accelerator.is_main_process:
        console.print(point.message)
    if point.finished is not None:
        return _finished_result(Path(cfg.output.dir), point.finished)
    run = _setup(cfg, accelerator, trackers, point.checkpoint)
    _train_steps(run)
    return _finish(run)


# ------------------------------------------------------------------------------------------------
# Setup: everything the step loop needs, in the order that keeps runs reproducible
# ------------------------------------------------------------------------------------------------


class RunLog:
    """metrics.jsonl (main process) and the experiment trackers."""

    def __init__(self, path: Optional[Path], accelerator, trackers: list[str], keep_bytes: Optional[int]):
        self.accelerator, self.trackers = accelerator, trackers
        self.file = open(path, "a", encoding="utf-8") if path is not None else None
        if self.file:
            # A resumed run's metrics go on from the checkpoint: what was logged after it is logged again.
            self.file.truncate(min(keep_bytes, self.file.tell()) if keep_bytes is not None else 0)

    def __call__(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.trackers:
            numbers = {k: v for k, v in flatten(record, sep="/").items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=record["step"])

    def sync(self) -> Optional[int]:
        """Flush to disk (a checkpoint must not promise records the disk lost); the file's length."""
        if not self.file:
            return None
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        if self.file and not self.file.closed:
            self.file.close()


@dataclass
class Run:
    """The live objects of one run: built by ``_setup``, driven by ``_train_steps``, closed by ``_finish``."""

    cfg: RunConfig
    accelerator: Any
    tokenizer: Any
    model: Any  # prepared by accelerate (DDP-wrapped with several processes)
    optimizer: Any
    scheduler: Any
    methods: list[Method]
    ctx: Context
    sources: list[Source]  # the task first, then the streams methods mix in
    batches: MixedBatches
    paired: list[tuple[Method, MixedBatches]]  # methods' own data, drawn every step like the batch
    references: list[tuple[Method, dict[str, MixedBatches]]]  # groups whose gradients constrain the step (Method.reference_data)
    eval_sets: list[EvalSet]
    train_stats: EncodeStats
    state: TrainerState
    writer: CheckpointWriter
    log: RunLog
    run_dir: Path
    trainable: int
    total_params: int
    budget: Budget  # the forgetting budget's signal and controller (inactive without budget options)
    sharded: bool = False  # FSDP2: parameters are DTensor shards (forgetless/sharding.py)
    zero: int = 0  # the DeepSpeed ZeRO stage (forgetless/zero.py); 0: not DeepSpeed
    opt_layout: tuple = ((), ())  # DeepSpeed: the optimiser's parameter names and groups before prepare (its checkpoint files)

    @property
    def in_step(self) -> bool:
        """Whether every process must run the same passes (FSDP2 and ZeRO gather or reduce in each)."""
        return self.sharded or self.zero > 0

    def trainable_params(self) -> list:
        return [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]


def _setup(cfg: RunConfig, accelerator, trackers: list[str], ckpt: Optional[Checkpoint]) -> Run:
    t, out = cfg.train, cfg.output
    main, world = accelerator.is_main_process, accelerator.num_processes
    # Everything that can fail on user input happens before the run directory is touched.
    tokenizer = load_tokenizer(cfg.model)
    train_examples, train_stats, eval_sets = prepare_data(cfg, tokenizer)
    model = load_model(cfg.model, tokenizer, seed=t.seed)
    if cfg.model.device_map is None and not cfg.model.load_in_4bit:  # a 4-bit model is placed while it loads
        model = model.to(accelerator.device)  # methods compute on it before prepare()
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length ({cfg.data.max_length}) exceeds the model's context ({context}); set data.max_length<={context}")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_ids = {id(p) for p in model.parameters()}
    methods = build_methods(cfg.methods)
    ctx = Context.build(cfg, tokenizer, accelerator, None, train_examples, t.seed, resume_state=ckpt.methods if ckpt else None)
    for m in methods:
        model = _wrap(m, model, ctx)
    # what methods add (adapters, experts) is saved in checkpoints; by name, which prepare() keeps
    added = {n for n, p in model.named_parameters() if id(p) not in base_ids}
    sources, owners = [Source(TASK_STREAM, train_examples, 1.0)], [None]
    for m in methods:
        extra = m.extra_sources(ctx)
        sources += extra
        owners += [m.name] * len(extra)
    extra_share = sum(s.weight for s in sources[1:])
    if extra_share >= 1:
        raise ConfigError(f"methods: mixed-in data takes {extra_share:.0%} of every batch, leaving nothing for the task; lower the ratios")
    sources[0].weight = 1.0 - extra_share
    paired_sources = []
    for m in methods:
        examples = m.paired_data(ctx)
        if examples is not None and not examples:
            raise UserError(f"methods.{m.name}: its data has no usable examples; check the dataset it names")
        if examples is not None:
            paired_sources.append((m, Source(m.name, examples, 1.0)))
    reference_data = [(m, ref) for m in methods if (ref := m.reference_data(ctx)) is not None]
    for m, ref in reference_data:
        empty = [g for g, exs in ref.groups.items() if not exs]
        if not ref.groups or empty:
            raise UserError(f"methods.{m.name}: its reference data {'group ' + empty[0] + ' ' if empty else ''}has no usable examples")
    trainable, total_params = count_parameters(model)
    if trainable == 0:
        raise ConfigError("no trainable parameters: the configuration froze the whole model")
    if cfg.data.packing:
        check_packing(model, train_examples, tokenizer.pad_token_id)
    for m in methods:
        m.before_train(model, ctx)
    if ckpt:
        for m in methods:
            m.load_state_dict(ckpt.methods.get(m.name, {}))
    run_dir = prepare_run_dir(Path(out.dir), out.overwrite, is_main=main, resume=out.resume)
    ctx.run_dir = run_dir
    accelerator.wait_for_everyone()

    global_batch = t.micro_batch_size * t.grad_accum_steps * world
    batches = MixedBatches(sources, global_batch, t.seed)
    # Each method's own data has its own seeded stream (by name), the same size per step as the batch.
    paired = [(m, MixedBatches([s], global_batch, t.seed + zlib.crc32(m.name.encode()))) for m, s in paired_sources]
    # Reference groups likewise (each group's batch a multiple of the processes, so that every one draws a share).
    references, reference_sources = [], []
    for m, ref in reference_data:
        size = global_batch if ref.batch is None else world * math.ceil(ref.batch / world)
        streams = {}
        for g, exs in ref.groups.items():
            source = Source(f"{m.name}:{g}", exs, 1.0)
            reference_sources.append(source)
            streams[g] = MixedBatches([source], size, t.seed + zlib.crc32(source.name.encode()))
        references.append((m, streams))
    total_steps = t.max_steps or batches.steps_for_epochs(t.epochs)
    fingerprint = data_fingerprint(sources + [s for _, s in paired_sources] + reference_sources)
    # the budget's starting distributions and scores: of the model the run starts from, so before a checkpoint's weights
    budget = Budget(cfg, methods, eval_sets, train_examples, total_steps, batches, owners)
    budget.prepare(model, tokenizer, accelerator)
    if ckpt:
        budget.load_state_dict(ckpt.methods.get(budget.name, {}))

    optimizer = build_optimizer(model, cfg)
    for m in methods:
        m.configure_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    sharding = getattr(accelerator, "is_fsdp2", False)
    stage = zero.stage(accelerator)
    opt_layout: tuple = ((), ())
    if stage:  # the optimiser's parameters by name, and its groups, before DeepSpeed flattens them (its checkpoint files)
        names = {id(p): n for n, p in model.named_parameters()}
        opt_layout = ([names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]], optimizer.state_dict()["param_groups"])
    if ckpt:
        if ckpt.trainer["data"] != fingerprint or ckpt.trainer["total_steps"] != total_steps:
            raise UserError(f"{ckpt.path}: the training data differs from the checkpoint's (a data file changed since?); resuming would not be exact, start a new run")
        restore_model(model, ckpt.tensors("model.safetensors"), ckpt.path)  # the whole model: FSDP2 and ZeRO partition it in prepare()
        if not sharding and not stage:
            restore_optimizer(optimizer, model, ckpt.tensors("optimizer.safetensors"), ckpt.json("optimizer.json"), ckpt.path)
        restore_scheduler(scheduler, ckpt.trainer["scheduler"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if stage:
        if ckpt:  # the states written into DeepSpeed's partitions
            zero.restore_optimizer(optimizer, accelerator.unwrap_model(model), opt_layout[0], ckpt.tensors("optimizer.safetensors"),
                                   ckpt.json("optimizer.json"), ckpt.path)
        if stage == 3:
            use_full_logits(accelerator.unwrap_model(model))  # the head's weight is partitioned outside the model's forward
    sharded = is_sharded(model)
    if sharded != sharding:  # the optimiser's state is restored before prepare() or after it by this
        raise RuntimeError(f"accelerate's FSDP2 is {'on' if sharding else 'off'}, but the prepared model is {'' if sharded else 'not '}sharded")
    if sharded:
        plain = accelerator.unwrap_model(model)
        use_full_logits(plain)  # the head applied apart from an FSDP2 root's forward crashes its backward
        if ckpt:  # the optimiser's states sharded like the parameters prepare() made
            restore_optimizer(optimizer, plain, ckpt.tensors("optimizer.safetensors"), ckpt.json("optimizer.json"), ckpt.path)
    for m in methods:  # the parameters prepare() made (FSDP2 replaces them): methods look theirs up again
        m.bind(accelerator.unwrap_model(model), ctx)
    if ckpt and ckpt.trainer.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt.trainer["scaler"])
    if main:
        remove_leftovers(run_dir, newer_than=ckpt.step if ckpt else -1)
        if ckpt is None:
            _save_run_config(cfg, run_dir)
    log = RunLog(run_dir / METRICS_FILE if main else None, accelerator, trackers, ckpt.trainer["metrics_bytes"] if ckpt else None)
    if trackers:
        accelerator.init_trackers(_project(cfg), config=_tracker_config(cfg))

    if ckpt:
        state = TrainerState.from_json(ckpt.trainer)
    else:
        state = TrainerState(total_steps, global_batch, fingerprint, [0] * len(sources))
        verdicts: dict[str, list] = {}
        state.before = evaluate_sets(model, tokenizer, eval_sets, cfg, accelerator, "before", verdicts) if cfg.eval.before else {}
        state.before_verdicts = {name: [list(v) for v in vs] for name, vs in verdicts.items()}
        if state.before:
            log({"step": 0, "eval": state.before})
            fault("eval")
    writer = CheckpointWriter(run_dir, accelerator, out.keep_last, added, opt_layout if stage else None)
    if ckpt:  # last: nothing in the setup above may draw from the restored random streams
        restore_rng(*ckpt.rng(accelerator.process_index))
    return Run(cfg, accelerator, tokenizer, model, optimizer, scheduler, methods, ctx, sources, batches, paired, references, eval_sets,
               train_stats, state, writer, log, run_dir, trainable, total_params, budget, sharded, stage, opt_layout)


def _wrap(method: Method, model, ctx: Context):
    """``method.wrap_model``, refusing parameters it adds without its registered prefix."""
    spec = REGISTRY[method.name]
    before = {id(p) for p in model.parameters()}
    model = method.wrap_model(model, ctx)
    stray = [n for n, p in model.named_parameters() if id(p) not in before and not spec.owns(n)]
    if stray:
        prefixes = " / ".join(spec.prefix) or "none declared"
        raise UserError(
            f"methods.{method.name}: it added parameters whose names lack its prefix ({prefixes}), e.g. {stray[0]}; a method's "
            f"parameters must carry its prefix (register(..., prefix=...)) so that saving and counting can find them"
        )
    return model


# ------------------------------------------------------------------------------------------------
# The step loop
# ------------------------------------------------------------------------------------------------


class _Clock:
    """Training time over resumes, and the tokens/s of the window since the last log line."""

    def __init__(self, before_s: float):
        self.before_s = before_s
        self.started = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.started

    def tokens(self, n: int) -> float:
        """Count ``n`` tokens; the window's tokens per second."""
        self.window_tokens += n
        return self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)

    def new_window(self, keep_tokens: bool = True) -> None:
        """Start the window again (after a log line, or after time spent outside training)."""
        self.window_start = time.perf_counter()
        if not keep_tokens:
            self.window_tokens = 0


@dataclass
class StepOutcome:
    problem: Optional[str]  # "non-finite loss" / "non-finite grad" when the update was skipped
    means: dict[str, float]  # the LM loss ("lm") and every batch / paired term, as means over the step
    step_terms: dict[str, float]
    target_tokens: int
    tokens: int  # real tokens of the global batch
    grad_norm: float
    gradient: dict[str, float] = field(default_factory=dict)  # what methods' edit_gradients report (e.g. A-GEM's projections)
    padded: int = 0  # FSDP2: micro-batch passes weighted 0 that kept the processes in step (over all of them)


def _train_steps(run: Run) -> None:
    """Optimiser steps from ``run.state.step`` to the end, with logging, evaluation and checkpoints."""
    cfg, out, state = run.cfg, run.cfg.output, run.state
    main = run.accelerator.is_main_process
    run.model.train()
    clock = _Clock(state.train_time_s)
    with TrainProgress(state.total_steps, enabled=out.progress and main) as progress:
        say = (progress.note if progress.enabled else console.print) if main else (lambda message: None)
        if state.step:
            progress.update(state.step, state.last_loss, run.scheduler.get_last_lr()[0], 0.0)
        for step in range(state.step, state.total_steps):
            if run.budget.stopped_at is not None:  # stopped early by the forgetting budget (also in a resumed run)
                break
            o = _step(run, step)
            state.step = step + 1
            state.tokens_seen += o.tokens
            tps = clock.tokens(o.tokens)
            if o.problem:
                _skipped(run, o.problem, say, clock)
            else:
                state.nonfinite_in_a_row = 0
                state.last_loss = o.means.pop("lm")
                progress.update(state.step, state.last_loss, run.scheduler.get_last_lr()[0], tps)
                if state.step % out.log_every == 0 or state.step == state.total_steps:
                    run.log(_step_record(run, o, tps, clock))
                    clock.new_window(keep_tokens=False)
            fault("step")
            if run.budget.due(state.step):
                record = run.budget.check(run.model, run.tokenizer, run.accelerator, state.step, run.trainable_params())
                run.log({"step": state.step, "budget": record})
                if record.get("action", "held") != "held":
                    say(_budget_line(state.step, record))
                fault("eval")
                clock.new_window()
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < state.total_steps:
                run.log({"step": state.step, "eval": evaluate_sets(run.model, run.tokenizer, run.eval_sets, cfg, run.accelerator, f"step {state.step}")})
                fault("eval")
                clock.new_window()
            stopped = run.budget.stopped_at is not None
            if stopped:
                how = "at the strongest protection " if run.budget.controlled else ""
                say(f"step {state.step}: stopped early: over the forgetting budget {how}({run.cfg.budget.patience} checks in a row)")
            if out.checkpoint_every and (state.step % out.checkpoint_every == 0 or state.step == state.total_steps or stopped):
                _checkpoint(run, clock)
                clock.new_window()
    state.train_time_s = clock.elapsed()


def _budget_line(step: int, record: dict) -> str:
    drops = ", ".join(f"{n} {d:+.3f}" for n, d in record.get("drop", {}).items())
    return (f"step {step}: budget {'inside' if record['inside'] else 'exceeded'} (KL {record['kl']:.4f}"
            f"{'; drops ' + drops if drops else ''}): protection {record['action']} to x{record['strength']:.3g}")


def _step(run: Run, step: int) -> StepOutcome:
    """One optimiser step on the global batch of ``step`` (the update is skipped when anything is non-finite)."""
    acc, t = run.accelerator, run.cfg.train
    rank, world, pad = acc.process_index, acc.num_processes, run.tokenizer.pad_token_id
    pairs = run.batches.batch(step)
    for j, _ in pairs:
        run.state.source_counts[j] += 1
    mine = run.batches.examples(shard(pairs, rank, world))
    if run.cfg.data.packing:
        micro = packed_micro_batches(mine, t.micro_batch_size, run.cfg.data.max_length, pad)
    else:
        micro = micro_batches(mine, t.micro_batch_size, pad)
    paired = [(m, micro_batches(stream.examples(shard(stream.batch(step), rank, world)), t.micro_batch_size, pad)) for m, stream in run.paired]
    local = [sum(count_targets(b["labels"]) for b in micro)] + [sum(m.paired_count(b) for b in mbs) for m, mbs in paired]
    counts = [int(c) for c in _reduce_sum(acc, torch.tensor(local, dtype=torch.float64)).tolist()]
    global_targets = counts[0]
    jobs = [(m, mbs, world / max(c, 1)) for (m, mbs), c in zip(paired, counts[1:])]
    pads: list[int] = []
    padded = 0  # passes run, over all processes, only to keep them in step
    if run.in_step:  # FSDP2 and ZeRO gather or reduce in every pass: each process runs as many as the busiest
        lengths = [len(micro)] + [len(mbs) for _, mbs in paired]
        pads = [most - n for most, n in zip(most_over_processes(lengths, acc.device), lengths)]
        padded = int(_reduce_sum(acc, torch.tensor([float(sum(pads))], dtype=torch.float64)).item())
    params = [p for p in run.model.parameters() if p.requires_grad]
    references = [(m, _reference_gradients(run, streams, step, params)) for m, streams in run.references]
    sums = forward_backward(run.model, micro, acc, scale=world / max(global_targets, 1), methods=run.methods, paired=jobs, pads=pads)
    step_terms, paired_sums = sums.pop("step_terms"), sums.pop("paired")
    if (run.sharded or run.zero == 3) and step_terms:  # each process added the penalty of its shards: the step's value is their sum
        step_terms = dict(zip(step_terms, _reduce_sum(acc, torch.tensor(list(step_terms.values()), dtype=torch.float64)).tolist()))
    gradient = {}
    for m, ref in references:  # every process holds the same synchronised gradients, so each edits them alike
        gradient.update(m.edit_gradients(params, ref))
    ds_skipped = False
    if run.zero:  # DeepSpeed's engine clips and steps (skipping a non-finite gradient) with the gradients it holds
        grad_norm, ds_skipped = zero.step(acc)
    else:
        grad_norm = _grad_norm(run.model, acc, t.max_grad_norm)
    # One reduction: every process's summed terms, and whether any process saw a non-finite gradient.
    flag = torch.tensor(0.0 if math.isfinite(grad_norm) else 1.0, dtype=torch.float64)
    reduced = _reduce_sum(acc, torch.stack([*sums.values(), *paired_sums.values(), flag])).tolist()
    means = {k: v / max(global_targets, 1) for k, v in zip(sums, reduced)}
    for (owner, name), v in zip(paired_sums, reduced[len(sums):]):
        means[name] = means.get(name, 0.0) + v / max(counts[1 + owner], 1)
    bad_loss = not all(math.isfinite(v) for v in [*reduced[:-1], *step_terms.values()])
    problem = "non-finite loss" if bad_loss else ("non-finite grad" if reduced[-1] > 0 else None)
    if run.zero:  # the engine has stepped already; a non-finite loss gave non-finite gradients, which it skipped
        problem = "non-finite loss" if bad_loss else ("non-finite grad" if ds_skipped else None)
    elif problem is None or acc.scaler is not None:
        run.optimizer.step()
        if acc.scaler is not None and not bad_loss:  # fp16: the loss scaler skips overflowing steps itself
            problem = "non-finite grad" if run.optimizer.step_was_skipped else None
    run.scheduler.step()  # also on a skipped step: the schedule, like the data, follows the step number
    run.optimizer.zero_grad(set_to_none=True)
    tokens = int(_reduce_sum(acc, torch.tensor([sum(int(b["attention_mask"].sum()) for b in micro)], dtype=torch.float64)).item())
    return StepOutcome(problem, means, step_terms, global_targets, tokens, grad_norm, gradient, padded)


def _reference_gradients(run: Run, streams: dict[str, MixedBatches], step: int, params: list) -> dict[str, list[torch.Tensor]]:
    """Each group's token-mean LM gradient on its batch of ``step`` (synchronised over processes), aligned
    with ``params``; the gradients are zeroed again after each, so the step's own accumulate from zero."""
    acc, t = run.accelerator, run.cfg.train
    rank, world, pad = acc.process_index, acc.num_processes, run.tokenizer.pad_token_id
    out = {}
    for group, stream in streams.items():
        micro = micro_batches(stream.examples(shard(stream.batch(step), rank, world)), t.micro_batch_size, pad)
        count = int(_reduce_sum(acc, torch.tensor([sum(count_targets(b["labels"]) for b in micro)], dtype=torch.float64)).item())
        forward_backward(run.model, micro, acc, scale=world / max(count, 1))
        out[group] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        run.optimizer.zero_grad(set_to_none=True)
    return out


def _step_record(run: Run, o: StepOutcome, tps: float, clock: _Clock) -> dict:
    state = run.state
    record = {
        "step": state.step,
        "epoch": None if (epoch := run.batches.epoch_at(state.step)) is None else round(epoch, 4),
        "loss": state.last_loss,
        "lr": run.scheduler.get_last_lr()[0],
        "target_tokens": o.target_tokens,
        "tokens_per_s": round(tps, 1),
        "elapsed_s": round(clock.elapsed(), 3),
        "grad_norm": o.grad_norm,
    }
    terms = {**o.means, **o.step_terms}
    if terms:
        record["terms"] = terms
        record["total_loss"] = state.last_loss + sum(terms.values())
    if o.gradient:
        record["gradient"] = o.gradient
    if o.padded:
        record["padded_passes"] = o.padded
    return record


def _skipped(run: Run, problem: str, say, clock: _Clock) -> None:
    """Count a skipped update; after train.max_nonfinite_steps in a row, stop with a checkpoint."""
    state, limit = run.state, run.cfg.train.max_nonfinite_steps
    state.nonfinite_in_a_row += 1
    state.skipped_steps += 1
    run.log({"step": state.step, "skipped": problem})
    say(f"step {state.step}: {problem}; the update was skipped ({state.nonfinite_in_a_row} in a row)")
    if limit is not None and state.nonfinite_in_a_row >= limit:
        saved = _checkpoint(run, clock)
        run.log.close()
        first = state.step + 1 - state.nonfinite_in_a_row
        raise UserError(
            f"training stopped at step {state.step}: the loss or gradient was non-finite (NaN/inf) at {state.nonfinite_in_a_row} steps "
            f"in a row (steps {first}-{state.step}), whose updates were skipped; checkpoint {saved.name} "
            f"holds the last finite weights. Try a lower train.lr, check the training data around those steps, or "
            f"train in bf16/float32 instead of fp16; to go on anyway, --resume with a higher train.max_nonfinite_steps"
        )


def _checkpoint(run: Run, clock: _Clock) -> Path:
    run.state.metrics_bytes = run.log.sync()
    run.state.train_time_s = clock.elapsed()
    try:
        return run.writer.save(run.model, run.optimizer, run.scheduler, [*run.methods, run.budget], run.state)
    except UserError:
        run.log.close()
        raise


# ------------------------------------------------------------------------------------------------
# Finish: evaluate, save, summarise
# ------------------------------------------------------------------------------------------------


def _finish(run: Run) -> RunResult:
    cfg, acc, state = run.cfg, run.accelerator, run.state
    unwrapped = acc.unwrap_model(run.model)
    end = run.budget.final_check(run.model, run.tokenizer, acc, run.eval_sets, state.before, state.step, run.trainable_params())
    if end is not None:
        run.log({"step": state.step, "budget": end})
        if acc.is_main_process and end["action"] != "end":
            console.print(f"budget exceeded at the end ({', '.join(f'{n} {d:+.3f}' for n, d in end['drop'].items())}): "
                          f"{end['action']}, the last check inside the budget")
    for m in run.methods:
        m.after_train(unwrapped, run.ctx)
    verdicts: dict[str, list] = {}
    after = evaluate_sets(run.model, run.tokenizer, run.eval_sets, cfg, acc, "after", verdicts)
    run.log({"step": state.step, "eval": after})
    fault("eval")
    flips = flips_of_run(run.eval_sets, state.before_verdicts, verdicts, run.tokenizer)
    flip_counts = {n: counts(f) for n, f in flips.items()}
    train_info = {
        "steps": state.step,
        "global_batch": state.global_batch,
        "processes": acc.num_processes,
        # where the run was placed: one process, DDP copies, FSDP2 shards or a ZeRO stage's partitions
        "placement": "fsdp2" if run.sharded else (f"zero{run.zero}" if run.zero else ("ddp" if acc.num_processes > 1 else "single")),
        "tokens": state.tokens_seen,
        "final_loss": state.last_loss,
        "skipped_steps": state.skipped_steps,
        "train_time_s": round(state.train_time_s, 2),
        "tokens_per_s": round(state.tokens_seen / max(state.train_time_s, 1e-9), 1),
        "trainable_params": run.trainable,
        "total_params": run.total_params,
        "methods": {m.name: m.describe() for m in run.methods},
    }
    if run.budget.active or run.budget.limits:
        train_info["budget"] = run.budget.describe()
    drawn = sum(state.source_counts)
    shares = zip(run.sources, run.batches.segments[0][1], state.source_counts)  # requested: as configured (a budget may move them)
    data_info = {
        "train": vars(run.train_stats),
        "mix": {s.name: {"requested": round(w, 4), "observed": round(c / max(drawn, 1), 4)} for s, w, c in shares},
        **{s.name: {"role": s.role, "examples": len(s.examples), "metric": s.metric, "higher_is_better": s.higher_is_better} for s in run.eval_sets},
    }
    roles = {s.name: s.role for s in run.eval_sets}
    if cfg.output.save_model:
        gathered = unsharded if run.sharded else (zero.gathered_model if run.zero == 3 else None)  # the whole weights, gathered by every process
        with gathered(unwrapped, keep=acc.is_main_process) if gathered else nullcontext():
            if acc.is_main_process:
                save_model(unwrapped, run.tokenizer, run.run_dir / MODEL_DIR, cfg)
    if acc.is_main_process:
        if cfg.output.save_model:
            notes = serving_notes(unwrapped)
            for note in notes:
                warnings.warn(f"serving: {note}", ForgetlessWarning, stacklevel=2)
            write_model_card(run.run_dir / MODEL_DIR, cfg, state.before, after, roles, train_info, data_info, notes)
        if flips:
            write_text_atomic(run.run_dir / FLIPS_FILE, json.dumps(flips, indent=1))
        # summary.json last: the run is finished
        write_summary(run.run_dir, state.before, after, roles, train_info, data_info, flip_counts)
        run.log.close()
        if not cfg.output.keep_checkpoints:
            remove_checkpoints(run.run_dir)
    acc.wait_for_everyone()
    if acc.is_main_process and cfg.output.push_to_hub:  # after the barrier: a failed push must not leave the others waiting
        from forgetless.models.hub import local_base_warning, push_run

        if warning := local_base_warning(run.run_dir):
            warnings.warn(warning, ForgetlessWarning, stacklevel=2)
        console.print(f"pushed to {push_run(run.run_dir, cfg.output.push_to_hub, private=cfg.output.hub_private)}")
    return RunResult(run.run_dir, state.before, after, roles, train_info, data_info, flip_counts,
                     model=unwrapped, tokenizer=run.tokenizer)


def _grad_norm(model, accelerator, max_norm) -> float:
    """The global gradient norm (inf or nan when a gradient is), clipped to ``max_norm`` when set."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(full(torch.nn.utils.get_total_norm(grads)))  # of FSDP2 shards: a DTensor, reduced over the processes


def _save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """config.yaml describes the run, not how it was started: saved with output.resume off, atomically."""
    saved = copy.copy(cfg)
    saved.output = dataclasses.replace(cfg.output, resume=False)
    write_atomic(run_dir / CONFIG_FILE, lambda tmp: save_config(saved, tmp))


def _tracker_config(cfg: RunConfig) -> dict:
    """The run's config as the trackers take it: one level, plain values, secrets redacted."""
    flat = flatten(redact_secrets(to_dict(cfg)), sep="/")
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in flat.items() if v != {}}


def _finished_result(run_dir: Path, summary: dict) -> RunResult:
    """The result of a run that has already finished, from its summary.json (no model loaded)."""
    roles = {row["set"]: row["role"] for row in summary.get("sets", [])}
    return RunResult(run_dir, summary.get("before", {}), summary.get("after", {}), roles, summary.get("train", {}), summary.get("data", {}),
                     summary.get("flips", {}))


def forward_backward(model, micro_batches: list[dict], accelerator, scale: float, methods: list = (), paired: list = (),
                     pads: list[int] = ()) -> dict:
    """Accumulate the gradients of one optimiser step.

    ``scale`` is ``world_size / global_target_tokens``: each micro-batch's *summed* token loss
    (and every method's batch term, also a sum over target tokens) is scaled by it, so the
    accumulated, DDP-averaged gradient is that of the token-mean loss over the whole global batch.
    ``paired`` holds ``(method, its micro-batches, its scale)`` for methods with data of their own
    (``Method.paired_data``): the recipe runs the model on them and the method's paired terms,
    sums over ``paired_count`` positions, are scaled by ``world_size / global count`` (a mean
    over the step). Step terms (penalties on the weights) are added once, with the last
    micro-batch; every process adds the same value, so DDP's average keeps it at weight 1.
    Gradients are synchronised across processes only on the last micro-batch. Every term is
    multiplied by its method's ``strength`` (1 unless a forgetting budget's controller moved it).
    ``pads`` (FSDP2): how many more micro-batches of the training batch (first) and of each paired
    entry to run, so that every process runs as many passes: copies of the last one, weighted 0
    and left out of the sums.

    Returns this process's sums: ``{"lm": ..., <batch term>: ..., "step_terms": {name: value},
    "paired": {(index of its entry in paired, name): sum}}``. Every process must return the same
    term names (a method returns each of its terms on every call, zero included): the sums are
    reduced across processes in one tensor.
    """
    sums: dict = {"lm": torch.zeros((), dtype=torch.float64)}
    step_values: dict[str, float] = {}
    paired_sums: dict[str, tuple] = {}
    plain = accelerator.unwrap_model(model)  # what methods see: the model without DDP's wrapper
    pads = list(pads) or [0] * (1 + len(paired))
    jobs = [(None, b, scale, True) for b in micro_batches] + [(None, micro_batches[-1], 0.0, False)] * pads[0]
    for k, (_, mbs, s) in enumerate(paired):
        jobs += [(k, b, s, True) for b in mbs] + [(k, mbs[-1], 0.0, False)] * pads[1 + k]
    deepspeed = zero.engine(accelerator) is not None  # the engine accumulates until told the step's last backward
    for i, (owner, b, job_scale, real) in enumerate(jobs):
        last = i == len(jobs) - 1
        with nullcontext() if last or deepspeed else accelerator.no_sync(model):
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            # hidden states and the head, not the full logits: the loss applies the head at targets, in chunks
            out = lm_forward(model, b["input_ids"], b["attention_mask"], head_of=plain, autocast=accelerator.autocast,
                             position_ids=b.get("position_ids"))
            if owner is None:  # a micro-batch of the training batch
                loss_sum, _ = out.token_loss(b["labels"])
                total = loss_sum
                if real:
                    sums["lm"] += loss_sum.detach().double().cpu()
                for m in methods:
                    for name, value in m.batch_terms(plain, b, out).items():
                        value = value * m.strength if m.strength != 1.0 else value
                        total = total + value
                        sums.setdefault(name, torch.zeros((), dtype=torch.float64))
                        if real:
                            sums[name] += value.detach().double().cpu()
            else:  # a micro-batch of a method's own data
                total = out.anchor()
                owner_method = paired[owner][0]
                for name, value in owner_method.paired_terms(plain, b, out).items():
                    value = value * owner_method.strength if owner_method.strength != 1.0 else value
                    total = total + value
                    key = (owner, name)
                    paired_sums.setdefault(key, torch.zeros((), dtype=torch.float64))
                    if real:
                        paired_sums[key] += value.detach().double().cpu()
            total = total * job_scale
            if last:
                for m in methods:
                    for name, value in m.step_terms(plain).items():
                        value = value * m.strength if m.strength != 1.0 else value
                        total = total + value
                        step_values[name] = float(value.detach())
            if deepspeed:
                zero.backward(accelerator, total, last)
            else:
                accelerator.backward(total)
    sums["step_terms"] = step_values
    sums["paired"] = paired_sums
    return sums


def _reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), "sum").cpu()
