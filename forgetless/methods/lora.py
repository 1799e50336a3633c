"""LoRA: train a low-rank update of chosen weight matrices; the base weights stay frozen.

Each adapted linear layer computes ``h = W x + (alpha / r) · B A x`` with ``A ∈ R^{r×k}``,
``B ∈ R^{d×r}`` trainable and ``W`` frozen (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv 2106.09685). ``B`` starts at zero, so the adapted model starts exactly
equal to the base. Variants:

- ``rslora``: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``, which keeps the update's size
  stable as ``r`` grows (Kalajdzievski, 2023, arXiv 2312.03732);
- ``dora``: ``W' = m · (W + s·BA) / ||W + s·BA||_c``, a trainable magnitude ``m`` per output
  column and a LoRA update of the direction (Liu et al., 2024, "DoRA", arXiv 2402.09353).

Why it forgets less: the update has rank ``r`` and touches no base weight ("LoRA Learns Less and
Forgets Less", Biderman et al., 2024, arXiv 2405.09673). Everything is PEFT's (``LoraConfig`` +
``get_peft_model``); this module only maps forgetless options onto it. The run's ``model/``
folder is a PEFT adapter directory (see forgetless/models/saving.py); ``forgetless merge`` folds
the update into the base weights (forgetless/models/merge.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from forgetless.config import option
from forgetless.errors import ConfigError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, STARTS_AT_BASE
from forgetless.models.adapters import ADAPTER_KINDS, is_peft_model


@dataclass
class LoraConfig:
    """Low-rank adapters (through PEFT) on the model's linear layers."""

    r: int = option(8, "Rank of each update BA.")
    alpha: float = option(16.0, "Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) for rslora).")
    dropout: float = option(0.0, "Dropout on the adapter's input, in [0, 1).")
    target_modules: list[str] = option(
        factory=lambda: ["all-linear"],
        help="Linear layers to adapt, by name (e.g. [q_proj, v_proj]); 'all-linear' = every linear layer "
        "except the output head.",
    )
    variant: Literal["lora", "dora", "rslora"] = option(
        "lora", "'lora'; 'dora' (weight-decomposed: trainable magnitude + low-rank direction); 'rslora' (alpha/sqrt(r) scaling)."
    )
    bias: Literal["none", "all", "lora_only"] = option(
        "none", "Which biases train: 'none' keeps the base bit-identical; 'all' / 'lora_only' train (and save) biases too."
    )
    modules_to_save: list[str] = option(
        factory=list, help="Modules trained in full and saved with the adapter (e.g. [lm_head]); they change the base's outputs."
    )
    layers: list[int] = option(factory=list, help="Adapt only these transformer blocks (indices); empty = all blocks.")

    def validate(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty; give layer names like [q_proj, v_proj] or 'all-linear'")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(f"{where}.target_modules: 'all-linear' cannot be combined with names; give one or the other")
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"{where}.layers: block indices must be >= 0, got {self.layers}")


class Lora(Method):
    name = "lora"

    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from forgetless.methods.freeze import find_blocks

        cfg = self.cfg
        if any(kind.detect(model) for kind in ADAPTER_KINDS.values()):
            raise ConfigError("methods.lora: the model carries forgetless adapters (it was loaded from a bottleneck run); train it with that method, or start from its base model")
        if is_peft_model(model):
            # A previous LoRA run as the starting point: fold its adapter in and learn a fresh one;
            # the run then saves the merged base beside its adapter (forgetless/models/saving.py).
            model = model.merge_and_unload()
        if cfg.layers:
            _, n_blocks = find_blocks(model)
            if max(cfg.layers) >= n_blocks:
                raise ConfigError(f"methods.lora.layers: block {max(cfg.layers)} does not exist; the model has blocks 0-{n_blocks - 1}")
        peft_cfg = PeftLoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules="all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules),
            use_dora=cfg.variant == "dora",
            use_rslora=cfg.variant == "rslora",
            bias=cfg.bias,
            modules_to_save=list(cfg.modules_to_save) or None,
            layers_to_transform=list(cfg.layers) or None,
        )
        try:
            model = get_peft_model(model, peft_cfg)
        except ValueError as e:
            first = str(e).strip().splitlines()[0][:200]
            raise ConfigError(f"methods.lora.target_modules: {first}; check the names against the model's linear layers") from None
        targets = model.peft_config["default"].target_modules
        self.facts = {
            "variant": cfg.variant,
            "r": cfg.r,
            "alpha": cfg.alpha,
            # PEFT expands 'all-linear' into qualified names; the distinct layer names read better.
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        if cfg.layers:
            self.facts["layers"] = sorted(cfg.layers)
        return model

    def describe(self) -> dict:
        return dict(self.facts)


register(
    "lora",
    LoraConfig,
    Lora,
    "LoRA / DoRA / rsLoRA adapters through PEFT: train a low-rank update, keep the base weights frozen.",
    phase=ADAPT,
    provides={
        ADAPTER: "a run saves one kind of adapter, and stacking PEFT and other adapters is not supported; use one, or "
        "train LoRA, merge it (forgetless merge) and train the other adapters on the merged model",
        FREEZES_BASE: "LoRA freezes every base weight itself (PEFT trains only the adapter), so freeze's choice would be "
        "silently overridden; pick blocks with methods.lora.layers, or train whole modules with methods.lora.modules_to_save",
        STARTS_AT_BASE: "",
    },
    prefix=("lora_", "modules_to_save"),
)
