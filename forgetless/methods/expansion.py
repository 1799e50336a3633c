"""Dynamic expansion: new LoRA experts for each task, next to the frozen experts of earlier tasks.

A run loads the experts (and router rows) of an earlier moe_lora / expansion run (``previous``),
freezes them, and adds ``new_experts`` fresh experts with their own router rows; only those train
(and, with ``train_router``, every router row). Inference needs no task id: the router weighs the
experts of every task per token. Without ``previous`` the run starts from the new experts alone.

Gates. The earlier run's routed experts keep their top-k softmax (methods.moe_lora); an expert
``e`` added later is gated by its router probability against itself and every earlier expert::

    y = W x + Σ_{e ∈ topk(routed)} g_e(x) s B_e A_e x + Σ_{e added} γ_e(x) s B_e A_e x,
    γ_e(x) = exp(l_e(x)) / Σ_{j ≤ e} exp(l_j(x)),     s = alpha / r,  l = R x.

Since ``B`` of a new expert starts at zero and no earlier gate depends on a later router row, the
model starts *exactly* equal to the earlier run's, and the earlier experts are bit-identical
after training; inside ``adapters_disabled`` (methods.kl's reference model) only the new experts
switch off, which gives exactly that earlier model. The new router rows learn from the new task only (the old data is not at hand),
so how well they keep a new expert off the old tasks' inputs depends on how different those
inputs look: on prompts that share one template the gates barely differ between tasks, and what
protects the old tasks is mostly that their experts are frozen.

Expert expansion with frozen old experts and gate rows follows Lifelong-MoE (Chen et al., ICML
2023, "Lifelong Language Pretraining with Distribution-Specialized Experts"), which re-normalises
one top-k over old and new experts; that changes the old outputs the moment an expert is added,
which the gate above avoids.

The experts are methods.moe_lora's (same layer, same saved adapter kind ``moe_lora``), so a run's
``model/`` folder is both loadable (forgetless.models.loading.load_model) and the ``previous``
of the next task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, KEEPS_BASE
from forgetless.methods.moe_lora import (
    DEFAULT_TARGETS,
    EXPERTS,
    KIND,
    attach_experts,
    check_lora_options,
    check_plain_model,
    expert_layers,
    find_linear_targets,
    load_experts,
    read_adapter,
)

WHERE = "methods.expansion"


@dataclass
class ExpansionConfig:
    """New LoRA experts for this task; the earlier tasks' experts stay frozen."""

    previous: Optional[str] = option(
        None,
        "Run directory of an earlier moe_lora / expansion run (or its model/ folder, a saved moe_lora adapter) "
        "whose experts are kept, frozen. Unset: start from the new experts alone (or from the experts of a "
        "model.name_or_path that is such a run).",
        path=True,
    )
    new_experts: int = option(1, "Experts added and trained for this task.")
    train_router: bool = option(False, "Also train the earlier experts' router rows (their experts stay frozen).")
    r: Optional[int] = option(None, "Rank of the new experts; default: the earlier experts' rank (must match), or 8.")
    alpha: Optional[float] = option(None, "Scaling numerator (alpha / r); default: the earlier experts' (must match), or 16.")
    top_k: Optional[int] = option(
        None, "Without earlier experts: experts each token uses among the new ones (default 2, at most new_experts). "
        "With them, their top_k stays."
    )
    dropout: float = option(0.0, "Dropout on the experts' input, in [0, 1).")
    target_modules: Optional[list[str]] = option(
        None, "Linear layers that get experts (PEFT's suffix rule); default: the earlier experts' layers, or the "
        "attention and MLP projections."
    )

    def validate(self, where: str) -> None:
        if self.new_experts < 1:
            raise ConfigError(f"{where}.new_experts must be at least 1, got {self.new_experts}")
        for key in ("r", "top_k"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {getattr(self, key)}")
        check_lora_options(self, where)
        if self.previous is not None and not self.previous.strip():
            raise ConfigError(f"{where}.previous is empty; give the run directory of an earlier moe_lora / expansion run, or leave it unset")


class Expansion(Method):
    name = "expansion"

    def __init__(self, cfg: ExpansionConfig):
        self.cfg = cfg
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        cfg = self.cfg
        check_plain_model(model, WHERE, own=KIND)
        layers = expert_layers(model)
        if layers and cfg.previous:
            raise ConfigError(f"{WHERE}.previous: the model (model.name_or_path) already carries experts; give its base model, or leave previous unset")
        if cfg.previous:
            settings, tensors = read_adapter(cfg.previous, KIND, f"{WHERE}.previous")
            self._check_same(settings, model)
            layers = load_experts(model, settings, tensors, cfg.dropout, where=f"{WHERE}.previous")
        earlier = next(iter(layers.values())).num_experts if layers else 0
        if layers:
            first = next(iter(layers.values()))
            if (cfg.r or first.r) != first.r or (cfg.alpha or first.alpha) != first.alpha:
                raise ConfigError(f"{WHERE}: r and alpha must match the earlier experts' (r={first.r}, alpha={first.alpha}); leave them unset")
            for layer in layers.values():
                layer.add(cfg.new_experts, routed=False)
        else:
            names = find_linear_targets(model, cfg.target_modules or DEFAULT_TARGETS, f"{WHERE}.target_modules")
            top_k = min(cfg.top_k or 2, cfg.new_experts)
            layers = attach_experts(model, names, cfg.r or 8, cfg.alpha or 16.0, top_k, cfg.dropout)
            for layer in layers.values():
                layer.add(cfg.new_experts)
        for name, p in model.named_parameters():
            if EXPERTS not in name:
                p.requires_grad_(False)
        for layer in layers.values():
            last = len(layer.A) - 1
            for i in range(last + 1):
                layer.A[i].requires_grad_(i == last)
                layer.B[i].requires_grad_(i == last)
                layer.router[i].requires_grad_(i == last or cfg.train_router)
        self.facts = {
            "earlier_experts": earlier,
            "new_experts": cfg.new_experts,
            "layers": len(layers),
            "train_router": cfg.train_router,
            "trainable_params": sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad),
        }
        return model

    def _check_same(self, settings: dict, model) -> None:
        """Options given together with ``previous`` must agree with the earlier experts'."""
        cfg = self.cfg
        if cfg.top_k is not None and cfg.top_k != settings["top_k"]:
            raise ConfigError(f"{WHERE}.top_k: the earlier experts route top {settings['top_k']}; leave top_k unset with previous")
        if cfg.target_modules is not None:
            names = find_linear_targets(model, cfg.target_modules, f"{WHERE}.target_modules")
            if sorted(names) != sorted(settings["modules"]):
                raise ConfigError(f"{WHERE}.target_modules must name the earlier experts' layers; leave it unset with previous")

    @classmethod
    def next_task(cls, options: ExpansionConfig, link) -> ExpansionConfig:
        """Every task starts from the base model; the previous run's experts are loaded frozen next to new ones."""
        if link.previous is not None:
            options.previous = str(link.previous)
        return options

    def describe(self) -> dict:
        return dict(self.facts)


register(
    "expansion",
    ExpansionConfig,
    Expansion,
    "Dynamic expansion: new LoRA experts per task next to the frozen experts of earlier runs; the router picks, no task id.",
    phase=ADAPT,
    provides={
        ADAPTER: "",
        FREEZES_BASE: "expansion freezes every base weight itself (only the new experts train)",
        KEEPS_BASE: "",
    },
    prefix="moe_lora_experts",
)
