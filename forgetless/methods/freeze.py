"""Partial fine-tuning: train only chosen blocks or modules, freeze the rest.

Blocks are chosen by position (first / last N, index ranges) or by importance: each block is
scored by how much what the model must keep depends on it (the mean diagonal Fisher information,
or the mean squared gradient, of the loss on old / general data), and only the N *least*
important blocks are trained. Modules are chosen by regular expressions on parameter names
(``self_attn``, ``mlp``, ``norm``, ``embed_tokens``, ``lm_head``...).

Rule: trainable = (selected blocks, or every parameter when no block is selected)
∩ (parameters matching ``train_modules``, when given) ∪ ``also_train`` − ``freeze_modules``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from forgetless.config import DatasetSpec, option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, SELECT, SELECTS_WEIGHTS, STARTS_AT_BASE


IMPORTANCE_FILE = "freeze_importance.json"

@dataclass
class FreezeConfig:
    """Which parts of the model train; everything else is frozen."""

    train_last_n: Optional[int] = option(None, "Train the last N transformer blocks.")
    train_first_n: Optional[int] = option(None, "Train the first N transformer blocks.")
    train_blocks: Optional[str] = option(None, "Train these block indices, e.g. '0-3,7' (ranges inclusive).")
    by_importance: Optional[int] = option(
        None, f"Train the N blocks least important to the importance data (scores saved to {IMPORTANCE_FILE})."
    )
    importance_data: Optional[DatasetSpec] = option(
        None, "Old-task or general data to score block importance on (default: the first data.keep set)."
    )
    importance_metric: Literal["fisher", "grad_norm"] = option(
        "fisher",
        "'fisher': mean squared per-example gradient (diagonal empirical Fisher) per parameter; "
        "'grad_norm': squared norm of the mean gradient per parameter.",
    )
    importance_samples: int = option(64, "Examples of importance_data used for the scores.")
    train_modules: list[str] = option(factory=list, help="Regexes on parameter names; only matching parameters train.")
    also_train: list[str] = option(factory=list, help="Regexes of parameters that always train (e.g. 'lm_head', 'norm').")
    freeze_modules: list[str] = option(factory=list, help="Regexes of parameters that never train.")

    def validate(self, where: str) -> None:
        for key in ("train_last_n", "train_first_n", "by_importance"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {v}")
        if self.train_blocks is not None:
            parse_ranges(self.train_blocks, f"{where}.train_blocks")
        for key in ("train_modules", "also_train", "freeze_modules"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"{where}.{key}: {pattern!r} is not a valid regular expression ({e})") from None
        if self.importance_samples < 1:
            raise ConfigError(f"{where}.importance_samples must be at least 1")
        if not any([self.train_last_n, self.train_first_n, self.train_blocks, self.by_importance, self.train_modules, self.also_train, self.freeze_modules]):
            raise ConfigError(f"{where}: says nothing to freeze; set train_last_n, train_blocks, by_importance, train_modules, ...")


def parse_ranges(text: str, where: str) -> list[int]:
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"{where}: {text!r} is not a list of indices or ranges like '0-3,7'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ConfigError(f"{where}: range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def find_blocks(model) -> tuple[str, int]:
    """The qualified name and length of the model's list of transformer blocks."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            if best is None or len(name) < len(best[0]):
                best = (name, len(module))
    if best is None:
        raise ConfigError("methods.freeze: could not find the model's transformer blocks (a ModuleList of num_hidden_layers)")
    return best


def block_of(param_name: str, prefix: str) -> Optional[int]:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", param_name)
    return int(m.group(1)) if m else None


class Freeze(Method):
    name = "freeze"

    def __init__(self, cfg: FreezeConfig):
        self.cfg = cfg
        self.scores: Optional[list[float]] = None
        self.trained_blocks: Optional[list[int]] = None

    def wrap_model(self, model, ctx: Context):
        cfg = self.cfg
        prefix, n_blocks = find_blocks(model)
        blocks: set[int] = set()
        if cfg.train_last_n:
            blocks |= set(range(max(0, n_blocks - cfg.train_last_n), n_blocks))
        if cfg.train_first_n:
            blocks |= set(range(min(cfg.train_first_n, n_blocks)))
        if cfg.train_blocks:
            chosen = parse_ranges(cfg.train_blocks, "methods.freeze.train_blocks")
            if chosen[-1] >= n_blocks:
                raise ConfigError(f"methods.freeze.train_blocks: block {chosen[-1]} does not exist; the model has blocks 0-{n_blocks - 1}")
            blocks |= set(chosen)
        if cfg.by_importance:
            state = ctx.restored(self.name)  # resuming: the scores the run chose its blocks by
            self.scores = state["scores"] if state is not None else block_importance(model, ctx, prefix, n_blocks, cfg)
            order = sorted(range(n_blocks), key=lambda i: self.scores[i])
            blocks |= set(order[: cfg.by_importance])
        select_blocks = bool(cfg.train_last_n or cfg.train_first_n or cfg.train_blocks or cfg.by_importance)
        self.trained_blocks = sorted(blocks) if select_blocks else None
        train_re = [re.compile(p) for p in cfg.train_modules]
        also_re = [re.compile(p) for p in cfg.also_train]
        freeze_re = [re.compile(p) for p in cfg.freeze_modules]
        for name, p in model.named_parameters():
            keep = True
            if select_blocks:
                keep = block_of(name, prefix) in blocks
            if train_re:
                keep = keep and any(r.search(name) for r in train_re)
            if any(r.search(name) for r in also_re):
                keep = True
            if any(r.search(name) for r in freeze_re):
                keep = False
            p.requires_grad_(keep)
        return model

    def after_train(self, model, ctx: Context) -> None:
        if self.scores is not None:
            record = {"metric": self.cfg.importance_metric, "scores": self.scores, "trained_blocks": self.trained_blocks}
            ctx.save_artifact(IMPORTANCE_FILE, lambda path: path.write_text(json.dumps(record, indent=2)))

    def state_dict(self) -> dict:
        return {"scores": self.scores, "trained_blocks": self.trained_blocks}

    def load_state_dict(self, state: dict) -> None:
        self.scores, self.trained_blocks = state["scores"], state["trained_blocks"]

    def describe(self) -> dict:
        out = {}
        if self.trained_blocks is not None:
            out["trained_blocks"] = self.trained_blocks
        if self.scores is not None:
            out["block_importance"] = [round(s, 8) for s in self.scores]
        return out


def block_importance(model, ctx: Context, prefix: str, n_blocks: int, cfg: FreezeConfig) -> list[float]:
    """Mean per-parameter importance of each block on the importance data."""
    from forgetless.data.batching import collate
    from forgetless.loss import forward as lm_forward

    spec = cfg.importance_data
    if spec is None:
        if ctx.keep is None:
            raise ConfigError("methods.freeze.by_importance needs importance_data, or a data.keep set to score blocks on")
        spec = ctx.keep
    examples = ctx.load_dataset(spec)[: cfg.importance_samples]
    params = {n: p for n, p in model.named_parameters() if block_of(n, prefix) is not None}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for p in params.values():
        p.requires_grad_(True)
    per_example = cfg.importance_metric == "fisher"
    groups = [[e] for e in examples] if per_example else [examples[i : i + 8] for i in range(0, len(examples), 8)]
    for group in groups:
        b = collate(group, ctx.tokenizer.pad_token_id)
        model.zero_grad(set_to_none=True)
        out = lm_forward(model, b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device))
        loss_sum, correct = out.token_loss(b["labels"].to(ctx.device))
        (loss_sum / max(correct.numel(), 1)).backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.float() ** 2 if per_example else p.grad.float()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    totals, counts = [0.0] * n_blocks, [0] * n_blocks
    for n, s in sums.items():
        i = block_of(n, prefix)
        value = s / len(groups) if per_example else (s / len(groups)) ** 2
        totals[i] += float(value.sum())
        counts[i] += s.numel()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


register("freeze", FreezeConfig, Freeze, "Partial fine-tuning: train only chosen blocks or modules (by position, name or importance).",
         phase=SELECT, provides={SELECTS_WEIGHTS: "", STARTS_AT_BASE: ""}, backends=("single", "ddp", "fsdp2", "zero2", "zero3"))
