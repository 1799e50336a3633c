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

Initialisations (``init``), cheap ones that protect what the base knows (all through PEFT's
``init_lora_weights``):

- ``default``: ``A`` random (Kaiming), ``B = 0``: the adapter adds nothing at step 0.
- ``pissa``: ``B A`` starts as the top-``r`` singular part of ``W`` (``W = U S V^T``:
  ``B = U_r S_r^½``, ``A = S_r^½ V_r^T``, each divided by ``√s``), and the frozen base becomes the
  residual ``W_res = W − s·B A`` (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular
  Vectors Adaptation", arXiv 2404.02948). ``init_niter: N`` takes a randomized SVD of ``N``
  subspace iterations instead of the full one (PEFT's ``pissa_niter_N``), seeded by the run.
- ``corda``: the SVD of ``W C`` with ``C`` the covariance of the layer's inputs on sample data
  (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation", arXiv 2406.05223).
  ``corda_mode: kpm`` (knowledge-preserved) builds ``C`` from the data to protect (``corda_data``,
  default the run's first ``data.keep`` set) and trains the *smallest* ``r`` components, so the
  directions that data uses stay in the frozen residual; ``ipm`` (instruction-previewed) builds it
  from the task's data (default the training data) and trains the largest, which learns faster and
  protects nothing. The model runs over ``corda_samples`` examples, one per forward (PEFT's
  ``preprocess_corda``).
- ``orthonormal``: ``B A`` starts as the first ``r`` columns / rows of ``W = Q R`` (PEFT's "olora"
  init; Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation", arXiv 2406.01775). Named so
  here because forgetless's ``olora`` is another method (O-LoRA).

The last three move part of ``W`` into the adapter (``W = W_res + s·B₀A₀``), which has three
consequences handled here and in forgetless/models/saving.py:

1. the model still starts at the base's outputs, up to float rounding of ``W − s·B₀A₀ + s·B₀A₀``
   (about 1e-7 relative in float32; in bfloat16 the residual is rounded to bfloat16);
2. the saved ``model/`` is a plain LoRA of rank ``2r`` on the *original* base: PEFT's conversion
   (``path_initial_model_for_weight_conversion``) writes ``A' = [A; A₀]``, ``B' = [B, −B₀]``, so
   ``W + s·B'A' = W_res + s·B A``. The initial adapter ``(A₀, B₀)`` is kept for it on the model
   (:data:`forgetless.models.saving.INITIAL_ADAPTER`, on the CPU: ``r·(d_in + d_out)`` numbers per
   layer); ``forgetless merge``, ``eval`` and interpolation then read an ordinary LoRA run;
3. "adapters off" is the residual, not the base: methods.kl takes a frozen copy as its teacher
   (:func:`moves_base`).

Resume is exact without saving the residual: the init is a function of the base weights, the
data and the seed, so a resumed run computes the same ``W_res`` and ``(A₀, B₀)`` again before the
checkpoint's trained ``A, B`` are loaded. PEFT's conversion keeps only ``lora_A`` / ``lora_B``, so
these inits refuse DoRA, trained biases and ``modules_to_save``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from forgetless.config import DatasetSpec, option
from forgetless.errors import ConfigError, UserError
from forgetless.methods.base import Context, Method
from forgetless.registry import register, ADAPT, ADAPTER, FREEZES_BASE, STARTS_AT_BASE
from forgetless.models.adapters import ADAPTER_KINDS, check_target_modules, is_peft_model, peft_targets, wrap_peft, wrapped_target_names
from forgetless.models.saving import INITIAL_ADAPTER

# forgetless's names of the inits that move part of W into the adapter -> PEFT's init_lora_weights
MOVING_INITS = {"pissa": "pissa", "corda": "corda", "orthonormal": "olora"}


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
    init: Literal["default", "pissa", "corda", "orthonormal"] = option(
        "default",
        "'default': B = 0 (the adapter adds nothing at first); 'pissa': BA = the top-r singular part of W, the rest frozen; "
        "'corda': BA from the SVD of W times the input covariance on sample data (see corda_mode); 'orthonormal': BA from "
        "W's QR (PEFT's OLoRA init). pissa / corda / orthonormal leave the residual W - BA frozen and save a rank-2r LoRA "
        "on the original base.",
    )
    init_niter: Optional[int] = option(
        None, "pissa only: a randomized SVD with this many subspace iterations (4-16 typical; fast on big models) instead of the full SVD."
    )
    corda_mode: Literal["kpm", "ipm"] = option(
        "kpm",
        "corda only. 'kpm' (knowledge-preserved): the covariance of the data to protect, and the r smallest components train; "
        "'ipm' (instruction-previewed): the covariance of the task's data, and the r largest train (faster, protects nothing).",
    )
    corda_data: Optional[DatasetSpec] = option(
        None, "corda only: the data whose covariance is taken; default: the first data.keep set (kpm) or the training data (ipm)."
    )
    corda_samples: int = option(256, "corda only: examples of corda_data run through the model (one per forward; a seeded sample).")

    def validate(self, where: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{where}.r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        check_target_modules(self.target_modules, where)
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"{where}.layers: block indices must be >= 0, got {self.layers}")
        if self.init_niter is not None and (self.init != "pissa" or self.init_niter < 0):
            raise ConfigError(f"{where}.init_niter ({self.init_niter}) needs init: pissa and a value >= 0; remove it for a full SVD")
        if self.corda_samples < 1:
            raise ConfigError(f"{where}.corda_samples must be at least 1, got {self.corda_samples}")
        if self.corda_data is not None:
            if self.init != "corda":
                raise ConfigError(f"{where}.corda_data is only read with init: corda (init is {self.init!r})")
            self.corda_data.validate(f"{where}.corda_data")
        if self.init in MOVING_INITS:
            # PEFT's conversion to a plain LoRA (at save) carries lora_A / lora_B only, and a DoRA magnitude does not convert.
            if self.variant == "dora":
                raise ConfigError(f"{where}.init: {self.init} cannot be combined with variant: dora (the saved adapter must convert to a plain LoRA)")
            if self.bias != "none" or self.modules_to_save:
                raise ConfigError(f"{where}.init: {self.init} needs bias: none and no modules_to_save (PEFT's conversion of the saved "
                                  f"adapter keeps only the low-rank factors)")


def moves_base(model) -> bool:
    """Whether the model is a PEFT LoRA whose init moved part of the base weights into the adapter
    (PiSSA, CorDA, OLoRA): with adapters off it computes the residual, not the base."""
    if not is_peft_model(model):
        return False
    init = getattr(model.peft_config[model.active_adapter], "init_lora_weights", True)
    return isinstance(init, str) and (init in MOVING_INITS.values() or init.startswith("pissa_niter_"))


def peft_init(cfg: LoraConfig):
    """PEFT's ``init_lora_weights`` for the options."""
    if cfg.init == "default":
        return True
    if cfg.init == "pissa" and cfg.init_niter is not None:
        return f"pissa_niter_{cfg.init_niter}"
    return MOVING_INITS[cfg.init]


def corda_examples(cfg: LoraConfig, ctx: Optional[Context]) -> tuple[list, str]:
    """The examples CorDA takes its covariance from (a seeded sample of ``corda_samples``), and their name."""
    where = "methods.lora.corda_data"
    if ctx is None:
        raise ConfigError("methods.lora.init: corda runs the model over data; it needs the run's context")
    if cfg.corda_data is not None:
        examples, name = ctx.load_dataset(cfg.corda_data), cfg.corda_data.path
    elif cfg.corda_mode == "kpm":
        if ctx.keep is None:
            raise ConfigError(f"methods.lora.corda_mode: kpm protects the knowledge of some data; add a data.keep set or give {where}")
        examples, name = ctx.load_dataset(ctx.keep), ctx.keep.path
    else:
        examples, name = ctx.train_examples, "train"
    if not len(examples):
        raise UserError(f"{where}: {name} has no usable examples")
    n = min(cfg.corda_samples, len(examples))
    picked = sorted(random.Random(ctx.seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked], name


def corda_covariance(model, peft_cfg, examples) -> None:
    """PEFT's ``preprocess_corda``: hooks on the target layers sum each input's covariance while
    the model runs over ``examples``, one at a time (its hook takes one sequence per forward)."""
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    device = next(model.parameters()).device
    was_training = model.training

    def run_model():
        for e in examples:
            model(input_ids=torch.tensor([list(e.input_ids)], device=device))

    try:
        # preprocess_corda matches target names itself: expand 'all-linear' the way get_peft_model will.
        preprocess_corda(model, _maybe_include_all_linear_layers(peft_cfg, model), run_model=run_model)
    finally:
        model.train(was_training)


class Lora(Method):
    name = "lora"

    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.facts: dict = {}

    def wrap_model(self, model, ctx: Context):
        from peft import get_peft_model_state_dict
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora.config import CordaConfig

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
        init = peft_init(cfg)
        peft_cfg = PeftLoraConfig(
            task_type="CAUSAL_LM",
            init_lora_weights=init,
            corda_config=CordaConfig(corda_method=cfg.corda_mode) if cfg.init == "corda" else None,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=peft_targets(cfg.target_modules),
            use_dora=cfg.variant == "dora",
            use_rslora=cfg.variant == "rslora",
            bias=cfg.bias,
            modules_to_save=list(cfg.modules_to_save) or None,
            layers_to_transform=list(cfg.layers) or None,
        )
        init_facts = {}
        if cfg.init == "corda":
            examples, name = corda_examples(cfg, ctx)
            corda_covariance(model, peft_cfg, examples)
            init_facts = {"corda_mode": cfg.corda_mode, "corda_data": name, "corda_samples": len(examples)}
        if getattr(model, "is_loaded_in_4bit", False):  # QLoRA (model.load_in_4bit): PEFT's k-bit preparation first
            from peft import prepare_model_for_kbit_training

            # gradient checkpointing stays as train.gradient_checkpointing set it (the recipe's, non-reentrant)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = wrap_peft(model, peft_cfg, "methods.lora")
        if cfg.init in MOVING_INITS:
            # (A0, B0), for the conversion to a plain LoRA on the original base at save (forgetless/models/saving.py).
            initial = get_peft_model_state_dict(model)
            setattr(model, INITIAL_ADAPTER, {k: v.detach().to("cpu", copy=True) for k, v in initial.items()})
        self.facts = {
            "variant": cfg.variant,
            "init": cfg.init if cfg.init_niter is None else f"pissa (randomized SVD, {cfg.init_niter} iterations)",
            **init_facts,
            "r": cfg.r,
            "alpha": cfg.alpha,
            "target_modules": wrapped_target_names(model),
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
    "LoRA / DoRA / rsLoRA adapters through PEFT (default, PiSSA, CorDA or OLoRA init): train a low-rank update, keep the base weights frozen.",
    phase=ADAPT,
    provides={
        ADAPTER: "a run saves one kind of adapter, and stacking PEFT and other adapters is not supported; use one, or "
        "train LoRA, merge it (forgetless merge) and train the other adapters on the merged model",
        FREEZES_BASE: "LoRA freezes every base weight itself (PEFT trains only the adapter), so freeze's choice would be "
        "silently overridden; pick blocks with methods.lora.layers, or train whole modules with methods.lora.modules_to_save",
        STARTS_AT_BASE: "",
    },
    prefix=("lora_", "modules_to_save"),
    backends=("single", "ddp", "fsdp2", "zero2", "zero3", "qlora"),  # QLoRA: the adapter on a 4-bit base
)
