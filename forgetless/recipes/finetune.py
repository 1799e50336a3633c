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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetless.checkpoint import (
    CheckpointWriter,
    ResumePoint,
    data_fingerprint,
    fault,
    find_resume_point,
    remove_checkpoints,
    remove_leftovers,
    restore_model,
    restore_optimizer,
    restore_rng,
    restore_scheduler,
    trainer_state,
)
from forgetless.config import RunConfig, redact_secrets, save_config, to_dict
from forgetless.data.batching import MixedBatches, Source, count_targets, micro_batches, shard
from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.data.loading import load_records
from forgetless.errors import ConfigError, UserError
from forgetless.eval.sets import EvalSet, evaluate_sets, harness_sets, make_eval_set
from forgetless.loss import token_cross_entropy
from forgetless.methods import Context, build_methods
from forgetless.models import load_model, load_tokenizer
from forgetless.models.saving import save_model
from forgetless.progress import TrainProgress, console
from forgetless.rundir import check_run_dir, prepare_run_dir, write_summary


@dataclass
class RunResult:
    """What a run returns to Python callers (the CLI prints and saves the same)."""

    run_dir: Path
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    roles: dict[str, str]
    train: dict[str, Any]
    data: dict[str, Any]
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)


def encode_dataset(encoder: Encoder, specs) -> tuple[list[Example], EncodeStats]:
    """Load and tokenize one or several datasets (concatenated)."""
    examples: list[Example] = []
    total = EncodeStats()
    for spec in specs:
        exs, stats = encoder.encode_all(load_records(spec), spec.format)
        if not exs:
            raise UserError(
                f"{spec.path}: no usable records after tokenization ({stats.dropped_too_long} too long, "
                f"{stats.dropped_no_target} with no target tokens); raise data.max_length or check the data"
            )
        examples += exs
        for k in ("records", "kept", "truncated", "dropped_too_long", "dropped_no_target"):
            setattr(total, k, getattr(total, k) + getattr(stats, k))
        for fmt, n in stats.formats.items():
            total.formats[fmt] = total.formats.get(fmt, 0) + n
    return examples, total


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[list[Example], EncodeStats, list[EvalSet]]:
    """Training examples and the named evaluation sets, each capped at eval.max_examples.

    Each set's headline metric is resolved here (``metric`` of its DatasetSpec, or the data's
    natural one); the 'task' set drawn from the training data takes the training data's metric.
    """
    encoder = Encoder(tokenizer, cfg.data)
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
            train = [e for i, e in enumerate(train) if i not in held]
        else:
            task = train[:cap]
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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def build_scheduler(optimizer, cfg: RunConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else int(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trackers(cfg: RunConfig) -> list[str]:
    wanted = []
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(cfg.output, name):
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"output.{name}=true needs the {module} package: pip install {module}") from None
            wanted.append(name)
    return wanted


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train(cfg: RunConfig) -> RunResult:
    """Fine-tune per ``cfg``; returns before/after scores and writes the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.validate()
    trackers = _trackers(cfg)
    if os.environ.get("RANK", "0") == "0":  # the process that will create the run directory says, before minutes of loading
        check_run_dir(Path(cfg.output.dir), cfg.output.overwrite, resume=cfg.output.resume)
    # accelerate forms a CPU process group (gloo) only when told to run on CPU; without a GPU, a
    # multi-process launch would otherwise give N independent single-process runs.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_process and not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(cfg.train.mixed_precision),
        log_with=trackers or None,
        project_dir=cfg.output.dir,
    )
    try:
        if multi_process and accelerator.num_processes == 1:
            raise UserError("launched as several processes, but they did not form a process group; check the launcher (use --nproc or torchrun)")
        return _run(cfg, accelerator, trackers, set_seed)
    finally:
        accelerator.end_training()  # also destroys the process group, so multi-process runs exit cleanly


def _run(cfg: RunConfig, accelerator, trackers: list[str], set_seed) -> RunResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars replace the per-shard ones of save/load
    set_seed(cfg.train.seed)
    main = accelerator.is_main_process
    t, out = cfg.train, cfg.output
    world = accelerator.num_processes

    # A resumed run first reads where it stands, so a finished run or a changed config costs nothing.
    point = find_resume_point(Path(out.dir), cfg, world) if out.resume else ResumePoint()
    if point.message and main:
        console.print(point.message)
    if point.finished is not None:
        return _finished_result(Path(out.dir), point.finished)
    ckpt = point.checkpoint

    # Everything that can fail on user input happens before the run directory is touched.
    tokenizer = load_tokenizer(cfg.model)
    train_examples, train_stats, eval_sets = prepare_data(cfg, tokenizer)
    model = load_model(cfg.model, tokenizer, seed=t.seed).to(accelerator.device)  # methods compute on it before prepare()
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length ({cfg.data.max_length}) exceeds the model's context ({context}); set data.max_length<={context}")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_ids = {id(p) for p in model.parameters()}  # what methods add (adapters, experts) is saved in checkpoints
    methods = build_methods(cfg.methods)
    ctx = Context(cfg, tokenizer, Encoder(tokenizer, cfg.data), accelerator, None, train_examples, t.seed,
                  resume_state=ckpt.methods if ckpt else None)
    for m in methods:
        model = m.wrap_model(model, ctx)
    sources = [Source("task", train_examples, 1.0)]
    for m in methods:
        sources += m.extra_sources(ctx)
    extra_share = sum(s.weight for s in sources[1:])
    if extra_share >= 1:
        raise ConfigError(f"methods: mixed-in data takes {extra_share:.0%} of every batch, leaving nothing for the task; lower the ratios")
    sources[0].weight = 1.0 - extra_share
    trainable, total_params = count_parameters(model)
    if trainable == 0:
        raise ConfigError("no trainable parameters: the configuration froze the whole model")
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
    total_steps = t.max_steps or batches.steps_for_epochs(t.epochs)
    fingerprint = data_fingerprint(sources)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if ckpt:
        if ckpt.trainer["data"] != fingerprint or ckpt.trainer["total_steps"] != total_steps:
            raise UserError(f"{ckpt.path}: the training data differs from the checkpoint's (a data file changed since?); resuming would not be exact, start a new run")
        restore_model(model, ckpt.tensors("model.safetensors"), ckpt.path)
        restore_optimizer(optimizer, model, ckpt.tensors("optimizer.safetensors"), ckpt.json("optimizer.json"), ckpt.path)
        restore_scheduler(scheduler, ckpt.trainer["scheduler"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if ckpt and ckpt.trainer.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt.trainer["scaler"])
    metrics_file = None
    if main:
        remove_leftovers(run_dir, newer_than=ckpt.step if ckpt else -1)
        if ckpt is None:
            _save_run_config(cfg, run_dir)
        metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        # A resumed run's metrics go on from the checkpoint: what was logged after it is logged again.
        metrics_file.truncate(min(ckpt.trainer["metrics_bytes"], metrics_file.tell()) if ckpt else 0)
    if trackers:
        accelerator.init_trackers(out.wandb_project if "wandb" in trackers else "tensorboard", config=_flat(redact_secrets(to_dict(cfg))))

    def log(record: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if trackers:
            flat = {k: v for k, v in _flat(record).items() if isinstance(v, (int, float)) and k != "step"}
            accelerator.log(flat, step=record["step"])

    roles = {s.name: s.role for s in eval_sets}
    if ckpt:
        state = ckpt.trainer
        before, first_step, tokens_seen, source_counts = state["before"], ckpt.step, state["tokens_seen"], state["source_counts"]
        last_loss = float("nan") if state["last_loss"] is None else state["last_loss"]
        elapsed_before, in_a_row, skipped = state["train_time_s"], state["nonfinite_in_a_row"], state["skipped_steps"]
    else:
        before = evaluate_sets(model, tokenizer, eval_sets, cfg, accelerator, "before") if cfg.eval.before else {}
        if before:
            log({"step": 0, "eval": before})
            fault("eval")
        first_step, tokens_seen, source_counts, last_loss = 0, 0, [0] * len(sources), float("nan")
        elapsed_before, in_a_row, skipped = 0.0, 0, 0

    writer = CheckpointWriter(run_dir, accelerator, out.keep_last, base_ids)

    def checkpoint(step: int) -> Path:
        if metrics_file:
            os.fsync(metrics_file.fileno())  # the checkpoint must not promise records the disk lost
        state = trainer_state(
            total_steps=total_steps, global_batch=global_batch, data=fingerprint, tokens_seen=tokens_seen,
            source_counts=source_counts, last_loss=last_loss, train_time_s=elapsed_before + time.perf_counter() - started,
            nonfinite_in_a_row=in_a_row, skipped_steps=skipped, metrics_bytes=metrics_file.tell() if metrics_file else None,
            before=before,
        )
        try:
            return writer.save(step, model, optimizer, scheduler, methods, state)
        except UserError:
            if metrics_file:
                metrics_file.close()
            raise

    if ckpt:  # last: nothing in the setup above may draw from the restored random streams
        restore_rng(*ckpt.rng(accelerator.process_index))
    model.train()
    started = time.perf_counter()
    window_tokens, window_start = 0, started
    with TrainProgress(total_steps, enabled=out.progress and main) as progress:
        say = (progress.note if progress.enabled else console.print) if main else (lambda message: None)
        if first_step:
            progress.update(first_step, last_loss, scheduler.get_last_lr()[0], 0.0)
        for step in range(first_step, total_steps):
            pairs = batches.batch(step)
            for j, _ in pairs:
                source_counts[j] += 1
            mine = batches.examples(shard(pairs, accelerator.process_index, world))
            micro = micro_batches(mine, t.micro_batch_size, tokenizer.pad_token_id)
            local_targets = sum(count_targets(b["labels"]) for b in micro)
            global_targets = int(_reduce_sum(accelerator, torch.tensor([local_targets], dtype=torch.float64)).item())
            sums = forward_backward(model, micro, accelerator, scale=world / max(global_targets, 1), methods=methods)
            step_terms = sums.pop("step_terms")
            grad_norm = _grad_norm(model, accelerator, t.max_grad_norm)
            # One reduction: every process's summed terms, and whether any process saw a non-finite gradient.
            flag = torch.tensor(0.0 if math.isfinite(grad_norm) else 1.0, dtype=torch.float64)
            reduced = _reduce_sum(accelerator, torch.stack([*sums.values(), flag])).tolist()
            totals = dict(zip(sums, reduced))
            bad_loss = not all(math.isfinite(v) for v in [*totals.values(), *step_terms.values()])
            problem = "non-finite loss" if bad_loss else ("non-finite grad" if reduced[-1] > 0 else None)
            if problem is None or accelerator.scaler is not None:
                optimizer.step()
                if accelerator.scaler is not None and not bad_loss:  # fp16: the loss scaler skips overflowing steps itself
                    problem = "non-finite grad" if optimizer.step_was_skipped else None
            scheduler.step()  # also on a skipped step: the schedule, like the data, follows the step number
            optimizer.zero_grad(set_to_none=True)

            step_tokens = int(_reduce_sum(accelerator, torch.tensor([sum(int(b["attention_mask"].sum()) for b in micro)], dtype=torch.float64)).item())
            tokens_seen += step_tokens
            window_tokens += step_tokens
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            lr = scheduler.get_last_lr()[0]
            if problem:
                in_a_row, skipped = in_a_row + 1, skipped + 1
                log({"step": step + 1, "skipped": problem})
                say(f"step {step + 1}: {problem}; the update was skipped ({in_a_row} in a row)")
                if t.max_nonfinite_steps is not None and in_a_row >= t.max_nonfinite_steps:
                    saved = checkpoint(step + 1)
                    if metrics_file:
                        metrics_file.close()
                    raise UserError(
                        f"training stopped at step {step + 1}: the loss or gradient was non-finite (NaN/inf) at {in_a_row} steps "
                        f"in a row (steps {step + 2 - in_a_row}-{step + 1}), whose updates were skipped; checkpoint {saved.name} "
                        f"holds the last finite weights. Try a lower train.lr, check the training data around those steps, or "
                        f"train in bf16/float32 instead of fp16; to go on anyway, --resume with a higher train.max_nonfinite_steps"
                    )
            else:
                in_a_row = 0
                means = {k: v / max(global_targets, 1) for k, v in totals.items()}
                last_loss = means.pop("lm")
                progress.update(step + 1, last_loss, lr, tps)
                if (step + 1) % out.log_every == 0 or step + 1 == total_steps:
                    record = {
                        "step": step + 1,
                        "epoch": round(batches.epoch_at(step + 1), 4),
                        "loss": last_loss,
                        "lr": lr,
                        "target_tokens": global_targets,
                        "tokens_per_s": round(tps, 1),
                        "elapsed_s": round(elapsed_before + now - started, 3),
                        "grad_norm": grad_norm,
                    }
                    terms = {**means, **step_terms}
                    if terms:
                        record["terms"] = terms
                        record["total_loss"] = last_loss + sum(terms.values())
                    log(record)
                    window_tokens, window_start = 0, now
            fault("step")
            if cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 and step + 1 < total_steps:
                log({"step": step + 1, "eval": evaluate_sets(model, tokenizer, eval_sets, cfg, accelerator, f"step {step + 1}")})
                fault("eval")
                window_start = time.perf_counter()
            if out.checkpoint_every and ((step + 1) % out.checkpoint_every == 0 or step + 1 == total_steps):
                checkpoint(step + 1)
                window_start = time.perf_counter()
    train_time = elapsed_before + time.perf_counter() - started

    unwrapped = accelerator.unwrap_model(model)
    for m in methods:
        m.after_train(unwrapped, ctx)
    after = evaluate_sets(model, tokenizer, eval_sets, cfg, accelerator, "after")
    log({"step": total_steps, "eval": after})
    fault("eval")
    train_info = {
        "steps": total_steps,
        "global_batch": global_batch,
        "processes": world,
        "tokens": tokens_seen,
        "final_loss": last_loss,
        "skipped_steps": skipped,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total_params,
        "methods": {m.name: m.describe() for m in methods},
    }
    drawn = sum(source_counts)
    data_info = {
        "train": vars(train_stats),
        "mix": {s.name: {"requested": round(w, 4), "observed": round(c / max(drawn, 1), 4)} for s, w, c in zip(sources, batches.shares, source_counts)},
        **{s.name: {"role": s.role, "examples": len(s.examples), "metric": s.metric, "higher_is_better": s.higher_is_better} for s in eval_sets},
    }
    if main:
        if cfg.output.save_model:
            save_model(unwrapped, tokenizer, run_dir / "model", cfg)
        write_summary(run_dir, before, after, roles, train_info, data_info)  # summary.json last: the run is finished
        metrics_file.close()
        if not out.keep_checkpoints:
            remove_checkpoints(run_dir)
    accelerator.wait_for_everyone()
    return RunResult(run_dir, before, after, roles, train_info, data_info, model=unwrapped, tokenizer=tokenizer)


def _grad_norm(model, accelerator, max_norm) -> float:
    """The global gradient norm (inf or nan when a gradient is), clipped to ``max_norm`` when set."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """config.yaml describes the run, not how it was started: saved with output.resume off, atomically."""
    saved = copy.copy(cfg)
    saved.output = dataclasses.replace(cfg.output, resume=False)
    tmp = run_dir / ".tmp-config.yaml"
    save_config(saved, tmp)
    os.replace(tmp, run_dir / "config.yaml")


def _finished_result(run_dir: Path, summary: dict) -> RunResult:
    """The result of a run that has already finished, from its summary.json (no model loaded)."""
    roles = {row["set"]: row["role"] for row in summary.get("sets", [])}
    return RunResult(run_dir, summary.get("before", {}), summary.get("after", {}), roles, summary.get("train", {}), summary.get("data", {}))


def forward_backward(model, micro_batches: list[dict], accelerator, scale: float, methods: list = ()) -> dict:
    """Accumulate the gradients of one optimiser step.

    ``scale`` is ``world_size / global_target_tokens``: each micro-batch's *summed* token loss
    (and every method's batch term, also a sum over target tokens) is scaled by it, so the
    accumulated, DDP-averaged gradient is that of the token-mean loss over the whole global batch.
    Step terms (penalties on the weights) are added once, with the last micro-batch; every process
    adds the same value, so DDP's average keeps it at weight 1. Gradients are synchronised across
    processes only on the last micro-batch.

    Returns this process's sums: ``{"lm": ..., <batch term>: ..., "step_terms": {name: value}}``.
    """
    sums: dict = {"lm": torch.zeros((), dtype=torch.float64)}
    step_values: dict[str, float] = {}
    plain = accelerator.unwrap_model(model)  # what methods see: the model without DDP's wrapper
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum, _ = token_cross_entropy(logits, b["labels"])
            total = loss_sum
            sums["lm"] += loss_sum.detach().double().cpu()
            for m in methods:
                for name, value in m.batch_terms(plain, b, logits).items():
                    total = total + value
                    sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64)) + value.detach().double().cpu()
            total = total * scale
            if last:
                for m in methods:
                    for name, value in m.step_terms(plain).items():
                        total = total + value
                        step_values[name] = float(value.detach())
            accelerator.backward(total)
    sums["step_terms"] = step_values
    return sums


def _reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), "sum").cpu()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out

